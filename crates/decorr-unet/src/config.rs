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

/// Largest accepted values (far above SD 1.x/2.x/XL: 320..1280 channels, 2-3 layers per block,
/// up to 10 transformer layers, 128 latent pixels). A config beyond them is refused by name before
/// anything is allocated.
pub mod bounds {
    /// Down (and up) blocks.
    pub const BLOCKS: usize = 8;
    /// Channels of a block, cross-attention width.
    pub const CHANNELS: usize = 8192;
    /// `layers_per_block`, `transformer_layers_per_block`.
    pub const LAYERS: usize = 256;
    /// `in_channels`, `out_channels`, `latent_channels`.
    pub const IO_CHANNELS: usize = 256;
    /// Attention heads of a block.
    pub const HEADS: usize = 1024;
    /// The UNet's `sample_size` (latent pixels; SD 1.5: 64, SDXL: 128).
    pub const UNET_SAMPLE_SIZE: usize = 1024;
    /// The VAE's `sample_size` (image pixels; SD 1.5: 512, SDXL: 1024).
    pub const VAE_SAMPLE_SIZE: usize = 8192;
    /// Convolution kernels (odd).
    pub const KERNEL: usize = 15;
}

/// `Err` naming `key` unless `lo <= v <= hi`.
fn in_range(key: &str, v: usize, lo: usize, hi: usize) -> Result<(), UNetError> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(UNetError::Config(format!(
            "`{key}` = {v} is out of range: allowed {lo}..={hi}"
        )))
    }
}

/// `Err` naming `key` unless `v` is finite and `lo < v <= hi`.
fn positive(key: &str, v: f64, hi: f64) -> Result<(), UNetError> {
    if v.is_finite() && v > 0.0 && v <= hi {
        Ok(())
    } else {
        Err(UNetError::Config(format!(
            "`{key}` = {v} is out of range: it must be a finite number > 0 and <= {hi}"
        )))
    }
}

/// Parameter counts of the layers the models are built from (burn's: biases included).
fn conv_params(cin: usize, cout: usize, k: usize) -> u128 {
    (cin * k * k) as u128 * cout as u128 + cout as u128
}
fn linear_params(i: usize, o: usize, bias: bool) -> u128 {
    i as u128 * o as u128 + if bias { o as u128 } else { 0 }
}
fn resnet_params(cin: usize, cout: usize, temb: Option<usize>) -> u128 {
    2 * cin as u128
        + conv_params(cin, cout, 3)
        + temb.map_or(0, |t| linear_params(t, cout, true))
        + 2 * cout as u128
        + conv_params(cout, cout, 3)
        + if cin != cout {
            conv_params(cin, cout, 1)
        } else {
            0
        }
}
/// A `Transformer2DModel` of `layers` blocks over `c` channels attending to `ctx`-wide context.
fn transformer_params(c: usize, ctx: usize, layers: usize) -> u128 {
    let c128 = c as u128;
    let attn = |kv: usize| {
        linear_params(c, c, false) + 2 * linear_params(kv, c, false) + linear_params(c, c, true)
    };
    let block = 3 * 2 * c128
        + attn(c)
        + attn(ctx)
        + linear_params(c, 8 * c, true)
        + linear_params(4 * c, c, true);
    2 * c128 + 2 * linear_params(c, c, true) + layers as u128 * block
}

