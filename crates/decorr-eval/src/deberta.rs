//! DeBERTa v1 (transformers' `DebertaModel`, eager attention), the encoder of
//! `microsoft/deberta-xlarge-mnli` that `bert_score` recommends (layer 40 of 48), with its
//! config, loader (`model.safetensors` or `pytorch_model.bin`, keys with or without the
//! `deberta.` prefix of `DebertaForSequenceClassification` checkpoints) and its byte-level BPE
//! tokenizer. Field names mirror transformers' weight keys (`embeddings.word_embeddings`,
//! `encoder.layer.N.attention.self.in_proj`, `encoder.rel_embeddings`, ...); the one exception
//! is `self`, a Rust keyword, which is the field `self_` (keys are remapped on load).
//!
//! Masking follows transformers 5.24: scores of masked (query, key) pairs are replaced by
//! `f32::MIN` before the softmax, so real tokens give padding keys probability 0 exactly as the
//! old `XSoftmax` did; rows of padding queries (every key masked) come out uniform, where
//! `XSoftmax` zeroed them. Only padding positions differ between the two, and BERTScore never
//! reads those; this module matches 5.24 at every position.
//!
//! Tokenization as `bert_score` 0.3.13 does it with transformers 5.24 ([`sent_encode`]): in 5.x
//! `DebertaTokenizer` derives from neither `GPT2Tokenizer` nor `RobertaTokenizer`, so
//! `sent_encode` takes its generic branch, `tokenizer.encode(sent.strip(),
//! add_special_tokens=True, max_length=model_max_length, truncation=True)`: **no**
//! `add_prefix_space` (with transformers 4, where the class derived from `GPT2Tokenizer`, the
//! first word got a leading space). The result is `[CLS] tokens [SEP]`.

// Fields are named `LayerNorm` like transformers' keys; the Module derive copies the name
// into local variables, so the lint is silenced for the whole file.
#![allow(non_snake_case)]

use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, relu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Deserializer, Serialize};

use decorr_core::ModelFile;
use decorr_core::weights::{KeyMap, load_safetensors};

use crate::EvalError;
use crate::encoder::LayerEncoder;

/// `config.json` of a DeBERTa v1 checkpoint; defaults are those of transformers'
/// `DebertaConfig`. Unknown keys (dropouts, pooler, labels) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DebertaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// 0: no token-type embeddings.
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub relative_attention: bool,
    /// Below 1: `max_position_embeddings` ([`Self::max_relative_positions`]).
    #[serde(default = "default_max_relative_positions")]
    pub max_relative_positions: i64,
    #[serde(default = "default_true")]
    pub position_biased_input: bool,
    /// A list, or the `"c2p|p2c"` string of old configs, or null; stored normalised.
    #[serde(default, deserialize_with = "de_pos_att_type")]
    pub pos_att_type: Vec<String>,
    /// Width of the word embeddings; `embeddings.embed_proj` maps it to `hidden_size`.
    #[serde(default)]
    pub embedding_size: Option<usize>,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// Not built (refused by [`Self::validate`]).
    #[serde(default)]
    pub talking_head: bool,
}

fn default_model_type() -> String {
    "deberta".into()
}
fn default_vocab_size() -> usize {
    50265
}
fn default_hidden_size() -> usize {
    768
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    12
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_max_position_embeddings() -> usize {
    512
}
fn default_layer_norm_eps() -> f64 {
    1e-7
}
fn default_max_relative_positions() -> i64 {
    -1
}
fn default_true() -> bool {
    true
}

/// `pos_att_type` as transformers' `DebertaConfig.__post_init__` normalises it: a string is
/// lower-cased and split on `|`, each part stripped.
fn de_pos_att_type<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Option::<Raw>::deserialize(d)? {
        None => Vec::new(),
        Some(Raw::List(v)) => v,
        Some(Raw::Text(s)) => s
            .to_lowercase()
            .split('|')
            .map(|x| x.trim().to_string())
            .collect(),
    })
}

