//! Helpers shared by DisenDiff's tests: the tiny models and the PyTorch reference's inputs
//! (tests/fixtures/disendiff, written by tests/pyref/make_disendiff_fixtures.py).
#![allow(dead_code)] // each test binary uses a different subset
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use decorr_core::ModelSource;
use decorr_core::weights::HostTensors;
use decorr_disendiff::tokens::{extend_tokenizer, initial_rows};
use decorr_disendiff::train::training_alphas_cumprod;
use decorr_disendiff::{DisenDiffConfig, MicroBatch, Trainer};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

/// The reference's float tensors (the int64 ids and timesteps through [`ints`]).
pub fn refs() -> HostTensors {
    let bytes = std::fs::read(fixtures().join("disendiff/reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HostTensors::new();
    for (name, v) in st.tensors() {
        if v.dtype() == safetensors::Dtype::F32 {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            out.insert(name, (v.shape().to_vec(), vals));
        }
    }
    out
}

pub fn cases() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("disendiff/cases.json")).unwrap())
        .unwrap()
}

/// Int64 reference tensors are not in `HostTensors` (floats only): read them directly.
pub fn ints(key: &str) -> (Vec<usize>, Vec<i64>) {
    let bytes = std::fs::read(fixtures().join("disendiff/reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(key).unwrap();
    let vals = v
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (v.shape().to_vec(), vals)
}

pub fn tensor<const D: usize>(refs: &HostTensors, key: &str, device: &Device) -> Tensor<D> {
    let (shape, v) = &refs[key];
    Tensor::from_data(TensorData::new(v.clone(), shape.clone()), device)
}

/// Micro-batch `i` of the reference.
pub fn batch(refs: &HostTensors, i: usize, device: &Device) -> MicroBatch {
    let (shape, ids) = ints(&format!("micro{i}.input_ids"));
    let ids: Vec<Vec<u32>> = ids
        .chunks(shape[1])
        .map(|r| r.iter().map(|&x| x as u32).collect())
        .collect();
    let (_, t) = ints(&format!("micro{i}.timesteps"));
    MicroBatch {
        ids,
        z0: tensor(refs, &format!("micro{i}.z0"), device),
        noise: tensor(refs, &format!("micro{i}.noise"), device),
        timesteps: t.iter().map(|&t| t as usize).collect(),
        mask: tensor(refs, &format!("micro{i}.mask"), device),
    }
}

/// The reference's configuration (accumulation 2, 8x8 stand-in maps) at `lr`.
pub fn config(lr: f64) -> DisenDiffConfig {
    DisenDiffConfig {
        lr,
        grad_accum: 2,
        max_train_steps: 3,
        resolution: 16,
        map_resolution: Some(8),
        ..Default::default()
    }
}

/// A trainer on the tiny models, as the reference sets them up.
pub fn trainer(lr: f64) -> Trainer {
    let device = decorr_core::device_from_env();
    let text = decorr_clip::load_text_encoder_dir(
        &fixtures().join("clip_tiny_train/text_encoder"),
        &device,
    )
    .unwrap()
    .model;
    let unet = decorr_unet::load_unet(&ModelSource::Local(fixtures().join("unet_tiny_a")), &device)
        .unwrap()
        .model;
    let tokenizer =
        decorr_clip::load_tokenizer(&ModelSource::Local(assets().join("sd-tiny"))).unwrap();
    let (_, ids) = extend_tokenizer(&tokenizer, text.vocab_size()).unwrap();
    let rows = initial_rows(&text).unwrap();
    let sched = decorr_scheduler::SchedulerConfig::from_file(
        fixtures().join("pipeline/scheduler/scheduler_config.json"),
    )
    .unwrap();
    let acp = training_alphas_cumprod(&sched).unwrap();
    Trainer::new(unet, text, rows, ids, acp, [8, 8], &config(lr), &device).unwrap()
}

pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// max |a - b| / max(max |b|, floor).
pub fn rel_diff(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths");
    let scale = b.iter().fold(floor, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
