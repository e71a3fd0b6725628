//! The CLIP text transformer (transformers' `CLIPTextModel`, eager attention, and with the
//! optional `text_projection` its `CLIPTextModelWithProjection`), with field names that mirror
//! the reference's weight names so a checkpoint loads without remapping. The forward pass
//! returns, on request, every layer's hidden state and the self-attention probabilities of
//! chosen layers (the method reads its attention map from here), one chosen hidden state and the
//! pooled / projected embedding (what SDXL conditions on: [`ClipTextModel::sdxl_conditioning`]).

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, sigmoid, softmax};
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};

use crate::ClipError;
use crate::config::{Activation, ClipTextConfig};

/// Token and position embeddings (`embeddings.*`).
#[derive(Module, Debug)]
pub struct ClipTextEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

/// Multi-head causal self-attention (`self_attn.*`).
#[derive(Module, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    num_heads: usize,
}

/// Feed-forward block (`mlp.*`).
#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    quick_gelu: bool,
}

/// One pre-norm transformer layer (`encoder.layers.N.*`).
#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

/// The stack of layers (`encoder.*`).
#[derive(Module, Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

/// CLIP text transformer; parameter paths equal transformers' keys without `text_model.`.
#[derive(Module, Debug)]
pub struct ClipTextModel {
    pub embeddings: ClipTextEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
    /// `text_projection` (`[hidden] -> [projection_dim]`, no bias) of
    /// `CLIPTextModelWithProjection`, SDXL's second encoder: turns the pooled state into
    /// `text_embeds`. `None` for a plain `CLIPTextModel`. Its key has no `text_model.` prefix in
    /// transformers' files either.
    pub text_projection: Option<Linear>,
    /// The config's `eos_token_id`: it picks the pooling rule ([`Self::pooling_position`]).
    eos_token_id: u32,
}

/// What a forward pass should return besides the last hidden state.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// Return the embeddings' output and every layer's output (`n_layers + 1` tensors, as
    /// transformers' `hidden_states`).
    pub hidden_states: bool,
    /// Layers (0-based) whose attention probabilities are returned.
    pub attention_layers: Vec<usize>,
    /// Stop as soon as this layer's (0-based) attention probabilities exist: its values,
    /// output projection and MLP and all later layers are not run, and `last_hidden_state` is
    /// `None`. Training and analysis only read that map, and parameters that do not reach it
    /// then get no gradient (as in PyTorch, where they are off the loss's graph).
    pub stop_at_attention: Option<usize>,
    /// Return transformers' `hidden_states[k]` alone, in f32, as
    /// [`TextEncoderOutput::hidden_state`]: the output of the first `k` layers before any final
    /// layer norm (0: the embeddings). SDXL conditions on `hidden_states[-2]`, `k = n_layers - 1`
    /// (`-(clip_skip + 2)` with clip skip), and needs no other layer's output kept.
    pub hidden_state_at: Option<usize>,
    /// Stop once `hidden_state_at` is taken: later layers and the final layer norm are not run,
    /// `last_hidden_state` is `None`. SDXL's first encoder needs nothing else, so its last layer
    /// is not computed.
    pub stop_at_hidden_state: bool,
    /// One pooling position per batch row ([`ClipTextModel::pooling_position`]): return the
    /// final-normed last hidden state there as [`TextEncoderOutput::pooled`] (transformers'
    /// `pooler_output`) and, for a model with a projection, [`TextEncoderOutput::text_embeds`]
    /// (SDXL's pooled embedding). Positions rather than ids, so that
    /// [`ClipTextModel::forward_embeds`] can pool too.
    pub pool_at: Option<Vec<usize>>,
}

impl ForwardOptions {
    /// Attention of the given layers only.
    pub fn attention(layers: &[usize]) -> Self {
        ForwardOptions {
            attention_layers: layers.to_vec(),
            ..Default::default()
        }
    }

