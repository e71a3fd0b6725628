//! Guidance strategies: how one denoising step turns the latents into the noise prediction the
//! scheduler steps with. Each method is one file and one [`Strategy`]: it decides its UNet calls
//! and how their predictions combine, and (Attend-and-Excite) may update the latents first. The
//! sampling loop in [`crate::pipeline`] knows none of them by name.
//!
//! - [`cfg`]: classifier-free guidance; with the fine-tuned encoder's conditional embedding it is
//!   the decorrelated guidance (METHOD.md Eq. 6).
//! - [`pag`]: perturbed-attention guidance (BASELINES.md section 1).
//! - [`attend_excite`]: Attend-and-Excite (BASELINES.md section 2).

pub mod attend_excite;
pub mod cfg;
pub mod pag;

use burn::tensor::Tensor;
use decorr_scheduler::Scheduler;
use decorr_unet::{AttentionMap, AttentionOptions, UNet2DConditionModel};
use serde::{Deserialize, Serialize};

use crate::PipelineError;

pub use attend_excite::{ExciteParams, ExciteStep};
pub use pag::PagParams;

/// The sampling-side method. The text side is separate: with a fine-tuned encoder loaded, the
/// conditional embedding of `pag` and `attend-and-excite` comes from it (the Eq. 6 pairing), so
/// the methods compose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Guidance {
    /// Standard classifier-free guidance: both embeddings from the pre-trained encoder.
    #[default]
    Cfg,
    /// Eq. 6: conditional from the fine-tuned encoder, unconditional from the pre-trained one.
    Decorrelated,
    /// Perturbed-attention guidance: a third UNet call with identity self-attention.
    Pag,
    /// Attend-and-Excite: gradient steps on the latent before CFG.
    AttendAndExcite,
}

impl Guidance {
    /// The name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Guidance::Cfg => "cfg",
            Guidance::Decorrelated => "decorrelated",
            Guidance::Pag => "pag",
            Guidance::AttendAndExcite => "attend-and-excite",
        }
    }
}

impl std::fmt::Display for Guidance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Guidance {
    type Err = PipelineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cfg" => Ok(Guidance::Cfg),
            "decorrelated" => Ok(Guidance::Decorrelated),
            "pag" => Ok(Guidance::Pag),
            "attend-and-excite" | "aae" => Ok(Guidance::AttendAndExcite),
            other => Err(PipelineError::Input(format!(
                "unknown guidance `{other}`; expected cfg, decorrelated, pag or attend-and-excite"
            ))),
        }
    }
}

/// What a strategy sees of one denoising step.
pub struct StepContext<'a> {
    pub unet: &'a UNet2DConditionModel,
    pub scheduler: &'a dyn Scheduler,
    /// Position in the scheduler's timesteps (what AaE's thresholds count).
    pub index: usize,
    /// How many timesteps the run has.
    pub total: usize,
    /// The timestep given to the UNet.
    pub timestep: f64,
    /// Slicing and the cross-attention maps the caller wants (figure 3) from the conditional
    /// branch of the main prediction.
    pub opts: &'a AttentionOptions,
}

/// A strategy's result for one step.
pub struct StepPrediction {
    /// The guided prediction handed to the scheduler.
    pub eps: Tensor<4>,
    /// The conditional rows' captured cross-attention maps (`[images, hw, keys]` each), when
    /// `opts` asked for them.
    pub cross_attention: Vec<AttentionMap>,
}

/// One method's per-step work.
pub trait Strategy {
    /// The prediction for `latents` (`[images, c, h, w]`) at this step; may replace `latents`
    /// (the scheduler then steps from the replaced ones).
    fn predict(
        &mut self,
        ctx: &StepContext,
        latents: &mut Tensor<4>,
    ) -> Result<StepPrediction, PipelineError>;

    /// What the strategy recorded over the run (Attend-and-Excite's losses and iterations).
    fn excite_log(&mut self) -> Vec<ExciteStep> {
        Vec::new()
    }
}

/// The embeddings a strategy works with: `cond` `[1, 77, d]`; `uncond` when guidance is on.
pub struct Embeddings {
    pub cond: Tensor<3>,
    pub uncond: Option<Tensor<3>>,
}

impl Embeddings {
    /// The UNet's context for a CFG batch of `images`: `[uncond x images; cond x images]`, or
    /// `cond x images` without guidance; and whether guidance is on.
    pub fn context(&self, images: usize) -> (Tensor<3>, bool) {
        let cond = rows(&self.cond, images);
        match &self.uncond {
            Some(u) => (Tensor::cat(vec![rows(u, images), cond], 0), true),
            None => (cond, false),
        }
    }
}

/// The conditional rows `start..start + n` of every captured map.
pub(crate) fn rows_of(maps: Vec<AttentionMap>, start: usize, n: usize) -> Vec<AttentionMap> {
    maps.into_iter()
        .map(|m| AttentionMap {
            probs: m.probs.narrow(0, start, n),
            ..m
        })
        .collect()
}

/// `latents` repeated `k` times along the batch.
pub(crate) fn repeat(latents: &Tensor<4>, k: usize) -> Tensor<4> {
    if k == 1 {
        latents.clone()
    } else {
        Tensor::cat(vec![latents.clone(); k], 0)
    }
}

/// `emb` `[1, n, d]` expanded to `rows` rows.
pub(crate) fn rows(emb: &Tensor<3>, rows: usize) -> Tensor<3> {
    let [_, n, d] = emb.dims();
    emb.clone().expand([rows, n, d])
}
