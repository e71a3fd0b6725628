//! The output folder in diffusers' Custom Diffusion format, so diffusers loads it:
//! `pytorch_custom_diffusion_weights.safetensors` (every cross-attention's trained k/v weight as
//! `{layer}.processor.to_k_custom_diffusion.weight`, `[out, in]`, as `unet.save_attn_procs`
//! writes it for `CustomDiffusionAttnProcessor(train_kv=True)`), `<new1>.safetensors` and
//! `<new2>.safetensors` (`{"<new1>": [hidden]}`, as `load_textual_inversion` reads them) and
//! `report.json` (settings, losses, the sampling prompt, the base model's fingerprint). Read
//! back, checked against the base model, and applied for sampling.

use std::path::Path;

use burn::tensor::DType;
use decorr_clip::ClipTextModel;
use decorr_convert::tensor::{
    DType as ConvertDType, StateDict, Tensor as ConvertTensor, to_safetensors_bytes,
};
use decorr_core::CoreError;
use decorr_core::weights::{HostTensors, read_tensors_f32};
use decorr_pipeline::StableDiffusion;
use decorr_unet::UNet2DConditionModel;
use serde::{Deserialize, Serialize};

use crate::DisenDiffError;
// In `crate::apply` so that training can restore a delta without depending on this module;
// re-exported here, where they have always been.
pub use crate::apply::{apply_kv, rows_tensor};
use crate::tokens::{MODIFIERS, extend_table, extend_tokenizer};
use crate::train::{DisenDiffConfig, MicroLosses, Trained};

/// diffusers' file name for Custom Diffusion processor weights (safetensors).
pub const WEIGHTS_FILE: &str = "pytorch_custom_diffusion_weights.safetensors";
/// The run's report.
pub const REPORT_FILE: &str = "report.json";

/// A modifier's embedding file, `<new1>.safetensors`.
pub fn token_file(modifier: &str) -> String {
    format!("{modifier}.safetensors")
}

/// What identifies the base model a delta was trained on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaseInfo {
    /// The model id or folder, as given.
    pub model: String,
    /// Leading values of base weights the delta does not change (see [`probe`]).
    pub probe: Vec<f32>,
    pub hidden_size: usize,
    pub vocab_size: usize,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub method: String,
    pub prompt: String,
    pub objects: [String; 2],
    /// The prompt with the modifiers, as sampling uses it.
    pub sampling_prompt: String,
    /// The target images' caption (without the augmentation prefixes).
    pub caption: String,
    pub modifiers: [String; 2],
    pub config: DisenDiffConfig,
    pub base: BaseInfo,
    /// The cross-attention layers `L_attn` read, and their side.
    pub map_layers: Vec<String>,
    pub map_resolution: usize,
    /// Optimiser steps done (the delta is the model after the last of them).
    pub steps_done: usize,
    /// Whether the run stopped before `config.max_train_steps` (Ctrl-C).
    pub interrupted: bool,
    /// Each micro-step's losses, in order.
    pub micro_losses: Vec<MicroLosses>,
    /// Each optimiser step's mean total loss over its micro-steps.
    pub step_losses: Vec<f64>,
    /// The training images (file names in `train_images/`) and regularisation images.
    pub training_images: Vec<String>,
    pub regularisation: String,
    /// Training time in seconds, resumed runs added up (loading and image generation left out).
    pub seconds: f64,
    /// Each optimiser step's wall time in seconds: its `grad_accum` micro-steps (each reads its
    /// losses back, so the device has finished) and the update, saving OUT left out. Empty in
    /// reports written before it was recorded.
    #[serde(default)]
    pub step_seconds: Vec<f64>,
}

/// How many leading values of each probed tensor [`probe`] keeps.
const PROBE: usize = 64;

/// The first values of the text encoder's position table and of the UNet's `conv_in` weight:
/// weights DisenDiff leaves as they are, so a delta can tell its base model from another.
pub fn probe(text: &ClipTextModel, unet: &UNet2DConditionModel) -> Vec<f32> {
    let pos = text
        .embeddings
        .position_embedding
        .weight
        .val()
        .flatten::<1>(0, 1);
    let conv = unet.conv_in.weight.val().flatten::<1>(0, 3);
    let mut out = Vec::new();
    for t in [pos, conv] {
        let n = t.dims()[0].min(PROBE);
        out.extend(decorr_core::readback::to_f32_vec(t.narrow(0, 0, n)));
    }
    out
}

