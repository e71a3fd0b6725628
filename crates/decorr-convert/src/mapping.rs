//! Tensor-name mapping between the original LDM single-file naming and diffusers/transformers
//! naming, following diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
//! `convert_ldm_clip_checkpoint` and (SD 2.x, SDXL's second encoder)
//! `convert_open_clip_checkpoint` (`diffusers/loaders/single_file_utils.py`).
//!
//! The mapping is a table of `(ldm prefix, diffusers prefix, kind)` built from the model's
//! config; the kind says how the rest of the name (and, for the VAE attention, the shape)
//! changes. The same table serves both directions.

use crate::error::ConvertError;
use crate::tensor::{StateDict, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The rest of the name is unchanged.
    Plain,
    /// UNet ResBlock: `in_layers.0` -> `norm1`, ...
    UnetResnet,
    /// VAE ResnetBlock: `nin_shortcut` -> `conv_shortcut`.
    VaeResnet,
    /// VAE mid-block attention: `q` -> `to_q`, ..., 1x1 conv weights squeezed to linear.
    VaeAttn,
}

const UNET_RESNET: &[(&str, &str)] = &[
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];
const VAE_RESNET: &[(&str, &str)] = &[("nin_shortcut.", "conv_shortcut.")];
const VAE_ATTN: &[(&str, &str)] = &[
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
];
/// Older diffusers VAE attention names, accepted when converting back to LDM.
const VAE_ATTN_OLD: &[(&str, &str)] = &[
    ("q.", "query."),
    ("k.", "key."),
    ("v.", "value."),
    ("proj_out.", "proj_attn."),
];

/// Table of one model's prefixes.
#[derive(Debug, Clone)]
pub struct Table {
    rows: Vec<(String, String, Kind)>,
}

/// What the mapping needs from a UNet2DConditionModel config.json.
#[derive(Debug, Clone)]
pub struct UnetShape {
    pub layers_per_block: usize,
    pub down_attn: Vec<bool>,
    pub up_attn: Vec<bool>,
    pub mid_attn: bool,
    /// The diffusers module LDM's `label_emb.0` becomes: `add_embedding` for SDXL's
    /// `addition_embed_type: text_time`, `class_embedding` for a `timestep`/`projection`
    /// `class_embed_type` (as diffusers' converter); `None` when the config has neither.
    pub label_emb: Option<&'static str>,
}

/// What the mapping needs from an AutoencoderKL config.json.
#[derive(Debug, Clone)]
pub struct VaeShape {
    pub layers_per_block: usize,
    pub n_blocks: usize,
    pub mid_attn: bool,
}

fn block_types(cfg: &serde_json::Value, key: &str) -> Result<Vec<bool>, String> {
    cfg.get(key)
        .and_then(|v| v.as_array())
        .ok_or_else(|| format!("`{key}` missing or not a list"))?
        .iter()
        .map(|t| {
            t.as_str()
                .map(|s| s.contains("CrossAttn"))
                .ok_or_else(|| format!("`{key}` holds a non-string"))
        })
        .collect()
}

fn usize_field(cfg: &serde_json::Value, key: &str) -> Result<usize, String> {
    cfg.get(key)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| format!("`{key}` missing or not an integer"))
}

/// Most layers per block and blocks a config may give (decorr-unet's bounds): the name tables
/// are built from them before any tensor is read.
const MAX_LAYERS: usize = 256;
const MAX_BLOCKS: usize = 8;

/// [`usize_field`] in `lo..=hi`, named with the range otherwise.
fn bounded_field(
    cfg: &serde_json::Value,
    key: &str,
    lo: usize,
    hi: usize,
) -> Result<usize, String> {
    let v = usize_field(cfg, key)?;
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "`{key}` = {v} is out of range: allowed {lo}..={hi}"
        ))
    }
}

fn check_blocks(n: usize, key: &str) -> Result<(), String> {
    if (1..=MAX_BLOCKS).contains(&n) {
        Ok(())
    } else {
        Err(format!("`{key}` has {n} entries: allowed 1..={MAX_BLOCKS}"))
    }
}

