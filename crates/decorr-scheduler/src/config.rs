//! `scheduler/scheduler_config.json` as diffusers writes it ([`SchedulerConfig`]), the SD 1.5
//! preset, and the per-class resolution of missing keys ([`SchedulerConfig::resolve`]).
//!
//! Every key is optional on purpose: diffusers fills a key that is absent from the file with the
//! default of the scheduler class that *reads* the file, not of the class that wrote it. SD 1.5's
//! file (written by `PNDMScheduler`) has no `timestep_spacing`, so `EulerDiscreteScheduler` reads
//! it as `linspace` (timesteps 999, 666, 333, 0 for 4 steps) while DDIM and PNDM read `leading`
//! (751, 501, 251, 1). Keys a class does not take are ignored by that class, as in diffusers.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{SchedulerError, SchedulerKind};

/// How the betas of the training noise schedule are laid out (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end))²`: Stable Diffusion.
    ScaledLinear,
    /// The cosine schedule of improved DDPM (`betas_for_alpha_bar`, capped at 0.999).
    SquaredcosCapV2,
}

/// What the denoising model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise ε: SD 1.x, SD 2.x base (512).
    Epsilon,
    /// The velocity v = α ε − σ x₀: SD 2.x 768-v models.
    VPrediction,
    /// The clean sample x₀ (DDIM, Euler, DPM-Solver and LMS only, as in diffusers).
    Sample,
}

/// How inference timesteps are placed on the training timesteps (`timestep_spacing`; table 2 of
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// The last sigma of sigma-based schedulers (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// Denoise all the way to σ = 0.
    Zero,
    /// Stop at the smallest training sigma.
    SigmaMin,
}

/// The most training timesteps a config may declare (SD: 1000).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// A diffusers `scheduler_config.json`. `None` means "absent from the file": the reading class's
/// default applies (see [`SchedulerConfig::resolve`]). Unknown keys are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// The class that wrote the file, e.g. `PNDMScheduler` (see [`SchedulerKind::from_class_name`]).
    #[serde(
        rename = "_class_name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_train_timesteps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_start: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_end: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_schedule: Option<BetaSchedule>,
    /// Explicit betas; overrides `beta_schedule` when present. Written as `null` by SD 1.5, which
    /// reads back as `None`.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<PredictionType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<TimestepSpacing>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_offset: Option<i64>,
    /// DDIM, PNDM: whether the "previous" alpha of the last step is 1 or `alphas_cumprod[0]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_alpha_to_one: Option<bool>,
    /// PNDM: skip the Runge-Kutta warm-up and run PLMS only (SD 1.x does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_prk_steps: Option<bool>,
    /// DDIM: clamp the predicted x₀ to ±`clip_sample_range`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_sample: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_sample_range: Option<f64>,
    /// DDIM, DPM-Solver: dynamic thresholding (not supported: an error when `true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholding: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescale_betas_zero_snr: Option<bool>,
    /// Euler, DPM-Solver, LMS: Karras et al. (2022) sigma spacing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_exponential_sigmas: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_beta_sigmas: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_lu_lambdas: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_flow_sigmas: Option<bool>,
    /// Euler: bounds of the Karras ramp (default: the schedule's own ends).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "lenient_f64")]
    pub sigma_min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "lenient_f64")]
    pub sigma_max: Option<f64>,
    /// Euler: `linear` (supported) or `log_linear`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpolation_type: Option<String>,
    /// Euler: `discrete` (supported) or `continuous`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_sigmas_type: Option<FinalSigmasType>,
    /// DPM-Solver: 1, 2 (default) or 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver_order: Option<usize>,
    /// DPM-Solver: `dpmsolver++` (supported; the SDE and non-++ variants are not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm_type: Option<String>,
    /// DPM-Solver: `midpoint` (default) or `heun`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower_order_final: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub euler_at_final: Option<bool>,
    /// DPM-Solver: clips the smallest λ; diffusers writes its default as `-Infinity` (not valid
    /// JSON, accepted here).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "lenient_f64")]
    pub lambda_min_clipped: Option<f64>,
    /// DPM-Solver: `learned`/`learned_range` (not supported) or null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variance_type: Option<String>,
    /// Everything else (`_diffusers_version`, keys of other classes or versions), kept so a saved
    /// config round-trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Every setting a scheduler reads, with the reading class's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedConfig {
    pub kind: SchedulerKind,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub set_alpha_to_one: bool,
    pub skip_prk_steps: bool,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub thresholding: bool,
    pub rescale_betas_zero_snr: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub interpolation_type: String,
    pub timestep_type: String,
    pub final_sigmas_type: FinalSigmasType,
    pub solver_order: usize,
    pub algorithm_type: String,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub lambda_min_clipped: f64,
    pub variance_type: Option<String>,
}