    /// Whether `model` can run these options on a `[batch, seq]` input: layers in range,
    /// `seq` within the position table, one pooling position per row inside the sequence, and
    /// no two options that contradict each other (a stop before an output asked for).
    pub fn check(&self, model: &ClipTextModel, batch: usize, seq: usize) -> Result<(), ClipError> {
        let n = model.num_layers();
        let bad = |m: String| Err(ClipError::Input(m));
        for &l in self.attention_layers.iter().chain(&self.stop_at_attention) {
            if l >= n {
                return bad(format!(
                    "layer {l} out of range: the encoder has {n} layers, numbered from 0"
                ));
            }
        }
        let positions = model.max_positions();
        if seq == 0 || seq > positions {
            return bad(format!(
                "a sequence of {seq} tokens: the encoder takes 1 to {positions}"
            ));
        }
        if let Some(k) = self.hidden_state_at {
            if k > n {
                return bad(format!(
                    "hidden state {k} does not exist: the encoder has {n} layers, so hidden \
                     states 0 (embeddings) to {n}"
                ));
            }
            if let Some(stop) = self.stop_at_attention.filter(|&s| k > s) {
                return bad(format!(
                    "hidden state {k} comes after layer {stop}, where the pass stops \
                     (stop_at_attention)"
                ));
            }
        }
        if self.stop_at_hidden_state {
            let Some(k) = self.hidden_state_at else {
                return bad("stop_at_hidden_state needs hidden_state_at".into());
            };
            if let Some(&l) = self.attention_layers.iter().find(|&&l| l >= k) {
                return bad(format!(
                    "the attention of layer {l} is asked for, but the pass stops after \
                     hidden state {k} (stop_at_hidden_state)"
                ));
            }
            if self.stop_at_attention.is_some() {
                return bad("stop_at_hidden_state and stop_at_attention both set: pick one".into());
            }
        }
        if let Some(pool) = &self.pool_at {
            if self.stop_at_attention.is_some() || self.stop_at_hidden_state {
                return bad(
                    "pooling needs the last hidden state, but the options stop the pass \
                     early (stop_at_attention / stop_at_hidden_state)"
                        .into(),
                );
            }
            if pool.len() != batch {
                return bad(format!(
                    "{} pooling positions for a batch of {batch}: give one per row",
                    pool.len()
                ));
            }
            if let Some(&p) = pool.iter().find(|&&p| p >= seq) {
                return bad(format!(
                    "pooling position {p} is outside the sequence of {seq} tokens"
                ));
            }
        }
        Ok(())
    }
}

/// Outputs of [`ClipTextModel::forward_with`].
#[derive(Debug, Clone)]
pub struct TextEncoderOutput {
    /// `[batch, seq, hidden]` after the final layer norm: what Stable Diffusion conditions on.
    pub last_hidden_state: Option<Tensor<3>>,
    /// `[batch, seq, hidden]` each, embeddings first, before the final layer norm.
    pub hidden_states: Vec<Tensor<3>>,
    /// `(layer, probabilities [batch, heads, seq(query), seq(key)])`, in the order asked for.
    pub attentions: Vec<(usize, Tensor<4>)>,
    /// `[batch, seq, hidden]`, f32: transformers' `hidden_states[k]` for
    /// [`ForwardOptions::hidden_state_at`] `= Some(k)`.
    pub hidden_state: Option<Tensor<3>>,
    /// `[batch, hidden]`, f32: the last hidden state at [`ForwardOptions::pool_at`]
    /// (transformers' `pooler_output`).
    pub pooled: Option<Tensor<2>>,
    /// `[batch, projection_dim]`, f32: `pooled` times `text_projection`, for a model that has
    /// one (transformers' `text_embeds`; SDXL's pooled prompt embedding).
    pub text_embeds: Option<Tensor<2>>,
}

impl TextEncoderOutput {
    /// The attention probabilities of `layer`, if they were asked for.
    pub fn attention(&self, layer: usize) -> Option<&Tensor<4>> {
        self.attentions
            .iter()
            .find(|(l, _)| *l == layer)
            .map(|(_, a)| a)
    }
}

/// Head-averaged attention map `[batch, query, key]`: the `A` of the method.
pub fn head_average(probs: Tensor<4>) -> Tensor<3> {
    probs.mean_dim(1).squeeze_dim(1)
}