impl UnetShape {
    pub fn from_config(cfg: &serde_json::Value) -> Result<Self, String> {
        let down_attn = block_types(cfg, "down_block_types")?;
        let up_attn = block_types(cfg, "up_block_types")?;
        if down_attn.len() != up_attn.len() {
            return Err("down_block_types and up_block_types differ in length".into());
        }
        if cfg.get("layers_per_block").is_some_and(|v| v.is_array()) {
            return Err("per-block `layers_per_block` lists are not supported".into());
        }
        let mid = cfg
            .get("mid_block_type")
            .and_then(|v| v.as_str())
            .unwrap_or("UNetMidBlock2DCrossAttn");
        check_blocks(down_attn.len(), "down_block_types")?;
        let str_field = |key: &str| cfg.get(key).and_then(|v| v.as_str());
        let label_emb = if str_field("addition_embed_type") == Some("text_time") {
            Some("add_embedding")
        } else if matches!(
            str_field("class_embed_type"),
            Some("timestep" | "projection")
        ) {
            Some("class_embedding")
        } else {
            None
        };
        Ok(Self {
            layers_per_block: bounded_field(cfg, "layers_per_block", 1, MAX_LAYERS)?,
            down_attn,
            up_attn,
            mid_attn: mid.contains("CrossAttn"),
            label_emb,
        })
    }
}

impl VaeShape {
    pub fn from_config(cfg: &serde_json::Value) -> Result<Self, String> {
        let n = cfg
            .get("down_block_types")
            .and_then(|v| v.as_array())
            .ok_or("`down_block_types` missing or not a list")?
            .len();
        check_blocks(n, "down_block_types")?;
        Ok(Self {
            layers_per_block: bounded_field(cfg, "layers_per_block", 1, MAX_LAYERS)?,
            n_blocks: n,
            mid_attn: cfg
                .get("mid_block_add_attention")
                .and_then(|v| v.as_bool())
                .unwrap_or(true),
        })
    }
}

impl Table {
    pub fn unet(s: &UnetShape) -> Table {
        let mut rows: Vec<(String, String, Kind)> = Vec::new();
        let mut add = |l: String, d: String, k: Kind| rows.push((l, d, k));
        use Kind::*;
        add(
            "time_embed.0".into(),
            "time_embedding.linear_1".into(),
            Plain,
        );
        add(
            "time_embed.2".into(),
            "time_embedding.linear_2".into(),
            Plain,
        );
        add("input_blocks.0.0".into(), "conv_in".into(), Plain);
        add("out.0".into(), "conv_norm_out".into(), Plain);
        add("out.2".into(), "conv_out".into(), Plain);
        if let Some(module) = s.label_emb {
            add("label_emb.0.0".into(), format!("{module}.linear_1"), Plain);
            add("label_emb.0.2".into(), format!("{module}.linear_2"), Plain);
        }
        let lpb = s.layers_per_block;
        let n = s.down_attn.len();
        for i in 0..n {
            for j in 0..lpb {
                let idx = 1 + i * (lpb + 1) + j;
                add(
                    format!("input_blocks.{idx}.0"),
                    format!("down_blocks.{i}.resnets.{j}"),
                    UnetResnet,
                );
                if s.down_attn[i] {
                    add(
                        format!("input_blocks.{idx}.1"),
                        format!("down_blocks.{i}.attentions.{j}"),
                        Plain,
                    );
                }
            }
            if i + 1 < n {
                let idx = 1 + i * (lpb + 1) + lpb;
                add(
                    format!("input_blocks.{idx}.0.op"),
                    format!("down_blocks.{i}.downsamplers.0.conv"),
                    Plain,
                );
            }
        }
        add(
            "middle_block.0".into(),
            "mid_block.resnets.0".into(),
            UnetResnet,
        );
        if s.mid_attn {
            add(
                "middle_block.1".into(),
                "mid_block.attentions.0".into(),
                Plain,
            );
            add(
                "middle_block.2".into(),
                "mid_block.resnets.1".into(),
                UnetResnet,
            );
        } else {
            add(
                "middle_block.1".into(),
                "mid_block.resnets.1".into(),
                UnetResnet,
            );
        }
        for i in 0..n {
            for j in 0..=lpb {
                let idx = i * (lpb + 1) + j;
                add(
                    format!("output_blocks.{idx}.0"),
                    format!("up_blocks.{i}.resnets.{j}"),
                    UnetResnet,
                );
                if s.up_attn[i] {
                    add(
                        format!("output_blocks.{idx}.1"),
                        format!("up_blocks.{i}.attentions.{j}"),
                        Plain,
                    );
                }
                if j == lpb && i + 1 < n {
                    let k = if s.up_attn[i] { 2 } else { 1 };
                    add(
                        format!("output_blocks.{idx}.{k}.conv"),
                        format!("up_blocks.{i}.upsamplers.0.conv"),
                        Plain,
                    );
                }
            }
        }
        Table { rows }
    }