impl SchedulerConfig {
    /// SD 1.5's `scheduler/scheduler_config.json` (PNDM, scaled-linear 0.00085..0.012,
    /// `steps_offset` 1, PLMS only; no `timestep_spacing`, no `prediction_type`).
    pub fn sd15() -> Self {
        let mut extra = serde_json::Map::new();
        extra.insert("_diffusers_version".into(), "0.6.0".into());
        SchedulerConfig {
            class_name: Some("PNDMScheduler".into()),
            num_train_timesteps: Some(1000),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some(BetaSchedule::ScaledLinear),
            trained_betas: None,
            set_alpha_to_one: Some(false),
            skip_prk_steps: Some(true),
            steps_offset: Some(1),
            clip_sample: Some(false),
            extra,
            ..Default::default()
        }
    }

    /// A preset by name: `sd15` (aliases `sd1`, `sd1.5`).
    pub fn preset(name: &str) -> Result<Self, SchedulerError> {
        match name {
            "sd15" | "sd1" | "sd1.5" => Ok(Self::sd15()),
            other => Err(SchedulerError::Config(format!(
                "unknown scheduler-config preset `{other}`; known presets: sd15"
            ))),
        }
    }

    /// Parses the text of a `scheduler_config.json`. Python's non-standard `Infinity`, `-Infinity`
    /// and `NaN` literals (diffusers writes `"lambda_min_clipped": -Infinity`) are accepted, and keys
    /// listed in `_use_default_values` (a config taken from a live diffusers scheduler) count as
    /// absent, as diffusers' `extract_init_dict` treats them.
    pub fn from_json_str(text: &str) -> Result<Self, SchedulerError> {
        let config = Self::parse(text).map_err(|e| {
            SchedulerError::Config(format!("not a valid diffusers scheduler config: {e}"))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses numbers no noise schedule can be built from, naming the key and the allowed
    /// range: `num_train_timesteps` outside 1..=[`MAX_TRAIN_TIMESTEPS`], betas (`beta_start`,
    /// `beta_end`, `trained_betas`) that are not finite numbers in (0, 1) (a beta of 1 or more
    /// makes `alphas_cumprod` zero or negative and the samples NaN), and non-finite or
    /// non-positive `clip_sample_range`, `sigma_min`, `sigma_max`.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let bad = |m: String| Err(SchedulerError::Config(m));
        if let Some(n) = self.num_train_timesteps
            && !(1..=MAX_TRAIN_TIMESTEPS).contains(&n)
        {
            return bad(format!(
                "`num_train_timesteps` = {n} is out of range: allowed 1..={MAX_TRAIN_TIMESTEPS}"
            ));
        }
        // A timestep offset; beyond the training schedule it only overflows the timestep maths.
        if let Some(o) = self.steps_offset
            && !(0..=MAX_TRAIN_TIMESTEPS as i64).contains(&o)
        {
            return bad(format!(
                "`steps_offset` = {o} is out of range: allowed 0..={MAX_TRAIN_TIMESTEPS} (SD uses 1)"
            ));
        }
        let beta_ok = |b: f64| b.is_finite() && b > 0.0 && b < 1.0;
        for (key, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            if let Some(b) = v.filter(|&b| !beta_ok(b)) {
                return bad(format!(
                    "`{key}` = {b} is out of range: betas must be finite numbers in (0, 1)"
                ));
            }
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() > MAX_TRAIN_TIMESTEPS {
                return bad(format!(
                    "`trained_betas` has {} values: at most {MAX_TRAIN_TIMESTEPS} are allowed",
                    betas.len()
                ));
            }
            if let Some((i, b)) = betas.iter().enumerate().find(|(_, b)| !beta_ok(**b)) {
                return bad(format!(
                    "`trained_betas[{i}]` = {b} is out of range: betas must be finite numbers in \
                     (0, 1)"
                ));
            }
        }
        for (key, v) in [
            ("clip_sample_range", self.clip_sample_range),
            ("sigma_min", self.sigma_min),
            ("sigma_max", self.sigma_max),
        ] {
            if let Some(x) = v.filter(|x| !(x.is_finite() && *x > 0.0)) {
                return bad(format!("`{key}` = {x} must be a finite number > 0"));
            }
        }
        Ok(())
    }

    /// Reads a checkpoint's `scheduler/scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SchedulerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            SchedulerError::Config(format!(
                "cannot read scheduler config {}: {e} (give the checkpoint's \
                 scheduler/scheduler_config.json)",
                path.display()
            ))
        })?;
        let config = Self::parse(&text).map_err(|e| {
            SchedulerError::Config(format!(
                "{} is not a valid diffusers scheduler config: {e}",
                path.display()
            ))
        })?;
        config.validate().map_err(|e| match e {
            SchedulerError::Config(m) => SchedulerError::Config(format!("{}: {m}", path.display())),
            other => other,
        })?;
        Ok(config)
    }

    fn parse(text: &str) -> Result<Self, serde_json::Error> {
        // A byte-order mark (some Windows editors write one) is not JSON; skip it.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut value: serde_json::Value = serde_json::from_str(&quote_non_finite(text))?;
        if let Some(obj) = value.as_object_mut()
            && let Some(serde_json::Value::Array(defaults)) = obj.remove("_use_default_values")
        {
            for key in defaults.iter().filter_map(|k| k.as_str()) {
                obj.remove(key);
            }
        }
        serde_json::from_value(value)
    }

    /// The JSON text of this config (non-finite floats written as strings, which
    /// [`SchedulerConfig::from_json_str`] reads back).
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).expect("a scheduler config always serialises")
    }

    /// The scheduler that wrote the file, from `_class_name`.
    pub fn kind(&self) -> Result<SchedulerKind, SchedulerError> {
        match &self.class_name {
            Some(name) => SchedulerKind::from_class_name(name),
            None => Err(SchedulerError::Config(
                "the scheduler config has no `_class_name`; choose a scheduler explicitly \
                 (ddim, pndm, euler, euler-a, dpmpp-2m, lms)"
                    .into(),
            )),
        }
    }

    /// The settings `kind` reads from this file, each missing key taking that class's default
    /// (diffusers 0.42 `__init__` signatures). Keys the class does not take are reset to values
    /// that have no effect, as diffusers ignores them.
    pub fn resolve(&self, kind: SchedulerKind) -> ResolvedConfig {
        use SchedulerKind::*;
        // Keys only some classes take: `takes` says whether `kind` reads it.
        let takes = |classes: &[SchedulerKind]| classes.contains(&kind);
        let dpm = kind == DpmSolverMultistep;
        ResolvedConfig {
            kind,
            num_train_timesteps: self.num_train_timesteps.unwrap_or(1000),
            beta_start: self.beta_start.unwrap_or(0.0001),
            beta_end: self.beta_end.unwrap_or(0.02),
            beta_schedule: self.beta_schedule.unwrap_or(BetaSchedule::Linear),
            trained_betas: self.trained_betas.clone(),
            prediction_type: self.prediction_type.unwrap_or(PredictionType::Epsilon),
            timestep_spacing: self.timestep_spacing.unwrap_or(match kind {
                Ddim | Pndm => TimestepSpacing::Leading,
                Euler | EulerAncestral | DpmSolverMultistep | Lms => TimestepSpacing::Linspace,
            }),
            steps_offset: self.steps_offset.unwrap_or(0),
            set_alpha_to_one: match kind {
                Ddim => self.set_alpha_to_one.unwrap_or(true),
                Pndm => self.set_alpha_to_one.unwrap_or(false),
                _ => false,
            },
            skip_prk_steps: takes(&[Pndm]) && self.skip_prk_steps.unwrap_or(false),
            clip_sample: takes(&[Ddim]) && self.clip_sample.unwrap_or(true),
            clip_sample_range: self.clip_sample_range.unwrap_or(1.0),
            thresholding: takes(&[Ddim, DpmSolverMultistep]) && self.thresholding.unwrap_or(false),
            rescale_betas_zero_snr: !takes(&[Pndm, Lms])
                && self.rescale_betas_zero_snr.unwrap_or(false),
            use_karras_sigmas: takes(&[Euler, DpmSolverMultistep, Lms])
                && self.use_karras_sigmas.unwrap_or(false),
            use_exponential_sigmas: takes(&[Euler, DpmSolverMultistep, Lms])
                && self.use_exponential_sigmas.unwrap_or(false),
            use_beta_sigmas: takes(&[Euler, DpmSolverMultistep, Lms])
                && self.use_beta_sigmas.unwrap_or(false),
            use_lu_lambdas: takes(&[DpmSolverMultistep]) && self.use_lu_lambdas.unwrap_or(false),
            use_flow_sigmas: takes(&[DpmSolverMultistep]) && self.use_flow_sigmas.unwrap_or(false),
            // Euler takes these; DPM-Solver and LMS read them too when the file has them
            // (diffusers registers a file's extra keys on the config, and `_convert_to_karras` /
            // `_convert_to_exponential` look there; LMS's own Karras ramp ignores them).
            sigma_min: if takes(&[Euler, DpmSolverMultistep, Lms]) {
                self.sigma_min
            } else {
                None
            },
            sigma_max: if takes(&[Euler, DpmSolverMultistep, Lms]) {
                self.sigma_max
            } else {
                None
            },
            interpolation_type: match (takes(&[Euler]), &self.interpolation_type) {
                (true, Some(t)) => t.clone(),
                _ => "linear".into(),
            },
            timestep_type: match (takes(&[Euler]), &self.timestep_type) {
                (true, Some(t)) => t.clone(),
                _ => "discrete".into(),
            },
            final_sigmas_type: if takes(&[Euler, DpmSolverMultistep]) {
                self.final_sigmas_type.unwrap_or(FinalSigmasType::Zero)
            } else {
                FinalSigmasType::Zero
            },
            solver_order: self.solver_order.filter(|_| dpm).unwrap_or(2),
            algorithm_type: match (dpm, &self.algorithm_type) {
                (true, Some(t)) => t.clone(),
                _ => "dpmsolver++".into(),
            },
            solver_type: match (dpm, &self.solver_type) {
                (true, Some(t)) => t.clone(),
                _ => "midpoint".into(),
            },
            lower_order_final: self.lower_order_final.filter(|_| dpm).unwrap_or(true),
            euler_at_final: self.euler_at_final.filter(|_| dpm).unwrap_or(false),
            lambda_min_clipped: self
                .lambda_min_clipped
                .filter(|_| dpm)
                .unwrap_or(f64::NEG_INFINITY),
            variance_type: self.variance_type.clone().filter(|_| dpm),
        }
    }
}

