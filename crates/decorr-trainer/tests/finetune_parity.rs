//! Training-trajectory parity with PyTorch (transformers CLIPTextModel, eager attention,
//! torch.optim.AdamW), recorded by `tests/pyref/make_fixtures.py` on `clip_tiny_train` for each
//! parameter preset: per-step loss rel. error <= 1e-3 (first 20 steps), per-epoch numbers, the
//! same selected epoch, trained weights max abs diff <= 1e-4 and every frozen weight bit-identical.
//! PyTorch runs full 77-token passes; ours run on the causal prefix up to the latest target, so
//! these tests are also what shows the prefix gives the same trajectory. With
//! `DECORR_FULL_FIXTURE=DIR` (`make_fixtures.py --full DIR`) the same check runs on a full-size
//! SD 1.5 text encoder at layer 11.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use decorr_clip::{ClipTokenizer, load_text_encoder, save_text_encoder};
use decorr_core::ModelSource;
use decorr_trainer::{
    ParamPreset, Silent, TargetSpec, TrainConfig, TrainPrompt, finetune, resolve_target,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read_f32(path: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{k}");
            let d = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k, d)
        })
        .collect()
}

fn check_preset(name: &str, preset: ParamPreset) {
    let dir = fixtures();
    check_run(
        name,
        preset,
        &dir.join("clip_tiny_train"),
        &dir.join(format!("finetune/{name}")),
    );
}

/// Compares our run on the encoder in `model_dir` with PyTorch's record `record.{json,safetensors}`.
fn check_run(name: &str, preset: ParamPreset, model_dir: &Path, record: &Path) {
    let text = std::fs::read_to_string(record.with_extension("json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let s = &reference["settings"];
    let config = TrainConfig {
        layer: s["layer"].as_u64().unwrap() as usize,
        epochs: s["epochs"].as_u64().unwrap() as usize,
        steps_per_epoch: s["steps_per_epoch"].as_u64().unwrap() as usize,
        lr: s["lr"].as_f64().unwrap(),
        beta1: s["betas"][0].as_f64().unwrap() as f32,
        beta2: s["betas"][1].as_f64().unwrap() as f32,
        eps: s["eps"].as_f64().unwrap() as f32,
        weight_decay: s["weight_decay"].as_f64().unwrap() as f32,
        tau: s["tau"].as_f64().unwrap(),
        params: preset,
        seed: 0,
    };
    let tok = ClipTokenizer::embedded();
    let prompts: Vec<TrainPrompt> = s["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pw| {
            let tokenized = tok.encode(pw[0].as_str().unwrap()).unwrap();
            let target =
                resolve_target(&tokenized, &TargetSpec::word(pw[1].as_str().unwrap())).unwrap();
            TrainPrompt { tokenized, target }
        })
        .collect();
    let targets: Vec<u64> = prompts.iter().map(|p| p.target as u64).collect();
    assert_eq!(serde_json::json!(targets), s["targets"], "target tokens");

    let device = decorr_core::device_from_env();
    let enc = load_text_encoder(&ModelSource::Local(model_dir.to_path_buf()), &device).unwrap();
    let out = finetune(enc.model, &prompts, &config, &device, &mut Silent).unwrap();

    let corrs: Vec<u64> = out.prompts.iter().map(|p| p.focus.corr as u64).collect();
    assert_eq!(
        serde_json::json!(corrs),
        s["corrs"],
        "corr tokens from A_pre"
    );

    let ref_steps: Vec<f64> = serde_json::from_value(reference["step_losses"].clone()).unwrap();
    assert_eq!(out.step_losses.len(), ref_steps.len());
    for (k, (ours, theirs)) in out.step_losses.iter().zip(&ref_steps).take(20).enumerate() {
        let rel = (ours - theirs).abs() / theirs.abs().max(1e-9);
        assert!(
            rel <= 1e-3 || (ours - theirs).abs() <= 1e-8,
            "{name} step {}: {ours} vs {theirs}",
            k + 1
        );
    }
    for (m, r) in out
        .epochs
        .iter()
        .zip(reference["epochs"].as_array().unwrap())
    {
        for (ours, key) in [
            (m.l_train, "l_train"),
            (m.l_corr, "l_corr"),
            (m.l_align, "l_align"),
            (m.l_val, "l_val"),
        ] {
            let theirs = r[key].as_f64().unwrap();
            assert!(
                (ours - theirs).abs() <= 2e-5,
                "{name} epoch {} {key}: {ours} vs {theirs}",
                m.epoch
            );
        }
    }
    assert_eq!(
        out.selected_epoch.map(|e| e as u64),
        reference["selected_epoch"].as_u64(),
        "{name}"
    );

    // Final weights, read back in transformers naming from our own save.
    let tmp = tempfile::tempdir().unwrap();
    save_text_encoder(&out.last, &enc.config, tmp.path()).unwrap();
    let ours = read_f32(&tmp.path().join("model.safetensors"));
    let trained = read_f32(&record.with_extension("safetensors"));
    let initial = read_f32(&model_dir.join("text_encoder/model.safetensors"));
    assert_eq!(ours.len(), initial.len(), "same tensors as the input file");
    let mut worst = 0.0f32;
    for (key, init) in &initial {
        let short = key.strip_prefix("text_model.").unwrap();
        let mine = &ours[key];
        match trained.get(short) {
            Some(theirs) => {
                let d = mine
                    .iter()
                    .zip(theirs)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                worst = worst.max(d);
            }
            None => assert!(mine == init, "{name}: frozen {key} changed"),
        }
    }
    println!(
        "{name}: trained weights max abs diff {worst:.2e}, steps {:?}",
        &out.step_losses[..3]
    );
    assert!(worst <= 1e-4, "{name}: trained weights differ by {worst}");
    // Something did train: the preset's weights moved away from the initial ones.
    let moved = trained
        .keys()
        .any(|k| ours[&format!("text_model.{k}")] != initial[&format!("text_model.{k}")]);
    assert!(moved, "{name}: nothing trained");
}

#[test]
fn preset_all_matches_pytorch() {
    check_preset("all", ParamPreset::All);
}

#[test]
fn preset_attn_matches_pytorch() {
    check_preset("attn", ParamPreset::Attn);
}

#[test]
fn preset_qk_matches_pytorch() {
    check_preset("qk", ParamPreset::Qk);
}

/// Full-size SD 1.5 text encoder (random weights), `--params all`, layer 11, two epochs of three
/// steps at lr 1e-4: `DECORR_FULL_FIXTURE=DIR cargo test -p decorr-trainer --test finetune_parity
/// -- --ignored`, after `make_fixtures.py --full DIR`.
#[test]
#[ignore = "needs DECORR_FULL_FIXTURE (full-size random SD 1.5 text encoder and its PyTorch run)"]
fn full_size_all_matches_pytorch() {
    let dir = std::env::var("DECORR_FULL_FIXTURE").expect("set DECORR_FULL_FIXTURE=DIR");
    let dir = Path::new(&dir);
    check_run("full", ParamPreset::All, dir, &dir.join("finetune_all"));
}