/// What SDXL's UNet takes from one text encoder, as diffusers'
/// `StableDiffusionXLPipeline.encode_prompt` computes it.
#[derive(Debug, Clone)]
pub struct SdxlConditioning {
    /// `hidden_states[-(clip_skip + 2)]`, `[batch, seq, hidden]`, f32, no final layer norm. The
    /// UNet's context is encoder 1's and encoder 2's side by side: `Tensor::cat(vec![a, b], 2)`.
    pub hidden: Tensor<3>,
    /// `text_embeds`, `[batch, projection_dim]`, f32, for an encoder with a projection (SDXL's
    /// encoder 2: the pooled prompt embedding); `None` for one without (encoder 1).
    pub text_embeds: Option<Tensor<2>>,
}

impl ClipTextModel {
    /// A model of `config`'s shape with freshly initialised (random) parameters.
    pub fn new(config: &ClipTextConfig, device: &Device) -> Self {
        let h = config.hidden_size;
        let ln = || {
            LayerNormConfig::new(h)
                .with_epsilon(config.layer_norm_eps)
                .init(device)
        };
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let layers = (0..config.num_hidden_layers)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: lin(h, h),
                    k_proj: lin(h, h),
                    v_proj: lin(h, h),
                    out_proj: lin(h, h),
                    num_heads: config.num_attention_heads,
                },
                layer_norm1: ln(),
                mlp: ClipMlp {
                    fc1: lin(h, config.intermediate_size),
                    fc2: lin(config.intermediate_size, h),
                    quick_gelu: config.hidden_act == Activation::QuickGelu,
                },
                layer_norm2: ln(),
            })
            .collect();
        ClipTextModel {
            embeddings: ClipTextEmbeddings {
                token_embedding: EmbeddingConfig::new(config.vocab_size, h).init(device),
                position_embedding: EmbeddingConfig::new(config.max_position_embeddings, h)
                    .init(device),
            },
            encoder: ClipEncoder { layers },
            final_layer_norm: ln(),
            text_projection: config.has_projection().then(|| {
                LinearConfig::new(h, config.projection_dim)
                    .with_bias(false)
                    .init(device)
            }),
            eos_token_id: config.eos_token_id,
        }
    }

    pub fn num_layers(&self) -> usize {
        self.encoder.layers.len()
    }

    /// Rows of the position table: the longest sequence the encoder takes.
    pub fn max_positions(&self) -> usize {
        self.embeddings.position_embedding.weight.dims()[0]
    }

    /// Where transformers pools one row of `ids` for this encoder's `eos_token_id`
    /// ([`ClipTextConfig::pooling_position`]).
    pub fn pooling_position(&self, ids: &[u32]) -> usize {
        crate::config::pooling_position(self.eos_token_id, ids)
    }

    /// The [`ForwardOptions`] of [`Self::sdxl_conditioning`], for callers that run the pass
    /// themselves ([`Self::forward_embeds`]): `hidden_states[-(clip_skip + 2)]`, then for a
    /// model with a projection the pooled `text_embeds` at each row's pooling position, else a
    /// stop right there. `clip_skip` 0 is diffusers' `clip_skip=None`.
    pub fn sdxl_options<I: AsRef<[u32]>>(
        &self,
        ids: &[I],
        clip_skip: usize,
    ) -> Result<ForwardOptions, ClipError> {
        let n = self.num_layers();
        if clip_skip >= n {
            return Err(ClipError::Input(format!(
                "clip skip {clip_skip} is too large for an encoder of {n} layers: at most {}",
                n.saturating_sub(1)
            )));
        }
        let pooled = self.text_projection.is_some();
        Ok(ForwardOptions {
            hidden_state_at: Some(n - 1 - clip_skip),
            stop_at_hidden_state: !pooled,
            pool_at: pooled.then(|| {
                ids.iter()
                    .map(|row| self.pooling_position(row.as_ref()))
                    .collect()
            }),
            ..Default::default()
        })
    }

    /// What SDXL reads from this encoder for the rows of `ids` (each as long, at most the
    /// position table): `hidden_states[-(clip_skip + 2)]` and, for the encoder with a
    /// projection, `text_embeds`. Encoder 1 stops after the layer it needs; encoder 2 runs all
    /// of its layers, which the pooled embedding needs. Bad ids, ragged rows or too large a
    /// clip skip are errors, not panics.
    pub fn sdxl_conditioning<I: AsRef<[u32]>>(
        &self,
        ids: &[I],
        clip_skip: usize,
    ) -> Result<SdxlConditioning, ClipError> {
        let Some(seq) = ids.first().map(|r| r.as_ref().len()) else {
            return Err(ClipError::Input("no prompts: the batch is empty".into()));
        };
        let opts = self.sdxl_options(ids, clip_skip)?;
        if let Some(r) = ids.iter().find(|r| r.as_ref().len() != seq) {
            return Err(ClipError::Input(format!(
                "rows of {seq} and {} ids in one batch: tokenize every prompt to the same length \
                 (77)",
                r.as_ref().len()
            )));
        }
        let flat: Vec<u32> = ids
            .iter()
            .flat_map(|r| r.as_ref().iter().copied())
            .collect();
        self.check_ids(&flat)?;
        opts.check(self, ids.len(), seq)?;
        let data = TensorData::new(
            flat.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(),
            [ids.len(), seq],
        );
        let device = self.embeddings.token_embedding.weight.val().device();
        let out = self.forward_with(Tensor::from_data(data, &device), &opts);
        Ok(SdxlConditioning {
            hidden: out.hidden_state.expect("hidden_state_at was asked for"),
            text_embeds: out.text_embeds,
        })
    }

    /// Rows of the token embedding.
    pub fn vocab_size(&self) -> usize {
        self.embeddings.token_embedding.weight.dims()[0]
    }

    /// Every id must index the token embedding; a mismatched tokenizer is a user error, not a panic.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), crate::ClipError> {
        let vocab = self.vocab_size();
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(&id) => Err(crate::ClipError::IdOutOfVocab { id, vocab }),
            None => Ok(()),
        }
    }

    /// Last hidden state of `input_ids` `[batch, seq]`.
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        self.forward_with(input_ids, &ForwardOptions::default())
            .last_hidden_state
            .expect("a full forward pass has a last hidden state")
    }

    /// Forward pass returning what `opts` asks for.
    ///
    /// # Panics
    /// If `opts` do not fit the model or the input (a layer out of range, a sequence longer
    /// than the position table, ...); callers validate user input first with
    /// [`ForwardOptions::check`], or use [`Self::sdxl_conditioning`], which returns the error.
    pub fn forward_with(
        &self,
        input_ids: Tensor<2, Int>,
        opts: &ForwardOptions,
    ) -> TextEncoderOutput {
        let tokens = self.embeddings.token_embedding.forward(input_ids);
        self.forward_embeds(tokens, opts)
    }

    /// [`Self::forward_with`] from token embeddings `[batch, seq, hidden]` (position embeddings
    /// are added here). The trainer feeds rows of its own small table through this, so the
    /// 49408-row table needs no dense gradient.
    pub fn forward_embeds(&self, tokens: Tensor<3>, opts: &ForwardOptions) -> TextEncoderOutput {
        let [batch, seq, _] = tokens.dims();
        if let Err(e) = opts.check(self, batch, seq) {
            panic!("{e}");
        }
        let device = tokens.device();
        let positions = self
            .embeddings
            .position_embedding
            .weight
            .val()
            .narrow(0, 0, seq)
            .unsqueeze_dim::<3>(0);
        let mut x = tokens + positions;
        // burn's `tril_mask` is true *outside* the lower triangle: keys after the query.
        let causal = Tensor::<2, Bool>::tril_mask([seq, seq], 0, &device);

        let mut out = TextEncoderOutput {
            last_hidden_state: None,
            hidden_states: Vec::new(),
            attentions: Vec::new(),
            hidden_state: None,
            pooled: None,
            text_embeds: None,
        };
        if opts.hidden_states {
            out.hidden_states.push(x.clone());
        }
        // `hidden_states[k]` is the input of layer k (and, for k = n, the last layer's output).
        let take = |k: usize, x: &Tensor<3>, out: &mut TextEncoderOutput| {
            if opts.hidden_state_at == Some(k) {
                out.hidden_state = Some(x.clone().cast(DType::F32));
            }
            opts.stop_at_hidden_state && opts.hidden_state_at == Some(k)
        };
        let mut stopped = take(0, &x, &mut out);
        for (i, layer) in self.encoder.layers.iter().enumerate() {
            if stopped {
                break;
            }
            if opts.stop_at_attention == Some(i) {
                let probs = layer
                    .self_attn
                    .probabilities(ln(&layer.layer_norm1, x.clone()), causal);
                out.attentions.push((i, probs));
                break;
            }
            let (y, probs) = layer.forward(x, causal.clone());
            x = y;
            if opts.attention_layers.contains(&i) {
                out.attentions.push((i, probs));
            }
            if opts.hidden_states {
                out.hidden_states.push(x.clone());
            }
            stopped = take(i + 1, &x, &mut out);
        }
        out.attentions
            .sort_by_key(|(l, _)| opts.attention_layers.iter().position(|w| w == l));
        if opts.stop_at_attention.is_none() && !opts.stop_at_hidden_state {
            let last = ln(&self.final_layer_norm, x);
            if let Some(positions) = &opts.pool_at {
                let pooled = self.pool(last.clone(), positions);
                out.text_embeds = self
                    .text_projection
                    .as_ref()
                    .map(|p| p.forward(pooled.clone()).cast(DType::F32));
                out.pooled = Some(pooled.cast(DType::F32));
            }
            // f32 out whatever the precision the encoder runs in.
            out.last_hidden_state = Some(last.cast(DType::F32));
        }
        out
    }

    /// Row `b` of `last` `[batch, seq, hidden]` at `positions[b]`: `[batch, hidden]`.
    fn pool(&self, last: Tensor<3>, positions: &[usize]) -> Tensor<2> {
        let [b, seq, h] = last.dims();
        let flat: Vec<i64> = positions
            .iter()
            .enumerate()
            .map(|(row, &p)| (row * seq + p) as i64)
            .collect();
        let index = Tensor::<1, Int>::from_data(TensorData::new(flat, [b]), &last.device());
        last.reshape([b * seq, h]).select(0, index)
    }
}

