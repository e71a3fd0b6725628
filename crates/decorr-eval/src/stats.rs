//! [`ActivationStats`], the mean and covariance of Inception activations: what FID
//! ([`crate::fid`]) computes from images and compares, and what `.npz` statistics files
//! ([`crate::npz`]) hold. A module of its own so that both use it without depending on each
//! other.

use nalgebra::DMatrix;

use crate::EvalError;

/// Mean and covariance of activations: what FID compares and what `--save-stats` stores.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationStats {
    /// Mean activation, length d.
    pub mu: Vec<f64>,
    /// Covariance (`np.cov(act, rowvar=False)`, divisor n - 1), d x d row-major.
    pub sigma: Vec<f64>,
}

impl ActivationStats {
    pub fn dim(&self) -> usize {
        self.mu.len()
    }

    /// `np.mean(act, axis=0)` and `np.cov(act, rowvar=False)` of `features`, row-major
    /// `n x dim` (f32 features widened to f64, as pytorch-fid's float64 `pred_arr`).
    pub fn from_features(features: &[f32], dim: usize) -> Result<Self, EvalError> {
        if dim == 0 || !features.len().is_multiple_of(dim) {
            return Err(EvalError::Input(format!(
                "{} feature values do not form rows of {dim}",
                features.len()
            )));
        }
        let n = features.len() / dim;
        if n < 2 {
            return Err(EvalError::Input(format!(
                "FID statistics need at least 2 images (the covariance of {n} is undefined)"
            )));
        }
        let mut mu = vec![0.0f64; dim];
        for row in features.chunks_exact(dim) {
            for (m, &v) in mu.iter_mut().zip(row) {
                *m += v as f64;
            }
        }
        for m in &mut mu {
            *m /= n as f64;
        }
        let centered = DMatrix::from_fn(n, dim, |i, j| features[i * dim + j] as f64 - mu[j]);
        // An explicit transpose makes this a blocked GEMM (`tr_mul` is per-entry dot products).
        let cov = centered.transpose() * &centered / (n as f64 - 1.0);
        // Symmetric: column-major storage equals row-major.
        Ok(Self {
            mu,
            sigma: cov.as_slice().to_vec(),
        })
    }

    /// Refuses statistics that [`crate::fid::frechet_distance`] cannot compare: a covariance of
    /// the wrong size, or non-finite values.
    pub(crate) fn check(&self, what: &str) -> Result<(), EvalError> {
        let d = self.dim();
        if self.sigma.len() != d * d {
            return Err(EvalError::Input(format!(
                "{what}: sigma has {} values, a {d}x{d} covariance needs {}",
                self.sigma.len(),
                d * d
            )));
        }
        if self.mu.iter().chain(&self.sigma).any(|v| !v.is_finite()) {
            return Err(EvalError::Input(format!(
                "{what}: the statistics contain NaN or infinite values"
            )));
        }
        Ok(())
    }
}
