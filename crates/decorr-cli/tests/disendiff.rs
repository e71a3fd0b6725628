//! `decorr disendiff` end to end on the tiny checkpoint: a run, resuming it to more steps
//! (same result as one run), sampling it with `generate --disendiff` (the sampling prompt is
//! what the manifest records), and the refusals.

mod common;

use std::path::Path;

use common::*;

fn train(model: &Path, out: &Path, steps: &str, extra: &[&str]) -> std::process::Output {
    train_on(model, out, steps, PROMPT, "tracks,train", extra)
}

fn train_on(
    model: &Path,
    out: &Path,
    steps: &str,
    prompt: &str,
    objects: &str,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "disendiff",
        "--weights",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--objects",
        objects,
        "--seeds",
        "0..2",
        "--sample-steps",
        "2",
        "--resolution",
        "16",
        "--map-resolution",
        "8",
        "--grad-accum",
        "2",
        "--save-every",
        "1",
        "--lr",
        "3e-3",
        "--max-train-steps",
        steps,
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    decorr(&args)
}

fn delta_values(out: &Path) -> Vec<f32> {
    let mut v = Vec::new();
    for f in [
        "pytorch_custom_diffusion_weights.safetensors",
        "<new1>.safetensors",
        "<new2>.safetensors",
    ] {
        let t = decorr_core::weights::read_tensors_f32(&out.join(f)).unwrap();
        for (_, (_, x)) in t {
            v.extend(x);
        }
    }
    v
}

#[test]
fn trains_resumes_and_samples() {
    let model = tiny_sd();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let o = train(model.path(), &a, "4", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["steps_done"], 4);
    assert_eq!(
        report["sampling_prompt"],
        "rusty <new1> tracks with an old <new2> train"
    );
    assert_eq!(report["micro_losses"].as_array().unwrap().len(), 8);
    let times = report["step_seconds"].as_array().unwrap();
    assert_eq!(times.len(), 4);
    assert!(times.iter().all(|t| t.as_f64().unwrap() > 0.0), "{times:?}");
    assert!(a.join("losses.png").is_file() && a.join("losses.svg").is_file());

    // Two steps, then the same command with four: the same stream, the same delta.
    let o = train(model.path(), &b, "2", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let two = delta_values(&b);
    let o = train(model.path(), &b, "4", &[]);
    assert!(text(&o).contains("resumed at step 2"), "{}", text(&o));
    let resumed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        resumed["step_seconds"].as_array().unwrap().len(),
        4,
        "kept across the resume"
    );
    let (va, vb) = (delta_values(&a), delta_values(&b));
    let d = va
        .iter()
        .zip(&vb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(d <= 1e-6, "resumed run differs by {d}");
    assert!(two.iter().zip(&vb).any(|(x, y)| x != y), "it trained on");
    // Finished: a third call changes nothing.
    let o = train(model.path(), &b, "4", &[]);
    assert!(text(&o).contains("already finished"), "{}", text(&o));

    // Sampling: the prompt recorded is the one with the modifiers.
    let gen_out = tmp.path().join("gen");
    let o = quick_generate(
        model.path(),
        &gen_out,
        &["--disendiff", a.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let manifest = std::fs::read_to_string(gen_out.join("manifest.json")).unwrap();
    assert!(
        manifest.contains("rusty <new1> tracks with an old <new2> train"),
        "{manifest}"
    );
    assert!(manifest.contains("disendiff"), "{manifest}");
    // A prompt without the objects is refused.
    let o = decorr(&[
        "generate",
        "--weights",
        model.path().to_str().unwrap(),
        "--prompt",
        "a cat",
        "--disendiff",
        a.to_str().unwrap(),
        "--steps",
        "2",
        "--quiet",
        "--out",
        tmp.path().join("g2").to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("does not name both objects"),
        "{}",
        text(&o)
    );

    // A delta from another base model: its recorded weights differ from this model's.
    let mut r = report.clone();
    r["base"]["probe"][0] = serde_json::json!(123.0);
    std::fs::write(a.join("report.json"), serde_json::to_vec(&r).unwrap()).unwrap();
    assert_fails(
        &[
            "generate",
            "--weights",
            model.path().to_str().unwrap(),
            "--prompt",
            PROMPT,
            "--disendiff",
            a.to_str().unwrap(),
            "--steps",
            "2",
            "--quiet",
            "--out",
            tmp.path().join("g3").to_str().unwrap(),
        ],
        &["another base model", "--model"],
    );
}

#[test]
fn bad_objects_and_images_are_refused() {
    let model = tiny_sd();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o = train_on(model.path(), &out, "1", PROMPT, "tracks,boat", &[]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("`boat` is not a word of the prompt"),
        "{t}"
    );
    assert!(!out.exists(), "no folder left behind");
    // "rusty" is one token; a made-up word is several.
    let o = train_on(model.path(), &out, "1", "zxqvw tracks", "zxqvw,tracks", &[]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("BPE tokens"), "{t}");
    // Fewer than two training images.
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    image::RgbImage::from_pixel(20, 20, image::Rgb([9, 9, 9]))
        .save(imgs.join("one.png"))
        .unwrap();
    let o = decorr(&[
        "disendiff",
        "--weights",
        model.path().to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--objects",
        "tracks,train",
        "--images",
        imgs.to_str().unwrap(),
        "--resolution",
        "16",
        "--map-resolution",
        "8",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("at least 2 training images"),
        "{t}"
    );
    assert!(!t.contains("panicked"), "{t}");
}