impl ClipEncoderLayer {
    fn forward(&self, x: Tensor<3>, causal: Tensor<2, Bool>) -> (Tensor<3>, Tensor<4>) {
        let (attn, probs) = self
            .self_attn
            .forward(ln(&self.layer_norm1, x.clone()), causal);
        let x = x + attn;
        let x = x.clone() + self.mlp.forward(ln(&self.layer_norm2, x));
        (x, probs)
    }
}

impl ClipAttention {
    /// Returns the attention output and the probabilities `[batch, heads, query, key]`.
    fn forward(&self, x: Tensor<3>, causal: Tensor<2, Bool>) -> (Tensor<3>, Tensor<4>) {
        let [b, n, d] = x.dims();
        let probs = self.probabilities(x.clone(), causal);
        let v = self.split_heads(self.v_proj.forward(x));
        let ctx = probs
            .clone()
            .cast(v.dtype())
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b, n, d]);
        (self.out_proj.forward(ctx), probs)
    }

    /// `[batch, seq, hidden]` to `[batch, heads, seq, head_dim]`.
    fn split_heads(&self, t: Tensor<3>) -> Tensor<4> {
        let [b, n, d] = t.dims();
        t.reshape([b, n, self.num_heads, d / self.num_heads])
            .swap_dims(1, 2)
    }

    /// `softmax(q k^T / sqrt(head_dim))` under the causal mask: `[batch, heads, query, key]`.
    fn probabilities(&self, x: Tensor<3>, causal: Tensor<2, Bool>) -> Tensor<4> {
        let [b, n, d] = x.dims();
        let h = self.num_heads;
        let q = self.split_heads(self.q_proj.forward(x.clone()));
        let k = self.split_heads(self.k_proj.forward(x));
        let scale = ((d / h) as f64).powf(-0.5);
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
        let mask = causal.unsqueeze_dims::<4>(&[0, 1]).expand([b, h, n, n]);
        // In f32 whatever the encoder's precision: the method reads these probabilities.
        softmax(
            scores.cast(DType::F32).mask_fill(mask, f32::NEG_INFINITY),
            3,
        )
    }
}

/// A layer norm, in f32 when the encoder runs in half precision (`decorr_core::norm_f32`).
fn ln(norm: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
    decorr_core::norm_f32(x, |x| norm.forward(x))
}

impl ClipMlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = self.fc1.forward(x);
        let x = if self.quick_gelu {
            x.clone() * sigmoid(x.mul_scalar(1.702))
        } else {
            gelu(x)
        };
        self.fc2.forward(x)
    }
}
