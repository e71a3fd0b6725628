//! Parity of `decorr_eval::deberta` with transformers 5.24's `DebertaModel` /
//! `DebertaTokenizer` and bert_score 0.3.13, against fixtures written by
//! `tests/pyref/make_deberta_fixtures.py` on tiny random models (`tests/fixtures/deberta/`).
//!
//! Tolerances (fp32): hidden states max abs error <= 1e-5 on every layer (real tokens of the
//! padded rows included; padding positions are checked too, since masking follows 5.24
//! exactly); BERTScore P/R/F <= 1e-5. Token ids must be equal.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use decorr_eval::bertscore::{LayerEncoder, ScoreOptions, load_deberta_scorer};
use decorr_eval::deberta::{
    DebertaConfig, DebertaModel, load_deberta, load_deberta_tokenizer, sent_encode,
};
use serde_json::Value;

const HIDDEN_TOL: f32 = 1e-5;
const SCORE_TOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/deberta")
}

fn reference() -> Value {
    let path = fixtures().join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn device() -> Device {
    decorr_core::device_from_env()
}

fn ids_of(v: &Value) -> Vec<Vec<i64>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn int2(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let (b, n) = (rows.len(), rows[0].len());
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [b, n]), device)
}

fn values(t: Tensor<3>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// `(max abs error over real tokens, over padding positions)` for every layer of both batches.
fn check_hidden(folder: &str) -> (f32, f32) {
    let device = device();
    let (model, config) = load_deberta(&fixtures().join(folder), &device).unwrap();
    let reference = reference();
    let hidden = decorr_core::weights::read_tensors_f32(
        &fixtures().join(format!("hidden_{folder}.safetensors")),
    )
    .unwrap();
    let (mut worst_real, mut worst_pad) = (0.0f32, 0.0f32);
    for batch in ["short", "long"] {
        let ids = ids_of(&reference["batches"][batch]["input_ids"]);
        let mask = ids_of(&reference["batches"][batch]["attention_mask"]);
        let n_layers = config.num_hidden_layers;
        let states = model.hidden_states(int2(&ids, &device), int2(&mask, &device), n_layers);
        assert_eq!(states.len(), n_layers + 1);
        for (l, h) in states.into_iter().enumerate() {
            let (shape, want) = &hidden[&format!("{batch}.hidden.{l}")];
            assert_eq!(
                &h.dims().to_vec(),
                shape,
                "{folder} {batch} layer {l} shape"
            );
            let got = values(h);
            let width = shape[2];
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                let (row, pos) = (i / width / shape[1], i / width % shape[1]);
                let err = (g - w).abs();
                if mask[row][pos] == 1 {
                    worst_real = worst_real.max(err);
                } else {
                    worst_pad = worst_pad.max(err);
                }
            }
        }
    }
    println!("{folder}: hidden max abs err real tokens {worst_real:.2e}, padding {worst_pad:.2e}");
    assert!(
        worst_real <= HIDDEN_TOL,
        "{folder}: real tokens differ by {worst_real}"
    );
    assert!(
        worst_pad <= HIDDEN_TOL,
        "{folder}: padding positions differ by {worst_pad}"
    );
    (worst_real, worst_pad)
}

/// The xlarge-mnli switches: relative attention c2p+p2c, no absolute positions, 30-token row
/// beyond max_position_embeddings (clamped relative positions).
#[test]
fn hidden_states_match_transformers() {
    check_hidden("tiny");
}

/// The other switches: absolute positions, token types, c2p only, embed_proj, relu,
/// explicit max_relative_positions smaller than the sequence.
#[test]
fn hidden_states_match_transformers_other_switches() {
    check_hidden("tiny_abs");
}

#[test]
fn layer_encoder_returns_the_requested_layer() {
    let device = device();
    let (model, _) = load_deberta(&fixtures().join("tiny"), &device).unwrap();
    let reference = reference();
    let ids = ids_of(&reference["batches"]["short"]["input_ids"]);
    let mask = ids_of(&reference["batches"]["short"]["attention_mask"]);
    assert_eq!(model.num_layers(), 3);
    let all = model.hidden_states(int2(&ids, &device), int2(&mask, &device), 3);
    for (layer, want) in all.into_iter().enumerate() {
        let one = model.hidden_state(int2(&ids, &device), int2(&mask, &device), layer);
        assert_eq!(values(one), values(want), "layer {layer}");
    }
}