    pub fn vae(s: &VaeShape) -> Table {
        use Kind::*;
        let mut rows: Vec<(String, String, Kind)> = Vec::new();
        let mut add = |l: String, d: String, k: Kind| rows.push((l, d, k));
        for part in ["encoder", "decoder"] {
            add(format!("{part}.conv_in"), format!("{part}.conv_in"), Plain);
            add(
                format!("{part}.conv_out"),
                format!("{part}.conv_out"),
                Plain,
            );
            add(
                format!("{part}.norm_out"),
                format!("{part}.conv_norm_out"),
                Plain,
            );
            add(
                format!("{part}.mid.block_1"),
                format!("{part}.mid_block.resnets.0"),
                VaeResnet,
            );
            add(
                format!("{part}.mid.block_2"),
                format!("{part}.mid_block.resnets.1"),
                VaeResnet,
            );
            if s.mid_attn {
                add(
                    format!("{part}.mid.attn_1"),
                    format!("{part}.mid_block.attentions.0"),
                    VaeAttn,
                );
            }
        }
        add("quant_conv".into(), "quant_conv".into(), Plain);
        add("post_quant_conv".into(), "post_quant_conv".into(), Plain);
        let n = s.n_blocks;
        let lpb = s.layers_per_block;
        for i in 0..n {
            for j in 0..lpb {
                add(
                    format!("encoder.down.{i}.block.{j}"),
                    format!("encoder.down_blocks.{i}.resnets.{j}"),
                    VaeResnet,
                );
            }
            if i + 1 < n {
                add(
                    format!("encoder.down.{i}.downsample.conv"),
                    format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                    Plain,
                );
            }
            let b = n - 1 - i;
            for j in 0..=lpb {
                add(
                    format!("decoder.up.{b}.block.{j}"),
                    format!("decoder.up_blocks.{i}.resnets.{j}"),
                    VaeResnet,
                );
            }
            if i + 1 < n {
                add(
                    format!("decoder.up.{b}.upsample.conv"),
                    format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    Plain,
                );
            }
        }
        Table { rows }
    }

