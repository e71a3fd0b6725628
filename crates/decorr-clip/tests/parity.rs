//! Parity with transformers: tokenizer ids and CLIPTextModel hidden states / attention
//! probabilities, against fixtures written by `tests/pyref/make_fixtures.py` on tiny random
//! models (and, with `DECORR_FULL_FIXTURE=DIR`, a full-size SD 1.5 text encoder).
//!
//! Tolerances (fp32): hidden states max abs error <= 1e-4, attention probabilities <= 1e-5.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use decorr_clip::{ClipTokenizer, ForwardOptions, load_text_encoder, load_tokenizer};
use decorr_core::ModelSource;

const HIDDEN_TOL: f32 = 1e-4;
const ATTN_TOL: f32 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A reference tensor: shape and values (floats as f32, ints as i64 cast to f64-free i64).
struct RefTensor {
    shape: Vec<usize>,
    f32s: Vec<f32>,
    i64s: Vec<i64>,
}

fn read_reference(path: &Path) -> HashMap<String, RefTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let (f32s, i64s) = match view.dtype() {
                safetensors::Dtype::F32 => (
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                    vec![],
                ),
                safetensors::Dtype::I64 => (
                    vec![],
                    data.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                other => panic!("unexpected dtype {other:?} for {name}"),
            };
            (
                name,
                RefTensor {
                    shape: view.shape().to_vec(),
                    f32s,
                    i64s,
                },
            )
        })
        .collect()
}

fn max_abs_diff<const D: usize>(ours: Tensor<D>, reference: &RefTensor) -> f32 {
    assert_eq!(ours.dims().to_vec(), reference.shape, "shape");
    let ours = ours
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap();
    ours.iter()
        .zip(&reference.f32s)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// Compare every hidden state and attention map of the encoder in `dir` with its reference.
fn check_encoder(dir: &Path) -> (f32, f32) {
    let device = decorr_core::device_from_env();
    let source = ModelSource::Local(dir.to_path_buf());
    let enc = load_text_encoder(&source, &device).unwrap();
    let reference = read_reference(&dir.join("text_encoder/reference.safetensors"));
    let ids = &reference["input_ids"];
    let input = Tensor::<2, Int>::from_data(
        TensorData::new(ids.i64s.clone(), ids.shape.clone()),
        &device,
    );
    let n = enc.config.num_hidden_layers;
    let opts = ForwardOptions {
        hidden_states: true,
        attention_layers: (0..n).collect(),
        stop_at_attention: None,
        ..Default::default()
    };
    let out = enc.model.forward_with(input, &opts);
    assert_eq!(out.hidden_states.len(), n + 1);
    let mut worst_h = max_abs_diff(
        out.last_hidden_state.unwrap(),
        &reference["last_hidden_state"],
    );
    for (i, h) in out.hidden_states.into_iter().enumerate() {
        worst_h = worst_h.max(max_abs_diff(h, &reference[&format!("hidden_states.{i}")]));
    }
    let mut worst_a = 0.0f32;
    for (i, a) in out.attentions {
        worst_a = worst_a.max(max_abs_diff(a, &reference[&format!("attentions.{i}")]));
    }
    println!(
        "{}: hidden max abs err {worst_h:.2e}, attention {worst_a:.2e}",
        dir.display()
    );
    assert!(
        worst_h <= HIDDEN_TOL,
        "hidden states differ by {worst_h} > {HIDDEN_TOL}"
    );
    assert!(
        worst_a <= ATTN_TOL,
        "attention differs by {worst_a} > {ATTN_TOL}"
    );
    (worst_h, worst_a)
}

/// SD 1.x-like: vocab 49408, quick_gelu, fp16 file with `text_model.` keys.
#[test]
fn encoder_a_fp16_prefixed_matches_transformers() {
    check_encoder(&fixtures().join("clip_tiny_a"));
}

/// SD 2.x-like: gelu, other width/heads/depth, fp32 file without prefix.
#[test]
fn encoder_b_gelu_unprefixed_matches_transformers() {
    check_encoder(&fixtures().join("clip_tiny_b"));
}

/// Full-size SD 1.5 text encoder with random weights, written by
/// `make_fixtures.py --full DIR` (about 500 MB, not committed):
/// `DECORR_FULL_FIXTURE=DIR cargo test -p decorr-clip --test parity -- --ignored`.
#[test]
#[ignore = "needs DECORR_FULL_FIXTURE (full-size random SD 1.5 text encoder)"]
fn full_size_sd15_matches_transformers() {
    let dir = std::env::var("DECORR_FULL_FIXTURE").expect("set DECORR_FULL_FIXTURE=DIR");
    check_encoder(Path::new(&dir));
}

#[derive(serde::Deserialize)]
struct TokRow {
    prompt: String,
    ids: Vec<u32>,
    tokens: Vec<String>,
    content_tokens: usize,
}

fn tokenizer_rows() -> Vec<TokRow> {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_ids.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(v["prompts"].clone()).unwrap()
}

fn check_tokenizer(tok: &ClipTokenizer) {
    let rows = tokenizer_rows();
    assert!(rows.len() >= 8);
    for r in rows {
        let ours = tok.encode(&r.prompt).unwrap();
        assert_eq!(ours.ids, r.ids, "ids of {:?}", r.prompt);
        assert_eq!(ours.tokens, r.tokens, "tokens of {:?}", r.prompt);
        assert_eq!(
            ours.truncated,
            r.content_tokens.saturating_sub(75),
            "{:?}",
            r.prompt
        );
    }
}

#[test]
fn embedded_vocabulary_matches_transformers() {
    check_tokenizer(&ClipTokenizer::embedded());
}

/// `clip_tiny_a` ships transformers' `tokenizer.json` only: the other loading path.
#[test]
fn tokenizer_json_matches_transformers() {
    let source = ModelSource::Local(fixtures().join("clip_tiny_a"));
    check_tokenizer(&load_tokenizer(&source).unwrap());
}

/// The ids recorded for the paper's prompts in the shared reference (`reference_ids.json`).
#[test]
fn paper_prompts_have_reference_ids() {
    let text = std::fs::read_to_string(fixtures().join("reference_ids.json")).unwrap();
    let v: HashMap<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    let tok = ClipTokenizer::embedded();
    for prompt in [
        "rusty tracks with an old train",
        "an old train with rusty tracks",
    ] {
        let want: Vec<u32> = serde_json::from_value(v[prompt].clone()).unwrap();
        assert_eq!(tok.encode(prompt).unwrap().ids, want, "{prompt}");
    }
}
