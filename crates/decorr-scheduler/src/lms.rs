//! Linear multistep (`LMSDiscreteScheduler`, "k-LMS" of Karras et al. 2022 / k-diffusion): the
//! Euler ODE in sigma space, integrated with an Adams–Bashforth-type rule over the last `order`
//! derivatives (order 4, `step`'s default in diffusers, which every pipeline uses; the first steps
//! use 1, 2, 3 as the history fills).
//!
//! The sigmas, timesteps, `init_noise_sigma` and `scale_model_input` are Euler's (linear
//! interpolation of the training sigmas, `linspace`/`leading`/`trailing` spacing, Karras or
//! exponential sigmas, final sigma 0); see [`crate::euler`].
//!
//! # Coefficients
//!
//! diffusers' `get_lms_coefficient(order, i, j)` is
//! `scipy.integrate.quad(ℓ_j, σ_i, σ_{i+1}, epsrel=1e-4)`, where ℓ_j is the Lagrange basis
//! polynomial through the nodes σ_i, σ_{i-1}, …, σ_{i-order+1} that is 1 at σ_{i-j}. ℓ_j has degree
//! `order - 1` ≤ 3, and quad's first pass (21-point Gauss–Kronrod, with its embedded 10-point Gauss
//! rule exact to degree 19) integrates it exactly, so both estimates agree to round-off and quad
//! returns the exact integral up to the rounding of its integrand evaluations (which diffusers does
//! in float32, the sigmas being a float32 tensor). Here the polynomial is expanded in
//! u = τ − σ_i and integrated term by term in float64 ([`lms_coefficient`]), which equals quad's
//! result to that round-off (the fixtures record quad's values; they agree to ~1e-7 relative).

use std::collections::VecDeque;

use burn::tensor::Tensor;

use crate::config::{PredictionType, ResolvedConfig};
use crate::euler::{init_noise_sigma, interp_sigmas, predict_x0, scale_by_sigma, sigma_timesteps};
use crate::schedule::{NoiseSchedule, exponential_sigmas, karras_sigmas, log_sigmas, sigma_to_t};
use crate::{
    Scheduler, SchedulerError, SchedulerKind, check_step, check_steps, starts_run, unsupported,
};

const KIND: SchedulerKind = SchedulerKind::Lms;

/// `order` of diffusers' `LMSDiscreteScheduler.step` when not given (as in every pipeline).
pub const DEFAULT_ORDER: usize = 4;

/// `LMSDiscreteScheduler` after `set_timesteps(n)`, with its derivative history.
#[derive(Debug, Clone)]
pub struct LmsDiscrete {
    /// n + 1 sigmas (float32), the last one 0.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
    /// The maximum order (`step(..., order=)`).
    order: usize,
    /// The last `order` ODE derivatives, oldest first (`self.derivatives`).
    derivatives: VecDeque<Tensor<4>>,
    /// The next step index expected.
    next: usize,
}

/// `get_lms_coefficient(order, i, j)`: ∫ from σ_i to σ_{i+1} of the Lagrange basis polynomial
/// through σ_i, σ_{i-1}, …, σ_{i-order+1} that is 1 at σ_{i-j} (and 0 at the other nodes), computed
/// exactly in float64 (see the module docs). Needs `j < order <= i + 1` and `i + 1 < sigmas.len()`.
pub fn lms_coefficient(sigmas: &[f32], order: usize, i: usize, j: usize) -> f64 {
    assert!(
        j < order && order <= i + 1 && i + 1 < sigmas.len(),
        "lms_coefficient(order {order}, i {i}, j {j}) with {} sigmas",
        sigmas.len()
    );
    let node = |k: usize| sigmas[i - k] as f64;
    let origin = node(0);
    // ℓ_j(σ_i + u) = Π_{k≠j} (u − d_k) / Π_{k≠j} (σ_{i-j} − σ_{i-k}), d_k = σ_{i-k} − σ_i.
    // `poly[m]` is the coefficient of u^m of the numerator.
    let mut poly = vec![0.0f64; order];
    poly[0] = 1.0;
    let mut degree = 0;
    let mut denominator = 1.0f64;
    for k in (0..order).filter(|&k| k != j) {
        let d = node(k) - origin;
        // poly ← poly · (u − d)
        for m in (0..=degree).rev() {
            poly[m + 1] += poly[m];
            poly[m] *= -d;
        }
        degree += 1;
        denominator *= node(j) - node(k);
    }
    // ∫_0^h u^m du = h^{m+1} / (m + 1).
    let h = sigmas[i + 1] as f64 - origin;
    let mut h_pow = h;
    let mut integral = 0.0f64;
    for (m, &c) in poly.iter().enumerate().take(degree + 1) {
        integral += c * h_pow / (m + 1) as f64;
        h_pow *= h;
    }
    integral / denominator
}