#[test]
fn token_ids_match_bert_score() {
    let reference = reference();
    let sentences: Vec<String> = serde_json::from_value(reference["sentences"].clone()).unwrap();
    let want: Vec<Vec<u32>> = serde_json::from_value(reference["tokens"].clone()).unwrap();
    // tiny/ has tokenizer.json; tiny_bin/ only vocab.json + merges.txt.
    for folder in ["tiny", "tiny_bin"] {
        let tok = load_deberta_tokenizer(&fixtures().join(folder)).unwrap();
        for (s, w) in sentences.iter().zip(&want) {
            assert_eq!(&sent_encode(&tok, s).unwrap(), w, "{folder}: {s:?}");
        }
        // [CLS] [SEP] for empty input (what bert_score gave with transformers 4).
        assert_eq!(sent_encode(&tok, "  ").unwrap(), vec![1, 2], "{folder}");
    }
}

#[test]
fn tokenizer_truncates_to_model_max_length() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixtures().join("tiny_bin").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"model_max_length": 5}"#,
    )
    .unwrap();
    let tok = load_deberta_tokenizer(dir.path()).unwrap();
    let ids = sent_encode(&tok, "a cat sat on the mat").unwrap();
    // bert_score's `max_length=model_max_length, truncation=True`: 3 tokens + [CLS] [SEP].
    assert_eq!(ids, vec![1, 69, 282, 269, 2]);
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let tok = load_deberta_tokenizer(dir.path()).unwrap();
    assert_eq!(sent_encode(&tok, "a cat sat on the mat").unwrap().len(), 11);
}

/// `pytorch_model.bin` of a DebertaForSequenceClassification (`deberta.` keys, heads, stray
/// position embeddings) loads to the same model as `model.safetensors`.
#[test]
fn bin_and_safetensors_load_equal() {
    let device = device();
    let (a, ca) = load_deberta(&fixtures().join("tiny"), &device).unwrap();
    let (b, cb) = load_deberta(&fixtures().join("tiny_bin"), &device).unwrap();
    assert_eq!(ca, cb);
    let reference = reference();
    let ids = ids_of(&reference["batches"]["long"]["input_ids"]);
    let mask = ids_of(&reference["batches"]["long"]["attention_mask"]);
    let ha = a.hidden_states(int2(&ids, &device), int2(&mask, &device), 3);
    let hb = b.hidden_states(int2(&ids, &device), int2(&mask, &device), 3);
    for (x, y) in ha.into_iter().zip(hb) {
        assert_eq!(values(x), values(y));
    }
}

/// Greedy cosine matching as bert_score's `greedy_cos_idf` without idf (weight 1, 0 for
/// [CLS]/[SEP]); embeddings of each sentence computed alone.
#[test]
fn bertscore_matches_bert_score_end_to_end() {
    let device = device();
    let dir = fixtures().join("tiny");
    let (model, _) = load_deberta(&dir, &device).unwrap();
    let tok = load_deberta_tokenizer(&dir).unwrap();
    let reference = reference();
    let bs = &reference["bertscore"];
    let layer = bs["num_layers"].as_u64().unwrap() as usize;
    let embed = |s: &str| -> (Vec<u32>, Vec<Vec<f32>>) {
        let ids = sent_encode(&tok, s).unwrap();
        model.check_input(&ids, ids.len()).unwrap();
        let row: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let h = model.hidden_state(
            int2(std::slice::from_ref(&row), &device),
            int2(&[vec![1; row.len()]], &device),
            layer,
        );
        let width = h.dims()[2];
        let v = values(h);
        let rows = v
            .chunks(width)
            .map(|r| {
                let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                r.iter().map(|x| x / norm).collect()
            })
            .collect();
        (ids, rows)
    };
    let weighted = |ids: &[u32], best: &[f32]| -> f64 {
        let w: Vec<f64> = ids
            .iter()
            .map(|&i| if i == 1 || i == 2 { 0.0 } else { 1.0 })
            .collect();
        let total: f64 = w.iter().sum();
        best.iter().zip(&w).map(|(b, w)| *b as f64 * w).sum::<f64>() / total
    };
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for i in 0..3 {
        let (cid, c) = embed(bs["cands"][i].as_str().unwrap());
        let (rid, r) = embed(bs["refs"][i].as_str().unwrap());
        let best_c: Vec<f32> = c
            .iter()
            .map(|x| r.iter().map(|y| dot(x, y)).fold(f32::MIN, f32::max))
            .collect();
        let best_r: Vec<f32> = r
            .iter()
            .map(|y| c.iter().map(|x| dot(x, y)).fold(f32::MIN, f32::max))
            .collect();
        let p = weighted(&cid, &best_c);
        let rr = weighted(&rid, &best_r);
        let f = 2.0 * p * rr / (p + rr);
        let want = |k: &str| bs[k][i].as_f64().unwrap();
        let err = [(p, "P"), (rr, "R"), (f, "F")]
            .iter()
            .map(|(x, k)| (x - want(k)).abs())
            .fold(0.0, f64::max);
        println!("pair {i}: P {p:.6} R {rr:.6} F {f:.6}, max abs error vs bert_score {err:.2e}");
        assert!(
            (p - want("P")).abs() <= SCORE_TOL,
            "P of pair {i}: {p} vs {}",
            want("P")
        );
        assert!(
            (rr - want("R")).abs() <= SCORE_TOL,
            "R of pair {i}: {rr} vs {}",
            want("R")
        );
        assert!(
            (f - want("F")).abs() <= SCORE_TOL,
            "F of pair {i}: {f} vs {}",
            want("F")
        );
    }
}