impl DebertaConfig {
    /// The configuration of `microsoft/deberta-xlarge-mnli` (its `config.json`, heads aside).
    pub fn xlarge_mnli() -> Self {
        DebertaConfig {
            model_type: "deberta".into(),
            vocab_size: 50265,
            hidden_size: 1024,
            num_hidden_layers: 48,
            num_attention_heads: 16,
            intermediate_size: 4096,
            hidden_act: "gelu".into(),
            max_position_embeddings: 512,
            type_vocab_size: 0,
            layer_norm_eps: 1e-7,
            relative_attention: true,
            max_relative_positions: -1,
            position_biased_input: false,
            pos_att_type: vec!["c2p".into(), "p2c".into()],
            embedding_size: None,
            pad_token_id: Some(0),
            talking_head: false,
        }
    }

    /// Range of relative positions: `max_relative_positions`, or `max_position_embeddings`
    /// when it is below 1 (as transformers).
    pub fn max_relative_positions(&self) -> usize {
        if self.max_relative_positions < 1 {
            self.max_position_embeddings
        } else {
            self.max_relative_positions as usize
        }
    }

    pub fn embedding_size(&self) -> usize {
        self.embedding_size.unwrap_or(self.hidden_size)
    }

    fn c2p(&self) -> bool {
        self.pos_att_type.iter().any(|t| t == "c2p")
    }

    fn p2c(&self) -> bool {
        self.pos_att_type.iter().any(|t| t == "p2c")
    }

    /// Refuse what this module does not build, naming the setting.
    pub fn validate(&self) -> Result<(), EvalError> {
        let bad = |m: String| Err(EvalError::Input(format!("DeBERTa config.json: {m}")));
        if self.model_type != "deberta" {
            return bad(format!(
                "model_type `{}` is not supported: only DeBERTa v1 (`deberta`, e.g. \
                 microsoft/deberta-xlarge-mnli) is built here; DeBERTa-v2/v3 differ",
                self.model_type
            ));
        }
        if self.talking_head {
            return bad(
                "`talking_head: true` is not supported (no released DeBERTa v1 \
                        checkpoint uses it)"
                    .into(),
            );
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "relu") {
            return bad(format!(
                "hidden_act `{}` is not supported (use `gelu` or `relu`)",
                self.hidden_act
            ));
        }
        if let Some(t) = self
            .pos_att_type
            .iter()
            .find(|t| !matches!(t.as_str(), "c2p" | "p2c"))
        {
            return bad(format!(
                "pos_att_type entry `{t}` is not supported (only `c2p` and `p2c`)"
            ));
        }
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} is not a positive multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.relative_attention && self.max_relative_positions() == 0 {
            return bad("relative_attention needs max_relative_positions or \
                        max_position_embeddings above 0"
                .into());
        }
        Ok(())
    }
}

/// Word (+ position, + token type) embeddings, `embed_proj`, LayerNorm (`embeddings.*`).
#[derive(Module, Debug)]
pub struct DebertaEmbeddings {
    pub word_embeddings: Embedding,
    /// Only with `position_biased_input` (xlarge-mnli has none; a stray
    /// `embeddings.position_embeddings.weight` in its file is ignored, as transformers does).
    pub position_embeddings: Option<Embedding>,
    /// Only with `type_vocab_size > 0`; `bert_score` passes no token types, so row 0 is added.
    pub token_type_embeddings: Option<Embedding>,
    /// Only when `embedding_size != hidden_size`.
    pub embed_proj: Option<Linear>,
    pub LayerNorm: LayerNorm,
}

/// Disentangled self-attention (`attention.self.*`).
#[derive(Module, Debug)]
pub struct DisentangledSelfAttention {
    /// Fused projection, no bias; output rows are per head `[q | k | v]` (`head_dim` each).
    pub in_proj: Linear,
    pub q_bias: Param<Tensor<1>>,
    pub v_bias: Param<Tensor<1>>,
    /// Content→position keys (`c2p`), no bias.
    pub pos_proj: Option<Linear>,
    /// Position→content queries (`p2c`), with bias.
    pub pos_q_proj: Option<Linear>,
    num_heads: usize,
    /// `1 + len(pos_att_type)`: scores are divided by `sqrt(head_dim * scale_factor)`.
    scale_factor: usize,
}

