//! `text_encoder/config.json` as transformers writes it (`CLIPTextConfig`), with named presets
//! for the encoders of SD 1.x, SD 2.x and SDXL (whose second encoder has a `text_projection`).
//! Missing keys take transformers' `CLIPTextConfig` defaults, as `from_pretrained` would.

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

    /// SDXL base's `text_encoder`: OpenAI CLIP ViT-L/14 as in SD 1.x (SDXL reads its
    /// penultimate layer, see [`crate::ClipTextModel::sdxl_conditioning`]).
    pub fn sdxl_text_encoder() -> Self {
        Self::sd15().with_projection(false)
    }

    /// SDXL base's `text_encoder_2`: OpenCLIP ViT-bigG/14 text tower, all 32 layers, with its
    /// `text_projection` (transformers' `CLIPTextModelWithProjection`, 694,659,840 parameters).
    /// Ids as SDXL base's `config.json`: bos 0, eos 2 (legacy: pooling takes the argmax id),
    /// pad 1.
    pub fn sdxl_text_encoder_2() -> Self {
        ClipTextConfig {
            hidden_size: 1280,
            intermediate_size: 5120,
            projection_dim: 1280,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: Activation::Gelu,
            bos_token_id: 0,
            eos_token_id: 2,
            ..Default::default()
        }
        .with_projection(true)
    }

    /// A preset by name: `sd15` (alias `sd1`), `sd2`, `sdxl-text-encoder` and
    /// `sdxl-text-encoder-2` (SDXL's two encoders; `sdxl` alone is refused, naming both).
    pub fn preset(name: &str) -> Result<Self, ClipError> {
        match name {
            "sd15" | "sd1" | "sd1.5" => Ok(Self::sd15()),
            "sd2" | "sd2.1" => Ok(Self::sd2()),
            "sdxl-text-encoder" | "sdxl-text-encoder-1" => Ok(Self::sdxl_text_encoder()),
            "sdxl-text-encoder-2" => Ok(Self::sdxl_text_encoder_2()),
            "sdxl" => Err(ClipError::Config(
                "SDXL has two text encoders: use preset `sdxl-text-encoder` (CLIP ViT-L, \
                 text_encoder/) or `sdxl-text-encoder-2` (OpenCLIP bigG with projection, \
                 text_encoder_2/)"
                    .into(),
            )),
            other => Err(ClipError::Config(format!(
                "unknown text-encoder preset `{other}`; known presets: sd15, sd2, \
                 sdxl-text-encoder, sdxl-text-encoder-2"
            ))),
        }
    }

    /// Whether the encoder has transformers' `text_projection` (SDXL's second encoder): the
    /// config's `architectures` names `CLIPTextModelWithProjection`, as transformers and
    /// diffusers write it.
    pub fn has_projection(&self) -> bool {
        self.extra
            .get("architectures")
            .and_then(|a| a.as_array())
            .is_some_and(|a| a.iter().any(|v| v == WITH_PROJECTION))
    }

    /// This config with (`CLIPTextModelWithProjection`) or without (`CLIPTextModel`) the
    /// projection, recorded in `architectures` as transformers reads it back.
    pub fn with_projection(mut self, projection: bool) -> Self {
        let arch = if projection {
            WITH_PROJECTION
        } else {
            WITHOUT_PROJECTION
        };
        self.extra
            .insert("architectures".into(), serde_json::json!([arch]));
        self
    }

    /// The position transformers' `CLIPTextModel` pools one row of ids at (`pooler_output`, and
    /// so SDXL's pooled embedding): for the legacy `eos_token_id` 2 of SD configs the first
    /// largest id (EOS, 49407, is the largest), otherwise the first `eos_token_id` (0 if none).
    pub fn pooling_position(&self, ids: &[u32]) -> usize {
        pooling_position(self.eos_token_id, ids)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rejects configs the model cannot be built from: sizes outside [`bounds`] (named with the
    /// allowed range), heads that do not divide the width, a layer-norm epsilon that is not a
    /// small positive number.
    pub fn validate(&self) -> Result<(), ClipError> {
        let range = |key: &str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ClipError::Config(format!(
                    "`{key}` = {v} is out of range: allowed {lo}..={hi}"
                )))
            }
        };
        range("vocab_size", self.vocab_size, 1, bounds::VOCAB)?;
        range("hidden_size", self.hidden_size, 1, bounds::WIDTH)?;
        range(
            "intermediate_size",
            self.intermediate_size,
            1,
            4 * bounds::WIDTH,
        )?;
        range(
            "num_hidden_layers",
            self.num_hidden_layers,
            1,
            bounds::LAYERS,
        )?;
        range(
            "max_position_embeddings",
            self.max_position_embeddings,
            1,
            bounds::POSITIONS,
        )?;
        range(
            "num_attention_heads",
            self.num_attention_heads,
            1,
            self.hidden_size.min(bounds::HEADS),
        )?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ClipError::Config(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.has_projection() {
            range("projection_dim", self.projection_dim, 1, bounds::WIDTH)?;
        }
        let eps = self.layer_norm_eps;
        if !(eps.is_finite() && eps > 0.0 && eps <= 1.0) {
            return Err(ClipError::Config(format!(
                "`layer_norm_eps` = {eps} is out of range: it must be a finite number > 0 and <= 1 \
                 (CLIP uses 1e-5)"
            )));
        }
        Ok(())
    }

    /// The number of parameters (f32 values) of the encoder built from this config, projection
    /// included; for a memory estimate before anything is allocated.
    pub fn num_params(&self) -> u128 {
        let (h, i) = (self.hidden_size as u128, self.intermediate_size as u128);
        let linear = |a: u128, b: u128| a * b + b;
        let layer = 4 * linear(h, h) + linear(h, i) + linear(i, h) + 2 * 2 * h;
        let projection = if self.has_projection() {
            h * self.projection_dim as u128
        } else {
            0
        };
        (self.vocab_size as u128 + self.max_position_embeddings as u128) * h
            + self.num_hidden_layers as u128 * layer
            + 2 * h
            + projection
    }
}

