//! DPM-Solver++ multistep (`DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`,
//! Lu et al. 2022); `solver_order=2` is the popular "DPM++ 2M" (with Karras sigmas, "DPM++ 2M
//! Karras").
//!
//! The solver works on the data prediction x₀ and keeps the last `solver_order` of them; it starts
//! and (with `lower_order_final`, under 15 steps) ends at lower order. The per-step scalars (α_t,
//! σ_t, λ_t = log α_t − log σ_t, h) are float32 as in diffusers, where they are 0-dim torch tensors.

use burn::tensor::Tensor;

use crate::config::{
    BetaSchedule, FinalSigmasType, PredictionType, ResolvedConfig, TimestepSpacing,
};
use crate::schedule::{
    NoiseSchedule, exponential_sigmas, karras_sigmas, log_sigmas, np_arange, np_interp_grid,
    np_linspace, np_round, sigma_to_t,
};
use crate::{
    Scheduler, SchedulerError, SchedulerKind, check_step, check_steps, starts_run, unsupported,
};

const KIND: SchedulerKind = SchedulerKind::DpmSolverMultistep;

/// Which second/third-order update (`solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// `DPMSolverMultistepScheduler` (dpmsolver++) after `set_timesteps(n)`, with its history.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    /// n + 1 sigmas (float32), the last one 0 or σ_min.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    prediction_type: PredictionType,
    solver_order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigmas_zero: bool,
    /// The last `solver_order` x₀ predictions, oldest first (`model_outputs`).
    model_outputs: Vec<Option<Tensor<4>>>,
    lower_order_nums: usize,
    /// The next step index expected.
    next: usize,
}

