//! Training-trajectory parity with PyTorch on both text encoders of the tiny SDXL model
//! (`tests/fixtures/sdxl_tiny/`), recorded by `tests/pyref/make_sdxl_finetune_fixtures.py` (the
//! reference run of `make_fixtures.py`, full 77-token passes, torch.optim.AdamW) for each
//! parameter preset, at the layer the UNet reads (`hidden_states[-2]`: layer n-2, 1 for
//! `text_encoder`, 2 for `text_encoder_2`), each encoder with its own tokenizer
//! (`tokenizer_2` pads with "!"). Same tolerances as `finetune_parity.rs`: per-step loss rel.
//! error <= 1e-3 (first 20 steps), per-epoch numbers abs <= 2e-5, the same selected epoch,
//! trained weights max abs diff <= 1e-4 and every frozen weight bit-identical. One exception:
//! the k_proj biases, whose true gradient is zero and whose AdamW updates follow rounding noise
//! (here up to 1.07e-4 apart; the same noise gives `finetune_parity.rs` its worst 4e-5 to 7e-5),
//! are checked to have moved like noise instead ([`check_noise_only`]). Measured (flex): every
//! other trained weight <= 2.6e-7, step losses <= 6e-6 rel., epoch numbers <= 2e-7.
//!
//! What SDXL adds is checked too: the padded ids equal transformers' (the "!" padding), the
//! token table (stored by the fixture as the prompt's rows plus every 1000th row, to stay small)
//! matches on those rows and only decays elsewhere, and `text_projection` of `text_encoder_2`,
//! off the loss's graph at layer n-2, gets no gradient: it stays bit-identical and the saved
//! encoder (decorr-clip's save, as `decorr finetune` writes it) carries it back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use decorr_clip::{
    TextEncoder, load_text_encoder, load_text_encoder_component, load_text_encoder_dir,
    load_tokenizer, load_tokenizer_component, save_text_encoder,
};
use decorr_core::ModelSource;
use decorr_trainer::{
    ParamPreset, Silent, TargetSpec, TrainConfig, TrainPrompt, finetune, resolve_target,
};

const TABLE: &str = "embeddings.token_embedding.weight";
const PROJECTION: &str = "text_projection.weight";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A safetensors file's tensors as f64 (f32 weights, i64 row ids), keys without `text_model.`
/// (transformers 5 writes `CLIPTextModel` without it, `CLIPTextModelWithProjection` and our
/// save with it).
fn read(path: &Path) -> HashMap<String, Vec<f64>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let d: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{k}: unexpected {other:?}"),
            };
            (k.strip_prefix("text_model.").unwrap_or(&k).to_string(), d)
        })
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// One encoder of `sdxl_tiny`: its folders and the prefix of its fixture files.
struct Encoder {
    name: &'static str,
    component: &'static str,
    tokenizer: &'static str,
}

const TE1: Encoder = Encoder {
    name: "te1",
    component: "text_encoder",
    tokenizer: "tokenizer",
};
const TE2: Encoder = Encoder {
    name: "te2",
    component: "text_encoder_2",
    tokenizer: "tokenizer_2",
};

fn load(e: &Encoder) -> (TextEncoder, decorr_clip::ClipTokenizer) {
    let source = ModelSource::Local(fixtures().join("sdxl_tiny"));
    let device = decorr_core::device_from_env();
    if e.component == "text_encoder" {
        (
            load_text_encoder(&source, &device).unwrap(),
            load_tokenizer(&source).unwrap(),
        )
    } else {
        (
            load_text_encoder_component(&source, e.component, &device).unwrap(),
            load_tokenizer_component(&source, e.tokenizer).unwrap(),
        )
    }
}

