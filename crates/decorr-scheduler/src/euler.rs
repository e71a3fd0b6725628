//! Euler (`EulerDiscreteScheduler`, Karras et al. 2022 algorithm 2 without churn): a first-order
//! ODE step in sigma space. Its timesteps are fractional in general (`linspace` spacing and Karras
//! sigmas map between integer training timesteps).
//!
//! Also holds what Euler ancestral shares with it: the sigma-space timestep layouts
//! ([`sigma_timesteps`]), the interpolated sigmas, and the x₀ prediction.

use burn::tensor::Tensor;

use crate::config::{FinalSigmasType, PredictionType, ResolvedConfig, TimestepSpacing};
use crate::schedule::{
    NoiseSchedule, exponential_sigmas, karras_sigmas, log_sigmas, np_arange, np_interp_grid,
    np_linspace, np_round, sigma_to_t,
};
use crate::{Scheduler, SchedulerError, SchedulerKind, check_step, check_steps, unsupported};

const KIND: SchedulerKind = SchedulerKind::Euler;

/// `EulerDiscreteScheduler` after `set_timesteps(n)`.
#[derive(Debug, Clone)]
pub struct EulerDiscrete {
    /// n + 1 sigmas (float32), the last one 0 or σ_min.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
}

/// The timesteps of Euler and Euler ancestral's `set_timesteps` (float32, descending).
pub(crate) fn sigma_timesteps(cfg: &ResolvedConfig, n: usize) -> Vec<f32> {
    let t = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| v as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / n;
            (0..n)
                .rev()
                .map(|k| (k * ratio) as f32 + cfg.steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / n as f64))
            .into_iter()
            .map(|v| np_round(v) as f32 - 1.0)
            .collect(),
    }
}

/// `np.interp(timesteps, arange(T), train_sigmas)` in float64.
pub(crate) fn interp_sigmas(timesteps: &[f32], train_sigmas: &[f32]) -> Vec<f64> {
    let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
    timesteps
        .iter()
        .map(|&t| np_interp_grid(t as f64, &fp))
        .collect()
}

/// diffusers' `init_noise_sigma` for sigma schedulers: σ_max, or √(σ_max² + 1) with `leading`
/// spacing (float32 arithmetic, as on the torch tensor).
pub(crate) fn init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

/// The model input: `sample / √(σ² + 1)`.
pub(crate) fn scale_by_sigma(sample: Tensor<4>, sigma: f32) -> Tensor<4> {
    sample.div_scalar((sigma * sigma + 1.0).sqrt())
}

/// x₀ predicted from the model output at noise level `sigma` (diffusers' Euler formulas).
pub(crate) fn predict_x0(
    prediction_type: PredictionType,
    model_output: Tensor<4>,
    sample: &Tensor<4>,
    sigma: f32,
) -> Tensor<4> {
    match prediction_type {
        PredictionType::Epsilon => sample.clone() - model_output.mul_scalar(sigma),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            model_output.mul_scalar(-sigma / s2.sqrt()) + sample.clone().div_scalar(s2)
        }
        PredictionType::Sample => model_output,
    }
}

impl EulerDiscrete {
    pub fn new(cfg: &ResolvedConfig, num_inference_steps: usize) -> Result<Self, SchedulerError> {
        let n = num_inference_steps;
        check_steps(cfg, n)?;
        if cfg.interpolation_type != "linear" {
            return Err(unsupported(
                KIND,
                format!(
                    "interpolation_type `{}` (only `linear`)",
                    cfg.interpolation_type
                ),
            ));
        }
        if cfg.timestep_type != "discrete" && cfg.prediction_type == PredictionType::VPrediction {
            return Err(unsupported(
                KIND,
                format!("timestep_type `{}` with v_prediction", cfg.timestep_type),
            ));
        }
        if cfg.use_beta_sigmas {
            return Err(unsupported(KIND, "beta sigmas (`use_beta_sigmas`)"));
        }
        if cfg.use_karras_sigmas && cfg.use_exponential_sigmas {
            return Err(SchedulerError::Config(
                "only one of use_karras_sigmas and use_exponential_sigmas can be set".into(),
            ));
        }
        let schedule = NoiseSchedule::new(cfg, true)?;
        let train_sigmas = schedule.train_sigmas();
        let timesteps32 = sigma_timesteps(cfg, n);
        let mut sigmas = interp_sigmas(&timesteps32, &train_sigmas);
        let mut timesteps: Vec<f64> = timesteps32.iter().map(|&t| t as f64).collect();
        if cfg.use_karras_sigmas || cfg.use_exponential_sigmas {
            let lo = cfg.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = cfg.sigma_max.unwrap_or(sigmas[0]);
            sigmas = if cfg.use_karras_sigmas {
                karras_sigmas(lo, hi, n)
            } else {
                exponential_sigmas(lo, hi, n)
            };
            let logs = log_sigmas(&train_sigmas);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &logs) as f32 as f64)
                .collect();
        }
        let last = match cfg.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => {
                let a0 = schedule.alphas_cumprod[0];
                ((1.0 - a0) / a0).sqrt() as f64
            }
        };
        let sigmas: Vec<f32> = sigmas
            .into_iter()
            .chain(std::iter::once(last))
            .map(|s| s as f32)
            .collect();
        Ok(EulerDiscrete {
            init_noise_sigma: init_noise_sigma(&sigmas, cfg.timestep_spacing),
            sigmas,
            timesteps,
            prediction_type: cfg.prediction_type,
        })
    }
}

impl Scheduler for EulerDiscrete {
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
        // s_churn = 0 (diffusers' default): γ = 0 and σ̂ = σ.
        let sigma = self.sigmas[i];
        let pred_x0 = predict_x0(self.prediction_type, model_output, &sample, sigma);
        let derivative = (sample.clone() - pred_x0).div_scalar(sigma);
        let dt = self.sigmas[i + 1] - sigma;
        Ok(sample + derivative.mul_scalar(dt))
    }
}
