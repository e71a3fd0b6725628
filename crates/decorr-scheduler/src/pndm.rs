//! PNDM (`PNDMScheduler`, Liu et al. 2022): pseudo linear multistep (PLMS) with an optional
//! Runge-Kutta (PRK) warm-up.
//!
//! Stable Diffusion 1.x sets `skip_prk_steps`: then `timesteps` repeats its second entry
//! (981, 961, 961, 941, …, 1 for 50 steps: 51 UNet calls) because the first PLMS step is a
//! two-evaluation Heun-like step. diffusers tracks progress with an internal counter rather than the
//! timestep it is given; here the counter is the step index, so steps must run in order.

use burn::tensor::Tensor;

use crate::config::{PredictionType, ResolvedConfig, TimestepSpacing};
use crate::ddim::py_index;
use crate::schedule::{NoiseSchedule, np_arange, np_linspace, np_round};
use crate::{
    Scheduler, SchedulerError, SchedulerKind, check_step, check_steps, starts_run, unsupported,
};

const KIND: SchedulerKind = SchedulerKind::Pndm;

/// `PNDMScheduler` after `set_timesteps(n)`, with its multistep state.
#[derive(Debug, Clone)]
pub struct Pndm {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps_int: Vec<i64>,
    timesteps: Vec<f64>,
    /// How many of the leading timesteps are Runge-Kutta steps (0 with `skip_prk_steps`).
    num_prk: usize,
    /// `num_train_timesteps // num_inference_steps`.
    step_ratio: i64,
    prediction_type: PredictionType,
    // diffusers' state: `counter`, `ets`, `cur_sample`, `cur_model_output`.
    counter: usize,
    ets: Vec<Tensor<4>>,
    cur_sample: Option<Tensor<4>>,
    cur_model_output: Option<Tensor<4>>,
}

