//! DDIM (`DDIMScheduler`, Song et al. 2020): deterministic with η = 0, stochastic with η > 0.
//!
//! The per-step scalars are computed in float32 in the same order as diffusers' 0-dim torch
//! tensors, so outputs agree with the reference to float32 rounding.

use burn::tensor::Tensor;

use crate::config::{PredictionType, ResolvedConfig, TimestepSpacing};
use crate::schedule::{NoiseSchedule, np_arange, np_linspace, np_round};
use crate::{
    Scheduler, SchedulerError, SchedulerKind, check_step, check_steps, require_noise, unsupported,
};

const KIND: SchedulerKind = SchedulerKind::Ddim;

/// `DDIMScheduler` after `set_timesteps(n)`.
#[derive(Debug, Clone)]
pub struct Ddim {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// The integer timesteps, and the same as f64 for [`Scheduler::timesteps`].
    timesteps_int: Vec<i64>,
    timesteps: Vec<f64>,
    /// `num_train_timesteps // num_inference_steps`: diffusers' distance to the previous timestep,
    /// whatever the spacing.
    step_ratio: i64,
    prediction_type: PredictionType,
    clip_sample: Option<f32>,
    eta: f32,
}

impl Ddim {
    pub fn new(
        cfg: &ResolvedConfig,
        num_inference_steps: usize,
        eta: f64,
    ) -> Result<Self, SchedulerError> {
        check_steps(cfg, num_inference_steps)?;
        if cfg.thresholding {
            return Err(unsupported(
                KIND,
                "dynamic thresholding (`thresholding: true`)",
            ));
        }
        let schedule = NoiseSchedule::new(cfg, false)?;
        let alphas_cumprod = schedule.alphas_cumprod;
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let timesteps_int = ddim_timesteps(cfg, num_inference_steps);
        if let Some(&bad) = timesteps_int
            .iter()
            .find(|&&t| py_index(&alphas_cumprod, t).is_none())
        {
            return Err(SchedulerError::Config(format!(
                "timestep {bad} is outside the {} training timesteps (steps_offset {} with \
                 {num_inference_steps} steps); lower steps_offset",
                cfg.num_train_timesteps, cfg.steps_offset
            )));
        }
        Ok(Ddim {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
            step_ratio: (cfg.num_train_timesteps / num_inference_steps) as i64,
            prediction_type: cfg.prediction_type,
            clip_sample: cfg.clip_sample.then_some(cfg.clip_sample_range as f32),
            eta: eta as f32,
        })
    }

    /// `alphas_cumprod` of the training schedule (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}

/// `values[t]` with Python's negative indexing. diffusers' `trailing` spacing can produce timestep
/// -1 (61 steps of 1000: `np.arange` yields one value too many), which torch then reads as the last
/// entry; reproducing that keeps the schedule identical to the reference.
pub(crate) fn py_index(values: &[f32], t: i64) -> Option<f32> {
    let len = values.len() as i64;
    let idx = if t < 0 { t + len } else { t };
    (0..len).contains(&idx).then(|| values[idx as usize])
}

/// DDIM's `set_timesteps` (descending integers).
pub(crate) fn ddim_timesteps(cfg: &ResolvedConfig, n: usize) -> Vec<i64> {
    let t = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| np_round(v) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / n;
            (0..n)
                .rev()
                .map(|k| (k * ratio) as i64 + cfg.steps_offset)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / n as f64))
            .into_iter()
            .map(|v| np_round(v) as i64 - 1)
            .collect(),
    }
}

impl Scheduler for Ddim {
    fn kind(&self) -> SchedulerKind {
        KIND
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn needs_noise(&self) -> bool {
        self.eta > 0.0
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        noise: Option<Tensor<4>>,
    ) -> Result<Tensor<4>, SchedulerError> {
        check_step(i, self.timesteps_int.len(), &model_output, &sample)?;
        let noise = if self.needs_noise() {
            Some(require_noise(KIND, i, noise, &sample)?)
        } else {
            None
        };
        let t = self.timesteps_int[i];
        let prev_t = t - self.step_ratio;
        let a_t = py_index(&self.alphas_cumprod, t).expect("checked in new");
        let a_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;

        let (mut pred_x0, pred_eps) = match self.prediction_type {
            PredictionType::Epsilon => (
                (sample.clone() - model_output.clone().mul_scalar(b_t.sqrt()))
                    .div_scalar(a_t.sqrt()),
                model_output,
            ),
            PredictionType::Sample => {
                let eps =
                    (sample - model_output.clone().mul_scalar(a_t.sqrt())).div_scalar(b_t.sqrt());
                (model_output, eps)
            }
            PredictionType::VPrediction => (
                sample.clone().mul_scalar(a_t.sqrt()) - model_output.clone().mul_scalar(b_t.sqrt()),
                model_output.mul_scalar(a_t.sqrt()) + sample.mul_scalar(b_t.sqrt()),
            ),
        };
        if let Some(range) = self.clip_sample {
            pred_x0 = pred_x0.clamp(-range, range);
        }

        // diffusers' `_get_variance`, then σ_t = η √variance.
        let b_prev = 1.0 - a_prev;
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std_dev_t = self.eta * variance.sqrt();
        let direction = pred_eps.mul_scalar((1.0 - a_prev - std_dev_t * std_dev_t).sqrt());
        let mut prev = pred_x0.mul_scalar(a_prev.sqrt()) + direction;
        if let Some(noise) = noise {
            prev = prev + noise.mul_scalar(std_dev_t);
        }
        Ok(prev)
    }
}