/// transformers' class names, as `architectures` holds them.
pub const WITH_PROJECTION: &str = "CLIPTextModelWithProjection";
pub const WITHOUT_PROJECTION: &str = "CLIPTextModel";

/// [`ClipTextConfig::pooling_position`] for a given `eos_token_id` (the model keeps only that).
pub(crate) fn pooling_position(eos_token_id: u32, ids: &[u32]) -> usize {
    if eos_token_id == 2 {
        // torch's argmax: the first of equal maxima.
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&i| i == max).unwrap_or(0)
    } else {
        ids.iter().position(|&i| i == eos_token_id).unwrap_or(0)
    }
}

/// Largest accepted values, far above SD 1.x/2.x (width 768/1024, 12/23 layers, 77 positions).
pub mod bounds {
    pub const VOCAB: usize = 1 << 20;
    pub const WIDTH: usize = 16384;
    pub const LAYERS: usize = 256;
    pub const HEADS: usize = 1024;
    pub const POSITIONS: usize = 16384;
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
        let e = ClipTextConfig::preset("sdxl").unwrap_err().to_string();
        assert!(
            e.contains("`sdxl-text-encoder`") && e.contains("`sdxl-text-encoder-2`"),
            "{e}"
        );
        let e = ClipTextConfig::preset("sd3").unwrap_err().to_string();
        assert!(e.contains("sd15, sd2, sdxl-text-encoder"), "{e}");
        let xl1 = ClipTextConfig::preset("sdxl-text-encoder").unwrap();
        assert!(!xl1.has_projection());
        assert_eq!(xl1.hidden_act, Activation::QuickGelu);
        let xl2 = ClipTextConfig::preset("sdxl-text-encoder-2").unwrap();
        assert!(xl2.has_projection());
        assert_eq!((xl2.hidden_size, xl2.num_hidden_layers), (1280, 32));
        xl2.validate().unwrap();
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