/// Whether `stored` (f32, from training) is what a model whose weights are in `dtype` holds:
/// the stored values rounded to that dtype must equal `now` exactly.
fn probe_matches(stored: &[f32], now: &[f32], dtype: DType) -> bool {
    let round = |x: f32| match dtype {
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        _ => x,
    };
    stored.len() == now.len() && stored.iter().zip(now).all(|(&a, &b)| round(a) == b)
}

/// f32 tensors as safetensors bytes with diffusers' `{"format": "pt"}` metadata (the
/// converter's writer); also the saved optimiser state's format.
pub fn f32_safetensors(
    tensors: Vec<(String, Vec<usize>, &[f32])>,
) -> Result<Vec<u8>, DisenDiffError> {
    let dict: StateDict = tensors
        .into_iter()
        .map(|(k, shape, v)| {
            let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (
                k,
                ConvertTensor {
                    dtype: ConvertDType::F32,
                    shape,
                    data,
                },
            )
        })
        .collect();
    to_safetensors_bytes(&dict).map_err(|e| DisenDiffError::Output(e.to_string()))
}

/// diffusers' key of a trained weight: `...attn2.to_k.weight` ->
/// `...attn2.processor.to_k_custom_diffusion.weight`.
pub fn file_key(path: &str) -> String {
    let (layer, name) = path.rsplit_once(".to_").expect("a k/v path");
    let proj = name.trim_end_matches(".weight");
    format!("{layer}.processor.to_{proj}_custom_diffusion.weight")
}

/// The inverse of [`file_key`]; `None` for keys that are not cross-attention k/v weights.
pub fn param_path(key: &str) -> Option<String> {
    let (layer, rest) = key.split_once(".processor.")?;
    let proj = match rest {
        "to_k_custom_diffusion.weight" => "to_k",
        "to_v_custom_diffusion.weight" => "to_v",
        _ => return None,
    };
    layer
        .ends_with(".attn2")
        .then(|| format!("{layer}.{proj}.weight"))
}

/// Writes the delta and the report into `dir` (created), each file whole or not at all
/// (temporary file, then rename); the report last, so a folder with a report is complete.
pub fn write_out(dir: &Path, trained: &Trained, report: &Report) -> Result<(), DisenDiffError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| DisenDiffError::Output(format!("cannot create {}: {e}", dir.display())))?;
    let kv = trained
        .kv
        .iter()
        .map(|(p, shape, v)| (file_key(p), shape.to_vec(), v.as_slice()))
        .collect();
    let write = |name: &str, bytes: &[u8]| {
        decorr_core::io::write_atomic(&dir.join(name), bytes)
            .map_err(|e| DisenDiffError::Output(e.to_string()))
    };
    write(WEIGHTS_FILE, &f32_safetensors(kv)?)?;
    for (m, row) in MODIFIERS.iter().zip(&trained.rows) {
        let t = vec![(m.to_string(), vec![row.len()], row.as_slice())];
        write(&token_file(m), &f32_safetensors(t)?)?;
    }
    let json = serde_json::to_vec_pretty(report).expect("a report serialises");
    write(REPORT_FILE, &json)
}

/// A delta read from a folder: the k/v weights by parameter path (`[out, in]`), the two rows,
/// and the report when the folder has one (diffusers' own training script writes none).
#[derive(Debug, Clone)]
pub struct DeltaFiles {
    pub trained: Trained,
    pub report: Option<Report>,
}

/// Every tensor of `path` as f32 (`decorr_core`'s reader, which converts f16/bf16), with
/// messages that say what the file was for; non-finite values are refused.
fn read_f32(path: &Path, what: &str) -> Result<HostTensors, DisenDiffError> {
    let tensors = read_tensors_f32(path).map_err(|e| match e {
        CoreError::Io { source, .. } => DisenDiffError::Delta(format!(
            "cannot read {} ({what}): {source}; is it a DisenDiff output folder (decorr \
             disendiff --out)?",
            path.display()
        )),
        // The core error names the file and what is wrong with it.
        other => DisenDiffError::Delta(format!("{other}; re-run decorr disendiff")),
    })?;
    if let Some((name, _)) = tensors
        .iter()
        .find(|(_, (_, v))| v.iter().any(|x| !x.is_finite()))
    {
        return Err(DisenDiffError::Delta(format!(
            "{name} in {} holds NaN or infinity: the training diverged; re-run with a lower --lr",
            path.display()
        )));
    }
    Ok(tensors)
}