/// `attention.output.*`: dense, residual, LayerNorm.
#[derive(Module, Debug)]
pub struct DebertaSelfOutput {
    pub dense: Linear,
    pub LayerNorm: LayerNorm,
}

/// `attention.*`; `self_` holds the keys `attention.self.*`.
#[derive(Module, Debug)]
pub struct DebertaAttention {
    pub self_: DisentangledSelfAttention,
    pub output: DebertaSelfOutput,
}

/// `intermediate.*`.
#[derive(Module, Debug)]
pub struct DebertaIntermediate {
    pub dense: Linear,
    relu: bool,
}

/// `output.*`: dense, residual, LayerNorm.
#[derive(Module, Debug)]
pub struct DebertaOutput {
    pub dense: Linear,
    pub LayerNorm: LayerNorm,
}

/// One layer (`encoder.layer.N.*`).
#[derive(Module, Debug)]
pub struct DebertaLayer {
    pub attention: DebertaAttention,
    pub intermediate: DebertaIntermediate,
    pub output: DebertaOutput,
}

/// `encoder.*`: layers and the relative-position embeddings shared by all layers.
#[derive(Module, Debug)]
pub struct DebertaEncoder {
    pub layer: Vec<DebertaLayer>,
    /// `[2 * max_relative_positions, hidden]`, only with `relative_attention`.
    pub rel_embeddings: Option<Embedding>,
    max_relative_positions: usize,
}

/// transformers' `DebertaModel`; parameter paths equal its keys (`self` → `self_`).
#[derive(Module, Debug)]
pub struct DebertaModel {
    pub embeddings: DebertaEmbeddings,
    pub encoder: DebertaEncoder,
}

impl DebertaModel {
    /// A model of `config`'s shape with freshly initialised parameters (callers load weights;
    /// `config` must have passed [`DebertaConfig::validate`]).
    pub fn new(config: &DebertaConfig, device: &Device) -> Self {
        let h = config.hidden_size;
        let e = config.embedding_size();
        let ln = || {
            LayerNormConfig::new(h)
                .with_epsilon(config.layer_norm_eps)
                .init(device)
        };
        let lin = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device);
        let rel = config.relative_attention;
        let layers = (0..config.num_hidden_layers)
            .map(|_| DebertaLayer {
                attention: DebertaAttention {
                    self_: DisentangledSelfAttention {
                        in_proj: lin(h, 3 * h, false),
                        q_bias: Param::from_tensor(Tensor::zeros([h], device)),
                        v_bias: Param::from_tensor(Tensor::zeros([h], device)),
                        pos_proj: (rel && config.c2p()).then(|| lin(h, h, false)),
                        pos_q_proj: (rel && config.p2c()).then(|| lin(h, h, true)),
                        num_heads: config.num_attention_heads,
                        scale_factor: 1 + config.pos_att_type.len(),
                    },
                    output: DebertaSelfOutput {
                        dense: lin(h, h, true),
                        LayerNorm: ln(),
                    },
                },
                intermediate: DebertaIntermediate {
                    dense: lin(h, config.intermediate_size, true),
                    relu: config.hidden_act == "relu",
                },
                output: DebertaOutput {
                    dense: lin(config.intermediate_size, h, true),
                    LayerNorm: ln(),
                },
            })
            .collect();
        let max_rel = config.max_relative_positions();
        DebertaModel {
            embeddings: DebertaEmbeddings {
                word_embeddings: EmbeddingConfig::new(config.vocab_size, e).init(device),
                position_embeddings: config
                    .position_biased_input
                    .then(|| EmbeddingConfig::new(config.max_position_embeddings, e).init(device)),
                token_type_embeddings: (config.type_vocab_size > 0)
                    .then(|| EmbeddingConfig::new(config.type_vocab_size, e).init(device)),
                embed_proj: (e != h).then(|| lin(e, h, false)),
                LayerNorm: ln(),
            },
            encoder: DebertaEncoder {
                layer: layers,
                rel_embeddings: rel.then(|| EmbeddingConfig::new(2 * max_rel, h).init(device)),
                max_relative_positions: max_rel,
            },
        }
    }

    /// Rows of the word embedding.
    pub fn vocab_size(&self) -> usize {
        self.embeddings.word_embeddings.weight.dims()[0]
    }

    /// Longest input the model accepts: the position table's rows with absolute positions,
    /// unbounded otherwise (relative positions are clamped).
    pub fn max_len(&self) -> Option<usize> {
        self.embeddings
            .position_embeddings
            .as_ref()
            .map(|p| p.weight.dims()[0])
    }

    /// Check user input before [`LayerEncoder::hidden_state`] (which panics on it): every id
    /// indexes the vocabulary and no sequence is longer than [`Self::max_len`].
    pub fn check_input(&self, ids: &[u32], seq_len: usize) -> Result<(), EvalError> {
        let vocab = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EvalError::Input(format!(
                "token id {id} is outside the DeBERTa vocabulary ({vocab} rows): tokenizer and \
                 model do not match"
            )));
        }
        if let Some(max) = self.max_len().filter(|&m| seq_len > m) {
            return Err(EvalError::Input(format!(
                "sequence of {seq_len} tokens is longer than the model's {max} positions: \
                 truncate the text"
            )));
        }
        Ok(())
    }

    /// Hidden states 0..=`upto` (0 = embedding output), as transformers' `hidden_states`.
    ///
    /// # Panics
    /// If `upto > num_layers` or the input fails [`Self::check_input`].
    pub fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
        upto: usize,
    ) -> Vec<Tensor<3>> {
        let n_layers = self.encoder.layer.len();
        assert!(
            upto <= n_layers,
            "layer {upto} out of range: the DeBERTa model has {n_layers} layers"
        );
        let [b, n] = input_ids.dims();
        let device = input_ids.device();
        // [b, n, 1] float 0/1, and the pair mask [b, 1, n, n] that is true where a score is
        // masked (query or key is padding), as `get_attention_mask` builds it.
        let m = attention_mask.float().reshape([b, n, 1]);
        let masked = m
            .clone()
            .matmul(m.clone().swap_dims(1, 2))
            .equal_elem(0.0)
            .reshape([b, 1, n, n]);
        let mut x = self.embeddings.forward(input_ids, m);
        let rel = self.encoder.relative(n, &device);
        let mut out = Vec::with_capacity(upto + 1);
        out.push(x.clone());
        for layer in self.encoder.layer.iter().take(upto) {
            x = layer.forward(x, masked.clone(), rel.as_ref());
            out.push(x.clone());
        }
        out
    }
}

