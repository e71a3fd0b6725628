//! Diffusion schedulers built from a checkpoint's `scheduler/scheduler_config.json`, reproducing
//! diffusers 0.42 (timesteps exactly, step outputs to float32 rounding).
//!
//! Supported ([`SchedulerKind`], CLI name / diffusers class):
//! - `ddim` / `DDIMScheduler`: η ≥ 0 ([`BuildOptions::eta`]; η > 0 needs noise), `set_alpha_to_one`,
//!   `clip_sample` (+ range).
//! - `pndm` / `PNDMScheduler`: PLMS with `skip_prk_steps` (SD 1.x: N steps are N + 1 UNet calls)
//!   and the Runge-Kutta warm-up without it.
//! - `euler` / `EulerDiscreteScheduler`: linear interpolation, Karras or exponential sigmas,
//!   `sigma_min`/`sigma_max`, `final_sigmas_type`; fractional timesteps.
//! - `euler-a` / `EulerAncestralDiscreteScheduler`: needs noise every step.
//! - `dpmpp-2m` / `DPMSolverMultistepScheduler`: `dpmsolver++`, `solver_order` 1–3, midpoint or Heun,
//!   `lower_order_final`, `euler_at_final`, Karras or exponential sigmas, `final_sigmas_type`,
//!   `lambda_min_clipped`.
//! - `lms` / `LMSDiscreteScheduler`: linear multistep (k-LMS) of order 4 (`step`'s default), Karras
//!   or exponential sigmas; coefficients integrated exactly (see [`lms`]).
//!
//! All of them: `beta_schedule` linear / scaled_linear / squaredcos_cap_v2 or `trained_betas`,
//! `rescale_betas_zero_snr` (where the class has it), `timestep_spacing` leading / trailing /
//! linspace, `steps_offset`, `prediction_type` epsilon and v_prediction (and `sample` where diffusers
//! has it). Options diffusers has but decorr does not (dynamic thresholding, beta/λ/flow sigmas,
//! SDE variants, `log_linear` interpolation, continuous timesteps, learned variance) are rejected
//! with an error rather than ignored.
//!
//! Usage mirrors diffusers' text-to-image loop:
//!
//! ```no_run
//! # use burn::tensor::{Device, Distribution, Tensor};
//! # use decorr_scheduler::*;
//! # fn unet(x: Tensor<4>, t: f64) -> Tensor<4> { x }
//! # fn main() -> Result<(), SchedulerError> {
//! let device = Device::flex();
//! let normal = || Tensor::<4>::random([1, 4, 64, 64], Distribution::Normal(0.0, 1.0), &device);
//! let config = SchedulerConfig::from_file("sd15/scheduler/scheduler_config.json")?;
//! let mut sched = build(config.kind()?, &config, 50)?; // or "euler-a".parse()?, ...
//! let mut latents = normal().mul_scalar(sched.init_noise_sigma());
//! for i in 0..sched.timesteps().len() {
//!     let x = sched.scale_model_input(latents.clone(), i);
//!     let eps = unet(x, sched.model_timestep(i));
//!     let noise = sched.needs_noise().then(normal);
//!     latents = sched.step(eps, i, latents, noise)?;
//! }
//! # Ok(()) }
//! ```

pub mod config;
pub mod ddim;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod lms;
pub mod pndm;
pub mod schedule;

use std::fmt;
use std::str::FromStr;

use burn::tensor::Tensor;

pub use config::{
    BetaSchedule, FinalSigmasType, PredictionType, ResolvedConfig, SchedulerConfig, TimestepSpacing,
};
pub use ddim::Ddim;
pub use dpm_solver::DpmSolverMultistep;
pub use euler::EulerDiscrete;
pub use euler_ancestral::EulerAncestral;
pub use lms::LmsDiscrete;
pub use pndm::Pndm;