/// The shape of a `UNet2DConditionModel` (SD 1.x, 2.x and XL family).
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
    /// `"text_time"` (SDXL: the pooled text embedding and the size/crop time ids, embedded and
    /// added to the time embedding) or none; diffusers' other kinds are refused.
    pub addition_embed_type: Option<String>,
    /// `text_time`: the width of each time id's sinusoid (SDXL: 256).
    pub addition_time_embed_dim: Option<usize>,
    /// `text_time`: the input width of `add_embedding` (SDXL base: 1280 pooled + 6 x 256).
    pub projection_class_embeddings_input_dim: Option<usize>,
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
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
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

    /// SDXL base 1.0 (2,567,463,684 parameters): three levels, the first without attention,
    /// 1 / 2 / 10 transformer layers, 64-wide heads, the two text encoders' 768 + 1280 = 2048-d
    /// context, and the `text_time` embedding of the 1280-d pooled text and six time ids.
    pub fn sdxl() -> Self {
        UNetConfig {
            sample_size: 128,
            down_block_types: [
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            up_block_types: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
                .map(String::from)
                .to_vec(),
            block_out_channels: vec![320, 640, 1280],
            transformer_layers_per_block: PerBlock::Many(vec![1, 2, 10]),
            attention_head_dim: PerBlock::Many(vec![5, 10, 20]),
            cross_attention_dim: PerBlock::One(2048),
            use_linear_projection: true,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            ..Default::default()
        }
    }

    /// A preset by name (`sd15`, `sd2`, `sdxl`).
    pub fn preset(name: &str) -> Result<Self, UNetError> {
        match name {
            "sd15" => Ok(Self::sd15()),
            "sd2" => Ok(Self::sd2()),
            "sdxl" => Ok(Self::sdxl()),
            other => Err(UNetError::Config(format!(
                "unknown UNet preset `{other}`; expected sd15, sd2 or sdxl"
            ))),
        }
    }

    /// The widths of the `text_time` added conditions (SDXL), or `None` when the config has no
    /// (or another, refused by `validate`) `addition_embed_type` or lacks a width.
    pub fn text_time_dims(&self) -> Option<crate::unet::TextTimeDims> {
        match (
            self.addition_embed_type.as_deref(),
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim,
        ) {
            (Some("text_time"), Some(time_embed_dim), Some(input_dim)) => {
                Some(crate::unet::TextTimeDims {
                    time_embed_dim,
                    input_dim,
                })
            }
            _ => None,
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
        self.check_bounds()?;
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
        let heads_key = if self.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        for i in 0..n {
            let c = self.block_out_channels[i];
            if !c.is_multiple_of(self.norm_num_groups) {
                return bad(format!(
                    "block_out_channels[{i}] = {c} is not divisible by norm_num_groups = {}",
                    self.norm_num_groups
                ));
            }
            if !c.is_multiple_of(self.heads(i)) {
                return bad(format!(
                    "block {i}: {c} channels do not split into {} attention heads (`{heads_key}` \
                     must divide block_out_channels)",
                    self.heads(i)
                ));
            }
            if self.only_cross_attention.get(i) {
                return bad("only_cross_attention = true is not supported".into());
            }
        }
        self.check_addition()?;
        self.check_extra()?;
        let unsupported = [
            ("class_embed_type", self.class_embed_type.is_some()),
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
                    "`{key}` is set in this UNet config; only the SD 1.x/2.x/XL family is \
                     supported"
                ));
            }
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return bad("conv_in_kernel and conv_out_kernel must be odd".into());
        }
        Ok(())
    }
}