impl Pndm {
    pub fn new(cfg: &ResolvedConfig, num_inference_steps: usize) -> Result<Self, SchedulerError> {
        let n = num_inference_steps;
        check_steps(cfg, n)?;
        if cfg.prediction_type == PredictionType::Sample {
            return Err(unsupported(
                KIND,
                "prediction_type `sample` (diffusers' PNDM takes epsilon or v_prediction)",
            ));
        }
        if !cfg.skip_prk_steps && n < 4 {
            return Err(SchedulerError::Config(format!(
                "PNDM's Runge-Kutta warm-up needs at least 4 inference steps, got {n} (or set \
                 skip_prk_steps)"
            )));
        }
        let schedule = NoiseSchedule::new(cfg, false)?;
        let alphas_cumprod = schedule.alphas_cumprod;
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let t = cfg.num_train_timesteps;
        // `_timesteps`, ascending.
        let base: Vec<i64> = match cfg.timestep_spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
                .into_iter()
                .map(|v| np_round(v) as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = t / n;
                (0..n)
                    .map(|k| (k * ratio) as i64 + cfg.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / n as f64))
                .into_iter()
                .rev()
                .map(|v| np_round(v) as i64 - 1)
                .collect(),
        };
        let len = base.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if cfg.skip_prk_steps {
            // concat(_ts[:-1], _ts[-2:-1], _ts[-1:])[::-1] (Python slices: one entry for n = 1)
            let mut plms: Vec<i64> = base[..len - 1].to_vec();
            if len >= 2 {
                plms.push(base[len - 2]);
            }
            plms.push(base[len - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            // _ts[-4:].repeat(2) + tile([0, ratio // 2], 4), then [:-1].repeat(2)[1:-1][::-1]
            let half = (t / n / 2) as i64;
            let pairs: Vec<i64> = base[len - 4..]
                .iter()
                .flat_map(|&v| [v, v + half])
                .collect();
            let doubled: Vec<i64> = pairs[..pairs.len() - 1]
                .iter()
                .flat_map(|&v| [v, v])
                .collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..len - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let num_prk = prk.len();
        let timesteps_int: Vec<i64> = prk.into_iter().chain(plms).collect();
        Ok(Pndm {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
            num_prk,
            step_ratio: (t / n) as i64,
            prediction_type: cfg.prediction_type,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    /// `alphas_cumprod[t]` with Python's negative indexing (see [`crate::ddim::py_index`]).
    fn alpha(&self, t: i64) -> Result<f32, SchedulerError> {
        py_index(&self.alphas_cumprod, t).ok_or_else(|| {
            SchedulerError::Config(format!(
                "PNDM reached timestep {t}, outside the {} training timesteps; check steps_offset \
                 and timestep_spacing",
                self.alphas_cumprod.len()
            ))
        })
    }

    /// diffusers' `_get_prev_sample` (formula (9) of the PNDM paper).
    fn prev_sample(
        &self,
        sample: Tensor<4>,
        timestep: i64,
        prev_timestep: i64,
        model_output: Tensor<4>,
    ) -> Result<Tensor<4>, SchedulerError> {
        let a_t = self.alpha(timestep)?;
        let a_prev = if prev_timestep >= 0 {
            self.alpha(prev_timestep)?
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let model_output = match self.prediction_type {
            PredictionType::VPrediction => {
                model_output.mul_scalar(a_t.sqrt()) + sample.clone().mul_scalar(b_t.sqrt())
            }
            _ => model_output,
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        Ok(sample.mul_scalar(sample_coeff)
            - model_output.mul_scalar(a_prev - a_t).div_scalar(denom))
    }

    fn step_prk(
        &mut self,
        model_output: Tensor<4>,
        timestep: i64,
        sample: Tensor<4>,
    ) -> Result<Tensor<4>, SchedulerError> {
        let c = self.counter;
        let diff_to_prev = if c % 2 == 1 { 0 } else { self.step_ratio / 2 };
        let prev_timestep = timestep - diff_to_prev;
        let timestep = self.timesteps_int[c / 4 * 4];
        let sixth = (1.0f64 / 6.0) as f32;
        let third = (1.0f64 / 3.0) as f32;
        let add = |acc: Option<Tensor<4>>, t: Tensor<4>| match acc {
            Some(a) => a + t,
            None => t,
        };
        let model_output = match c % 4 {
            0 => {
                let acc = self.cur_model_output.take();
                self.cur_model_output = Some(add(acc, model_output.clone().mul_scalar(sixth)));
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output
            }
            1 | 2 => {
                let acc = self.cur_model_output.take();
                self.cur_model_output = Some(add(acc, model_output.clone().mul_scalar(third)));
                model_output
            }
            _ => {
                let acc = self.cur_model_output.take();
                add(acc, model_output.mul_scalar(sixth))
            }
        };
        let cur_sample = self.cur_sample.clone().unwrap_or(sample);
        let prev = self.prev_sample(cur_sample, timestep, prev_timestep, model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(
        &mut self,
        model_output: Tensor<4>,
        timestep: i64,
        sample: Tensor<4>,
    ) -> Result<Tensor<4>, SchedulerError> {
        let mut timestep = timestep;
        let mut prev_timestep = timestep - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_timestep = timestep;
            timestep += self.step_ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let mut sample = sample;
        let model_output = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output
        } else if k == 1 && self.counter == 1 {
            sample = self.cur_sample.take().unwrap_or(sample);
            (model_output + e[0].clone()).div_scalar(2.0f32)
        } else if k == 2 {
            (e[1].clone().mul_scalar(3.0f32) - e[0].clone()).div_scalar(2.0f32)
        } else if k == 3 {
            (e[2].clone().mul_scalar(23.0f32) - e[1].clone().mul_scalar(16.0f32)
                + e[0].clone().mul_scalar(5.0f32))
            .div_scalar(12.0f32)
        } else {
            (e[k - 1].clone().mul_scalar(55.0f32) - e[k - 2].clone().mul_scalar(59.0f32)
                + e[k - 3].clone().mul_scalar(37.0f32)
                - e[k - 4].clone().mul_scalar(9.0f32))
            .mul_scalar((1.0f64 / 24.0) as f32)
        };
        let prev = self.prev_sample(sample, timestep, prev_timestep, model_output)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Scheduler for Pndm {
    fn kind(&self) -> SchedulerKind {
        KIND
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        _noise: Option<Tensor<4>>,
    ) -> Result<Tensor<4>, SchedulerError> {
        check_step(i, self.timesteps_int.len(), &model_output, &sample)?;
        if starts_run(KIND, i, self.counter)? {
            self.counter = 0;
            self.ets.clear();
            self.cur_sample = None;
            self.cur_model_output = None;
        }
        let timestep = self.timesteps_int[i];
        if self.counter < self.num_prk {
            self.step_prk(model_output, timestep, sample)
        } else {
            self.step_plms(model_output, timestep, sample)
        }
    }
}
