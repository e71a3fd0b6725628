//! The CLIP text transformer (transformers' `CLIPTextModel`, eager attention), with field names
//! that mirror the reference's weight names so a checkpoint loads without remapping. The forward
//! pass returns, on request, every layer's hidden state and the self-attention probabilities of
//! chosen layers: the method reads its attention map from here.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, sigmoid, softmax};
use burn::tensor::{Bool, DType, Device, Int, Tensor};

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
}

impl ForwardOptions {
    /// Attention of the given layers only.
    pub fn attention(layers: &[usize]) -> Self {
        ForwardOptions {
            attention_layers: layers.to_vec(),
            ..Default::default()
        }
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
        }
    }

    pub fn num_layers(&self) -> usize {
        self.encoder.layers.len()
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
    /// If a requested layer is out of range or the sequence is longer than the position table;
    /// callers validate user input first ([`crate::ClipError::LayerOutOfRange`]).
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
        let n_layers = self.num_layers();
        for &l in opts
            .attention_layers
            .iter()
            .chain(opts.stop_at_attention.iter())
        {
            assert!(
                l < n_layers,
                "layer {l} out of range: the encoder has {n_layers} layers"
            );
        }
        let [_, seq, _] = tokens.dims();
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
        };
        if opts.hidden_states {
            out.hidden_states.push(x.clone());
        }
        for (i, layer) in self.encoder.layers.iter().enumerate() {
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
        }
        out.attentions
            .sort_by_key(|(l, _)| opts.attention_layers.iter().position(|w| w == l));
        if opts.stop_at_attention.is_none() {
            // f32 out whatever the precision the encoder runs in.
            out.last_hidden_state = Some(ln(&self.final_layer_norm, x).cast(DType::F32));
        }
        out
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
