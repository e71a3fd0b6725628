//! Classifier-free guidance, as diffusers' `StableDiffusionPipeline` runs it: one batch
//! `[uncond; cond]`, then `ε_u + w (ε_c − ε_u)`; with guidance <= 1 only the conditional branch.
//! The decorrelated guidance (METHOD.md Eq. 6) is this with the fine-tuned encoder's `cond`.

use burn::tensor::Tensor;

use super::{Conditioning, Embeddings, StepContext, StepPrediction, Strategy, repeat, rows_of};
use crate::PipelineError;

pub struct Cfg {
    /// `[uncond x b; cond x b]` (or `cond x b` without guidance), built once.
    context: Conditioning,
    images: usize,
    scale: f64,
    guided: bool,
}

impl Cfg {
    pub fn new(emb: &Embeddings, images: usize, scale: f64) -> Self {
        let (context, guided) = emb.context(images);
        Cfg {
            context,
            images,
            scale,
            guided,
        }
    }
}

/// `ε_u + w (ε_c − ε_u)`, diffusers' operation order.
pub(crate) fn combine(uncond: Tensor<4>, cond: Tensor<4>, scale: f64) -> Tensor<4> {
    uncond.clone() + (cond - uncond).mul_scalar(scale)
}

/// One CFG prediction on `latents` (shared by the strategies that add to it).
pub(crate) fn cfg_prediction(
    ctx: &StepContext,
    latents: &Tensor<4>,
    context: &Conditioning,
    images: usize,
    scale: f64,
    guided: bool,
) -> Result<StepPrediction, PipelineError> {
    let k = if guided { 2 } else { 1 };
    let input = ctx
        .scheduler
        .scale_model_input(repeat(latents, k), ctx.index);
    let out = context.predict(ctx.unet, input, ctx.timestep, ctx.opts)?;
    let start = if guided { images } else { 0 };
    let cross_attention = rows_of(out.cross_attention, start, images);
    let eps = if guided {
        let uncond = out.sample.clone().narrow(0, 0, images);
        let cond = out.sample.narrow(0, images, images);
        combine(uncond, cond, scale)
    } else {
        out.sample
    };
    Ok(StepPrediction {
        eps,
        cross_attention,
    })
}

impl Strategy for Cfg {
    fn predict(
        &mut self,
        ctx: &StepContext,
        latents: &mut Tensor<4>,
    ) -> Result<StepPrediction, PipelineError> {
        cfg_prediction(
            ctx,
            latents,
            &self.context,
            self.images,
            self.scale,
            self.guided,
        )
    }
}