impl LayerEncoder for DebertaModel {
    fn hidden_state(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
        layer: usize,
    ) -> Tensor<3> {
        self.hidden_states(input_ids, attention_mask, layer)
            .pop()
            .expect("hidden_states returns layer+1 tensors")
    }

    fn num_layers(&self) -> usize {
        self.encoder.layer.len()
    }
}

impl DebertaEmbeddings {
    /// `mask` `[b, n, 1]`: padding rows of the output are zeroed, as transformers does.
    fn forward(&self, input_ids: Tensor<2, Int>, mask: Tensor<3>) -> Tensor<3> {
        let [_, n] = input_ids.dims();
        let mut x = self.word_embeddings.forward(input_ids);
        if let Some(p) = &self.position_embeddings {
            x = x + p.weight.val().narrow(0, 0, n).unsqueeze_dim::<3>(0);
        }
        if let Some(t) = &self.token_type_embeddings {
            x = x + t.weight.val().narrow(0, 0, 1).unsqueeze_dim::<3>(0);
        }
        if let Some(proj) = &self.embed_proj {
            x = proj.forward(x);
        }
        self.LayerNorm.forward(x) * mask
    }
}

/// Relative-position inputs shared by all layers for one sequence length.
struct RelPos {
    /// `rel_embeddings[max - span .. max + span]`, `[1, 2 * span, hidden]`.
    embeddings: Tensor<3>,
    /// `clamp(q - k + span, 0, 2 * span - 1)` `[n, n]`: the bucket of (query q, key k), used by
    /// both c2p and p2c (transformers' `c2p_pos`, and `p2c_pos` after its transpose).
    index: Tensor<2, Int>,
}