    /// The longest row whose prefix (on the LDM side if `ldm`, else diffusers) starts `key`
    /// followed by a dot; returns the row and the rest of the key.
    fn find<'k>(&self, key: &'k str, ldm: bool) -> Option<(&(String, String, Kind), &'k str)> {
        self.rows
            .iter()
            .filter_map(|row| {
                let p = if ldm { &row.0 } else { &row.1 };
                key.strip_prefix(p.as_str())
                    .and_then(|r| r.strip_prefix('.'))
                    .map(|rest| (row, rest, p.len()))
            })
            .max_by_key(|(_, _, len)| *len)
            .map(|(row, rest, _)| (row, rest))
    }

    /// Map LDM tensors (names without the family prefix) to diffusers names. Any name the
    /// table does not cover is an error.
    pub fn to_diffusers(&self, ldm: StateDict, family: &str) -> Result<StateDict, ConvertError> {
        let mut out = StateDict::new();
        let mut unknown = Vec::new();
        for (key, t) in ldm {
            let Some(((_, dprefix, kind), rest)) = self.find(&key, true) else {
                unknown.push(format!("{family}{key}"));
                continue;
            };
            let (rest, t) = match kind {
                Kind::Plain => (rest.to_string(), t),
                Kind::UnetResnet => (rename(rest, UNET_RESNET, false), t),
                Kind::VaeResnet => (rename(rest, VAE_RESNET, false), t),
                Kind::VaeAttn => {
                    let r = rename(rest, VAE_ATTN, false);
                    let t = if r.ends_with(".weight") && !r.starts_with("group_norm.") {
                        squeeze(t)
                    } else {
                        t
                    };
                    (r, t)
                }
            };
            out.insert(format!("{dprefix}.{rest}"), t);
        }
        unknown_error(unknown)?;
        Ok(out)
    }

    /// Map diffusers tensors to LDM names (without the family prefix).
    pub fn to_ldm(&self, diffusers: StateDict, what: &str) -> Result<StateDict, ConvertError> {
        let mut out = StateDict::new();
        let mut unknown = Vec::new();
        for (key, t) in diffusers {
            let Some(((lprefix, _, kind), rest)) = self.find(&key, false) else {
                unknown.push(format!("{what}: {key}"));
                continue;
            };
            let (rest, t) = match kind {
                Kind::Plain => (rest.to_string(), t),
                Kind::UnetResnet => (rename(rest, UNET_RESNET, true), t),
                Kind::VaeResnet => (rename(rest, VAE_RESNET, true), t),
                Kind::VaeAttn => {
                    let mut r = rename(rest, VAE_ATTN, true);
                    if r == rest {
                        r = rename(rest, VAE_ATTN_OLD, true);
                    }
                    let t = if r.ends_with(".weight") && !r.starts_with("norm.") {
                        unsqueeze_conv(t)
                    } else {
                        t
                    };
                    (r, t)
                }
            };
            out.insert(format!("{lprefix}.{rest}"), t);
        }
        unknown_error(unknown)?;
        Ok(out)
    }
}

fn unknown_error(mut unknown: Vec<String>) -> Result<(), ConvertError> {
    if unknown.is_empty() {
        return Ok(());
    }
    let n = unknown.len();
    unknown.truncate(8);
    let mut keys = unknown.join(", ");
    if n > 8 {
        keys.push_str(&format!(" and {} more", n - 8));
    }
    Err(ConvertError::UnknownKeys { keys })
}

/// Rename the leading component(s) of `rest` by `pairs` (LDM -> diffusers, or back if `back`).
fn rename(rest: &str, pairs: &[(&str, &str)], back: bool) -> String {
    for (l, d) in pairs {
        let (from, to) = if back { (d, l) } else { (l, d) };
        if let Some(r) = rest.strip_prefix(from) {
            return format!("{to}{r}");
        }
    }
    rest.to_string()
}

/// `[C, C, 1, 1]` or `[C, C, 1]` -> `[C, C]` (same bytes).
fn squeeze(mut t: Tensor) -> Tensor {
    if t.shape.len() > 2 && t.shape[2..].iter().all(|&d| d == 1) {
        t.shape.truncate(2);
    }
    t
}

/// `[C, C]` -> `[C, C, 1, 1]` (same bytes), the LDM VAE attention's 1x1 conv shape.
fn unsqueeze_conv(mut t: Tensor) -> Tensor {
    if t.shape.len() == 2 {
        t.shape.extend([1, 1]);
    }
    t
}

