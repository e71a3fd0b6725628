//! `unet/config.json` (`UNet2DConditionModel`) and `vae/config.json` (`AutoencoderKL`) as diffusers
//! writes them. Missing keys take diffusers' class defaults, as `from_pretrained` would; keys we do
//! not model are kept in `extra` and the ones that would change the network are refused by
//! `validate` rather than silently ignored.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::UNetError;

/// A value given once for all blocks or once per block (diffusers accepts both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value of down block `i`.
    pub fn get(&self, i: usize) -> T {
        match self {
            PerBlock::One(v) => v.clone(),
            PerBlock::Many(v) => v[i].clone(),
        }
    }
    fn check(&self, blocks: usize, key: &str) -> Result<(), UNetError> {
        match self {
            PerBlock::Many(v) if v.len() != blocks => Err(UNetError::Config(format!(
                "`{key}` has {} entries but there are {blocks} down blocks",
                v.len()
            ))),
            _ => Ok(()),
        }
    }
}

/// The shape of a `UNet2DConditionModel` (SD 1.x and 2.x family).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub sample_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    /// diffusers' misnomer: the number of heads when `num_attention_heads` is absent.
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub time_embedding_type: String,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub dual_cross_attention: bool,
    pub num_class_embeds: Option<usize>,
    pub time_cond_proj_dim: Option<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub reverse_transformer_layers_per_block: Option<Value>,
    pub resnet_out_scale_factor: f64,
    pub attention_type: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl Default for UNetConfig {
    /// diffusers' `UNet2DConditionModel()` defaults.
    fn default() -> Self {
        UNetConfig {
            sample_size: 64,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            class_embed_type: None,
            addition_embed_type: None,
            time_embedding_type: "positional".into(),
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            dual_cross_attention: false,
            num_class_embeds: None,
            time_cond_proj_dim: None,
            encoder_hid_dim: None,
            reverse_transformer_layers_per_block: None,
            resnet_out_scale_factor: 1.0,
            attention_type: "default".into(),
            extra: Default::default(),
        }
    }
}

impl UNetConfig {
    /// SD 1.x (859,520,964 parameters).
    pub fn sd15() -> Self {
        UNetConfig {
            cross_attention_dim: PerBlock::One(768),
            ..Default::default()
        }
    }

    /// SD 2.x (768-v and base): linear projections, 64-wide heads, OpenCLIP's 1024-d context.
    pub fn sd2() -> Self {
        UNetConfig {
            cross_attention_dim: PerBlock::One(1024),
            attention_head_dim: PerBlock::Many(vec![5, 10, 20, 20]),
            use_linear_projection: true,
            sample_size: 96,
            ..Default::default()
        }
    }

    /// A preset by name (`sd15`, `sd2`).
    pub fn preset(name: &str) -> Result<Self, UNetError> {
        match name {
            "sd15" => Ok(Self::sd15()),
            "sd2" => Ok(Self::sd2()),
            other => Err(UNetError::Config(format!(
                "unknown UNet preset `{other}`; expected sd15 or sd2"
            ))),
        }
    }

    /// Heads of down block `i` (diffusers: `num_attention_heads or attention_head_dim`).
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }

    /// Refuses configs whose network this crate does not build, naming the key.
    pub fn validate(&self) -> Result<(), UNetError> {
        let n = self.block_out_channels.len();
        let bad = |m: String| Err(UNetError::Config(m));
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have \
                 the same, non-zero length",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        self.layers_per_block.check(n, "layers_per_block")?;
        self.cross_attention_dim.check(n, "cross_attention_dim")?;
        self.transformer_layers_per_block
            .check(n, "transformer_layers_per_block")?;
        self.attention_head_dim.check(n, "attention_head_dim")?;
        self.only_cross_attention.check(n, "only_cross_attention")?;
        if let Some(h) = &self.num_attention_heads {
            h.check(n, "num_attention_heads")?;
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad(format!(
                    "down block type `{t}` is not supported (CrossAttnDownBlock2D, DownBlock2D)"
                ));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad(format!(
                    "up block type `{t}` is not supported (CrossAttnUpBlock2D, UpBlock2D)"
                ));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") | None => {}
            Some(t) => return bad(format!("mid block type `{t}` is not supported")),
        }
        for i in 0..n {
            let c = self.block_out_channels[i];
            if !c.is_multiple_of(self.norm_num_groups) {
                return bad(format!(
                    "block_out_channels[{i}] = {c} is not divisible by norm_num_groups = {}",
                    self.norm_num_groups
                ));
            }
            if self.heads(i) == 0 || !c.is_multiple_of(self.heads(i)) {
                return bad(format!(
                    "block {i}: {c} channels do not split into {} attention heads",
                    self.heads(i)
                ));
            }
            if self.only_cross_attention.get(i) {
                return bad("only_cross_attention = true is not supported".into());
            }
        }
        let unsupported = [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("addition_embed_type", self.addition_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("dual_cross_attention", self.dual_cross_attention),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift != "default",
            ),
            (
                "time_embedding_type",
                self.time_embedding_type != "positional",
            ),
            ("act_fn", self.act_fn != "silu"),
            ("attention_type", self.attention_type != "default"),
            (
                "reverse_transformer_layers_per_block",
                self.reverse_transformer_layers_per_block
                    .as_ref()
                    .is_some_and(|v| !v.is_null()),
            ),
            (
                "resnet_out_scale_factor",
                self.resnet_out_scale_factor != 1.0,
            ),
        ];
        for (key, on) in unsupported {
            if on {
                return bad(format!(
                    "`{key}` is set in this UNet config; only the SD 1.x/2.x family is supported"
                ));
            }
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return bad("conv_in_kernel and conv_out_kernel must be odd".into());
        }
        Ok(())
    }
}

/// The shape of an `AutoencoderKL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    pub force_upcast: bool,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl Default for VaeConfig {
    /// diffusers' `AutoencoderKL()` defaults.
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: true,
            extra: Default::default(),
        }
    }
}

impl VaeConfig {
    /// SD 1.x/2.x VAE (83,653,863 parameters).
    pub fn sd15() -> Self {
        VaeConfig {
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: 512,
            ..Default::default()
        }
    }

    /// Refuses configs whose network this crate does not build.
    pub fn validate(&self) -> Result<(), UNetError> {
        let n = self.block_out_channels.len();
        let bad = |m: String| Err(UNetError::Config(m));
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(
                "VAE block_out_channels, down_block_types and up_block_types must have \
                        the same, non-zero length"
                    .into(),
            );
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
            .or(self
                .up_block_types
                .iter()
                .find(|t| *t != "UpDecoderBlock2D"))
        {
            return bad(format!("VAE block type `{t}` is not supported"));
        }
        if self.act_fn != "silu" {
            return bad(format!(
                "VAE act_fn `{}` is not supported (silu)",
                self.act_fn
            ));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c % self.norm_num_groups != 0)
        {
            return bad(format!(
                "VAE channels {c} not divisible by norm_num_groups {}",
                self.norm_num_groups
            ));
        }
        Ok(())
    }
}
