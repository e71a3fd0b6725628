//! The numerics every scheduler shares: training betas and `alphas_cumprod`, the NumPy/PyTorch
//! primitives diffusers builds its timesteps and sigmas with (`linspace`, `arange`, `interp`,
//! banker's rounding), Karras and exponential sigma ramps, and `_sigma_to_t`.
//!
//! Each function reproduces the dtype and the order of operations of the reference: diffusers keeps
//! betas, `alphas_cumprod` and the stored sigmas in float32 (torch), and builds timesteps and
//! interpolated sigmas in float64 (numpy). Matching these bit for bit is what lets the timesteps
//! agree exactly and the step outputs agree to float32 rounding.

use crate::SchedulerError;
use crate::config::{BetaSchedule, ResolvedConfig};

/// `torch.linspace(start, end, n, dtype=float32)` on CPU, bit for bit: the kernel fills the first
/// half forwards from `start` and the second half backwards from `end`, each value one fused
/// multiply-add (as PyTorch's AVX2/AVX-512 builds compile it).
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    match n {
        0 => return Vec::new(),
        1 => return vec![start],
        _ => {}
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `np.linspace(start, stop, n)` in float64: `i * step + start`, the last value exactly `stop`.
pub fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// `np.arange(start, stop, step)` for floats: `ceil((stop - start) / step)` values, filled as
/// `start + i * ((start + step) - start)` like NumPy's `DOUBLE_fill` (which is why 61 trailing
/// steps give 62 timesteps in diffusers).
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// NumPy's `round`: half to even.
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, arange(len(fp)), fp)`: linear interpolation on the integer grid 0..len.
pub fn np_interp_grid(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return f64::NAN;
    }
    if x >= last as f64 {
        return fp[last];
    }
    if x <= 0.0 {
        return fp[0];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// The training betas (float32), as each diffusers `__init__` builds them.
pub fn betas(cfg: &ResolvedConfig) -> Result<Vec<f32>, SchedulerError> {
    let n = cfg.num_train_timesteps;
    if n == 0 {
        return Err(SchedulerError::Config(
            "num_train_timesteps is 0; the scheduler config must give a positive count".into(),
        ));
    }
    if n > crate::config::MAX_TRAIN_TIMESTEPS {
        return Err(SchedulerError::Config(format!(
            "`num_train_timesteps` = {n} is out of range: allowed 1..={}",
            crate::config::MAX_TRAIN_TIMESTEPS
        )));
    }
    let betas = if let Some(trained) = &cfg.trained_betas {
        if trained.len() != n {
            return Err(SchedulerError::Config(format!(
                "trained_betas has {} values but num_train_timesteps is {n}; they must agree",
                trained.len()
            )));
        }
        trained.iter().map(|&b| b as f32).collect()
    } else {
        match cfg.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(cfg.beta_start.powf(0.5), cfg.beta_end.powf(0.5), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar_cosine(n),
        }
    };
    // Every beta in (0, 1): `alphas_cumprod` then stays finite, positive and decreasing (a beta
    // of 1 or more would make it zero or negative, and every sample NaN).
    if let Some((i, b)) = betas
        .iter()
        .enumerate()
        .find(|(_, b)| !(b.is_finite() && **b > 0.0 && **b < 1.0))
    {
        return Err(SchedulerError::Config(format!(
            "the training schedule's beta {i} is {b}: betas must be finite numbers in (0, 1); \
             check beta_start, beta_end, beta_schedule and trained_betas"
        )));
    }
    Ok(if cfg.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    })
}

/// diffusers' `betas_for_alpha_bar(n, max_beta=0.999, "cosine")`, computed in float64 and stored
/// as float32.
fn betas_for_alpha_bar_cosine(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod(1 - betas)`: float32 inputs, accumulated in float64 (PyTorch's CPU accumulate
/// type), each output rounded to float32.
pub fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, algorithm 1), in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut sqrt_ab: Vec<f32> = alphas_cumprod(betas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_ab[0];
    let last = sqrt_ab[sqrt_ab.len() - 1];
    let scale = first / (first - last);
    for v in &mut sqrt_ab {
        *v -= last;
        *v *= scale;
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    for w in ab.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// The training schedule a scheduler keeps: betas and their cumulative alpha product (float32).
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub betas: Vec<f32>,
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// `terminal_2_pow_24`: the sigma-based schedulers (Euler, DPM-Solver) set the last
    /// `alphas_cumprod` to 2⁻²⁴ after a zero-SNR rescale so that its sigma stays finite.
    pub fn new(cfg: &ResolvedConfig, terminal_2_pow_24: bool) -> Result<Self, SchedulerError> {
        let betas = betas(cfg)?;
        let mut alphas_cumprod = alphas_cumprod(&betas);
        if cfg.rescale_betas_zero_snr && terminal_2_pow_24 {
            *alphas_cumprod.last_mut().expect("non-empty") = 2f32.powi(-24);
        }
        Ok(NoiseSchedule {
            betas,
            alphas_cumprod,
        })
    }

    /// `((1 - ᾱ) / ᾱ) ** 0.5` per training timestep (float32, ascending in t).
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }
}