/// Errors of the scheduler crate.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("scheduler config: {0}")]
    Config(String),
    #[error("unknown scheduler `{0}`; valid names: ddim, pndm, euler, euler-a, dpmpp-2m, lms")]
    UnknownName(String),
    #[error(
        "unknown scheduler class `{0}`; supported classes: DDIMScheduler, PNDMScheduler, \
         EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, \
         LMSDiscreteScheduler (choose one of ddim, pndm, euler, euler-a, dpmpp-2m, lms explicitly)"
    )]
    UnknownClass(String),
    #[error("{kind} does not support {what}")]
    Unsupported { kind: SchedulerKind, what: String },
    #[error(
        "{kind} step {i} adds fresh noise (ancestral sampling or eta > 0): pass Some(noise) with \
         the sample's shape"
    )]
    NoiseRequired { kind: SchedulerKind, i: usize },
    #[error("{what} has shape {got:?} but the sample has shape {expected:?}; they must match")]
    ShapeMismatch {
        what: &'static str,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("step index {i} is out of range: the schedule has {len} timesteps (0..{len})")]
    StepOutOfRange { i: usize, len: usize },
    #[error(
        "{kind} keeps a multistep history, so steps must run in order: expected step {expected}, \
         got {got} (step 0 starts a new run)"
    )]
    OutOfOrder {
        kind: SchedulerKind,
        expected: usize,
        got: usize,
    },
}

/// The schedulers decorr implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Pndm,
    Euler,
    EulerAncestral,
    DpmSolverMultistep,
    Lms,
}

/// Serialised as its CLI name (`ddim`, `euler-a`, ...), as manifests and reports record it.
impl serde::Serialize for SchedulerKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::Lms,
    ];

    /// The CLI name: `ddim`, `pndm`, `euler`, `euler-a`, `dpmpp-2m`, `lms`.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmSolverMultistep => "dpmpp-2m",
            SchedulerKind::Lms => "lms",
        }
    }

    /// The diffusers class (`_class_name`).
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerKind::Lms => "LMSDiscreteScheduler",
        }
    }

    /// From a config's `_class_name`.
    pub fn from_class_name(name: &str) -> Result<Self, SchedulerError> {
        Self::ALL
            .into_iter()
            .find(|k| k.class_name() == name)
            .ok_or_else(|| SchedulerError::UnknownClass(name.to_string()))
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;

    /// The CLI names (case-insensitive, `_` for `-` accepted) or a diffusers class name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        let kind = match norm.as_str() {
            "ddim" => SchedulerKind::Ddim,
            "pndm" | "plms" => SchedulerKind::Pndm,
            "euler" => SchedulerKind::Euler,
            "euler-a" | "euler-ancestral" => SchedulerKind::EulerAncestral,
            "dpmpp-2m" | "dpm++-2m" | "dpm++2m" | "dpmpp2m" => SchedulerKind::DpmSolverMultistep,
            "lms" | "k-lms" | "klms" | "lms-discrete" => SchedulerKind::Lms,
            _ => {
                return SchedulerKind::from_class_name(s.trim())
                    .map_err(|_| SchedulerError::UnknownName(s.to_string()));
            }
        };
        Ok(kind)
    }
}

/// Settings that are not in `scheduler_config.json` but chosen per run (e.g. from the CLI).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildOptions {
    /// Overrides the config's `use_karras_sigmas` (like diffusers'
    /// `from_config(config, use_karras_sigmas=...)`): `Some(true)` turns Karras sigmas on,
    /// `Some(false)` off, `None` keeps the file's value. Only `euler`, `dpmpp-2m` and `lms` have
    /// Karras sigmas; `Some(true)` on another scheduler is an error.
    pub karras: Option<bool>,
    /// DDIM's η (`eta` of `DDIMScheduler.step`): 0 (default) is deterministic DDIM, 1 is DDPM-like;
    /// with η > 0 every step needs noise. Non-zero η on another scheduler is an error.
    pub eta: f64,
}

