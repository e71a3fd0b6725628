//! `UNet2DConditionModel` for the SD 1.x/2.x/XL family: time embedding (plus SDXL's `text_time`
//! added embedding of the pooled text and the size/crop conditions), down blocks (ResNets with
//! optional cross-attention transformers and a stride-2 down-sampler), the cross-attention mid
//! block, up blocks fed by the skip connections, and the output head. Field names are diffusers'
//! weight names. `forward_with` returns the noise prediction and any captured attention maps;
//! `forward_added` and `cross_attention_until_added` take SDXL's [`AddedConditions`].

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{DType, Device, Tensor};

use crate::attention::{
    AttentionMap, AttentionOptions, Recorder, Transformer2DModel, TransformerSpec,
};
use crate::blocks::{
    Downsample2D, ResnetBlock2D, TimestepEmbedding, Upsample2D, conv, group_norm, timestep_features,
};
use crate::config::UNetConfig;
use crate::{UNetError, host};

/// A down block (`down_blocks.N`): `CrossAttnDownBlock2D` when `attentions` is not empty, else
/// `DownBlock2D`.
#[derive(Module, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsamplers: Vec<Downsample2D>,
}

/// `UNetMidBlock2DCrossAttn` (`mid_block`): resnet, (transformer, resnet) x layers.
#[derive(Module, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

/// An up block (`up_blocks.N`): `CrossAttnUpBlock2D` or `UpBlock2D`; each ResNet takes a skip
/// connection concatenated on channels.
#[derive(Module, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsamplers: Vec<Upsample2D>,
}

/// The denoising UNet; parameter paths equal diffusers' keys (after the remaps in `load`).
#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    /// SDXL's `text_time` embedding (`add_embedding.linear_1`, `.linear_2`) of the pooled text
    /// embedding and the time ids' sinusoids, added to the time embedding; `None` without an
    /// `addition_embed_type`. (diffusers' `add_time_proj` has no weights.)
    pub add_embedding: Option<TimestepEmbedding>,
    /// Width of each time id's sinusoid (`addition_time_embed_dim`; 0 without `add_embedding`).
    add_time_channels: usize,
    time_channels: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    center_input_sample: bool,
}

/// SDXL's added conditions (diffusers' `added_cond_kwargs`), which a UNet with
/// `addition_embed_type: "text_time"` needs in every pass.
#[derive(Debug, Clone)]
pub struct AddedConditions {
    /// The second text encoder's pooled, projected embedding `[batch, pooled]`.
    pub text_embeds: Tensor<2>,
    /// The micro-conditions `[batch, k]`, each embedded as a sinusoid of
    /// `addition_time_embed_dim` features: SDXL base's six are original height and width, crop
    /// top and left, target height and width (the refiner's five end with the aesthetic score).
    /// Read as f32 values, as diffusers does.
    pub time_ids: Tensor<2>,
}