impl LmsDiscrete {
    pub fn new(cfg: &ResolvedConfig, num_inference_steps: usize) -> Result<Self, SchedulerError> {
        let n = num_inference_steps;
        check_steps(cfg, n)?;
        let ramps = [
            cfg.use_karras_sigmas,
            cfg.use_exponential_sigmas,
            cfg.use_beta_sigmas,
        ];
        if ramps.iter().filter(|&&on| on).count() > 1 {
            return Err(SchedulerError::Config(
                "only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can be \
                 set"
                .into(),
            ));
        }
        if cfg.use_beta_sigmas {
            return Err(unsupported(KIND, "beta sigmas (`use_beta_sigmas`)"));
        }
        // LMS has no zero-SNR rescale: the schedule is the plain one ([`SchedulerConfig::resolve`]
        // turns `rescale_betas_zero_snr` off for it).
        let schedule = NoiseSchedule::new(cfg, false)?;
        let train_sigmas = schedule.train_sigmas();
        let timesteps32 = sigma_timesteps(cfg, n);
        let mut sigmas = interp_sigmas(&timesteps32, &train_sigmas);
        let mut timesteps: Vec<f64> = timesteps32.iter().map(|&t| t as f64).collect();
        if cfg.use_karras_sigmas || cfg.use_exponential_sigmas {
            let (first, last) = (sigmas[0], sigmas[sigmas.len() - 1]);
            sigmas = if cfg.use_karras_sigmas {
                // LMS's own `_convert_to_karras` ignores `sigma_min`/`sigma_max`.
                karras_sigmas(last, first, n)
            } else {
                // `_convert_to_exponential` (copied from Euler) reads them from the config.
                exponential_sigmas(
                    cfg.sigma_min.unwrap_or(last),
                    cfg.sigma_max.unwrap_or(first),
                    n,
                )
            };
            let logs = log_sigmas(&train_sigmas);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &logs) as f32 as f64)
                .collect();
        }
        let sigmas: Vec<f32> = sigmas
            .into_iter()
            .chain(std::iter::once(0.0))
            .map(|s| s as f32)
            .collect();
        Ok(LmsDiscrete {
            init_noise_sigma: init_noise_sigma(&sigmas, cfg.timestep_spacing),
            sigmas,
            timesteps,
            prediction_type: cfg.prediction_type,
            order: DEFAULT_ORDER,
            derivatives: VecDeque::with_capacity(DEFAULT_ORDER),
            next: 0,
        })
    }

    /// The same scheduler stepping with `step(..., order=order)` instead of the default 4 (order 1
    /// is Euler's step). Resets the history. `order` must be at least 1.
    pub fn with_order(mut self, order: usize) -> Result<Self, SchedulerError> {
        if order == 0 {
            return Err(SchedulerError::Config(
                "the LMS order must be at least 1".into(),
            ));
        }
        self.order = order;
        self.derivatives.clear();
        self.next = 0;
        Ok(self)
    }

    /// The maximum order of the multistep rule.
    pub fn order(&self) -> usize {
        self.order
    }

    /// The coefficients step `i` multiplies the derivatives by, newest first:
    /// `[get_lms_coefficient(order, i, j) for j in range(order)]` with `order = min(i + 1, order)`.
    /// Panics if `i >= timesteps().len()`.
    pub fn lms_coefficients(&self, i: usize) -> Vec<f64> {
        let order = (i + 1).min(self.order);
        (0..order)
            .map(|j| lms_coefficient(&self.sigmas, order, i, j))
            .collect()
    }
}

impl Scheduler for LmsDiscrete {
    fn kind(&self) -> SchedulerKind {
        KIND
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: Tensor<4>, i: usize) -> Tensor<4> {
        scale_by_sigma(sample, self.sigmas[i])
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        _noise: Option<Tensor<4>>,
    ) -> Result<Tensor<4>, SchedulerError> {
        check_step(i, self.timesteps.len(), &model_output, &sample)?;
        if starts_run(KIND, i, self.next)? {
            self.derivatives.clear();
        }
        let sigma = self.sigmas[i];
        let pred_x0 = predict_x0(self.prediction_type, model_output, &sample, sigma);
        let derivative = (sample.clone() - pred_x0).div_scalar(sigma);
        self.derivatives.push_back(derivative);
        if self.derivatives.len() > self.order {
            self.derivatives.pop_front();
        }
        // `sample + sum(coeff * d for coeff, d in zip(coeffs, reversed(derivatives)))`: the float64
        // coefficients multiply the float32 tensors as float32 scalars, summed newest first.
        let coeffs = self.lms_coefficients(i);
        let mut acc: Option<Tensor<4>> = None;
        for (c, d) in coeffs.iter().zip(self.derivatives.iter().rev()) {
            let term = d.clone().mul_scalar(*c as f32);
            acc = Some(match acc {
                None => term,
                Some(a) => a + term,
            });
        }
        self.next = i + 1;
        Ok(sample + acc.expect("at least one derivative"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Composite Simpson's rule, exact for cubics (a sanity check independent of the expansion).
    fn simpson(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
        let m = 0.5 * (a + b);
        (b - a) / 6.0 * (f(a) + 4.0 * f(m) + f(b))
    }

    #[test]
    fn coefficients_integrate_the_lagrange_basis() {
        let sigmas = [14.614647f32, 7.25, 3.5, 1.75, 0.8, 0.029167, 0.0];
        for i in 0..sigmas.len() - 1 {
            for order in 1..=(i + 1).min(4) {
                let mut total = 0.0;
                for j in 0..order {
                    let got = lms_coefficient(&sigmas, order, i, j);
                    let basis = |tau: f64| {
                        (0..order)
                            .filter(|&k| k != j)
                            .map(|k| {
                                (tau - sigmas[i - k] as f64)
                                    / (sigmas[i - j] as f64 - sigmas[i - k] as f64)
                            })
                            .product::<f64>()
                    };
                    let want = simpson(basis, sigmas[i] as f64, sigmas[i + 1] as f64);
                    assert!(
                        (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                        "i {i} order {order} j {j}: {got} vs {want}"
                    );
                    total += got;
                }
                // The basis polynomials sum to 1, so the coefficients sum to σ_{i+1} − σ_i.
                let h = sigmas[i + 1] as f64 - sigmas[i] as f64;
                assert!((total - h).abs() <= 1e-12 * h.abs(), "i {i} order {order}");
            }
        }
        // Order 1 is Euler's step.
        assert_eq!(
            lms_coefficient(&sigmas, 1, 2, 0),
            sigmas[3] as f64 - sigmas[2] as f64
        );
    }
}