/// One diffusers scheduler after `set_timesteps(n)`, stepped by index into [`Scheduler::timesteps`]
/// the way diffusers' pipelines loop:
/// `latents *= init_noise_sigma`; for each `i`: `x = scale_model_input(latents, i)`,
/// `out = unet(x, model_timestep(i))`, `latents = step(out, i, latents, noise)`.
pub trait Scheduler: Send {
    fn kind(&self) -> SchedulerKind;
    /// diffusers' `scheduler.timesteps` after `set_timesteps(n)` (f64: Euler's are fractional).
    /// PNDM without PRK has n + 1 of them; DDIM/PNDM/DPM-Solver values are integers.
    fn timesteps(&self) -> &[f64];
    /// The factor the initial Gaussian latents are multiplied by: by default 1.0, as diffusers'
    /// DDIM, PNDM and DPM-Solver have it; Euler, Euler ancestral and LMS return theirs (from
    /// σ_max).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The UNet input at index `i`: by default the sample unchanged (DDIM, PNDM, DPM-Solver);
    /// Euler, Euler ancestral and LMS divide it by √(σ² + 1), and panic if
    /// `i >= timesteps().len()`.
    fn scale_model_input(&self, sample: Tensor<4>, i: usize) -> Tensor<4> {
        let _ = i;
        sample
    }
    /// One step at `timesteps()[i]`: the sample at the next timestep. `noise` (standard normal,
    /// the sample's shape) is required when [`Scheduler::needs_noise`] and ignored otherwise.
    /// Multistep schedulers (PNDM, DPM-Solver, LMS) must be stepped for i = 0, 1, 2, ... in order;
    /// `i = 0` starts a new run.
    fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        noise: Option<Tensor<4>>,
    ) -> Result<Tensor<4>, SchedulerError>;
    /// Whether [`Scheduler::step`] needs `noise` (Euler ancestral, DDIM with η > 0).
    fn needs_noise(&self) -> bool {
        false
    }
    /// The timestep the UNet is called with at index `i`.
    fn model_timestep(&self, i: usize) -> f64 {
        self.timesteps()[i]
    }
    /// diffusers' `scheduler.sigmas` (float32, one per timestep plus the final one) for the
    /// sigma-based schedulers (Euler, Euler ancestral, DPM-Solver, LMS); `None` for DDIM and PNDM.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
}

/// Builds `kind` from a scheduler config for `num_inference_steps` steps, with default
/// [`BuildOptions`] (the file's Karras setting, η = 0).
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    build_with(kind, config, num_inference_steps, &BuildOptions::default())
}

/// Builds `kind` from a scheduler config for `num_inference_steps` steps. Keys missing from the
/// config take `kind`'s defaults ([`SchedulerConfig::resolve`]).
pub fn build_with(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    options: &BuildOptions,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    config.validate()?;
    let mut resolved = config.resolve(kind);
    if let Some(karras) = options.karras {
        if karras
            && !matches!(
                kind,
                SchedulerKind::Euler | SchedulerKind::DpmSolverMultistep | SchedulerKind::Lms
            )
        {
            return Err(SchedulerError::Unsupported {
                kind,
                what: "Karras sigmas (only euler, dpmpp-2m and lms have them)".into(),
            });
        }
        resolved.use_karras_sigmas = karras;
    }
    if !(options.eta.is_finite() && options.eta >= 0.0) {
        return Err(SchedulerError::Config(format!(
            "eta must be a finite number >= 0, got {}",
            options.eta
        )));
    }
    if options.eta != 0.0 && kind != SchedulerKind::Ddim {
        return Err(SchedulerError::Unsupported {
            kind,
            what: format!("eta = {} (only ddim takes eta)", options.eta),
        });
    }
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(Ddim::new(&resolved, num_inference_steps, options.eta)?),
        SchedulerKind::Pndm => Box::new(Pndm::new(&resolved, num_inference_steps)?),
        SchedulerKind::Euler => Box::new(EulerDiscrete::new(&resolved, num_inference_steps)?),
        SchedulerKind::EulerAncestral => {
            Box::new(EulerAncestral::new(&resolved, num_inference_steps)?)
        }
        SchedulerKind::DpmSolverMultistep => {
            Box::new(DpmSolverMultistep::new(&resolved, num_inference_steps)?)
        }
        SchedulerKind::Lms => Box::new(LmsDiscrete::new(&resolved, num_inference_steps)?),
    })
}