impl DebertaEncoder {
    fn relative(&self, n: usize, device: &Device) -> Option<RelPos> {
        let table = self.rel_embeddings.as_ref()?;
        let max = self.max_relative_positions;
        let span = n.min(max);
        let embeddings = table
            .weight
            .val()
            .narrow(0, max - span, 2 * span)
            .unsqueeze_dim::<3>(0);
        let (s, top) = (span as i64, 2 * span as i64 - 1);
        let index: Vec<i64> = (0..n as i64)
            .flat_map(|q| (0..n as i64).map(move |k| (q - k + s).clamp(0, top)))
            .collect();
        let index = Tensor::from_data(TensorData::new(index, [n, n]), device);
        Some(RelPos { embeddings, index })
    }
}

impl DebertaLayer {
    fn forward(
        &self,
        x: Tensor<3>,
        masked: Tensor<4, burn::tensor::Bool>,
        rel: Option<&RelPos>,
    ) -> Tensor<3> {
        let ctx = self.attention.self_.forward(x.clone(), masked, rel);
        let out = &self.attention.output;
        let attn = out.LayerNorm.forward(out.dense.forward(ctx) + x);
        let mut inter = self.intermediate.dense.forward(attn.clone());
        inter = if self.intermediate.relu {
            relu(inter)
        } else {
            gelu(inter)
        };
        self.output
            .LayerNorm
            .forward(self.output.dense.forward(inter) + attn)
    }
}

impl DisentangledSelfAttention {
    /// `[b, n, h*d]` → `[b, h, n, d]`.
    fn split_heads(&self, t: Tensor<3>) -> Tensor<4> {
        let [b, n, w] = t.dims();
        t.reshape([b, n, self.num_heads, w / self.num_heads])
            .swap_dims(1, 2)
    }

    /// Context `[b, n, hidden]` (before `attention.output`).
    fn forward(
        &self,
        x: Tensor<3>,
        masked: Tensor<4, burn::tensor::Bool>,
        rel: Option<&RelPos>,
    ) -> Tensor<3> {
        let [b, n, hidden] = x.dims();
        let h = self.num_heads;
        let d = hidden / h;
        // `transpose_for_scores(in_proj(x)).chunk(3, -1)`: per head, q | k | v.
        let qkv = self.split_heads(self.in_proj.forward(x));
        let bias = |p: &Param<Tensor<1>>| p.val().reshape([1, h, 1, d]);
        let q = qkv.clone().narrow(3, 0, d) + bias(&self.q_bias);
        let k = qkv.clone().narrow(3, d, d);
        let v = qkv.narrow(3, 2 * d, d) + bias(&self.v_bias);
        // `sqrt(tensor(d, float32) * scale_factor)`, computed in f32 as transformers does.
        let scale = (d as f32 * self.scale_factor as f32).sqrt();
        let q = q.div_scalar(scale);
        let mut scores = q.clone().matmul(k.clone().swap_dims(2, 3));
        if let Some(rel) = rel {
            let index = rel.index.clone().reshape([1, 1, n, n]).expand([b, h, n, n]);
            let mut bias: Option<Tensor<4>> = None;
            if let Some(pos_proj) = &self.pos_proj {
                let pos_k = self.split_heads(pos_proj.forward(rel.embeddings.clone()));
                let c2p = q.matmul(pos_k.swap_dims(2, 3)).gather(3, index.clone());
                bias = Some(c2p);
            }
            if let Some(pos_q_proj) = &self.pos_q_proj {
                let pos_q = self
                    .split_heads(pos_q_proj.forward(rel.embeddings.clone()))
                    .div_scalar(scale);
                // p2c[q, k] = K_k · Pq[index[q, k]]: gather row k at index^T, then transpose.
                let p2c = k
                    .matmul(pos_q.swap_dims(2, 3))
                    .gather(3, index.swap_dims(2, 3))
                    .swap_dims(2, 3);
                bias = Some(match bias {
                    Some(c2p) => c2p + p2c,
                    None => p2c,
                });
            }
            if let Some(bias) = bias {
                scores = scores + bias;
            }
        }
        let probs = softmax(scores.mask_fill(masked.expand([b, h, n, n]), f32::MIN), 3);
        probs.matmul(v).swap_dims(1, 2).reshape([b, n, hidden])
    }
}

/// Weight files tried in order.
pub const WEIGHT_FILES: &[&str] = &["model.safetensors", "pytorch_model.bin"];