/// (α_t, σ_t) of a sigma: α = 1/√(σ² + 1), σ_t = σ α.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α − log σ (+∞ at σ = 0).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverMultistep {
    pub fn new(cfg: &ResolvedConfig, num_inference_steps: usize) -> Result<Self, SchedulerError> {
        let n = num_inference_steps;
        check_steps(cfg, n)?;
        if cfg.algorithm_type != "dpmsolver++" {
            return Err(unsupported(
                KIND,
                format!(
                    "algorithm_type `{}` (only `dpmsolver++`)",
                    cfg.algorithm_type
                ),
            ));
        }
        let solver_type = match cfg.solver_type.as_str() {
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => {
                return Err(unsupported(
                    KIND,
                    format!("solver_type `{other}` (midpoint or heun)"),
                ));
            }
        };
        if !(1..=3).contains(&cfg.solver_order) {
            return Err(unsupported(
                KIND,
                format!("solver_order {} (1, 2 or 3)", cfg.solver_order),
            ));
        }
        if cfg.thresholding {
            return Err(unsupported(
                KIND,
                "dynamic thresholding (`thresholding: true`)",
            ));
        }
        if let Some(v) = &cfg.variance_type {
            return Err(unsupported(KIND, format!("variance_type `{v}`")));
        }
        for (on, what) in [
            (cfg.use_beta_sigmas, "beta sigmas (`use_beta_sigmas`)"),
            (cfg.use_lu_lambdas, "λ-uniform sigmas (`use_lu_lambdas`)"),
            (cfg.use_flow_sigmas, "flow sigmas (`use_flow_sigmas`)"),
        ] {
            if on {
                return Err(unsupported(KIND, what));
            }
        }
        if cfg.use_karras_sigmas && cfg.use_exponential_sigmas {
            return Err(SchedulerError::Config(
                "only one of use_karras_sigmas and use_exponential_sigmas can be set".into(),
            ));
        }
        let schedule = NoiseSchedule::new(cfg, true)?;
        let t_train = cfg.num_train_timesteps;

        // λ clipping: the number of training timesteps whose λ stays above lambda_min_clipped.
        let clipped_idx = if cfg.lambda_min_clipped == f64::NEG_INFINITY {
            0
        } else {
            let min = cfg.lambda_min_clipped as f32;
            let mut lambdas: Vec<f32> = schedule
                .alphas_cumprod
                .iter()
                .map(|&a| lambda(a.sqrt(), (1.0 - a).sqrt()))
                .collect();
            lambdas.reverse();
            lambdas.partition_point(|&l| l < min)
        };
        let last_timestep = t_train - clipped_idx;
        if last_timestep == 0 {
            return Err(SchedulerError::Config(format!(
                "lambda_min_clipped {} clips every training timestep",
                cfg.lambda_min_clipped
            )));
        }

        let mut timesteps: Vec<f64> = match cfg.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = np_linspace(0.0, (last_timestep - 1) as f64, n + 1)
                    .into_iter()
                    .map(np_round)
                    .rev()
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n)
                    .rev()
                    .map(|k| (k * ratio) as f64 + cfg.steps_offset as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                np_arange(last_timestep as f64, 0.0, -(t_train as f64 / n as f64))
                    .into_iter()
                    .map(|v| np_round(v) - 1.0)
                    .collect()
            }
        };
        let train_sigmas = schedule.train_sigmas();
        let sigmas: Vec<f64> = if cfg.use_karras_sigmas || cfg.use_exponential_sigmas {
            let lo = cfg.sigma_min.unwrap_or(train_sigmas[0] as f64);
            let hi = cfg.sigma_max.unwrap_or(train_sigmas[t_train - 1] as f64);
            let sigmas = if cfg.use_karras_sigmas {
                karras_sigmas(lo, hi, n)
            } else {
                exponential_sigmas(lo, hi, n)
            };
            let logs = log_sigmas(&train_sigmas);
            let round = cfg.use_karras_sigmas && cfg.beta_schedule != BetaSchedule::SquaredcosCapV2;
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &logs);
                    if round { np_round(t) } else { t }
                })
                .collect();
            sigmas
        } else {
            let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
            timesteps.iter().map(|&t| np_interp_grid(t, &fp)).collect()
        };
        // `.to(dtype=torch.int64)` truncates.
        let timesteps: Vec<f64> = timesteps.into_iter().map(|t| (t as i64) as f64).collect();
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
        Ok(DpmSolverMultistep {
            sigmas,
            timesteps,
            prediction_type: cfg.prediction_type,
            solver_order: cfg.solver_order,
            solver_type,
            lower_order_final: cfg.lower_order_final,
            euler_at_final: cfg.euler_at_final,
            final_sigmas_zero: cfg.final_sigmas_type == FinalSigmasType::Zero,
            model_outputs: vec![None; cfg.solver_order],
            lower_order_nums: 0,
            next: 0,
        })
    }

    /// The data prediction x₀ (`convert_model_output` for dpmsolver++).
    fn convert_model_output(
        &self,
        model_output: Tensor<4>,
        sample: &Tensor<4>,
        i: usize,
    ) -> Tensor<4> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        match self.prediction_type {
            PredictionType::Epsilon => {
                (sample.clone() - model_output.mul_scalar(sigma_t)).div_scalar(alpha_t)
            }
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => {
                sample.clone().mul_scalar(alpha_t) - model_output.mul_scalar(sigma_t)
            }
        }
    }

    fn history(&self, back: usize) -> Tensor<4> {
        self.model_outputs[self.solver_order - 1 - back]
            .clone()
            .expect("the solver order never exceeds the recorded history")
    }

    fn first_order(&self, x0: Tensor<4>, sample: Tensor<4>, i: usize) -> Tensor<4> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        sample.mul_scalar(sigma_t / sigma_s) - x0.mul_scalar(alpha_t * ((-h).exp() - 1.0))
    }

    fn second_order(&self, sample: Tensor<4>, i: usize) -> Tensor<4> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let (m0, m1) = (self.history(0), self.history(1));
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d1 = (m0.clone() - m1).mul_scalar(1.0 / r0);
        let e = (-h).exp() - 1.0;
        let x = sample.mul_scalar(sigma_t / sigma_s0) - m0.mul_scalar(alpha_t * e);
        match self.solver_type {
            SolverType::Midpoint => x - d1.mul_scalar(0.5 * (alpha_t * e)),
            SolverType::Heun => x + d1.mul_scalar(alpha_t * (e / h + 1.0)),
        }
    }

    fn third_order(&self, sample: Tensor<4>, i: usize) -> Tensor<4> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[i - 2]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let (m0, m1, m2) = (self.history(0), self.history(1), self.history(2));
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let h_1 = lambda_s1 - lambda_s2;
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d1_0 = (m0.clone() - m1.clone()).mul_scalar(1.0 / r0);
        let d1_1 = (m1 - m2).mul_scalar(1.0 / r1);
        let d1 = d1_0.clone() + (d1_0.clone() - d1_1.clone()).mul_scalar(r0 / (r0 + r1));
        let d2 = (d1_0 - d1_1).mul_scalar(1.0 / (r0 + r1));
        let e = (-h).exp() - 1.0;
        sample.mul_scalar(sigma_t / sigma_s0) - m0.mul_scalar(alpha_t * e)
            + d1.mul_scalar(alpha_t * (e / h + 1.0))
            - d2.mul_scalar(alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5))
    }
}

impl Scheduler for DpmSolverMultistep {
    fn kind(&self) -> SchedulerKind {
        KIND
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
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
        let len = self.timesteps.len();
        check_step(i, len, &model_output, &sample)?;
        if starts_run(KIND, i, self.next)? {
            self.model_outputs.iter_mut().for_each(|m| *m = None);
            self.lower_order_nums = 0;
        }
        let lower_order_final = i == len - 1
            && (self.euler_at_final
                || (self.lower_order_final && len < 15)
                || self.final_sigmas_zero);
        let lower_order_second = i + 2 == len && self.lower_order_final && len < 15;

        let x0 = self.convert_model_output(model_output, &sample, i);
        self.model_outputs.rotate_left(1);
        *self.model_outputs.last_mut().expect("solver_order >= 1") = Some(x0.clone());

        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(x0, sample, i)
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(sample, i)
        } else {
            self.third_order(sample, i)
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.next = i + 1;
        Ok(prev)
    }
}