/// A copy of `tiny/` whose config.json and weights a test may edit.
fn tiny_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny").join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

fn edit_weights(dir: &Path, edit: impl FnOnce(&mut decorr_convert::StateDict)) {
    let path = dir.join("model.safetensors");
    let mut sd = decorr_convert::tensor::read_safetensors(&path).unwrap();
    edit(&mut sd);
    decorr_convert::tensor::write_safetensors(&path, &sd).unwrap();
}

fn load_err(dir: &Path) -> String {
    load_deberta(dir, &device()).unwrap_err().to_string()
}

#[test]
fn missing_tensor_is_named() {
    let dir = tiny_copy();
    let key = "encoder.layer.1.attention.self.pos_q_proj.weight";
    edit_weights(dir.path(), |sd| {
        sd.remove(key).unwrap();
    });
    let msg = load_err(dir.path());
    assert!(msg.contains(&format!("`{key}` is missing")), "{msg}");
}

#[test]
fn unexpected_and_misshaped_tensors_are_named() {
    let dir = tiny_copy();
    edit_weights(dir.path(), |sd| {
        let t = sd["encoder.rel_embeddings.weight"].clone();
        sd.insert("encoder.extra.weight".into(), t);
    });
    let msg = load_err(dir.path());
    assert!(
        msg.contains("`encoder.extra.weight` in the file is not part"),
        "{msg}"
    );

    let dir = tiny_copy();
    edit_config(dir.path(), |v| v["intermediate_size"] = 40.into());
    let msg = load_err(dir.path());
    assert!(
        msg.contains("encoder.layer.0.intermediate.dense.weight"),
        "{msg}"
    );
    assert!(msg.contains("shape"), "{msg}");
}

#[test]
fn unsupported_config_options_are_named() {
    let cases: [(&str, Value, &str); 5] = [
        ("talking_head", Value::Bool(true), "talking_head"),
        ("model_type", "deberta-v2".into(), "deberta-v2"),
        ("hidden_act", "gelu_new".into(), "gelu_new"),
        ("pos_att_type", "c2p|p2p".into(), "p2p"),
        ("num_attention_heads", 5.into(), "num_attention_heads"),
    ];
    for (key, value, named) in cases {
        let dir = tiny_copy();
        edit_config(dir.path(), |v| v[key] = value.clone());
        let msg = load_err(dir.path());
        assert!(msg.contains(named), "{key}: {msg}");
    }
}

#[test]
fn missing_files_are_reported() {
    let dir = tiny_copy();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("pytorch_model.bin"), "{msg}");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert!(load_err(dir.path()).contains("config.json"));
    let msg = load_deberta_tokenizer(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("vocab.json"), "{msg}");
}

