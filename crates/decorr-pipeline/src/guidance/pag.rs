//! Perturbed-attention guidance as diffusers' `StableDiffusionPAGPipeline` runs it (BASELINES.md
//! section 1): besides `ε_u` and `ε_c`, a third prediction `ε_p` with the prompt embedding and
//! the chosen self-attention layers replaced by the identity, then
//! `ε = ε_u + w (ε_c − ε_u) + s_t (ε_c − ε_p)`, or `ε_c + s_t (ε_c − ε_p)` without CFG, where
//! `s_t = max(0, s − a (1000 − t))` with the adaptive scale `a` (`s_t = s` when `a` is 0).
//! One UNet call of the batch `[uncond, cond, perturbed]`, as diffusers runs it (one call of
//! three rows costs less than a call of two and one of one: the weights are read once).

use burn::tensor::Tensor;
use decorr_unet::{AttentionOptions, Capture, UNet2DConditionModel};
use serde::{Deserialize, Serialize};

use super::cfg::{cfg_prediction, combine};
use super::{Conditioning, Embeddings, StepContext, StepPrediction, Strategy};
use crate::PipelineError;

/// PAG's settings (diffusers' defaults: `pag_scale` 3, `pag_adaptive_scale` 0, layers `mid`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PagParams {
    /// `s`; 0 turns PAG off (plain CFG), as in diffusers.
    pub scale: f64,
    /// `a`: the scale falls by `a` per unit of `1000 − t`, clamped at 0.
    pub adaptive_scale: f64,
    /// diffusers' `pag_applied_layers`: regular expressions searched in the self-attention
    /// modules' paths (`mid`, `down_blocks.1`, `up_blocks.0.attentions.1`).
    pub layers: Vec<String>,
}

impl Default for PagParams {
    fn default() -> Self {
        PagParams {
            scale: 3.0,
            adaptive_scale: 0.0,
            layers: vec!["mid".into()],
        }
    }
}

impl PagParams {
    /// `s_t` at timestep `t` (diffusers' `_get_pag_scale`; f32 arithmetic, as torch does it on
    /// the integer timestep tensor).
    pub fn scale_at(&self, t: f64) -> f64 {
        if self.adaptive_scale > 0.0 && self.scale > 0.0 {
            let fall = self.adaptive_scale as f32 * (1000.0 - t) as f32;
            (self.scale as f32 - fall).max(0.0) as f64
        } else {
            self.scale
        }
    }

    /// The `attn1` module paths the patterns select, in forward order; an error names a pattern
    /// that selects none (and what exists) or does not parse.
    pub fn modules(&self, unet: &UNet2DConditionModel) -> Result<Vec<String>, PipelineError> {
        if !(self.scale.is_finite() && self.scale >= 0.0) {
            return Err(PipelineError::Input(format!(
                "--pag-scale {}: must be a finite number >= 0 (3 is diffusers' default)",
                self.scale
            )));
        }
        if !(self.adaptive_scale.is_finite() && self.adaptive_scale >= 0.0) {
            return Err(PipelineError::Input(format!(
                "--pag-adaptive-scale {}: must be a finite number >= 0",
                self.adaptive_scale
            )));
        }
        if self.layers.is_empty() {
            return Err(PipelineError::Input(
                "--pag-layers: name at least one layer (e.g. mid)".into(),
            ));
        }
        let own: Vec<String> = unet
            .attention_sites([8, 8])
            .into_iter()
            .filter(|s| !s.cross)
            .map(|s| s.path)
            .collect();
        let mut chosen = Vec::new();
        for pattern in &self.layers {
            let re = regex::Regex::new(pattern).map_err(|e| {
                PipelineError::Input(format!(
                    "--pag-layers `{pattern}` is not a regular expression: {e}"
                ))
            })?;
            let hits: Vec<&String> = own.iter().filter(|p| re.is_match(p)).collect();
            if hits.is_empty() {
                return Err(PipelineError::Input(format!(
                    "--pag-layers `{pattern}` matches no self-attention layer of this UNet; it \
                     has: {}",
                    own.join(", ")
                )));
            }
            chosen.extend(hits.into_iter().cloned());
        }
        chosen.sort_by_key(|p| own.iter().position(|o| o == p));
        chosen.dedup();
        Ok(chosen)
    }
}

pub struct Pag {
    params: PagParams,
    /// `[uncond x b; cond x b]` or `cond x b`: plain CFG (PAG scale 0).
    cfg_context: Conditioning,
    /// `cfg_context` and `cond x b` for the perturbed rows.
    context: Conditioning,
    perturbed: Vec<String>,
    images: usize,
    scale: f64,
    guided: bool,
}

impl Pag {
    pub fn new(
        unet: &UNet2DConditionModel,
        emb: &Embeddings,
        images: usize,
        scale: f64,
        params: &PagParams,
    ) -> Result<Self, PipelineError> {
        let perturbed = params.modules(unet)?;
        let (cfg_context, guided) = emb.context(images);
        let context = cfg_context.clone().cat(emb.cond_rows(images));
        Ok(Pag {
            params: params.clone(),
            cfg_context,
            context,
            perturbed,
            images,
            scale,
            guided,
        })
    }
}

impl Strategy for Pag {
    fn predict(
        &mut self,
        ctx: &StepContext,
        latents: &mut Tensor<4>,
    ) -> Result<StepPrediction, PipelineError> {
        let s = self.params.scale_at(ctx.timestep);
        if self.params.scale == 0.0 {
            // diffusers' `do_perturbed_attention_guidance` is off: plain CFG.
            return cfg_prediction(
                ctx,
                latents,
                &self.cfg_context,
                self.images,
                self.scale,
                self.guided,
            );
        }
        // One call: [uncond, cond, perturbed] as diffusers batches it (or [cond, perturbed]),
        // the chosen self-attention perturbed in the last `b` rows only.
        let b = self.images;
        let k = if self.guided { 3 } else { 2 };
        let input = ctx
            .scheduler
            .scale_model_input(super::repeat(latents, k), ctx.index);
        let opts = AttentionOptions {
            perturb_self: Capture::Prefixes(self.perturbed.clone()),
            perturb_from: (k - 1) * b,
            ..ctx.opts.clone()
        };
        let out = self.context.predict(ctx.unet, input, ctx.timestep, &opts)?;
        let start = if self.guided { b } else { 0 };
        let cross_attention = super::rows_of(out.cross_attention, start, b);
        let eps_p = out.sample.clone().narrow(0, (k - 1) * b, b);
        let cond = out.sample.clone().narrow(0, start, b);
        let eps = if self.guided {
            let uncond = out.sample.narrow(0, 0, b);
            combine(uncond, cond.clone(), self.scale) + (cond - eps_p).mul_scalar(s)
        } else {
            cond.clone() + (cond - eps_p).mul_scalar(s)
        };
        Ok(StepPrediction {
            eps,
            cross_attention,
        })
    }
}