/// Checks that are the same for every scheduler: a usable step count.
pub(crate) fn check_steps(cfg: &ResolvedConfig, n: usize) -> Result<(), SchedulerError> {
    if n == 0 || n > cfg.num_train_timesteps {
        return Err(SchedulerError::Config(format!(
            "num_inference_steps must be between 1 and num_train_timesteps ({}), got {n}",
            cfg.num_train_timesteps
        )));
    }
    Ok(())
}

/// Errors for config options diffusers has but decorr does not implement.
pub(crate) fn unsupported(kind: SchedulerKind, what: impl Into<String>) -> SchedulerError {
    SchedulerError::Unsupported {
        kind,
        what: what.into(),
    }
}

/// `Err` unless `t` has the sample's shape.
pub(crate) fn check_shape(
    what: &'static str,
    t: &Tensor<4>,
    sample: &Tensor<4>,
) -> Result<(), SchedulerError> {
    let (got, expected) = (t.dims(), sample.dims());
    if got != expected {
        return Err(SchedulerError::ShapeMismatch {
            what,
            expected: expected.to_vec(),
            got: got.to_vec(),
        });
    }
    Ok(())
}

/// The checks every [`Scheduler::step`] starts with: `i` indexes the schedule of `len` steps
/// and the model output has the sample's shape.
pub(crate) fn check_step(
    i: usize,
    len: usize,
    model_output: &Tensor<4>,
    sample: &Tensor<4>,
) -> Result<(), SchedulerError> {
    if i >= len {
        return Err(SchedulerError::StepOutOfRange { i, len });
    }
    check_shape("model_output", model_output, sample)
}

/// For the multistep schedulers (PNDM, DPM-Solver, LMS), whose history makes steps run in
/// order: `Ok(true)` when step `i` starts a new run (`i == 0`, the caller clears its history),
/// `Ok(false)` when it is the `expected` next step, `Err` otherwise.
pub(crate) fn starts_run(
    kind: SchedulerKind,
    i: usize,
    expected: usize,
) -> Result<bool, SchedulerError> {
    if i == 0 {
        Ok(true)
    } else if i == expected {
        Ok(false)
    } else {
        Err(SchedulerError::OutOfOrder {
            kind,
            expected,
            got: i,
        })
    }
}

/// The noise tensor of a stochastic step, checked.
pub(crate) fn require_noise(
    kind: SchedulerKind,
    i: usize,
    noise: Option<Tensor<4>>,
    sample: &Tensor<4>,
) -> Result<Tensor<4>, SchedulerError> {
    let noise = noise.ok_or(SchedulerError::NoiseRequired { kind, i })?;
    check_shape("noise", &noise, sample)?;
    Ok(noise)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in SchedulerKind::ALL {
            assert_eq!(k.name().parse::<SchedulerKind>().unwrap(), k);
            assert_eq!(k.to_string(), k.name());
            assert_eq!(SchedulerKind::from_class_name(k.class_name()).unwrap(), k);
            assert_eq!(k.class_name().parse::<SchedulerKind>().unwrap(), k);
        }
        assert_eq!(
            "Euler_A".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::EulerAncestral
        );
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        let err = "heun".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(err.contains("`heun`"), "{err}");
        assert!(
            err.contains("ddim, pndm, euler, euler-a, dpmpp-2m, lms"),
            "{err}"
        );
        let err = SchedulerKind::from_class_name("HeunDiscreteScheduler")
            .unwrap_err()
            .to_string();
        assert!(err.contains("HeunDiscreteScheduler") && err.contains("LMSDiscreteScheduler"));
        for alias in ["LMS", "k_lms", "k-lms", "LMSDiscreteScheduler"] {
            assert_eq!(alias.parse::<SchedulerKind>().unwrap(), SchedulerKind::Lms);
        }
    }
}