/// `np.log` of the float32 training sigmas. NumPy's float32 `log` is a vectorised approximation
/// that can differ from the correctly rounded value by one ulp; this uses the correctly rounded
/// one, which moves `_sigma_to_t` results by at most ~1e-4 of a timestep.
pub fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas
        .iter()
        .map(|&s| (s as f64).ln() as f32)
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma interpolates to
/// `sigma` (linear in log sigma between the two neighbouring training timesteps).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // np.cumsum(dists >= 0).argmax(): the first index where the count of `dist >= 0` peaks, i.e.
    // the last index with `dist >= 0` (0 when there is none).
    let mut count = 0usize;
    let mut best = 0usize;
    let mut low_idx = 0usize;
    for (j, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low_idx = j;
        }
    }
    let low_idx = low_idx.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx] as f64;
    let high = log_sigmas[high_idx] as f64;
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Karras et al. (2022) sigmas, ρ = 7, from `sigma_max` down to `sigma_min` (float64).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Exponentially spaced sigmas from `sigma_max` down to `sigma_min` (float64).
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_primitives() {
        assert_eq!(
            np_linspace(0.0, 999.0, 5)
                .into_iter()
                .map(np_round)
                .collect::<Vec<_>>(),
            vec![0.0, 250.0, 500.0, 749.0, 999.0]
        );
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(
            np_arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 7.0).len(), 7);
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_round(3.5), 4.0);
        let fp = [1.0, 3.0, 7.0];
        assert_eq!(np_interp_grid(0.5, &fp), 2.0);
        assert_eq!(np_interp_grid(1.0, &fp), 3.0);
        assert_eq!(np_interp_grid(5.0, &fp), 7.0);
        assert_eq!(np_interp_grid(-1.0, &fp), 1.0);
    }

    #[test]
    fn torch_linspace_edges() {
        let v = torch_linspace_f32(0.0001, 0.02, 1000);
        assert_eq!(v[0], 0.0001f32);
        assert_eq!(v[999], 0.02f32);
        assert_eq!(torch_linspace_f32(0.5, 1.0, 1), vec![0.5]);
    }

    #[test]
    fn sigma_to_t_inverts_the_grid() {
        let sigmas: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        let logs = log_sigmas(&sigmas);
        assert!((sigma_to_t(1.0, &logs) - 0.0).abs() < 1e-12);
        assert!((sigma_to_t(10.0, &logs) - 9.0).abs() < 1e-6);
        assert!(
            (sigma_to_t(0.5, &logs) - 0.0).abs() < 1e-12,
            "clamped below"
        );
        assert!(
            (sigma_to_t(20.0, &logs) - 9.0).abs() < 1e-12,
            "clamped above"
        );
        let mid = sigma_to_t((2.0f64 * 3.0).sqrt(), &logs);
        assert!((mid - 1.5).abs() < 1e-6, "{mid}");
    }
}