/// CLIP text encoder: LDM `cond_stage_model.transformer.[text_model.]X` -> `text_model.X`.
/// `position_ids` buffers are dropped (transformers does not store them).
pub fn clip_to_diffusers(ldm: StateDict) -> StateDict {
    ldm.into_iter()
        .filter(|(k, _)| !k.ends_with("embeddings.position_ids"))
        .map(|(k, t)| {
            let k = if k.starts_with("text_model.") {
                k
            } else {
                format!("text_model.{k}")
            };
            (k, t)
        })
        .collect()
}

/// A transformers CLIP text-model name with its `text_model.` prefix: transformers >= 5.6 saves
/// `CLIPTextModel` without it (`embeddings.*`, `encoder.*`, `final_layer_norm.*`), SD files and
/// older folders with it. `None` for a name of neither form.
pub fn with_text_model(key: &str) -> Option<String> {
    if key.starts_with("text_model.") {
        Some(key.to_string())
    } else if ["embeddings.", "encoder.", "final_layer_norm."]
        .iter()
        .any(|p| key.starts_with(p))
    {
        Some(format!("text_model.{key}"))
    } else {
        None
    }
}

/// Swap the two dimensions of a 2-D tensor (same dtype). OpenCLIP stores `text_projection` as
/// the `[width, proj]` matrix it right-multiplies; transformers' `text_projection.weight` is a
/// Linear's `[proj, width]`: the same matrix transposed (diffusers' `.T` in
/// `convert_open_clip_checkpoint`).
pub fn transpose_2d(t: Tensor, name: &str) -> Result<Tensor, ConvertError> {
    let size = t.dtype.size();
    let (rows, cols) = match t.shape[..] {
        [r, c] if r.checked_mul(c).and_then(|n| n.checked_mul(size)) == Some(t.data.len()) => {
            (r, c)
        }
        _ => {
            return Err(ConvertError::Unsupported(format!(
                "`{name}` has shape {:?}: a text projection must be a 2-D matrix",
                t.shape
            )));
        }
    };
    let mut data = vec![0u8; t.data.len()];
    for r in 0..rows {
        for c in 0..cols {
            let from = (r * cols + c) * size;
            let to = (c * rows + r) * size;
            data[to..to + size].copy_from_slice(&t.data[from..from + size]);
        }
    }
    Ok(Tensor {
        dtype: t.dtype,
        shape: vec![cols, rows],
        data,
    })
}

/// OpenCLIP text-tower names (below `cond_stage_model.model.`) that no diffusers model holds:
/// the projection to the joint image-text space and the contrastive temperature (SD 2 uses
/// the penultimate layer's hidden states, not the pooled projection), and the causal mask
/// buffer some exports carry.
pub const OPEN_CLIP_UNUSED: &[&str] = &["text_projection", "logit_scale", "attn_mask"];

/// Per-resblock renames, OpenCLIP -> transformers (`DIFFUSERS_TO_LDM_MAPPING["openclip"]`).
const OPEN_CLIP_LAYER: &[(&str, &str)] = &[
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
];
const OPEN_CLIP_TOP: &[(&str, &str)] = &[
    (
        "token_embedding.weight",
        "text_model.embeddings.token_embedding.weight",
    ),
    (
        "positional_embedding",
        "text_model.embeddings.position_embedding.weight",
    ),
    ("ln_final.weight", "text_model.final_layer_norm.weight"),
    ("ln_final.bias", "text_model.final_layer_norm.bias"),
];

/// Split a tensor in `n` equal parts along its first dimension (same bytes, row-major).
fn split_rows(t: Tensor, n: usize, name: &str) -> Result<Vec<Tensor>, ConvertError> {
    let rows = t.shape.first().copied().unwrap_or(0);
    if rows == 0 || !rows.is_multiple_of(n) {
        return Err(ConvertError::Unsupported(format!(
            "`{name}` has shape {:?}: a fused q/k/v projection needs a first dimension divisible by {n}",
            t.shape
        )));
    }
    let chunk = t.data.len() / n;
    let mut shape = t.shape.clone();
    shape[0] = rows / n;
    Ok(t.data
        .chunks_exact(chunk)
        .map(|c| Tensor {
            dtype: t.dtype,
            shape: shape.clone(),
            data: c.to_vec(),
        })
        .collect())
}