    /// Degenerate or absurd numbers are refused by key with the allowed range, before a model
    /// (or a million-line error list) is made of them.
    #[test]
    fn bad_numbers_name_the_key_and_range() {
        let text =
            |extra: &str| format!(r#"{{"hidden_size": 32, "num_attention_heads": 4{extra}}}"#);
        for (extra, want) in [
            (
                r#", "num_hidden_layers": 1000000000"#,
                "`num_hidden_layers` = 1000000000",
            ),
            (r#", "num_hidden_layers": 100000"#, "allowed 1..=256"),
            (r#", "num_hidden_layers": 0"#, "`num_hidden_layers` = 0"),
            (
                r#", "layer_norm_eps": -1e-5"#,
                "`layer_norm_eps` = -0.00001",
            ),
            (r#", "layer_norm_eps": 0"#, "`layer_norm_eps` = 0"),
            (r#", "vocab_size": 0"#, "`vocab_size` = 0"),
            (
                r#", "max_position_embeddings": 0"#,
                "`max_position_embeddings`",
            ),
            (
                r#", "intermediate_size": 100000000000"#,
                "`intermediate_size`",
            ),
        ] {
            let c: ClipTextConfig = serde_json::from_str(&text(extra)).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let c = ClipTextConfig {
            num_attention_heads: 0,
            ..ClipTextConfig::sd15()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`num_attention_heads` = 0")
        );
        ClipTextConfig::sd15().validate().unwrap();
        ClipTextConfig::sd2().validate().unwrap();
    }

    #[test]
    fn parameter_estimate_is_exact() {
        use burn::module::Module;
        assert_eq!(ClipTextConfig::sd15().num_params(), 123_060_480);
        let c = ClipTextConfig {
            vocab_size: 100,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            ..ClipTextConfig::sd15()
        };
        let model = crate::ClipTextModel::new(&c, &burn::tensor::Device::flex());
        assert_eq!(c.num_params(), model.num_params() as u128);
        // With a non-square projection: counted as the model holds it.
        let c = ClipTextConfig {
            projection_dim: 20,
            ..c
        }
        .with_projection(true);
        let model = crate::ClipTextModel::new(&c, &burn::tensor::Device::flex());
        assert!(model.text_projection.is_some());
        assert_eq!(c.num_params(), model.num_params() as u128);
        // transformers' count on the meta device (tests/pyref/make_sdxl_clip_fixtures.py).
        assert_eq!(
            ClipTextConfig::sdxl_text_encoder().num_params(),
            123_060_480
        );
        assert_eq!(
            ClipTextConfig::sdxl_text_encoder_2().num_params(),
            694_659_840
        );
    }

    #[test]
    fn projection_is_read_from_architectures_and_checked() {
        let c: ClipTextConfig = serde_json::from_str(
            r#"{"architectures": ["CLIPTextModelWithProjection"], "projection_dim": 0}"#,
        )
        .unwrap();
        assert!(c.has_projection());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`projection_dim` = 0"), "{e}");
        let c: ClipTextConfig =
            serde_json::from_str(r#"{"architectures": ["CLIPTextModel"]}"#).unwrap();
        assert!(!c.has_projection());
        assert!(!ClipTextConfig::default().has_projection());
        let back = serde_json::to_value(c.with_projection(true)).unwrap();
        assert_eq!(back["architectures"][0], WITH_PROJECTION);
    }

    /// transformers' two pooling rules: argmax id for the legacy eos_token_id 2, else the first
    /// EOS; both take the first of several.
    #[test]
    fn pooling_position_follows_transformers() {
        let legacy = ClipTextConfig::sd15();
        // EOS padding (tokenizer 1) and "!" padding (tokenizer 2): the first EOS either way.
        assert_eq!(legacy.pooling_position(&[49406, 320, 49407, 49407]), 2);
        assert_eq!(legacy.pooling_position(&[49406, 320, 49407, 0, 0]), 2);
        let fixed = ClipTextConfig {
            eos_token_id: 49407,
            ..ClipTextConfig::sd15()
        };
        // An added token above EOS moves the legacy argmax, not the EOS rule.
        assert_eq!(legacy.pooling_position(&[49406, 49408, 49407, 0]), 1);
        assert_eq!(fixed.pooling_position(&[49406, 49408, 49407, 0]), 2);
        assert_eq!(fixed.pooling_position(&[49406, 320]), 0);
        assert_eq!(legacy.pooling_position(&[]), 0);
    }
}
