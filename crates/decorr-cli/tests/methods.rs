//! The compared methods through the binary, on the tiny models: `generate --guidance pag` and
//! `attend-and-excite` (and their compositions with a fine-tuned encoder), what their manifests
//! and PNGs record, resume with changed settings, the flags' errors, `fix --compare pag,aae`,
//! and the ready tiny model folder `assets/sd-tiny` that README's main job uses.
//! Numerical parity of PAG and Attend-and-Excite with diffusers is tested in decorr-pipeline.

mod common;

use std::path::{Path, PathBuf};

use common::{PROMPT, assert_fails, decorr, fixtures, text};
use decorr_pipeline::png::read_text_chunks;

/// The committed tiny model folder (relative symbolic links into tests/fixtures).
fn sd_tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/sd-tiny")
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The `decorr` record inside a PNG.
fn record(png: &Path) -> serde_json::Value {
    let chunks = read_text_chunks(png).unwrap();
    serde_json::from_str(&chunks.iter().find(|(k, _)| k == "decorr").unwrap().1).unwrap()
}

/// `decorr generate` on the tiny folder: 2 DDIM steps, seeds 0 and 1, plus `extra`.
fn generate(out: &Path, extra: &[&str]) -> std::process::Output {
    let w = sd_tiny();
    let mut args = vec![
        "generate",
        "--weights",
        w.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--steps",
        "2",
        "--scheduler",
        "ddim",
        "--num-images",
        "2",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    decorr(&args)
}

#[test]
fn pag_records_its_settings_refuses_changed_ones_and_composes_with_the_encoder() {
    let work = tempfile::tempdir().unwrap();
    let sd = work.path().join("sd");
    let o = generate(&sd, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let pag = work.path().join("pag");
    let args = [
        "--guidance",
        "pag",
        "--pag-scale",
        "2.5",
        "--pag-layers",
        "mid,up_blocks.1",
        "--attention-maps",
        "tracks,train",
    ];
    let o = generate(&pag, &args);
    assert!(o.status.success(), "{}", text(&o));
    let m = json(&pag.join("manifest.json"));
    let first = &m["images"][0];
    assert_eq!(first["method"], "pag");
    assert_eq!(first["guidance"], "pag");
    assert_eq!(first["pag"]["scale"], 2.5);
    assert_eq!(first["pag"]["adaptive_scale"], 0.0);
    assert_eq!(
        first["pag"]["layers"],
        serde_json::json!(["mid", "up_blocks.1"])
    );
    assert!(first.get("excite").is_none(), "{first}");
    let png = record(&pag.join("seed-000001.png"));
    assert_eq!(png["pag"], first["pag"]);
    assert_eq!(png["seed"], 1);
    assert!(pag.join("attention-000000.png").is_file());
    // The pre-trained run records no PAG settings, and its images differ from PAG's.
    assert!(
        json(&sd.join("manifest.json"))["images"][0]
            .get("pag")
            .is_none()
    );
    assert_ne!(
        image::open(sd.join("seed-000000.png")).unwrap().to_rgb8(),
        image::open(pag.join("seed-000000.png")).unwrap().to_rgb8()
    );

    // Resume: same settings skip everything; another scale is refused, naming the field.
    let o = generate(&pag, &args);
    assert!(
        o.status.success() && text(&o).contains("2 of 2 images already there"),
        "{}",
        text(&o)
    );
    let mut changed = args.to_vec();
    changed[3] = "3";
    let o = generate(&pag, &changed);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("other parameters") && text(&o).contains("pag"),
        "{}",
        text(&o)
    );

    // With a fine-tuned encoder: its own method name, the encoder recorded.
    let tuned = fixtures().join("pipeline/tuned_text_encoder");
    let both = work.path().join("both");
    let o = generate(
        &both,
        &["--guidance", "pag", "--encoder", tuned.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let first = &json(&both.join("manifest.json"))["images"][0];
    assert_eq!(first["method"], "ours+pag");
    assert_eq!(first["encoder_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(first["pag"]["layers"], serde_json::json!(["mid"]));
}

#[test]
fn attend_and_excite_records_its_objects_and_writes_its_losses() {
    let work = tempfile::tempdir().unwrap();
    let aae = work.path().join("aae");
    let args = [
        "--guidance",
        "attend-and-excite",
        "--excite",
        "tracks,train",
        "--excite-attn-res",
        "8",
        "--excite-thresholds",
        "0:0.05,1:0.5",
        "--excite-max-refinement-steps",
        "2",
        "--attention-maps",
        "tracks,train",
    ];
    let o = generate(&aae, &args);
    assert!(o.status.success(), "{}", text(&o));
    let first = &json(&aae.join("manifest.json"))["images"][0];
    assert_eq!(first["method"], "aae");
    assert_eq!(first["guidance"], "attend-and-excite");
    let ex = &first["excite"];
    // "rusty tracks with an old train": BOS, rusty, tracks, with, an, old, train.
    assert_eq!(ex["token_indices"], serde_json::json!([2, 6]));
    assert_eq!(ex["attn_res"], serde_json::json!([8, 8]));
    assert_eq!(ex["max_iter_to_alter"], 25);
    assert_eq!(ex["thresholds"]["1"], 0.5);
    assert_eq!(ex["max_refinement_steps"], 2);
    assert!(first.get("pag").is_none());
    assert_eq!(record(&aae.join("seed-000000.png"))["excite"], *ex);
    assert!(aae.join("attention-000001.png").is_file());
    for seed in [0u64, 1] {
        let log = json(&aae.join(format!("excite-{seed:06}.json")));
        assert_eq!(log["seed"], seed);
        assert_eq!(log["token_indices"], serde_json::json!([2, 6]));
        assert_eq!(log["tokens"], serde_json::json!(["tracks", "train"]));
        let steps = log["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 2, "one entry per denoising step: {log}");
        for (i, s) in steps.iter().enumerate() {
            assert_eq!(s["step"], i);
            let loss = s["loss"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&loss), "{s}");
            assert!(s["refinement_iters"].as_u64().unwrap() <= 2, "{s}");
        }
    }
    // `--excite-indices` naming the same tokens is the same run: everything is reused.
    let mut by_index = args.to_vec();
    by_index[2] = "--excite-indices";
    by_index[3] = "2,6";
    let o = generate(&aae, &by_index);
    assert!(
        o.status.success() && text(&o).contains("2 of 2 images already there"),
        "{}",
        text(&o)
    );
    // Other objects are another run.
    by_index[3] = "2,5";
    let o = generate(&aae, &by_index);
    assert!(
        !o.status.success() && text(&o).contains("excite"),
        "{}",
        text(&o)
    );
    // `aae` is accepted for the guidance; with the fine-tuned encoder it is its own method.
    let tuned = fixtures().join("pipeline/tuned_text_encoder");
    let both = work.path().join("both");
    let mut composed = args.to_vec();
    composed[1] = "aae";
    composed.extend(["--encoder", tuned.to_str().unwrap()]);
    let o = generate(&both, &composed);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        json(&both.join("manifest.json"))["images"][0]["method"],
        "ours+aae"
    );
}

#[test]
fn method_flags_are_refused_with_what_to_write() {
    let work = tempfile::tempdir().unwrap();
    let d = work.path().join("x");
    let w = sd_tiny();
    let base = [
        "generate",
        "--weights",
        w.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--steps",
        "1",
        "--out",
        d.to_str().unwrap(),
    ];
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    let aae = ["--guidance", "attend-and-excite", "--excite-attn-res", "8"];
    for (extra, needles) in [
        (
            [&aae[..], &["--excite", "horse,train,cow"]].concat(),
            &[
                "`horse`, `cow` are not in the prompt",
                "rusty, tracks, with, an, old, train",
            ][..],
        ),
        (
            aae.to_vec(),
            &["--excite WORD,WORD", "--excite-indices"][..],
        ),
        (
            [&aae[..], &["--excite-indices", "0,6"]].concat(),
            &["--excite-indices 0", "1..="][..],
        ),
        (
            [&aae[..], &["--excite", "train", "--excite-indices", "6"]].concat(),
            &["--excite", "cannot be used with"][..],
        ),
        (
            [
                &aae[..],
                &["--excite", "train", "--excite-thresholds", "0:0.05,10"],
            ]
            .concat(),
            &["--excite-thresholds", "POS:VALUE"][..],
        ),
        (
            vec!["--guidance", "aae", "--excite", "train"],
            &["--excite-attn-res 16", "4, 8"][..],
        ),
        (
            vec![
                "--guidance",
                "aae",
                "--excite",
                "train",
                "--excite-attn-res",
                "8y8",
            ],
            &["--excite-attn-res", "HxW"][..],
        ),
        (
            vec!["--excite", "train"],
            &["--guidance attend-and-excite"][..],
        ),
        (
            vec!["--guidance", "pag", "--pag-layers", "down_blocks.7"],
            &["down_blocks.7", "matches no self-attention", "mid_block"][..],
        ),
        (
            vec!["--guidance", "pag", "--pag-scale=-1"],
            &["--pag-scale", "negative"][..],
        ),
        (
            vec!["--guidance", "perturbed"],
            &["perturbed", "attend-and-excite"][..],
        ),
    ] {
        let args = with(&extra);
        assert_fails(&args, needles);
        assert!(!d.exists(), "{extra:?}: nothing written");
    }
}

/// An older manifest (written before PAG and Attend-and-Excite existed) still resumes.
#[test]
fn manifests_without_the_method_settings_still_resume() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("old");
    let o = generate(&out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let m = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(!m.contains("\"pag\"") && !m.contains("\"excite\""), "{m}");
    let o = generate(&out, &[]);
    assert!(
        o.status.success() && text(&o).contains("2 of 2 images already there"),
        "{}",
        text(&o)
    );
}

#[test]
fn fix_compares_pag_and_attend_and_excite_on_the_same_seeds() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("fix");
    let w = sd_tiny();
    let args = [
        "fix",
        "--weights",
        w.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--target",
        "train",
        "--seeds",
        "0..2",
        "--layer",
        "1",
        "--anyway", // the tiny random model has no real correlation
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--lr",
        "1e-3",
        "--steps",
        "2",
        "--scheduler",
        "ddim",
        "--compare",
        "pag,aae",
        "--excite-attn-res",
        "8",
        "--quiet",
        "--json",
        "--out",
        dir.to_str().unwrap(),
    ];
    let o = decorr(&args);
    assert!(o.status.success(), "{}", text(&o));
    for f in [
        "sd/seed-000001.png",
        "pag/seed-000000.png",
        "pag/seed-000001.png",
        "pag/manifest.json",
        "aae/seed-000000.png",
        "aae/seed-000001.png",
        "aae/excite-000001.json",
        "aae/manifest.json",
        "ours/seed-000001.png",
        "comparison.png",
        "report.html",
        "summary.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    assert_eq!(
        json(&dir.join("pag/manifest.json"))["images"][0]["method"],
        "pag"
    );
    let aae = &json(&dir.join("aae/manifest.json"))["images"][0];
    assert_eq!(aae["method"], "aae");
    // The pair the fix is about: the correlated token (on the tiny encoder "old") and the target.
    assert_eq!(aae["excite"]["token_indices"], serde_json::json!([5, 6]));
    let summary = json(&dir.join("summary.json"));
    let methods: Vec<&str> = summary["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["sd", "pag", "aae", "ours"]);
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    for needle in [
        "pag/seed-000000.png",
        "aae/seed-000001.png",
        "aae/excite-000001.json",
        "aae/manifest.json",
        "<b>old</b> (token 5)",
    ] {
        assert!(html.contains(needle), "{needle} missing in report.html");
    }
    // Four rows in the grid: taller than fix's two-row grid would be.
    let grid = image::open(dir.join("comparison.png")).unwrap();
    assert!(grid.height() > 4 * 128, "{}", grid.height());
    // A second run reuses everything; a changed PAG setting is refused before fine-tuning.
    let o = decorr(&args);
    assert!(
        o.status.success() && text(&o).contains("reusing"),
        "{}",
        text(&o)
    );
    let mut changed = args.to_vec();
    changed.extend(["--pag-scale", "1"]);
    let o = decorr(&changed);
    assert!(
        !o.status.success() && text(&o).contains("--compare pag") && text(&o).contains("pag"),
        "{}",
        text(&o)
    );
}

/// README's main job runs on the committed folder of tiny models, no copy step.
#[test]
fn the_ready_tiny_model_folder_loads_through_the_cli() {
    let w = sd_tiny();
    for part in ["text_encoder", "unet", "vae", "scheduler", "tokenizer"] {
        assert!(w.join(part).is_dir(), "assets/sd-tiny/{part} missing");
    }
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("gen");
    let o = generate(&out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    // The same images as the test helper's copied folder (whose tokenizer is the embedded one).
    let copy = common::tiny_sd();
    let out2 = work.path().join("gen2");
    let o = common::quick_generate(copy.path(), &out2, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        image::open(out.join("seed-000000.png")).unwrap().to_rgb8(),
        image::open(out2.join("seed-000000.png")).unwrap().to_rgb8()
    );
    // And `analyze` (tokenizer + encoder) reads it.
    let o = decorr(&[
        "analyze",
        "--weights",
        w.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--target",
        "train",
        "--layer",
        "1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
}