/// The converted OpenCLIP text encoder.
pub struct OpenClipText {
    pub tensors: StateDict,
    /// LDM tensors diffusers drops: resblocks at or past `num_hidden_layers`, and
    /// [`OPEN_CLIP_UNUSED`].
    pub dropped: usize,
    /// Resblocks in the checkpoint.
    pub resblocks: usize,
}

/// SD 2.x OpenCLIP text tower (names below `cond_stage_model.model.`) -> transformers
/// `CLIPTextModel` names, as diffusers' `convert_open_clip_checkpoint`: the fused
/// `attn.in_proj_{weight,bias}` is split in three along the first dimension into q, k, v;
/// resblocks from `num_layers` on are dropped (SD 2 ships the 24-block tower and conditions on
/// the penultimate block, so its text encoder config has 23 layers and diffusers drops
/// `resblocks.23`); `text_projection`/`logit_scale` are dropped.
pub fn open_clip_to_diffusers(
    ldm: StateDict,
    num_layers: usize,
    family: &str,
) -> Result<OpenClipText, ConvertError> {
    let mut out = StateDict::new();
    let mut unknown = Vec::new();
    let mut dropped = 0;
    let mut resblocks = 0;
    for (key, t) in ldm {
        if let Some((_, d)) = OPEN_CLIP_TOP.iter().find(|(l, _)| *l == key) {
            out.insert(d.to_string(), t);
            continue;
        }
        if OPEN_CLIP_UNUSED.contains(&key.as_str()) {
            dropped += 1;
            continue;
        }
        let parsed = key.strip_prefix("transformer.resblocks.").and_then(|r| {
            let (i, rest) = r.split_once('.')?;
            Some((i.parse::<usize>().ok()?, rest))
        });
        let Some((i, rest)) = parsed else {
            unknown.push(format!("{family}{key}"));
            continue;
        };
        let pre = format!("text_model.encoder.layers.{i}.");
        let mapped: Option<Vec<(String, Tensor)>> = match rest {
            "attn.in_proj_weight" | "attn.in_proj_bias" => {
                let kind = if rest.ends_with("weight") {
                    "weight"
                } else {
                    "bias"
                };
                let parts = split_rows(t, 3, &format!("{family}{key}"))?;
                Some(
                    ["q", "k", "v"]
                        .iter()
                        .zip(parts)
                        .map(|(p, t)| (format!("{pre}self_attn.{p}_proj.{kind}"), t))
                        .collect(),
                )
            }
            _ => OPEN_CLIP_LAYER
                .iter()
                .find_map(|(l, d)| rest.strip_prefix(l).map(|r| format!("{pre}{d}{r}")))
                .map(|k| vec![(k, t)]),
        };
        let Some(mapped) = mapped else {
            unknown.push(format!("{family}{key}"));
            continue;
        };
        resblocks = resblocks.max(i + 1);
        if i >= num_layers {
            dropped += 1;
            continue;
        }
        out.extend(mapped);
    }
    unknown_error(unknown)?;
    Ok(OpenClipText {
        tensors: out,
        dropped,
        resblocks,
    })
}