/// Rewrites the bare `Infinity`, `-Infinity` and `NaN` tokens that Python's `json` writes (outside
/// strings) into strings, which [`lenient_f64`] reads.
fn quote_non_finite(text: &str) -> std::borrow::Cow<'_, str> {
    if !(text.contains("Infinity") || text.contains("NaN")) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(t) = token {
            out.push('"');
            out.push_str(t);
            out.push('"');
            rest = &rest[t.len()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

/// An optional float that may also be written `"Infinity"`, `"-Infinity"` or `"NaN"` (Python's
/// json), and is written back that way when it is not finite (serde_json would write `null`).
mod lenient_f64 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(f64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Num(v)) => Ok(Some(v)),
            Some(Raw::Text(s)) => match s.as_str() {
                "Infinity" | "inf" => Ok(Some(f64::INFINITY)),
                "-Infinity" | "-inf" => Ok(Some(f64::NEG_INFINITY)),
                "NaN" | "nan" => Ok(Some(f64::NAN)),
                other => Err(D::Error::custom(format!(
                    "expected a number, Infinity, -Infinity or NaN, found `{other}`"
                ))),
            },
        }
    }

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(x) if x.is_finite() => s.serialize_f64(*x),
            Some(x) if x.is_nan() => s.serialize_str("NaN"),
            Some(x) if *x > 0.0 => s.serialize_str("Infinity"),
            Some(_) => s.serialize_str("-Infinity"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15_FILE: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}"#;

    #[test]
    fn sd15_preset_equals_the_file() {
        let parsed = SchedulerConfig::from_json_str(SD15_FILE).unwrap();
        assert_eq!(parsed, SchedulerConfig::sd15());
        assert_eq!(parsed.kind().unwrap(), SchedulerKind::Pndm);
        assert_eq!(parsed.timestep_spacing, None);
        assert_eq!(parsed.prediction_type, None);
        let back = SchedulerConfig::from_json_str(&parsed.to_json_string()).unwrap();
        assert_eq!(back, parsed);
    }

    #[test]
    fn missing_keys_take_the_reading_class_defaults() {
        let c = SchedulerConfig::sd15();
        let euler = c.resolve(SchedulerKind::Euler);
        assert_eq!(euler.timestep_spacing, TimestepSpacing::Linspace);
        assert!(!euler.set_alpha_to_one && !euler.skip_prk_steps);
        assert_eq!(euler.steps_offset, 1);
        let ddim = c.resolve(SchedulerKind::Ddim);
        assert_eq!(ddim.timestep_spacing, TimestepSpacing::Leading);
        assert!(!ddim.set_alpha_to_one, "present in the file: false");
        assert!(!ddim.clip_sample);
        let pndm = c.resolve(SchedulerKind::Pndm);
        assert!(pndm.skip_prk_steps);
        assert_eq!(pndm.prediction_type, PredictionType::Epsilon);

        // An empty file: DDIM's own defaults (set_alpha_to_one and clip_sample true, linear).
        let empty = SchedulerConfig::from_json_str("{}").unwrap();
        let ddim = empty.resolve(SchedulerKind::Ddim);
        assert!(ddim.set_alpha_to_one && ddim.clip_sample);
        assert_eq!(ddim.beta_schedule, BetaSchedule::Linear);
        assert!(!empty.resolve(SchedulerKind::Pndm).set_alpha_to_one);
    }

    #[test]
    fn explicit_spacing_wins() {
        let text = SD15_FILE.replace(
            "\"clip_sample\": false",
            "\"clip_sample\": false, \"timestep_spacing\": \"leading\"",
        );
        let c = SchedulerConfig::from_json_str(&text).unwrap();
        assert_eq!(
            c.resolve(SchedulerKind::Euler).timestep_spacing,
            TimestepSpacing::Leading
        );
    }

    #[test]
    fn unknown_keys_are_kept_and_python_infinity_is_read() {
        let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
            "some_future_key": [1, 2], "note": "NaN and -Infinity inside a string",
            "use_karras_sigmas": true, "variance_type": null}"#;
        let c = SchedulerConfig::from_json_str(text).unwrap();
        assert_eq!(c.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(c.extra["note"], "NaN and -Infinity inside a string");
        assert!(c.extra.contains_key("some_future_key"));
        assert_eq!(c.kind().unwrap(), SchedulerKind::DpmSolverMultistep);
        assert!(
            c.resolve(SchedulerKind::DpmSolverMultistep)
                .use_karras_sigmas
        );
        assert!(
            !c.resolve(SchedulerKind::Ddim).use_karras_sigmas,
            "DDIM does not take it"
        );
        let back = SchedulerConfig::from_json_str(&c.to_json_string()).unwrap();
        assert_eq!(back.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(back.extra, c.extra);
    }

    #[test]
    fn use_default_values_marks_keys_as_absent() {
        // A config taken from a live diffusers scheduler lists the keys that took defaults.
        let text = r#"{"_class_name": "PNDMScheduler", "timestep_spacing": "leading",
            "steps_offset": 1, "_use_default_values": ["timestep_spacing"]}"#;
        let c = SchedulerConfig::from_json_str(text).unwrap();
        assert_eq!(c.timestep_spacing, None);
        assert_eq!(c.steps_offset, Some(1));
        assert!(!c.extra.contains_key("_use_default_values"));
        assert_eq!(
            c.resolve(SchedulerKind::Euler).timestep_spacing,
            TimestepSpacing::Linspace
        );
    }

    #[test]
    fn bad_json_and_bad_values_name_the_problem() {
        let err = SchedulerConfig::from_json_str("{\"beta_start\": ").unwrap_err();
        assert!(
            err.to_string()
                .contains("not a valid diffusers scheduler config")
        );
        let err = SchedulerConfig::from_json_str(r#"{"beta_schedule": "cubic"}"#).unwrap_err();
        assert!(err.to_string().contains("scaled_linear"), "{err}");
        let err = SchedulerConfig::from_json_str(r#"{"sigma_min": "tiny"}"#).unwrap_err();
        assert!(err.to_string().contains("tiny"), "{err}");
    }

    #[test]
    fn from_file_names_the_file() {
        let dir = std::env::temp_dir().join(format!("decorr-scheduler-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("scheduler_config.json");
        std::fs::write(&good, SD15_FILE).unwrap();
        assert_eq!(
            SchedulerConfig::from_file(&good).unwrap(),
            SchedulerConfig::sd15()
        );
        // A leading byte-order mark (Windows editors) is skipped.
        std::fs::write(&good, format!("\u{feff}{SD15_FILE}")).unwrap();
        assert_eq!(
            SchedulerConfig::from_file(&good).unwrap(),
            SchedulerConfig::sd15()
        );
        let bad = dir.join("broken.json");
        std::fs::write(&bad, "{\"num_train_timesteps\": \"many\"}").unwrap();
        let err = SchedulerConfig::from_file(&bad).unwrap_err().to_string();
        assert!(
            err.contains("broken.json") && err.contains("invalid type"),
            "{err}"
        );
        let err = SchedulerConfig::from_file(dir.join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing.json") && err.contains("cannot read"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Numbers that would give NaN samples or allocate without bound are refused by key.
    #[test]
    fn bad_numbers_are_refused_by_key() {
        for (text, want) in [
            (
                r#"{"num_train_timesteps": 1000000000000}"#,
                "`num_train_timesteps` = 1000000000000",
            ),
            (r#"{"num_train_timesteps": 0}"#, "allowed 1..=100000"),
            (r#"{"beta_end": 1.5}"#, "`beta_end` = 1.5"),
            (r#"{"beta_start": -0.1}"#, "`beta_start` = -0.1"),
            (r#"{"beta_start": NaN}"#, "not a valid"), // not a number serde reads here
            (r#"{"trained_betas": [0.1, 2.0]}"#, "`trained_betas[1]` = 2"),
            (r#"{"sigma_min": NaN}"#, "`sigma_min` = NaN"),
            (r#"{"clip_sample_range": 0}"#, "`clip_sample_range` = 0"),
            // Found by `cargo xtask fuzz`: PNDM's timestep maths overflowed on this.
            (
                r#"{"steps_offset": 9223372036854775807}"#,
                "`steps_offset` = 9223372036854775807",
            ),
            (r#"{"steps_offset": -1}"#, "allowed 0..=100000"),
        ] {
            let e = SchedulerConfig::from_json_str(text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let dir = std::env::temp_dir().join(format!("decorr-sched-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("scheduler_config.json");
        std::fs::write(&p, r#"{"_class_name": "DDIMScheduler", "beta_end": 2}"#).unwrap();
        let e = SchedulerConfig::from_file(&p).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).ok();
        assert!(
            e.contains("scheduler_config.json") && e.contains("`beta_end` = 2"),
            "{e}"
        );
        SchedulerConfig::sd15().validate().unwrap();
        // A config made in code is checked when a scheduler is built from it.
        let made = SchedulerConfig {
            beta_end: Some(1.5),
            ..SchedulerConfig::sd15()
        };
        let e = crate::build(SchedulerKind::Ddim, &made, 10)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`beta_end` = 1.5"), "{e}");
    }

    #[test]
    fn presets() {
        assert_eq!(
            SchedulerConfig::preset("sd1.5").unwrap(),
            SchedulerConfig::sd15()
        );
        assert!(
            SchedulerConfig::preset("sdxl")
                .unwrap_err()
                .to_string()
                .contains("sd15")
        );
    }
}
