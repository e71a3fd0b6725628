//! Euler ancestral (`EulerAncestralDiscreteScheduler`): an Euler step down to σ_down followed by
//! fresh noise of size σ_up, so every step needs a noise tensor (the caller draws it, which keeps
//! the random stream under the caller's control).

use burn::tensor::Tensor;

use crate::config::{PredictionType, ResolvedConfig};
use crate::euler::{init_noise_sigma, interp_sigmas, predict_x0, scale_by_sigma, sigma_timesteps};
use crate::schedule::NoiseSchedule;
use crate::{
    Scheduler, SchedulerError, SchedulerKind, check_step, check_steps, require_noise, unsupported,
};

const KIND: SchedulerKind = SchedulerKind::EulerAncestral;

/// `EulerAncestralDiscreteScheduler` after `set_timesteps(n)`.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    /// n + 1 sigmas (float32), the last one 0.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
}

impl EulerAncestral {
    pub fn new(cfg: &ResolvedConfig, num_inference_steps: usize) -> Result<Self, SchedulerError> {
        let n = num_inference_steps;
        check_steps(cfg, n)?;
        if cfg.prediction_type == PredictionType::Sample {
            return Err(unsupported(
                KIND,
                "prediction_type `sample` (not implemented in diffusers either)",
            ));
        }
        let schedule = NoiseSchedule::new(cfg, true)?;
        let timesteps32 = sigma_timesteps(cfg, n);
        let sigmas: Vec<f32> = interp_sigmas(&timesteps32, &schedule.train_sigmas())
            .into_iter()
            .chain(std::iter::once(0.0))
            .map(|s| s as f32)
            .collect();
        Ok(EulerAncestral {
            init_noise_sigma: init_noise_sigma(&sigmas, cfg.timestep_spacing),
            sigmas,
            timesteps: timesteps32.iter().map(|&t| t as f64).collect(),
            prediction_type: cfg.prediction_type,
        })
    }
}

impl Scheduler for EulerAncestral {
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

    fn needs_noise(&self) -> bool {
        true
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        noise: Option<Tensor<4>>,
    ) -> Result<Tensor<4>, SchedulerError> {
        check_step(i, self.timesteps.len(), &model_output, &sample)?;
        let noise = require_noise(KIND, i, noise, &sample)?;
        let sigma = self.sigmas[i];
        let pred_x0 = predict_x0(self.prediction_type, model_output, &sample, sigma);
        let (from, to) = (sigma, self.sigmas[i + 1]);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let derivative = (sample.clone() - pred_x0).div_scalar(sigma);
        let dt = sigma_down - sigma;
        let prev = sample + derivative.mul_scalar(dt);
        Ok(prev + noise.mul_scalar(sigma_up))
    }
}
