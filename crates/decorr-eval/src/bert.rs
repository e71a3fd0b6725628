//! The BERT encoder (transformers' `BertModel`, absolute positions, no pooler) that BERTScore
//! reads its token embeddings from, and its loader from a local model folder (`config.json` +
//! `model.safetensors` or `pytorch_model.bin` + `tokenizer.json`). Field names mirror the
//! reference's weight names (`embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`,
//! ...); only `self`, a Rust keyword, is spelled `self_`.

// `LayerNorm` fields keep the reference's weight names (the derive's code uses them too).
#![allow(non_snake_case)]

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, gelu_approximate, relu, softmax};
use burn::tensor::{Device, Int, Tensor};
use decorr_core::weights::{KeyMap, load_safetensors, read_json};
use serde::{Deserialize, Serialize};

use crate::EvalError;
use crate::encoder::LayerEncoder;

/// `config.json` of a BERT checkpoint (transformers' `BertConfig`); missing keys take its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// `"gelu"` (exact erf), `"gelu_new"` / `"gelu_pytorch_tanh"` (tanh approximation) or `"relu"`.
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    /// Only `"absolute"` (the default) is implemented.
    pub position_embedding_type: Option<String>,
}

impl Default for BertConfig {
    /// transformers' `BertConfig()` defaults (bert-base).
    fn default() -> Self {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            position_embedding_type: None,
        }
    }
}

/// The feed-forward activation named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertActivation {
    /// Exact (erf) GELU: transformers' `"gelu"`.
    Gelu,
    /// Tanh-approximated GELU: `"gelu_new"`, `"gelu_pytorch_tanh"`.
    GeluTanh,
    Relu,
}