impl UNetConfig {
    /// `addition_embed_type`: none, or `text_time` with both its widths in range (called by
    /// `validate`). The pooled width is what `projection_class_embeddings_input_dim` leaves
    /// beside the time ids, whose count the pipeline picks (SDXL base 6, the refiner 5), so the
    /// two widths are checked against the inputs when the UNet runs.
    fn check_addition(&self) -> Result<(), UNetError> {
        let Some(kind) = self.addition_embed_type.as_deref() else {
            return Ok(());
        };
        if kind != "text_time" {
            return Err(UNetError::Config(format!(
                "`addition_embed_type` = \"{kind}\" is not supported; only \"text_time\" (SDXL) \
                 or none"
            )));
        }
        for (key, v) in [
            ("addition_time_embed_dim", self.addition_time_embed_dim),
            (
                "projection_class_embeddings_input_dim",
                self.projection_class_embeddings_input_dim,
            ),
        ] {
            match v {
                Some(v) => in_range(key, v, 1, bounds::CHANNELS)?,
                None => {
                    return Err(UNetError::Config(format!(
                        "`addition_embed_type` is \"text_time\" but `{key}` is missing; SDXL's \
                         config sets addition_time_embed_dim 256 and \
                         projection_class_embeddings_input_dim 2816"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Keys kept in `extra` that change the network when set (diffusers writes them as null or
    /// false): refused by name rather than ignored (called by `validate`).
    fn check_extra(&self) -> Result<(), UNetError> {
        let time_embed = self.block_out_channels.first().map_or(0, |c| c * 4) as u64;
        for key in [
            "time_embedding_dim",
            "time_embedding_act_fn",
            "timestep_post_act",
            "cross_attention_norm",
            "encoder_hid_dim_type",
            "resnet_skip_time_act",
            "class_embeddings_concat",
            "mid_block_only_cross_attention",
        ] {
            let harmless = match self.extra.get(key) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => true,
                // The width this crate builds anyway.
                Some(v) => key == "time_embedding_dim" && v.as_u64() == Some(time_embed),
            };
            if !harmless {
                return Err(UNetError::Config(format!(
                    "`{key}` = {} is set in this UNet config; this crate builds the network only \
                     without it (null)",
                    self.extra[key]
                )));
            }
        }
        Ok(())
    }

    /// Sizes within [`bounds`], counts at least 1, norms well defined (called by `validate`).
    fn check_bounds(&self) -> Result<(), UNetError> {
        let n = self.block_out_channels.len();
        in_range("sample_size", self.sample_size, 1, bounds::UNET_SAMPLE_SIZE)?;
        in_range("in_channels", self.in_channels, 1, bounds::IO_CHANNELS)?;
        in_range("out_channels", self.out_channels, 1, bounds::IO_CHANNELS)?;
        in_range("block_out_channels (its length)", n, 1, bounds::BLOCKS)?;
        let heads_key = if self.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        for i in 0..n {
            let c = self.block_out_channels[i];
            in_range(&format!("block_out_channels[{i}]"), c, 1, bounds::CHANNELS)?;
            let at = |key: &str| format!("{key}[{i}]");
            in_range(
                &at("layers_per_block"),
                self.layers_per_block.get(i),
                1,
                bounds::LAYERS,
            )?;
            in_range(
                &at("transformer_layers_per_block"),
                self.transformer_layers_per_block.get(i),
                1,
                bounds::LAYERS,
            )?;
            in_range(
                &at("cross_attention_dim"),
                self.cross_attention_dim.get(i),
                1,
                bounds::CHANNELS,
            )?;
            in_range(&at(heads_key), self.heads(i), 1, bounds::HEADS.min(c))?;
        }
        let c_min = self.block_out_channels.iter().copied().min().unwrap_or(1);
        in_range("norm_num_groups", self.norm_num_groups, 1, c_min)?;
        positive("norm_eps", self.norm_eps, 1.0)?;
        for (key, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            in_range(key, k, 1, bounds::KERNEL)?;
        }
        in_range("downsample_padding", self.downsample_padding, 0, 8)?;
        for (key, v) in [
            ("freq_shift", self.freq_shift),
            ("mid_block_scale_factor", self.mid_block_scale_factor),
        ] {
            if !v.is_finite() {
                return Err(UNetError::Config(format!(
                    "`{key}` = {v} is not a finite number"
                )));
            }
        }
        Ok(())
    }

    /// The number of parameters (f32 values) the model built from this config holds; for a
    /// memory estimate before anything is allocated. Call on a validated config.
    pub fn num_params(&self) -> u128 {
        let ch = &self.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let cross = |kind: &str| kind.starts_with("CrossAttn");
        let mut total = conv_params(self.in_channels, ch[0], self.conv_in_kernel)
            + linear_params(ch[0], temb, true)
            + linear_params(temb, temb, true);
        if let Some(d) = self.text_time_dims() {
            total += linear_params(d.input_dim, temb, true) + linear_params(temb, temb, true);
        }
        let mut cin = ch[0];
        for (i, kind) in self.down_block_types.iter().enumerate() {
            let (cout, layers) = (ch[i], self.layers_per_block.get(i));
            let (ctx, tl) = (
                self.cross_attention_dim.get(i),
                self.transformer_layers_per_block.get(i),
            );
            for l in 0..layers {
                total += resnet_params(if l == 0 { cin } else { cout }, cout, Some(temb));
                if cross(kind) {
                    total += transformer_params(cout, ctx, tl);
                }
            }
            if i + 1 < n {
                total += conv_params(cout, cout, 3);
            }
            cin = cout;
        }
        let last = n - 1;
        if self.mid_block_type.is_some() {
            let c = ch[last];
            total += 2 * resnet_params(c, c, Some(temb))
                + transformer_params(
                    c,
                    self.cross_attention_dim.get(last),
                    self.transformer_layers_per_block.get(last),
                );
        }
        let mut prev = ch[last];
        for (j, kind) in self.up_block_types.iter().enumerate() {
            let i = last - j;
            let (cout, skip_in) = (ch[i], ch[i.saturating_sub(1)]);
            let layers = self.layers_per_block.get(i) + 1;
            let (ctx, tl) = (
                self.cross_attention_dim.get(i),
                self.transformer_layers_per_block.get(i),
            );
            for l in 0..layers {
                let res_skip = if l == layers - 1 { skip_in } else { cout };
                let res_in = if l == 0 { prev } else { cout };
                total += resnet_params(res_in + res_skip, cout, Some(temb));
                if cross(kind) {
                    total += transformer_params(cout, ctx, tl);
                }
            }
            if j < last {
                total += conv_params(cout, cout, 3);
            }
            prev = cout;
        }
        total + 2 * ch[0] as u128 + conv_params(ch[0], self.out_channels, self.conv_out_kernel)
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

    /// SDXL's VAE: SD 1.x's shape (83,653,863 parameters) with its own latent scale 0.13025,
    /// at 1024 px; `force_upcast` (it overflows in fp16).
    pub fn sdxl() -> Self {
        VaeConfig {
            sample_size: 1024,
            scaling_factor: 0.13025,
            force_upcast: true,
            ..Self::sd15()
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
        in_range("in_channels", self.in_channels, 1, bounds::IO_CHANNELS)?;
        in_range("out_channels", self.out_channels, 1, bounds::IO_CHANNELS)?;
        in_range(
            "latent_channels",
            self.latent_channels,
            1,
            bounds::IO_CHANNELS,
        )?;
        in_range("block_out_channels (its length)", n, 1, bounds::BLOCKS)?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            in_range(&format!("block_out_channels[{i}]"), c, 1, bounds::CHANNELS)?;
        }
        in_range("layers_per_block", self.layers_per_block, 1, bounds::LAYERS)?;
        in_range("sample_size", self.sample_size, 1, bounds::VAE_SAMPLE_SIZE)?;
        let c_min = self.block_out_channels.iter().copied().min().unwrap_or(1);
        in_range("norm_num_groups", self.norm_num_groups, 1, c_min)?;
        // The latents are divided by it before decoding: 0 or a non-finite factor gives an image
        // of one colour.
        positive("scaling_factor", self.scaling_factor, 1e3)?;
        if let Some(s) = self.shift_factor.filter(|s| !s.is_finite()) {
            return bad(format!("`shift_factor` = {s} is not a finite number"));
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

    /// The number of parameters of the VAE built from this config (encoder and decoder); for a
    /// memory estimate before anything is allocated. Call on a validated config.
    pub fn num_params(&self) -> u128 {
        let ch = &self.block_out_channels;
        let n = ch.len();
        let (lat, layers) = (self.latent_channels, self.layers_per_block);
        let c_last = ch[n - 1];
        let mid = 2 * resnet_params(c_last, c_last, None)
            + if self.mid_block_add_attention {
                2 * c_last as u128 + 4 * linear_params(c_last, c_last, true)
            } else {
                0
            };
        let mut total = conv_params(self.in_channels, ch[0], 3);
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            for l in 0..layers {
                total += resnet_params(if l == 0 { cin } else { cout }, cout, None);
            }
            if i + 1 < n {
                total += conv_params(cout, cout, 3);
            }
            cin = cout;
        }
        total += mid + 2 * c_last as u128 + conv_params(c_last, 2 * lat, 3);
        total += conv_params(lat, c_last, 3) + mid;
        let mut prev = c_last;
        for j in 0..n {
            let cout = ch[n - 1 - j];
            for l in 0..=layers {
                total += resnet_params(if l == 0 { prev } else { cout }, cout, None);
            }
            if j + 1 < n {
                total += conv_params(cout, cout, 3);
            }
            prev = cout;
        }
        total += 2 * ch[0] as u128 + conv_params(ch[0], self.out_channels, 3);
        if self.use_quant_conv {
            total += conv_params(2 * lat, 2 * lat, 1);
        }
        if self.use_post_quant_conv {
            total += conv_params(lat, lat, 1);
        }
        total
    }
}