/// Runs our fine-tuning on encoder `e` with `preset` and compares it with PyTorch's record;
/// returns the folder our fine-tuned encoder was saved to (kept alive by the returned guard).
fn check(e: &Encoder, preset: ParamPreset, preset_name: &str) -> tempfile::TempDir {
    let name = format!("{}_{preset_name}", e.name);
    let record = fixtures().join("sdxl_finetune").join(&name);
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
    let (enc, tok) = load(e);
    assert_eq!(
        config.layer,
        enc.model.num_layers() - 2,
        "{name}: SDXL reads hidden_states[-2], the output of layer n-2"
    );

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
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokenized.ids.clone()).collect();
    assert_eq!(
        serde_json::json!(ids),
        reference["input_ids"],
        "{name}: padded ids"
    );
    let targets: Vec<u64> = prompts.iter().map(|p| p.target as u64).collect();
    assert_eq!(serde_json::json!(targets), s["targets"], "{name}: targets");

    let device = decorr_core::device_from_env();
    let out = finetune(enc.model, &prompts, &config, &device, &mut Silent).unwrap();
    let corrs: Vec<u64> = out.prompts.iter().map(|p| p.focus.corr as u64).collect();
    assert_eq!(
        serde_json::json!(corrs),
        s["corrs"],
        "{name}: corr from A_pre"
    );

    let ref_steps: Vec<f64> = serde_json::from_value(reference["step_losses"].clone()).unwrap();
    assert_eq!(out.step_losses.len(), ref_steps.len());
    let mut worst_step = 0.0f64;
    for (k, (ours, theirs)) in out.step_losses.iter().zip(&ref_steps).take(20).enumerate() {
        let rel = (ours - theirs).abs() / theirs.abs().max(1e-9);
        worst_step = worst_step.max(rel);
        assert!(
            rel <= 1e-3 || (ours - theirs).abs() <= 1e-8,
            "{name} step {}: {ours} vs {theirs}",
            k + 1
        );
    }
    let ref_epochs = reference["epochs"].as_array().unwrap();
    assert_eq!(out.epochs.len(), ref_epochs.len());
    let mut worst_epoch = 0.0f64;
    for (m, r) in out.epochs.iter().zip(ref_epochs) {
        for (ours, key) in [
            (m.l_train, "l_train"),
            (m.l_corr, "l_corr"),
            (m.l_align, "l_align"),
            (m.l_val, "l_val"),
        ] {
            let theirs = r[key].as_f64().unwrap();
            worst_epoch = worst_epoch.max((ours - theirs).abs());
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

    // Final weights, read back from our own save (what `decorr finetune` writes).
    let tmp = tempfile::tempdir().unwrap();
    save_text_encoder(&out.last, &enc.config, tmp.path()).unwrap();
    let ours = read(&tmp.path().join("model.safetensors"));
    let initial = read(&fixtures().join(format!("sdxl_tiny/{}/model.safetensors", e.component)));
    let trained = read(&record.with_extension("safetensors"));
    let mut keys: Vec<&String> = initial.keys().collect();
    keys.sort();
    let ours_keys: Vec<&String> = {
        let mut k: Vec<&String> = ours.keys().collect();
        k.sort();
        k
    };
    assert_eq!(ours_keys, keys, "{name}: same tensors as the input file");

    for key in trained.keys() {
        let tensor = key.strip_suffix(".ids").or(key.strip_suffix(".rows"));
        assert!(
            initial.contains_key(tensor.unwrap_or(key)),
            "{name}: the fixture's {key} is no tensor of the encoder"
        );
    }
    let mut worst = 0.0f64;
    let mut worst_noise = 0.0f64;
    let mut noise_vs_torch = 0.0f64;
    let mut moved = false;
    for key in keys {
        let (mine, init) = (&ours[key], &initial[key]);
        if key == TABLE && trained.contains_key(&format!("{TABLE}.ids")) {
            let (w, m) = check_table(&name, &config, &out.step_losses, mine, init, &trained);
            worst = worst.max(w);
            moved |= m;
        } else if let Some(theirs) = trained.get(key)
            && key.ends_with(".self_attn.k_proj.bias")
        {
            let grad = reference["max_abs_grad"][key.as_str()].as_f64().unwrap();
            let drift = check_noise_only(&name, key, &config, grad, mine, theirs, init);
            worst_noise = worst_noise.max(drift);
            noise_vs_torch = noise_vs_torch.max(max_abs_diff(mine, theirs));
        } else if let Some(theirs) = trained.get(key) {
            worst = worst.max(max_abs_diff(mine, theirs));
            moved |= theirs != init;
        } else {
            assert!(mine == init, "{name}: frozen {key} changed");
        }
    }
    println!(
        "{name}: trained weights max abs diff {worst:.2e}, step loss max rel err {worst_step:.2e}, \
         epoch numbers max abs diff {worst_epoch:.2e}, selected epoch {:?}; k_proj biases \
         (noise-only gradient) moved at most {worst_noise:.2e} beyond decay, \
         {noise_vs_torch:.2e} from PyTorch's",
        out.selected_epoch
    );
    assert!(worst <= 1e-4, "{name}: trained weights differ by {worst}");
    assert!(moved, "{name}: nothing trained");
    tmp
}

/// A k_proj bias: softmax ignores a shift shared by a row's logits, so its true gradient is
/// zero, and what both runs compute is rounding noise (~1e-9, against AdamW's eps 1e-8) that
/// AdamW turns into updates of a fraction of lr in the noise's direction: ours and PyTorch's
/// differ by up to ~1e-4 after 20 steps, with no effect on any output (the bias never changes
/// an attention probability). So instead of the 1e-4 match, checked: PyTorch's gradient was
/// noise (<= 1e-7; real gradients here are >= 5e-4), and neither run moved the bias beyond
/// weight decay by more than a fifth of `steps * lr` (what a real gradient moves a tensor:
/// ~1e-3 here). Returns the larger drift.
fn check_noise_only(
    name: &str,
    key: &str,
    config: &TrainConfig,
    grad: f64,
    mine: &[f64],
    theirs: &[f64],
    init: &[f64],
) -> f64 {
    assert!(
        grad <= 1e-7,
        "{name}: PyTorch's gradient of {key} reached {grad}: not noise"
    );
    let steps = (config.epochs * config.steps_per_epoch) as i32;
    let decayed: Vec<f64> = init
        .iter()
        .map(|x| x * (1.0 - config.lr * config.weight_decay as f64).powi(steps))
        .collect();
    let (ours, torch) = (max_abs_diff(mine, &decayed), max_abs_diff(theirs, &decayed));
    let bound = 0.2 * steps as f64 * config.lr;
    assert!(
        ours <= bound && torch <= bound,
        "{name}: {key} moved by {ours} (ours) / {torch} (PyTorch) beyond decay, over {bound}: \
         more than noise"
    );
    ours.max(torch)
}

/// The token table against the fixture's rows (trained and decay-only rows, by id), and every
/// row the fixture left out against pure decay, `init * (1 - lr*wd)^steps`, as torch's AdamW
/// treats a row whose gradient is always zero. Returns the max abs diff on the recorded rows
/// and whether any recorded row moved beyond decay.
fn check_table(
    name: &str,
    config: &TrainConfig,
    steps: &[f64],
    mine: &[f64],
    init: &[f64],
    trained: &HashMap<String, Vec<f64>>,
) -> (f64, bool) {
    let ids: Vec<usize> = trained[&format!("{TABLE}.ids")]
        .iter()
        .map(|&i| i as usize)
        .collect();
    let rows = &trained[&format!("{TABLE}.rows")];
    let width = rows.len() / ids.len();
    assert_eq!(mine.len() % width, 0, "{name}: table width");
    let decay = (1.0 - config.lr * config.weight_decay as f64).powi(steps.len() as i32);
    let row = |t: &[f64], id: usize| t[id * width..(id + 1) * width].to_vec();
    let mut worst = 0.0f64;
    let mut moved = false;
    for (k, &id) in ids.iter().enumerate() {
        let theirs = &rows[k * width..(k + 1) * width];
        worst = worst.max(max_abs_diff(&row(mine, id), theirs));
        let decayed: Vec<f64> = row(init, id).iter().map(|x| x * decay).collect();
        moved |= max_abs_diff(theirs, &decayed) > 1e-6;
    }
    let mut worst_decay = 0.0f64;
    for id in (0..mine.len() / width).filter(|i| ids.binary_search(i).is_err()) {
        let decayed: Vec<f64> = row(init, id).iter().map(|x| x * decay).collect();
        worst_decay = worst_decay.max(max_abs_diff(&row(mine, id), &decayed));
    }
    println!("{name}: token table, unrecorded rows vs pure decay max abs diff {worst_decay:.2e}");
    assert!(
        worst_decay <= 1e-7,
        "{name}: a token row outside the prompt moved by {worst_decay} beyond weight decay"
    );
    (worst, moved)
}

#[test]
fn text_encoder_all_matches_pytorch() {
    check(&TE1, ParamPreset::All, "all");
}

#[test]
fn text_encoder_attn_matches_pytorch() {
    check(&TE1, ParamPreset::Attn, "attn");
}

#[test]
fn text_encoder_qk_matches_pytorch() {
    check(&TE1, ParamPreset::Qk, "qk");
}

/// `text_encoder_2` with every parameter trainable, including `text_projection`: it gets no
/// gradient at layer n-2 (PyTorch's run lists it under `no_grad`), so it must come back
/// bit-identical, and the saved folder must hold it and load as an encoder with projection.
#[test]
fn text_encoder_2_all_matches_pytorch_and_keeps_its_projection() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("sdxl_finetune/te2_all.json")).unwrap(),
    )
    .unwrap();
    assert!(
        reference["no_grad"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(PROJECTION)),
        "PyTorch's projection got a gradient"
    );
    let saved = check(&TE2, ParamPreset::All, "all");

    let file = read(&saved.path().join("model.safetensors"));
    let initial = read(&fixtures().join("sdxl_tiny/text_encoder_2/model.safetensors"));
    assert_eq!(
        file.get(PROJECTION),
        Some(&initial[PROJECTION]),
        "the saved text_projection.weight is the original one"
    );
    let raw = std::fs::read(saved.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    assert!(
        st.names().contains(&PROJECTION),
        "saved at transformers' top-level key {PROJECTION}"
    );
    let reloaded = load_text_encoder_dir(saved.path(), &decorr_core::device_from_env()).unwrap();
    assert!(
        reloaded.config.has_projection(),
        "saved as an encoder with projection"
    );
    assert_eq!(reloaded.config.projection_dim, 20);
    assert!(reloaded.model.text_projection.is_some());
}

#[test]
fn text_encoder_2_attn_matches_pytorch() {
    check(&TE2, ParamPreset::Attn, "attn");
}

#[test]
fn text_encoder_2_qk_matches_pytorch() {
    check(&TE2, ParamPreset::Qk, "qk");
}