impl BertConfig {
    /// Check what this implementation supports, naming the offending key.
    pub fn validate(&self) -> Result<BertActivation, String> {
        if let Some(p) = &self.position_embedding_type
            && p != "absolute"
        {
            return Err(format!(
                "position_embedding_type \"{p}\" is not supported (only \"absolute\")"
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.type_vocab_size == 0 {
            return Err("type_vocab_size is 0; token type 0 needs one row".into());
        }
        match self.hidden_act.as_str() {
            "gelu" => Ok(BertActivation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(BertActivation::GeluTanh),
            "relu" => Ok(BertActivation::Relu),
            other => Err(format!(
                "hidden_act \"{other}\" is not supported (use gelu, gelu_new or relu)"
            )),
        }
    }
}

/// Word, position and token-type embeddings, summed and normalised (`embeddings.*`).
#[derive(Module, Debug)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub LayerNorm: LayerNorm,
}

/// Query/key/value projections (`attention.self.*`).
#[derive(Module, Debug)]
pub struct BertSelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    num_heads: usize,
}

/// Output projection, residual and norm of the attention block (`attention.output.*`).
#[derive(Module, Debug)]
pub struct BertSelfOutput {
    pub dense: Linear,
    pub LayerNorm: LayerNorm,
}

/// `attention.*`.
#[derive(Module, Debug)]
pub struct BertAttention {
    /// transformers' `attention.self` (renamed on load: `self` is a Rust keyword).
    pub self_: BertSelfAttention,
    pub output: BertSelfOutput,
}

/// First feed-forward projection and activation (`intermediate.*`).
#[derive(Module, Debug)]
pub struct BertIntermediate {
    pub dense: Linear,
    #[module(skip)]
    act: BertActivation,
}

/// Second feed-forward projection, residual and norm (`output.*`).
#[derive(Module, Debug)]
pub struct BertOutput {
    pub dense: Linear,
    pub LayerNorm: LayerNorm,
}

/// One post-norm transformer layer (`encoder.layer.N.*`).
#[derive(Module, Debug)]
pub struct BertLayer {
    pub attention: BertAttention,
    pub intermediate: BertIntermediate,
    pub output: BertOutput,
}

/// `encoder.*`.
#[derive(Module, Debug)]
pub struct BertEncoder {
    pub layer: Vec<BertLayer>,
}

/// transformers' `BertModel` without the pooler; parameter paths equal its keys.
#[derive(Module, Debug)]
pub struct BertModel {
    pub embeddings: BertEmbeddings,
    pub encoder: BertEncoder,
}

impl BertModel {
    /// A model of `config`'s shape with random parameters.
    pub fn new(config: &BertConfig, device: &Device) -> Result<Self, String> {
        let act = config.validate()?;
        let h = config.hidden_size;
        let ln = || {
            LayerNormConfig::new(h)
                .with_epsilon(config.layer_norm_eps)
                .init(device)
        };
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let layer = (0..config.num_hidden_layers)
            .map(|_| BertLayer {
                attention: BertAttention {
                    self_: BertSelfAttention {
                        query: lin(h, h),
                        key: lin(h, h),
                        value: lin(h, h),
                        num_heads: config.num_attention_heads,
                    },
                    output: BertSelfOutput {
                        dense: lin(h, h),
                        LayerNorm: ln(),
                    },
                },
                intermediate: BertIntermediate {
                    dense: lin(h, config.intermediate_size),
                    act,
                },
                output: BertOutput {
                    dense: lin(config.intermediate_size, h),
                    LayerNorm: ln(),
                },
            })
            .collect();
        Ok(BertModel {
            embeddings: BertEmbeddings {
                word_embeddings: EmbeddingConfig::new(config.vocab_size, h).init(device),
                position_embeddings: EmbeddingConfig::new(config.max_position_embeddings, h)
                    .init(device),
                token_type_embeddings: EmbeddingConfig::new(config.type_vocab_size, h).init(device),
                LayerNorm: ln(),
            },
            encoder: BertEncoder { layer },
        })
    }

    pub fn num_layers(&self) -> usize {
        self.encoder.layer.len()
    }

    /// Rows of the position table: the longest sequence the model takes.
    pub fn max_positions(&self) -> usize {
        self.embeddings.position_embeddings.weight.dims()[0]
    }

    /// Rows of the word embedding.
    pub fn vocab_size(&self) -> usize {
        self.embeddings.word_embeddings.weight.dims()[0]
    }

    /// Hidden states `0..=up_to` (0 = embedding output) of `input_ids` `[batch, seq]` with
    /// `attention_mask` (1 = token, 0 = padding), token type 0 everywhere.
    ///
    /// # Panics
    /// If `up_to > num_layers()` or `seq > max_positions()`; callers validate first.
    pub fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
        up_to: usize,
    ) -> Vec<Tensor<3>> {
        assert!(
            up_to <= self.num_layers(),
            "layer {up_to} out of range: the encoder has {} layers",
            self.num_layers()
        );
        let [b, n] = input_ids.dims();
        assert!(
            n <= self.max_positions(),
            "sequence of {n} tokens is longer than the {} positions",
            self.max_positions()
        );
        let emb = &self.embeddings;
        let positions = emb
            .position_embeddings
            .weight
            .val()
            .narrow(0, 0, n)
            .unsqueeze_dim::<3>(0);
        let token_type = emb
            .token_type_embeddings
            .weight
            .val()
            .narrow(0, 0, 1)
            .unsqueeze_dim::<3>(0);
        let x = emb.word_embeddings.forward(input_ids) + positions + token_type;
        let mut x = emb.LayerNorm.forward(x);

        // transformers' extended mask: 0 for tokens, the most negative f32 for padding, added
        // to the scores of every head and query: `[batch, 1, 1, key]`.
        let bias = attention_mask
            .float()
            .neg()
            .add_scalar(1.0)
            .mul_scalar(f32::MIN)
            .reshape([b, 1, 1, n]);
        let mut out = vec![x.clone()];
        for layer in self.encoder.layer.iter().take(up_to) {
            x = layer.forward(x, bias.clone());
            out.push(x.clone());
        }
        out
    }
}

impl BertLayer {
    fn forward(&self, x: Tensor<3>, bias: Tensor<4>) -> Tensor<3> {
        let ctx = self.attention.self_.forward(x.clone(), bias);
        let out = &self.attention.output;
        let a = out.LayerNorm.forward(out.dense.forward(ctx) + x);
        let i = self.intermediate.dense.forward(a.clone());
        let i = match self.intermediate.act {
            BertActivation::Gelu => gelu(i),
            BertActivation::GeluTanh => gelu_approximate(i),
            BertActivation::Relu => relu(i),
        };
        self.output
            .LayerNorm
            .forward(self.output.dense.forward(i) + a)
    }
}

impl BertSelfAttention {
    /// Context vectors `[batch, seq, hidden]` before the output projection.
    fn forward(&self, x: Tensor<3>, bias: Tensor<4>) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let h = self.num_heads;
        let split = |t: Tensor<3>| t.reshape([b, n, h, d / h]).swap_dims(1, 2);
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x));
        let scale = ((d / h) as f64).powf(-0.5);
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale) + bias;
        let probs = softmax(scores, 3);
        probs.matmul(v).swap_dims(1, 2).reshape([b, n, d])
    }
}