/// Load `config.json` and the weights (`model.safetensors`, else `pytorch_model.bin`, read by
/// the restricted unpickler) from a local folder (a hub snapshot of
/// `microsoft/deberta-xlarge-mnli`, or a `save_pretrained` folder). Every model tensor must be
/// present with the right shape; file tensors that are not part of `DebertaModel` must be
/// heads (`pooler.*`, `classifier.*`, `lm_predictions.*`, `cls.*`) or known buffers.
pub fn load_deberta(
    dir: &Path,
    device: &Device,
) -> Result<(DebertaModel, DebertaConfig), EvalError> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(EvalError::BadFile {
            path: dir.to_path_buf(),
            message: "not a DeBERTa model folder: config.json is missing".into(),
        });
    }
    let config: DebertaConfig = decorr_core::weights::read_json(&config_path, "a DeBERTa config")?;
    config.validate()?;
    let mut model = DebertaModel::new(&config, device);
    let Some(weights) = WEIGHT_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
    else {
        return Err(EvalError::BadFile {
            path: dir.to_path_buf(),
            message: format!(
                "no weights: the folder needs one of {}",
                WEIGHT_FILES.join(", ")
            ),
        });
    };
    let file = if weights.extension().is_some_and(|e| e == "safetensors") {
        ModelFile::Path(weights)
    } else {
        // A torch pickle (restricted unpickler), loaded as safetensors bytes in memory.
        let state = decorr_convert::read_state_dict(&weights)?;
        let bytes = decorr_convert::tensor::to_safetensors_bytes(&state)?;
        ModelFile::Memory {
            name: weights.display().to_string(),
            bytes: std::sync::Arc::new(bytes),
        }
    };
    // Heads of DebertaFor* checkpoints and buffers the encoder does not use; the absolute
    // position table too when the config does not add it to the input.
    let mut ignore = vec![
        r"^(deberta\.)?(pooler|classifier|lm_predictions|cls|mask_predictions)\.",
        r"position_ids$",
    ];
    if !config.position_biased_input {
        ignore.push(r"^(deberta\.)?embeddings\.position_embeddings\.weight$");
    }
    let keys = KeyMap {
        remap: &[
            (r"^deberta\.", ""),
            (r"\.attention\.self\.", ".attention.self_."),
        ],
        ignore: &ignore,
        file_names: &[(".self_.", ".self.")],
    };
    load_safetensors(&mut model, &file, &keys)?;
    Ok((model, config))
}

