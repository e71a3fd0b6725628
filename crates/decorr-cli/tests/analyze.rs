//! End-to-end tests of `decorr analyze` on the tiny transformers-written fixtures: outputs,
//! the exported attention map against transformers' own (head-averaged), and every error path.

use std::path::Path;

mod common;
use common::{PROMPT, assert_fails, decorr, fixtures, text};

#[test]
fn analyze_writes_table_json_and_heatmap() {
    let dir = tempfile::tempdir().unwrap();
    let (json, png) = (dir.path().join("a.json"), dir.path().join("a.png"));
    let weights = fixtures().join("clip_tiny_a");
    let out = decorr(&[
        "analyze",
        "--prompt",
        PROMPT,
        "--target",
        "train",
        "--layer",
        "2",
        "--weights",
        weights.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--heatmap",
        png.to_str().unwrap(),
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("row of \"train\" (index 6)"), "{t}");
    assert!(t.contains("<- corr"), "{t}");

    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["prompt"], PROMPT);
    assert_eq!(v["layer"], 2);
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 8, "BOS + 6 words + EOS");
    assert_eq!(tokens[6]["text"], "train");
    assert_eq!(tokens[6]["word"], "train");
    assert_eq!(tokens[6]["id"], 3231);
    assert_eq!(v["target"]["index"], 6);
    let a: Vec<Vec<f32>> = serde_json::from_value(v["attention"].clone()).unwrap();
    assert_eq!(a.len(), 8);
    // The exported map equals transformers' layer-2 attention of prompt 0, averaged over heads.
    let reference = read_attention(&weights.join("text_encoder/reference.safetensors"), 2);
    for i in 0..8 {
        for j in 0..8 {
            assert!((a[i][j] - reference[i][j]).abs() <= 1e-5, "A[{i},{j}]");
        }
        let row_sum: f32 = a[i].iter().sum();
        assert!((row_sum - 1.0).abs() < 1e-4);
    }
    // corr is the argmax over 1..t of the target row.
    let corr = v["target"]["corr"].as_u64().unwrap() as usize;
    assert!((1..6).all(|s| a[6][corr] >= a[6][s]));

    let img = image::open(&png).unwrap();
    assert!(img.width() > 8 * 28 && img.height() > 8 * 28);
}

/// Head-averaged attention of layer `layer`, prompt 0, real tokens 0..8, from the fixture.
fn read_attention(path: &Path, layer: usize) -> Vec<Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(&format!("attentions.{layer}")).unwrap();
    let [_, h, n, _] = t.shape().try_into().unwrap();
    let f: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (0..8)
        .map(|i| {
            (0..8)
                .map(|j| (0..h).map(|k| f[(k * n + i) * n + j]).sum::<f32>() / h as f32)
                .collect()
        })
        .collect()
}

#[test]
fn analyze_without_target_prints_every_row_and_suspects() {
    let weights = fixtures().join("clip_tiny_a");
    let out = decorr(&[
        "analyze",
        "--prompt",
        "a cat and a dog",
        "--layer",
        "1",
        "--weights",
        weights.to_str().unwrap(),
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for tok in ["\"cat\"", "\"and\"", "\"dog\""] {
        assert!(t.contains(&format!("row of {tok}")), "{tok}: {t}");
    }
    assert!(
        t.contains("suspected unidirectional correlations") || t.contains("no suspected"),
        "{t}"
    );
}

#[test]
fn bad_input_gives_clear_errors() {
    let w = fixtures().join("clip_tiny_a");
    let w = w.to_str().unwrap();
    assert_fails(
        &[
            "analyze",
            "--prompt",
            PROMPT,
            "--target",
            "plane",
            "--weights",
            w,
        ],
        &["plane", "rusty, tracks, with, an, old, train"],
    );
    assert_fails(
        &[
            "analyze",
            "--prompt",
            PROMPT,
            "--target",
            "rusty",
            "--weights",
            w,
        ],
        &["first token", "nothing"],
    );
    assert_fails(
        &[
            "analyze",
            "--prompt",
            PROMPT,
            "--layer",
            "11",
            "--weights",
            w,
        ],
        &["layer 11", "0..=2"],
    );
    assert_fails(
        &[
            "analyze",
            "--prompt",
            PROMPT,
            "--weights",
            "/nonexistent/sd15",
        ],
        &["/nonexistent/sd15", "does not exist", "--weights"],
    );
    assert_fails(
        &["analyze", "--prompt", PROMPT, "--backend", "tpu"],
        &["tpu", "flex"],
    );
    // clip_tiny_b has a 1000-token vocabulary and no tokenizer/: CLIP's ids do not fit it.
    let b = fixtures().join("clip_tiny_b");
    assert_fails(
        &[
            "analyze",
            "--prompt",
            PROMPT,
            "--layer",
            "1",
            "--weights",
            b.to_str().unwrap(),
        ],
        &["49406", "vocabulary of 1000", "tokenizer"],
    );
}

#[test]
fn hub_default_without_network_or_cache_says_how_to_get_weights() {
    assert_fails(
        &["analyze", "--prompt", PROMPT, "--target", "train"],
        &[
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "HF_HUB_OFFLINE",
            "--weights",
        ],
    );
}

#[test]
fn json_to_unwritable_place_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "x").unwrap();
    let bad = dir.path().join("file/out.json");
    let w = fixtures().join("clip_tiny_a");
    assert_fails(
        &[
            "analyze",
            "--prompt",
            PROMPT,
            "--layer",
            "2",
            "--weights",
            w.to_str().unwrap(),
            "--json",
            bad.to_str().unwrap(),
        ],
        &["file/out.json"],
    );
}

/// Errors name the flag the user has: `--occurrence` in analyze, `--checkpoint-config` (not
/// xtask's `--config`) for a single-file checkpoint, and a failed write says "cannot write".
#[test]
fn errors_name_the_flag_this_command_has() {
    let w = fixtures().join("clip_tiny_a");
    let w = w.to_str().unwrap();
    assert_fails(
        &[
            "analyze",
            "--prompt",
            "a cat and a cat",
            "--target",
            "cat",
            "--occurrence",
            "3",
            "--weights",
            w,
        ],
        &["--occurrence 3", "2 time(s)", "1..=2"],
    );
    let tiny = fixtures().join("convert/tiny.safetensors");
    for choice in ["auto", "sd2"] {
        let o = decorr(&[
            "analyze",
            "--weights",
            tiny.to_str().unwrap(),
            "--checkpoint-config",
            choice,
            "--prompt",
            "a",
        ]);
        let t = text(&o);
        assert!(!o.status.success(), "{t}");
        assert!(t.contains("--checkpoint-config"), "{choice}: {t}");
        assert!(
            !t.contains(" --config"),
            "{choice}: names xtask's flag: {t}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "x").unwrap();
    let bad = dir.path().join("file/out.json");
    let o = decorr(&[
        "analyze",
        "--prompt",
        PROMPT,
        "--layer",
        "2",
        "--weights",
        w,
        "--json",
        bad.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("cannot write") && !t.contains("cannot read"),
        "{t}"
    );
}