/// microsoft/deberta-xlarge-mnli's config.json (as on the hub, labels shortened) parses to
/// exactly the configuration built here, with the old `"c2p|p2c"` string form accepted too.
#[test]
fn xlarge_mnli_config_is_what_is_built() {
    let text = r#"{
      "model_type": "deberta",
      "attention_probs_dropout_prob": 0.1,
      "hidden_act": "gelu",
      "hidden_dropout_prob": 0.1,
      "hidden_size": 1024,
      "initializer_range": 0.02,
      "intermediate_size": 4096,
      "max_position_embeddings": 512,
      "relative_attention": true,
      "pos_att_type": "c2p|p2c",
      "layer_norm_eps": 1e-7,
      "max_relative_positions": -1,
      "position_biased_input": false,
      "num_attention_heads": 16,
      "num_hidden_layers": 48,
      "type_vocab_size": 0,
      "vocab_size": 50265,
      "pad_token_id": 0,
      "pooler_dropout": 0,
      "pooler_hidden_act": "gelu",
      "pooler_hidden_size": 1024,
      "id2label": {"0": "CONTRADICTION", "1": "NEUTRAL", "2": "ENTAILMENT"}
    }"#;
    let c: DebertaConfig = serde_json::from_str(text).unwrap();
    c.validate().unwrap();
    assert_eq!(c, DebertaConfig::xlarge_mnli());
    assert_eq!(c.max_relative_positions(), 512);
    let list: DebertaConfig =
        serde_json::from_str(&text.replace(r#""c2p|p2c""#, r#"["c2p", "p2c"]"#)).unwrap();
    assert_eq!(list, c);
    let none: DebertaConfig = serde_json::from_str(&text.replace(r#""c2p|p2c""#, "null")).unwrap();
    assert!(none.pos_att_type.is_empty());
    // The tiny fixture uses the same switches.
    let tiny: DebertaConfig = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny/config.json")).unwrap(),
    )
    .unwrap();
    let x = DebertaConfig::xlarge_mnli();
    assert_eq!(
        (
            tiny.relative_attention,
            tiny.max_relative_positions,
            &tiny.pos_att_type
        ),
        (
            x.relative_attention,
            x.max_relative_positions,
            &x.pos_att_type
        )
    );
    assert_eq!(
        (
            tiny.position_biased_input,
            tiny.type_vocab_size,
            &tiny.hidden_act,
            tiny.layer_norm_eps
        ),
        (
            x.position_biased_input,
            x.type_vocab_size,
            &x.hidden_act,
            x.layer_norm_eps
        )
    );
    // A model of that shape has no absolute positions and accepts any length.
    let small = DebertaModel::new(&tiny, &device());
    assert_eq!(small.max_len(), None);
    assert!(small.check_input(&[1, 319, 2], 1000).is_ok());
    assert!(
        small
            .check_input(&[1, 320, 2], 3)
            .unwrap_err()
            .to_string()
            .contains("320")
    );
}

/// The crate's BERTScore (`bertscore::Scorer`, batched and padded as bert_score does) on the
/// DeBERTa folder against `bert_score.score(cands, refs, model_type=tiny/, num_layers=2,
/// batch_size=2)`.
#[test]
fn scorer_matches_bert_score() {
    let reference = reference();
    let bs = &reference["bertscore"];
    let layer = bs["num_layers"].as_u64().unwrap() as usize;
    let scorer =
        load_deberta_scorer(&fixtures().join("tiny"), Some(layer), false, &device()).unwrap();
    let strings = |k: &str| -> Vec<String> { serde_json::from_value(bs[k].clone()).unwrap() };
    let opts = ScoreOptions {
        batch_size: 2,
        ..Default::default()
    };
    // Largest P/R/F difference between `scorer` and the recorded scores `expected`.
    let worst_diff = |scorer: &decorr_eval::bertscore::Scorer, expected: &serde_json::Value| {
        let scores = scorer
            .score(&strings("cands"), &strings("refs"), &opts)
            .unwrap();
        let mut worst = 0.0f64;
        for (i, s) in scores.iter().enumerate() {
            for (got, k) in [(s.precision, "P"), (s.recall, "R"), (s.f1, "F")] {
                worst = worst.max((got - expected[k][i].as_f64().unwrap()).abs());
            }
        }
        worst
    };
    let worst = worst_diff(&scorer, bs);
    println!("Scorer vs bert_score: max abs P/R/F error {worst:.2e}");
    assert!(worst <= SCORE_TOL, "P/R/F differ by {worst}");
    // The scorer tokenizes as bert_score does.
    let want: Vec<Vec<u32>> = serde_json::from_value(reference["tokens"].clone()).unwrap();
    let sentences: Vec<String> = serde_json::from_value(reference["sentences"].clone()).unwrap();
    for (s, w) in sentences.iter().zip(&want) {
        assert_eq!(&scorer.encode(s).unwrap(), w, "{s:?}");
    }

    // With the leading space bert_score added under transformers < 4.24.
    let old = &reference["bertscore_prefix_space"];
    let scorer =
        load_deberta_scorer(&fixtures().join("tiny"), Some(layer), true, &device()).unwrap();
    let worst = worst_diff(&scorer, old);
    assert!(worst <= SCORE_TOL, "prefix-space P/R/F differ by {worst}");
    assert!(
        (old["R"][0].as_f64().unwrap() - bs["R"][0].as_f64().unwrap()).abs() > 1e-3,
        "the two encodings must give different scores for this test to mean anything"
    );
}
