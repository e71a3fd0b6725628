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
use decorr_unet::{
    AddedConditions, AttentionMap, AttentionOptions, UNet2DConditionModel, UNetOutput,
};
use serde::Serialize;

use crate::PipelineError;

pub use attend_excite::{ExciteParams, ExciteStep};
pub use pag::PagParams;

/// The sampling-side method, with its settings. The text side (which encoder gives which
/// branch's embedding: [`crate::TextSide`]) is separate, so a fine-tuned encoder composes with
/// PAG and Attend-and-Excite.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Guidance {
    /// Classifier-free guidance (the decorrelated guidance of METHOD.md Eq. 6 is this with
    /// [`crate::TextSide::Decorrelated`]).
    #[default]
    Cfg,
    /// Perturbed-attention guidance: a third UNet call with identity self-attention.
    Pag(PagParams),
    /// Attend-and-Excite: gradient steps on the latent before CFG.
    AttendAndExcite(ExciteParams),
}

impl Guidance {
    /// The name used on the command line and in manifests.
    pub fn name(&self) -> &'static str {
        match self {
            Guidance::Cfg => "cfg",
            Guidance::Pag(_) => "pag",
            Guidance::AttendAndExcite(_) => "attend-and-excite",
        }
    }

    /// PAG's settings, when this is PAG.
    pub fn pag(&self) -> Option<&PagParams> {
        match self {
            Guidance::Pag(p) => Some(p),
            _ => None,
        }
    }

    /// Attend-and-Excite's settings, when this is Attend-and-Excite.
    pub fn excite(&self) -> Option<&ExciteParams> {
        match self {
            Guidance::AttendAndExcite(e) => Some(e),
            _ => None,
        }
    }
}

impl std::fmt::Display for Guidance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
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

/// The embeddings a strategy works with: `cond` `[1, 77, d]`; `uncond` when guidance is on;
/// and for SDXL the pooled embeddings and micro-conditions.
pub struct Embeddings {
    pub cond: Tensor<3>,
    pub uncond: Option<Tensor<3>>,
    pub added: Option<AddedEmbeddings>,
}

/// SDXL's added conditions of one image: each branch's pooled embedding `[1, P]` and the time
/// ids `[1, 6]` (the same for both branches).
pub struct AddedEmbeddings {
    pub cond_pooled: Tensor<2>,
    pub uncond_pooled: Option<Tensor<2>>,
    pub time_ids: Tensor<2>,
}

/// What the UNet sees of the text for a batch: the context `[rows, 77, d]` and, for SDXL, the
/// added conditions of each row.
#[derive(Clone)]
pub struct Conditioning {
    pub context: Tensor<3>,
    pub added: Option<AddedConditions>,
}

impl Conditioning {
    /// `self`'s rows followed by `other`'s.
    pub fn cat(self, other: Conditioning) -> Conditioning {
        let added = match (self.added, other.added) {
            (Some(a), Some(b)) => Some(AddedConditions {
                text_embeds: Tensor::cat(vec![a.text_embeds, b.text_embeds], 0),
                time_ids: Tensor::cat(vec![a.time_ids, b.time_ids], 0),
            }),
            _ => None,
        };
        Conditioning {
            context: Tensor::cat(vec![self.context, other.context], 0),
            added,
        }
    }

    /// The UNet's prediction for `input` at `timestep` (every row) with this conditioning.
    pub fn predict(
        &self,
        unet: &UNet2DConditionModel,
        input: Tensor<4>,
        timestep: f64,
        opts: &AttentionOptions,
    ) -> Result<UNetOutput, PipelineError> {
        let n = input.dims()[0];
        Ok(unet.forward_added(
            input,
            &vec![timestep; n],
            &self.context,
            self.added.as_ref(),
            opts,
        )?)
    }
}

impl Embeddings {
    /// The conditional branch for `images` rows.
    pub fn cond_rows(&self, images: usize) -> Conditioning {
        Conditioning {
            context: rows(&self.cond, images),
            added: self.added.as_ref().map(|a| AddedConditions {
                text_embeds: rows2(&a.cond_pooled, images),
                time_ids: rows2(&a.time_ids, images),
            }),
        }
    }

    /// The UNet's conditioning for a CFG batch of `images`: `[uncond x images; cond x images]`,
    /// or `cond x images` without guidance; and whether guidance is on.
    pub fn context(&self, images: usize) -> (Conditioning, bool) {
        let cond = self.cond_rows(images);
        match &self.uncond {
            Some(u) => {
                let uncond = Conditioning {
                    context: rows(u, images),
                    added: self.added.as_ref().map(|a| AddedConditions {
                        text_embeds: rows2(
                            a.uncond_pooled.as_ref().unwrap_or(&a.cond_pooled),
                            images,
                        ),
                        time_ids: rows2(&a.time_ids, images),
                    }),
                };
                (uncond.cat(cond), true)
            }
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

/// `v` `[1, d]` expanded to `rows` rows.
pub(crate) fn rows2(v: &Tensor<2>, rows: usize) -> Tensor<2> {
    let [_, d] = v.dims();
    v.clone().expand([rows, d])
}

/// `emb` `[1, n, d]` expanded to `rows` rows.
pub(crate) fn rows(emb: &Tensor<3>, rows: usize) -> Tensor<3> {
    let [_, n, d] = emb.dims();
    emb.clone().expand([rows, n, d])
}