/// The tokenizer of a DeBERTa folder, set up as transformers 5.24's `DebertaTokenizer` is
/// when `bert_score` calls it: `tokenizer.json` if present, else GPT-2 byte-level BPE from
/// `vocab.json` + `merges.txt` (no prefix space, the special tokens of the vocabulary, post
/// processor `[CLS] $A [SEP]`). Padding is off; truncation to `model_max_length` of
/// `tokenizer_config.json` when it sets one (`bert_score` passes `max_length=model_max_length,
/// truncation=True`; without one, transformers' default 1e30 is no limit).
pub fn load_deberta_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer, EvalError> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, Tokenizer, TruncationParams};

    let tok_err =
        |p: &Path, e: &dyn std::fmt::Display| EvalError::Tokenizer(format!("{}: {e}", p.display()));
    let cfg = read_tokenizer_config(dir)?;
    let json = dir.join("tokenizer.json");
    let mut tok = if json.is_file() {
        decorr_core::input::read_text(&json, "a tokenizer file")?
            .parse::<Tokenizer>()
            .map_err(|e| tok_err(&json, &e))?
    } else {
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if !vocab.is_file() || !merges.is_file() {
            return Err(EvalError::BadFile {
                path: dir.to_path_buf(),
                message: "no DeBERTa tokenizer: the folder needs tokenizer.json, or vocab.json \
                          and merges.txt"
                    .into(),
            });
        }
        let path_str = |p: &PathBuf| p.to_string_lossy().into_owned();
        let bpe = BPE::from_file(&path_str(&vocab), &path_str(&merges))
            .build()
            .map_err(|e| tok_err(&vocab, &e))?;
        let mut tok = Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        tok.with_decoder(Some(ByteLevel::default()));
        let names = [
            ("unk_token", "[UNK]"),
            ("cls_token", "[CLS]"),
            ("sep_token", "[SEP]"),
            ("pad_token", "[PAD]"),
            ("mask_token", "[MASK]"),
        ]
        .iter()
        .map(|(k, d)| special_token_name(dir, k, d))
        .collect::<Result<Vec<String>, EvalError>>()?;
        let specials: Vec<AddedToken> = names
            .iter()
            .filter(|t| tok.token_to_id(t).is_some())
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        tok.add_special_tokens(specials)
            .map_err(|e| tok_err(&vocab, &e))?;
        let (cls, sep) = (&names[1], &names[2]);
        let id = |t: &String| {
            tok.token_to_id(t).ok_or_else(|| {
                EvalError::Tokenizer(format!(
                    "{}: the vocabulary has no `{t}` token, which DeBERTa puts around every \
                     sentence",
                    vocab.display()
                ))
            })
        };
        let (cls_id, sep_id) = (id(cls)?, id(sep)?);
        let template = TemplateProcessing::builder()
            .try_single(format!("{cls} $A {sep}"))
            .and_then(|b| b.try_pair(format!("{cls} $A {sep} {sep} $B {sep}")))
            .map_err(|e| tok_err(&vocab, &e))?
            .special_tokens(vec![(cls.clone(), cls_id), (sep.clone(), sep_id)])
            .build()
            .map_err(|e| tok_err(&vocab, &e))?;
        tok.with_post_processor(Some(template));
        tok
    };
    tok.with_padding(None);
    let max_len = cfg
        .get("model_max_length")
        .and_then(|v| v.as_f64())
        .filter(|m| (2.0..1e12).contains(m))
        .map(|m| m as usize);
    let trunc = max_len.map(|max_length| TruncationParams {
        max_length,
        ..Default::default()
    });
    tok.with_truncation(trunc)
        .map_err(|e| tok_err(&dir.join("tokenizer_config.json"), &e))?;
    Ok(tok)
}

/// `tokenizer_config.json` as a JSON object, empty when absent.
fn read_tokenizer_config(
    dir: &Path,
) -> Result<serde_json::Map<String, serde_json::Value>, EvalError> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(Default::default());
    }
    let v: serde_json::Value = decorr_core::weights::read_json(&path, "a tokenizer config")?;
    match v {
        serde_json::Value::Object(m) => Ok(m),
        _ => Err(EvalError::BadFile {
            path,
            message: "tokenizer_config.json is not a JSON object".into(),
        }),
    }
}

/// Token ids of `sent` as `bert_score.utils.sent_encode` makes them with transformers 5.24:
/// `tokenizer.encode(sent.strip(), add_special_tokens=True, max_length=model_max_length,
/// truncation=True)` (truncation is part of `tokenizer`, see [`load_deberta_tokenizer`]).
///
/// One difference from the reference: an empty (or all-whitespace) sentence gives
/// `[CLS] [SEP]` (bert_score 0.3.13 raises `AttributeError` there with transformers 5, which
/// removed `build_inputs_with_special_tokens`; with transformers 4 it gave `[CLS] [SEP]`).
/// `strip` is Python's: Unicode whitespace plus U+001C..U+001F.
pub fn sent_encode(tokenizer: &tokenizers::Tokenizer, sent: &str) -> Result<Vec<u32>, EvalError> {
    let enc = tokenizer
        .encode(crate::encoder::python_strip(sent), true)
        .map_err(|e| EvalError::Tokenizer(format!("cannot encode {sent:?}: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// bert_score's default layer for `microsoft/deberta-xlarge-mnli` (`model2layers`).
pub const XLARGE_MNLI_LAYER: usize = 40;

/// The name of special token `key` in `tokenizer_config.json` (a string or an `AddedToken`
/// object), else `default`.
pub(crate) fn special_token_name(
    dir: &Path,
    key: &str,
    default: &str,
) -> Result<String, EvalError> {
    let cfg = read_tokenizer_config(dir)?;
    Ok(match cfg.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or(default)
            .to_string(),
        _ => default.to_string(),
    })
}