/// transformers `CLIPTextModel` names (with or without `text_model.`) -> OpenCLIP names (below
/// `cond_stage_model.model.` or SDXL's `conditioner.embedders.1.model.`), q/k/v concatenated
/// back into `attn.in_proj_*`. The tower gets only the layers the folder has (23 for SD 2: the
/// dropped last block cannot be restored). `text_projection.weight` is not handled here: the
/// caller takes it out and stores it transposed ([`transpose_2d`]).
pub fn diffusers_to_open_clip(sd: StateDict, what: &str) -> Result<StateDict, ConvertError> {
    let mut out = StateDict::new();
    let mut unknown = Vec::new();
    let mut qkv: std::collections::BTreeMap<(String, &'static str), [Option<Tensor>; 3]> =
        Default::default();
    for (key, t) in sd {
        if key.ends_with("embeddings.position_ids") {
            continue;
        }
        let Some(key) = with_text_model(&key) else {
            unknown.push(format!("{what}: {key}"));
            continue;
        };
        if let Some((l, _)) = OPEN_CLIP_TOP.iter().find(|(_, d)| *d == key) {
            out.insert(l.to_string(), t);
            continue;
        }
        let parsed = key
            .strip_prefix("text_model.encoder.layers.")
            .and_then(|r| {
                let (i, rest) = r.split_once('.')?;
                i.parse::<usize>().ok()?;
                Some((i.to_string(), rest))
            });
        let Some((i, rest)) = parsed else {
            unknown.push(format!("{what}: {key}"));
            continue;
        };
        let fused = ["q", "k", "v"].iter().enumerate().find_map(|(n, p)| {
            for kind in ["weight", "bias"] {
                if rest == format!("self_attn.{p}_proj.{kind}") {
                    return Some((n, kind));
                }
            }
            None
        });
        if let Some((n, kind)) = fused {
            qkv.entry((i, kind)).or_default()[n] = Some(t);
            continue;
        }
        match OPEN_CLIP_LAYER
            .iter()
            .find_map(|(l, d)| rest.strip_prefix(d).map(|r| format!("{l}{r}")))
        {
            Some(r) => {
                out.insert(format!("transformer.resblocks.{i}.{r}"), t);
            }
            None => unknown.push(format!("{what}: {key}")),
        }
    }
    unknown_error(unknown)?;
    for ((i, kind), parts) in qkv {
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(ConvertError::Missing(format!(
                "{what}: layer {i} lacks one of self_attn.{{q,k,v}}_proj.{kind}"
            )));
        };
        if q.dtype != k.dtype || q.dtype != v.dtype || q.shape != k.shape || q.shape != v.shape {
            return Err(ConvertError::Unsupported(format!(
                "{what}: layer {i}'s q/k/v {kind} differ in dtype or shape"
            )));
        }
        let mut shape = q.shape.clone();
        shape[0] *= 3;
        let mut data = q.data;
        data.extend(k.data);
        data.extend(v.data);
        out.insert(
            format!("transformer.resblocks.{i}.attn.in_proj_{kind}"),
            Tensor {
                dtype: q.dtype,
                shape,
                data,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15_unet() -> UnetShape {
        UnetShape {
            layers_per_block: 2,
            down_attn: vec![true, true, true, false],
            up_attn: vec![false, true, true, true],
            mid_attn: true,
            label_emb: None,
        }
    }

    fn map(t: &Table, k: &str) -> String {
        let mut sd = StateDict::new();
        sd.insert(
            k.to_string(),
            Tensor {
                dtype: crate::tensor::DType::F32,
                shape: vec![1],
                data: vec![0; 4],
            },
        );
        t.to_diffusers(sd, "").unwrap().into_keys().next().unwrap()
    }

    /// A config asking for absurd layer or block counts is refused by key before the name
    /// tables (one row per layer) are built.
    #[test]
    fn shapes_refuse_absurd_counts() {
        let unet = |lpb: serde_json::Value| {
            serde_json::json!({
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "layers_per_block": lpb,
            })
        };
        let e = UnetShape::from_config(&unet(1_000_000_000u64.into()))
            .err()
            .unwrap();
        assert!(
            e.contains("`layers_per_block` = 1000000000") && e.contains("1..=256"),
            "{e}"
        );
        assert!(UnetShape::from_config(&unet(0.into())).is_err());
        assert!(UnetShape::from_config(&unet(2.into())).is_ok());
        let vae = serde_json::json!({"down_block_types": [], "layers_per_block": 2});
        let e = VaeShape::from_config(&vae).err().unwrap();
        assert!(e.contains("down_block_types"), "{e}");
        let vae = serde_json::json!({"down_block_types": ["D"], "layers_per_block": 100000});
        assert!(
            VaeShape::from_config(&vae)
                .err()
                .unwrap()
                .contains("100000")
        );
    }

    #[test]
    fn sd15_unet_names_match_diffusers() {
        let t = Table::unet(&sd15_unet());
        for (l, d) in [
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight",
                "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "input_blocks.11.0.skip_connection.bias",
                "down_blocks.3.resnets.1.conv_shortcut.bias",
            ),
            (
                "middle_block.2.emb_layers.1.weight",
                "mid_block.resnets.1.time_emb_proj.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.proj_in.weight",
                "up_blocks.1.attentions.2.proj_in.weight",
            ),
            (
                "output_blocks.11.0.out_layers.3.weight",
                "up_blocks.3.resnets.2.conv2.weight",
            ),
            ("out.2.weight", "conv_out.weight"),
        ] {
            assert_eq!(map(&t, l), d, "{l}");
        }
    }

    /// SDXL's `label_emb.0` rows exist only for a config with an added (or class) embedding.
    #[test]
    fn label_emb_maps_to_add_embedding_for_text_time() {
        let mut shape = sd15_unet();
        shape.label_emb = Some("add_embedding");
        let t = Table::unet(&shape);
        assert_eq!(map(&t, "label_emb.0.2.bias"), "add_embedding.linear_2.bias");
        let cfg = |extra: serde_json::Value| {
            let mut c = serde_json::json!({
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                "layers_per_block": 2,
            });
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            UnetShape::from_config(&c).unwrap().label_emb
        };
        assert_eq!(
            cfg(serde_json::json!({"addition_embed_type": "text_time"})),
            Some("add_embedding")
        );
        assert_eq!(
            cfg(serde_json::json!({"class_embed_type": "projection"})),
            Some("class_embedding")
        );
        assert_eq!(cfg(serde_json::json!({"addition_embed_type": null})), None);
    }

    /// A non-square projection is transposed element by element, for any element size.
    #[test]
    fn transpose_swaps_rows_and_columns() {
        let t = Tensor {
            dtype: crate::tensor::DType::F16,
            shape: vec![2, 3],
            data: (0u8..12).collect(),
        };
        let tt = transpose_2d(t.clone(), "p").unwrap();
        assert_eq!(tt.shape, vec![3, 2]);
        // Elements (2 bytes each) 0 1 2 / 3 4 5 become 0 3 / 1 4 / 2 5.
        assert_eq!(tt.data, vec![0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]);
        assert_eq!(transpose_2d(tt, "p").unwrap(), t);
        let flat = Tensor {
            dtype: crate::tensor::DType::F32,
            shape: vec![4],
            data: vec![0; 16],
        };
        assert!(transpose_2d(flat, "p").is_err());
        assert_eq!(
            with_text_model("encoder.layers.0.mlp.fc1.weight").as_deref(),
            Some("text_model.encoder.layers.0.mlp.fc1.weight")
        );
        assert_eq!(with_text_model("logit_scale"), None);
    }

    #[test]
    fn vae_attention_is_squeezed_and_back() {
        let t = Table::vae(&VaeShape {
            layers_per_block: 2,
            n_blocks: 4,
            mid_attn: true,
        });
        let mut sd = StateDict::new();
        sd.insert(
            "encoder.mid.attn_1.proj_out.weight".into(),
            Tensor {
                dtype: crate::tensor::DType::F32,
                shape: vec![2, 2, 1, 1],
                data: vec![0; 16],
            },
        );
        let d = t.to_diffusers(sd.clone(), "").unwrap();
        let (k, v) = d.iter().next().unwrap();
        assert_eq!(k, "encoder.mid_block.attentions.0.to_out.0.weight");
        assert_eq!(v.shape, vec![2, 2]);
        assert_eq!(t.to_ldm(d, "vae").unwrap(), sd);
        assert_eq!(
            map(&t, "decoder.up.3.block.2.nin_shortcut.weight"),
            "decoder.up_blocks.0.resnets.2.conv_shortcut.weight"
        );
    }
}