/// Reads a DisenDiff (or diffusers Custom Diffusion, train_kv) output folder.
pub fn read_out(dir: &Path) -> Result<DeltaFiles, DisenDiffError> {
    if !dir.is_dir() {
        return Err(DisenDiffError::Delta(format!(
            "{} is not a folder; give the --out folder of decorr disendiff",
            dir.display()
        )));
    }
    let wpath = dir.join(WEIGHTS_FILE);
    let mut kv = Vec::new();
    for (key, (shape, values)) in read_f32(&wpath, "the k/v weights")? {
        let path = param_path(&key).ok_or_else(|| {
            DisenDiffError::Delta(format!(
                "{} holds {key}, which is not a cross-attention to_k/to_v weight of Custom \
                 Diffusion (train_kv); only k/v deltas are supported",
                wpath.display()
            ))
        })?;
        let [o, i] = shape[..] else {
            return Err(DisenDiffError::Delta(format!(
                "{key} in {} has shape {shape:?}; expected [out, in]",
                wpath.display()
            )));
        };
        kv.push((path, [o, i], values));
    }
    kv.sort_by(|a, b| a.0.cmp(&b.0));
    if kv.is_empty() {
        return Err(DisenDiffError::Delta(format!(
            "{} holds no weights",
            wpath.display()
        )));
    }
    let mut rows = Vec::new();
    for m in MODIFIERS {
        let p = dir.join(token_file(m));
        let mut t = read_f32(&p, "a modifier's embedding")?;
        let (shape, v) = t.remove(m).ok_or_else(|| {
            DisenDiffError::Delta(format!("{} holds no tensor named {m}", p.display()))
        })?;
        if shape.len() > 2 || v.is_empty() || (shape.len() == 2 && shape[0] != 1) {
            return Err(DisenDiffError::Delta(format!(
                "{m} in {} has shape {shape:?}; expected one row [hidden]",
                p.display()
            )));
        }
        rows.push(v);
    }
    if rows[0].len() != rows[1].len() {
        return Err(DisenDiffError::Delta(format!(
            "the two modifier rows have different lengths ({} and {})",
            rows[0].len(),
            rows[1].len()
        )));
    }
    let rpath = dir.join(REPORT_FILE);
    let report = if rpath.is_file() {
        let text = std::fs::read_to_string(&rpath)
            .map_err(|e| DisenDiffError::Delta(format!("cannot read {}: {e}", rpath.display())))?;
        Some(serde_json::from_str(&text).map_err(|e| {
            DisenDiffError::Delta(format!(
                "{} is not a DisenDiff report: {e}",
                rpath.display()
            ))
        })?)
    } else {
        None
    };
    let [r1, r2]: [Vec<f32>; 2] = rows.try_into().expect("two rows");
    Ok(DeltaFiles {
        trained: Trained { kv, rows: [r1, r2] },
        report,
    })
}

/// The variant of a loaded pipeline that samples with a delta: the k/v weights in the UNet, the
/// modifiers in the tokenizer and the text encoder's table; every other weight is shared with
/// `sd`, which is not changed. Refuses a delta trained on another base model (by the report's
/// fingerprint) or one whose shapes do not fit.
pub fn with_delta(
    sd: &StableDiffusion,
    delta: &DeltaFiles,
) -> Result<StableDiffusion, DisenDiffError> {
    let hidden = sd
        .text_encoder
        .embeddings
        .token_embedding
        .weight
        .val()
        .dims()[1];
    if delta.trained.rows[0].len() != hidden {
        return Err(DisenDiffError::Delta(format!(
            "the modifier rows have {} values but this text encoder's embeddings {hidden}: the \
             delta is for another base model",
            delta.trained.rows[0].len()
        )));
    }
    if let Some(report) = &delta.report {
        let now = probe(&sd.text_encoder, &sd.unet);
        let dtype = sd.unet.conv_in.weight.val().dtype();
        if !probe_matches(&report.base.probe, &now, dtype) {
            return Err(DisenDiffError::Delta(format!(
                "the delta was trained on another base model ({}) than {}: their weights \
                 differ; pass --model with the model it was trained on",
                report.base.model, sd.model_id
            )));
        }
    }
    let rows_n = sd.text_encoder.vocab_size();
    let (tokenizer, _) = extend_tokenizer(&sd.tokenizer, rows_n)?;
    let rows = rows_tensor(&delta.trained.rows, &sd.device)?;
    Ok(StableDiffusion {
        unet: apply_kv(sd.unet.clone(), &delta.trained.kv)?,
        text_encoder: extend_table(sd.text_encoder.clone(), rows),
        tokenizer,
        ..sd.clone()
    })
}
