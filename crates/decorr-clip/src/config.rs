//! `text_encoder/config.json` as transformers writes it (`CLIPTextConfig`), with named presets
//! for the encoders of SD 1.x and SD 2.x. Missing keys take transformers' `CLIPTextConfig`
//! defaults, as `from_pretrained` would.

use serde::{Deserialize, Serialize};

use crate::ClipError;

/// The feed-forward activation of the encoder layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP, SD 1.x.
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP ViT-H, SD 2.x.
    Gelu,
}

/// The shape of a CLIP text transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    /// Everything else transformers writes (architectures, dtype, dropout, ...), kept so a saved
    /// config round-trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for ClipTextConfig {
    /// transformers' `CLIPTextConfig()` defaults.
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            bos_token_id: 49406,
            eos_token_id: 49407,
            pad_token_id: 1,
            extra: Default::default(),
        }
    }
}

impl ClipTextConfig {
    /// SD 1.x: OpenAI CLIP ViT-L/14 text encoder (123,060,480 parameters).
    pub fn sd15() -> Self {
        ClipTextConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            bos_token_id: 0,
            eos_token_id: 2,
            ..Default::default()
        }
    }

    /// SD 2.x: OpenCLIP ViT-H/14 text tower, shipped with 23 of its 24 layers so that the last
    /// hidden state is the penultimate layer's output (followed by the final layer norm).
    pub fn sd2() -> Self {
        ClipTextConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            projection_dim: 512,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: Activation::Gelu,
            bos_token_id: 0,
            eos_token_id: 2,
            ..Default::default()
        }
    }

    /// A preset by name: `sd15` (alias `sd1`), `sd2`.
    pub fn preset(name: &str) -> Result<Self, ClipError> {
        match name {
            "sd15" | "sd1" | "sd1.5" => Ok(Self::sd15()),
            "sd2" | "sd2.1" => Ok(Self::sd2()),
            other => Err(ClipError::Config(format!(
                "unknown text-encoder preset `{other}`; known presets: sd15, sd2"
            ))),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rejects configs the model cannot be built from.
    pub fn validate(&self) -> Result<(), ClipError> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(ClipError::Config(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.num_hidden_layers == 0 || self.max_position_embeddings == 0 {
            return Err(ClipError::Config(
                "num_hidden_layers and max_position_embeddings must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sd15_file_and_keeps_unknown_keys() {
        let text = r#"{"architectures":["CLIPTextModel"],"hidden_size":768,"intermediate_size":3072,
            "num_attention_heads":12,"num_hidden_layers":12,"projection_dim":768,
            "hidden_act":"quick_gelu","bos_token_id":0,"eos_token_id":2,"torch_dtype":"float32"}"#;
        let c: ClipTextConfig = serde_json::from_str(text).unwrap();
        assert_eq!(c.num_hidden_layers, 12);
        assert_eq!(c.vocab_size, 49408);
        assert_eq!(c.head_dim(), 64);
        assert!(c.extra.contains_key("architectures"));
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["torch_dtype"], "float32");
        assert_eq!(back["hidden_act"], "quick_gelu");
    }

    #[test]
    fn presets_and_validation() {
        assert_eq!(
            ClipTextConfig::preset("sd2").unwrap().hidden_act,
            Activation::Gelu
        );
        assert!(
            ClipTextConfig::preset("sdxl")
                .unwrap_err()
                .to_string()
                .contains("sd15, sd2")
        );
        let bad = ClipTextConfig {
            num_attention_heads: 7,
            ..ClipTextConfig::sd15()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("divisible")
        );
    }
}