/// What a `text_time` UNet's [`AddedConditions`] must fit: `text_embeds` `[batch, P]` and
/// `time_ids` `[batch, K]` with `P + K * time_embed_dim == input_dim` (SDXL base: 1280 + 6 x
/// 256 = 2816).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeDims {
    /// `addition_time_embed_dim`: the width of each time id's sinusoid.
    pub time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim`: what `add_embedding.linear_1` takes.
    pub input_dim: usize,
}

/// What [`UNet2DConditionModel::forward_with`] returns.
#[derive(Debug, Clone)]
pub struct UNetOutput {
    /// The prediction (noise or v) `[batch, out_channels, h, w]`.
    pub sample: Tensor<4>,
    /// Captured cross-attention maps, in forward order.
    pub cross_attention: Vec<AttentionMap>,
    /// Captured self-attention maps, in forward order.
    pub self_attention: Vec<AttentionMap>,
}

impl UNet2DConditionModel {
    /// A randomly initialised UNet of `config` (validate it first; loading replaces the values).
    pub fn new(config: &UNetConfig, device: &Device) -> Self {
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let groups = config.norm_num_groups;
        let eps = config.norm_eps;
        let spec = |c: usize, i: usize| TransformerSpec {
            channels: c,
            heads: config.heads(i),
            context_dim: config.cross_attention_dim.get(i),
            layers: config.transformer_layers_per_block.get(i),
            groups,
            linear_projection: config.use_linear_projection,
        };

        let mut down_blocks = Vec::new();
        let mut cin = ch[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let cout = ch[i];
            let layers = config.layers_per_block.get(i);
            let cross = kind == "CrossAttnDownBlock2D";
            down_blocks.push(DownBlock {
                resnets: (0..layers)
                    .map(|l| {
                        let c = if l == 0 { cin } else { cout };
                        ResnetBlock2D::new(c, cout, Some(temb), groups, eps, device)
                    })
                    .collect(),
                attentions: if cross {
                    (0..layers)
                        .map(|_| Transformer2DModel::new(&spec(cout, i), device))
                        .collect()
                } else {
                    Vec::new()
                },
                downsamplers: if i + 1 < n {
                    vec![Downsample2D::new(cout, config.downsample_padding, device)]
                } else {
                    Vec::new()
                },
            });
            cin = cout;
        }

        let last = n - 1;
        let mid_block = config.mid_block_type.as_ref().map(|_| {
            let layers = config.transformer_layers_per_block.get(last);
            let c = ch[last];
            MidBlock {
                resnets: (0..2)
                    .map(|_| ResnetBlock2D::new(c, c, Some(temb), groups, eps, device))
                    .collect(),
                attentions: vec![Transformer2DModel::new(
                    &TransformerSpec {
                        layers,
                        ..spec(c, last)
                    },
                    device,
                )],
            }
        });

        let mut up_blocks = Vec::new();
        let mut prev = ch[last];
        for (j, kind) in config.up_block_types.iter().enumerate() {
            let i = last - j; // the mirrored down block
            let cout = ch[i];
            let skip_in = ch[i.saturating_sub(1)];
            let layers = config.layers_per_block.get(i) + 1;
            let cross = kind == "CrossAttnUpBlock2D";
            up_blocks.push(UpBlock {
                resnets: (0..layers)
                    .map(|l| {
                        let res_skip = if l == layers - 1 { skip_in } else { cout };
                        let res_in = if l == 0 { prev } else { cout };
                        ResnetBlock2D::new(res_in + res_skip, cout, Some(temb), groups, eps, device)
                    })
                    .collect(),
                attentions: if cross {
                    (0..layers)
                        .map(|_| Transformer2DModel::new(&spec(cout, i), device))
                        .collect()
                } else {
                    Vec::new()
                },
                upsamplers: if j < last {
                    vec![Upsample2D::new(cout, device)]
                } else {
                    Vec::new()
                },
            });
            prev = cout;
        }

        // `validate` has checked that a `text_time` config has both widths.
        let text_time = config.text_time_dims();
        UNet2DConditionModel {
            conv_in: conv(config.in_channels, ch[0], config.conv_in_kernel, device),
            time_embedding: TimestepEmbedding::new(ch[0], temb, device),
            add_embedding: text_time.map(|d| TimestepEmbedding::new(d.input_dim, temb, device)),
            add_time_channels: text_time.map_or(0, |d| d.time_embed_dim),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, ch[0], eps, device),
            conv_out: conv(ch[0], config.out_channels, config.conv_out_kernel, device),
            time_channels: ch[0],
            flip_sin_to_cos: config.flip_sin_to_cos,
            freq_shift: config.freq_shift,
            center_input_sample: config.center_input_sample,
        }
    }

    /// The prediction for `sample` `[batch, in_channels, h, w]` at `timesteps` (one per batch
    /// row) given the text encoder's `context` `[batch, tokens, cross_attention_dim]`.
    ///
    /// # Panics
    /// As [`Self::forward_with`].
    pub fn forward(&self, sample: Tensor<4>, timesteps: &[f64], context: &Tensor<3>) -> Tensor<4> {
        self.forward_with(sample, timesteps, context, &AttentionOptions::default())
            .sample
    }

    /// [`Self::forward`] with attention slicing, captured maps and perturbed self-attention as
    /// `opts` asks. (`opts.stop_after` is for [`Self::cross_attention_until`]; here the pass
    /// always completes.) For SD 1.x/2.x UNets; an SDXL (`text_time`) UNet needs
    /// [`Self::forward_added`].
    ///
    /// # Panics
    /// If `timesteps` does not hold one value per batch row, or the UNet is a `text_time` one
    /// (callers build both; [`Self::text_time_dims`] tells which UNet this is).
    pub fn forward_with(
        &self,
        sample: Tensor<4>,
        timesteps: &[f64],
        context: &Tensor<3>,
        opts: &AttentionOptions,
    ) -> UNetOutput {
        self.forward_added(sample, timesteps, context, None, opts)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::forward_with`] with SDXL's added conditions: `Some` for a UNet whose config sets
    /// `addition_embed_type: "text_time"`, `None` for the others. Either mismatch, or
    /// conditions whose batch or widths do not fit ([`TextTimeDims`]), is an error that says
    /// so, before any layer runs.
    ///
    /// # Panics
    /// If `timesteps` does not hold one value per batch row (callers build it).
    pub fn forward_added(
        &self,
        sample: Tensor<4>,
        timesteps: &[f64],
        context: &Tensor<3>,
        added: Option<&AddedConditions>,
        opts: &AttentionOptions,
    ) -> Result<UNetOutput, UNetError> {
        let opts = &AttentionOptions {
            stop_after: None,
            ..opts.clone()
        };
        let (out, rec) = self.run(sample, timesteps, context, added, opts)?;
        Ok(UNetOutput {
            sample: out.expect("a pass without stop_after completes"),
            cross_attention: rec.cross,
            self_attention: rec.self_attn,
        })
    }

    /// The captured cross-attention maps of a pass that stops after the cross-attention module
    /// `last` (a path from [`Self::attention_sites`]): the layers after it cannot change the maps,
    /// so a gradient of the maps (Attend-and-Excite) needs only this part of the UNet.
    ///
    /// # Panics
    /// As [`Self::forward_with`].
    pub fn cross_attention_until(
        &self,
        sample: Tensor<4>,
        timesteps: &[f64],
        context: &Tensor<3>,
        opts: &AttentionOptions,
        last: &str,
    ) -> Vec<AttentionMap> {
        self.cross_attention_until_added(sample, timesteps, context, None, opts, last)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::cross_attention_until`] with SDXL's added conditions, as
    /// [`Self::forward_added`] takes them.
    ///
    /// # Panics
    /// If `timesteps` does not hold one value per batch row (callers build it).
    pub fn cross_attention_until_added(
        &self,
        sample: Tensor<4>,
        timesteps: &[f64],
        context: &Tensor<3>,
        added: Option<&AddedConditions>,
        opts: &AttentionOptions,
        last: &str,
    ) -> Result<Vec<AttentionMap>, UNetError> {
        let opts = &AttentionOptions {
            stop_after: Some(last.to_string()),
            ..opts.clone()
        };
        Ok(self.run(sample, timesteps, context, added, opts)?.1.cross)
    }

    /// The widths SDXL's added conditions must have, for a `text_time` UNet; `None` for a UNet
    /// that takes none (SD 1.x/2.x).
    pub fn text_time_dims(&self) -> Option<TextTimeDims> {
        self.add_embedding.as_ref().map(|e| TextTimeDims {
            time_embed_dim: self.add_time_channels,
            input_dim: e.linear_1.weight.dims()[0],
        })
    }

    /// Stores every 3x3 convolution weight that the flex host path runs split per kernel tap
    /// ([`host::store_taps`]), in the layout of a pass at `latent_hw` (the config's
    /// `sample_size`), so that no pass keeps a second, split copy of them; `load_unet` calls it.
    /// No effect on other backends.
    pub fn store_conv_taps(&mut self, latent_hw: [usize; 2]) {
        let sizes = self.level_sizes(latent_hw);
        let n = sizes.len();
        host::store_taps(&mut self.conv_in, sizes[0]);
        host::store_taps(&mut self.conv_out, sizes[0]);
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            block
                .resnets
                .iter_mut()
                .for_each(|r| r.store_taps(sizes[i]));
        }
        if let Some(mid) = &mut self.mid_block {
            mid.resnets
                .iter_mut()
                .for_each(|r| r.store_taps(sizes[n - 1]));
        }
        for (j, block) in self.up_blocks.iter_mut().enumerate() {
            let i = n - 1 - j;
            block
                .resnets
                .iter_mut()
                .for_each(|r| r.store_taps(sizes[i]));
            for up in &mut block.upsamplers {
                host::store_taps(&mut up.conv, sizes[i.saturating_sub(1)]);
            }
        }
    }

    /// The feature-map size of each level for a latent of `latent_hw`: stride-2 3x3
    /// convolutions with padding 1 round up.
    fn level_sizes(&self, latent_hw: [usize; 2]) -> Vec<[usize; 2]> {
        let mut sizes = vec![latent_hw];
        for _ in 1..self.down_blocks.len().max(1) {
            let [h, w] = *sizes.last().expect("one level");
            sizes.push([h.div_ceil(2), w.div_ceil(2)]);
        }
        sizes
    }

    /// Every attention module (`...attn1`, `...attn2`) in forward order with the feature-map
    /// size it sees for a latent of `latent_hw`: for choosing modules by name (PAG's layers) or
    /// by resolution (Attend-and-Excite's maps) before a pass, and naming what exists.
    pub fn attention_sites(&self, latent_hw: [usize; 2]) -> Vec<AttentionSite> {
        let mut sites = Vec::new();
        let mut push = |path: String, t: &Transformer2DModel, hw: [usize; 2]| {
            for i in 0..t.transformer_blocks.len() {
                for (name, cross) in [("attn1", false), ("attn2", true)] {
                    sites.push(AttentionSite {
                        path: format!("{path}.transformer_blocks.{i}.{name}"),
                        cross,
                        height: hw[0],
                        width: hw[1],
                    });
                }
            }
        };
        let sizes = self.level_sizes(latent_hw);
        for (i, block) in self.down_blocks.iter().enumerate() {
            for (l, t) in block.attentions.iter().enumerate() {
                push(format!("down_blocks.{i}.attentions.{l}"), t, sizes[i]);
            }
        }
        if let Some(mid) = &self.mid_block {
            for (l, t) in mid.attentions.iter().enumerate() {
                push(
                    format!("mid_block.attentions.{l}"),
                    t,
                    sizes[sizes.len() - 1],
                );
            }
        }
        let n = self.up_blocks.len();
        for (j, block) in self.up_blocks.iter().enumerate() {
            for (l, t) in block.attentions.iter().enumerate() {
                push(format!("up_blocks.{j}.attentions.{l}"), t, sizes[n - 1 - j]);
            }
        }
        sites
    }

    /// diffusers' `get_aug_embed` for `text_time`: each time id through the sinusoids of
    /// `add_time_proj` (f32, the time embedding's flip and shift), `[b, k * dim]` after the
    /// pooled `text_embeds`, through `add_embedding`; `None` for a UNet without one. The
    /// conditions are checked against the UNet and the batch `b` first.
    fn added_embedding(
        &self,
        added: Option<&AddedConditions>,
        b: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Tensor<2>>, UNetError> {
        let bad = |m: String| Err(UNetError::Input(m));
        let (embedding, added) = match (&self.add_embedding, added) {
            (None, None) => return Ok(None),
            (None, Some(_)) => {
                return bad(
                    "added conditions (text_embeds, time_ids) were passed to a UNet \
                            without an addition embedding (its config sets no \
                            `addition_embed_type`): pass None for an SD 1.x/2.x UNet"
                        .into(),
                );
            }
            (Some(e), Some(a)) => (e, a),
            (Some(_), None) => {
                return bad(
                    "this UNet's config sets `addition_embed_type: \"text_time\"` \
                            (SDXL): every pass needs the pooled text embedding and the time \
                            ids; call `forward_added` / `cross_attention_until_added` with \
                            `AddedConditions`"
                        .into(),
                );
            }
        };
        let dims = TextTimeDims {
            time_embed_dim: self.add_time_channels,
            input_dim: embedding.linear_1.weight.dims()[0],
        };
        let [tb, pooled] = added.text_embeds.dims();
        let [ib, k] = added.time_ids.dims();
        if tb != b || ib != b {
            return bad(format!(
                "added conditions: `text_embeds` has {tb} rows and `time_ids` {ib}, but the \
                 sample has a batch of {b}; give one row of each per batch row"
            ));
        }
        let want = dims.input_dim;
        if pooled + k * dims.time_embed_dim != want {
            return bad(format!(
                "added conditions: `text_embeds` [{b}, {pooled}] and `time_ids` [{b}, {k}] give \
                 {pooled} + {k} x {} = {} inputs, but `add_embedding.linear_1` takes {want} \
                 (`projection_class_embeddings_input_dim`); check the pooled embedding's width \
                 (the second text encoder's projection) and the number of time ids",
                dims.time_embed_dim,
                pooled + k * dims.time_embed_dim
            ));
        }
        // torch embeds `time_ids.flatten()` as f32, whatever the ids' dtype.
        let ids: Vec<f64> = added
            .time_ids
            .clone()
            .cast(DType::F32)
            .into_data()
            .iter::<f32>()
            .map(f64::from)
            .collect();
        let time_embeds = timestep_features(
            &ids,
            dims.time_embed_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
            device,
        )
        .reshape([b, k * dims.time_embed_dim]);
        let input = Tensor::cat(
            vec![
                added.text_embeds.clone().cast(dtype),
                time_embeds.cast(dtype),
            ],
            1,
        );
        Ok(Some(embedding.forward(input)))
    }

    /// The pass itself: `None` for the prediction when it stopped at `opts.stop_after`.
    fn run<'a>(
        &self,
        sample: Tensor<4>,
        timesteps: &[f64],
        context: &Tensor<3>,
        added: Option<&AddedConditions>,
        opts: &'a AttentionOptions,
    ) -> Result<(Option<Tensor<4>>, Recorder<'a>), UNetError> {
        let [b, _, _, _] = sample.dims();
        assert_eq!(timesteps.len(), b, "one timestep per batch row");
        let device = sample.device();
        // Inputs in the weights' precision (`decorr_core::cast_module`); the prediction and the
        // recorded maps come back in f32, so callers never see half precision.
        let dtype = self.conv_in.weight.val().dtype();
        let aug = self.added_embedding(added, b, dtype, &device)?;
        let sample = sample.cast(dtype);
        let context = &context.clone().cast(dtype);
        let mut rec = Recorder::new(opts);
        let t = timestep_features(
            timesteps,
            self.time_channels,
            self.flip_sin_to_cos,
            self.freq_shift,
            &device,
        );
        let emb = self.time_embedding.forward(t.cast(dtype));
        let emb = match aug {
            Some(aug) => emb + aug,
            None => emb,
        };
        let sample = if self.center_input_sample {
            sample.mul_scalar(2.0).sub_scalar(1.0)
        } else {
            sample
        };

        let mut x = host::conv2d(&self.conv_in, sample);
        let mut skips = vec![x.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            for (l, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(x, Some(&emb));
                if let Some(attn) = block.attentions.get(l) {
                    x = attn.forward(
                        x,
                        context,
                        &format!("down_blocks.{i}.attentions.{l}"),
                        &mut rec,
                    );
                    if rec.stopped {
                        return Ok((None, rec));
                    }
                }
                skips.push(x.clone());
            }
            for down in &block.downsamplers {
                x = down.forward(x);
                skips.push(x.clone());
            }
        }
        if let Some(mid) = &self.mid_block {
            x = mid.resnets[0].forward(x, Some(&emb));
            for (l, (attn, resnet)) in mid.attentions.iter().zip(&mid.resnets[1..]).enumerate() {
                x = attn.forward(x, context, &format!("mid_block.attentions.{l}"), &mut rec);
                if rec.stopped {
                    return Ok((None, rec));
                }
                x = resnet.forward(x, Some(&emb));
            }
        }
        for (j, block) in self.up_blocks.iter().enumerate() {
            for (l, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up-block resnet");
                x = resnet.forward(Tensor::cat(vec![x, skip], 1), Some(&emb));
                if let Some(attn) = block.attentions.get(l) {
                    x = attn.forward(
                        x,
                        context,
                        &format!("up_blocks.{j}.attentions.{l}"),
                        &mut rec,
                    );
                    if rec.stopped {
                        return Ok((None, rec));
                    }
                }
            }
            for up in &block.upsamplers {
                // Up-sample to the next skip's size (odd sizes were rounded up going down).
                let size = skips.last().map(|s| {
                    let [_, _, h, w] = s.dims();
                    [h, w]
                });
                x = up.forward(x, size);
            }
        }
        let x = host::conv2d(
            &self.conv_out,
            host::group_norm(&self.conv_norm_out, x, true),
        );
        Ok((Some(x.cast(DType::F32)), rec))
    }
}

/// An attention module of the UNet and the feature-map size it attends over.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSite {
    /// diffusers' module path, e.g. `mid_block.attentions.0.transformer_blocks.0.attn1`.
    pub path: String,
    /// `attn2` (keys from the text) rather than `attn1`.
    pub cross: bool,
    pub height: usize,
    pub width: usize,
}