impl LayerEncoder for BertModel {
    fn hidden_state(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
        layer: usize,
    ) -> Tensor<3> {
        self.hidden_states(input_ids, attention_mask, layer)
            .pop()
            .expect("hidden_states returns at least the embeddings")
    }

    fn num_layers(&self) -> usize {
        BertModel::num_layers(self)
    }
}

/// Weight files tried in order inside a model folder.
pub const WEIGHT_FILES: &[&str] = &["model.safetensors", "pytorch_model.bin"];

/// File keys → module paths: `BertFor*` checkpoints prefix `bert.`; `self` is a keyword here.
/// Pooler, task heads and the `position_ids` buffer are not used by the encoder.
const KEYS: KeyMap<'static> = KeyMap {
    remap: &[
        (r"^bert\.", ""),
        (r"\.attention\.self\.", ".attention.self_."),
    ],
    ignore: &[
        r"(^|\.)position_ids$",
        r"(^|\.)token_type_ids$",
        r"^(bert\.)?pooler\.",
        r"^cls\.",
        r"^classifier\.",
        r"^qa_outputs\.",
    ],
    file_names: &[(".self_.", ".self.")],
};

/// A loaded BERT and the files it came from.
#[derive(Debug)]
pub struct LoadedBert {
    pub config: BertConfig,
    pub model: BertModel,
    pub weights_path: PathBuf,
}

/// Load `config.json` and the weights of the BERT in `dir` (safetensors preferred, else a
/// PyTorch `pytorch_model.bin`) onto `device`.
pub fn load_bert(dir: &Path, device: &Device) -> Result<LoadedBert, EvalError> {
    let config_path = dir.join("config.json");
    let weights_path = WEIGHT_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file());
    let weights_path = match (config_path.is_file(), weights_path) {
        (true, Some(w)) => w,
        _ => {
            return Err(EvalError::Input(format!(
                "{} is not a BERT model folder: it needs config.json and one of {} \
                 (sharded checkpoints are not supported)",
                dir.display(),
                WEIGHT_FILES.join(", ")
            )));
        }
    };
    let config: BertConfig = read_json(&config_path, "a BERT config")?;
    let mut model = BertModel::new(&config, device).map_err(|message| EvalError::BadFile {
        path: config_path.clone(),
        message,
    })?;
    if weights_path.extension().is_some_and(|e| e == "safetensors") {
        load_safetensors(&mut model, &weights_path, &KEYS)?;
    } else {
        // A torch pickle: read it with decorr-convert's restricted unpickler and load it as
        // safetensors bytes in memory, so one loader checks every name and shape.
        let tensors = decorr_convert::read_state_dict(&weights_path)?;
        let file = decorr_core::source::ModelFile::Memory {
            name: weights_path.display().to_string(),
            bytes: std::sync::Arc::new(decorr_convert::tensor::to_safetensors_bytes(&tensors)?),
        };
        drop(tensors);
        load_safetensors(&mut model, &file, &KEYS)?;
    }
    Ok(LoadedBert {
        config,
        model,
        weights_path,
    })
}
