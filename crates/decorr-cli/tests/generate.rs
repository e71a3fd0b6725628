//! `decorr generate` and `decorr fix` end to end on the tiny fixtures: files, PNG parameters,
//! manifest, resume, and the errors for bad sizes and encoders. Pixel parity with diffusers is
//! tested in decorr-pipeline; here the CLI must reproduce the pipeline's reference image too.

mod common;

use common::{PROMPT, assert_fails, decorr, fixtures, quick_generate, text, tiny_sd};
use decorr_pipeline::png::read_text_chunks;

#[test]
fn generate_writes_images_with_parameters_and_resumes() {
    let model = tiny_sd();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("run");
    let w = model.path().to_str().unwrap();
    let d = dir.to_str().unwrap();
    let args = [
        "generate",
        "--weights",
        w,
        "--prompt",
        PROMPT,
        "--steps",
        "4",
        "--scheduler",
        "ddim",
        "--seed",
        "0",
        "--num-images",
        "3",
        "--batch-size",
        "2",
        "--attention-maps",
        "tracks,train",
        "--quiet",
        "--out",
        d,
    ];
    let o = decorr(&args);
    assert!(o.status.success(), "{}", text(&o));
    for f in [
        "seed-000000.png",
        "seed-000001.png",
        "seed-000002.png",
        "attention-000001.png",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let chunks = read_text_chunks(&dir.join("seed-000001.png")).unwrap();
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.starts_with(PROMPT)
            && params.contains("Seed: 1")
            && params.contains("Sampler: ddim"),
        "{params}"
    );
    let ours: serde_json::Value =
        serde_json::from_str(&chunks.iter().find(|(k, _)| k == "decorr").unwrap().1).unwrap();
    assert_eq!(ours["seed"], 1);
    assert_eq!(ours["method"], "sd");

    // Seed 0 of this run is the pipeline fixture's `ddim_cfg` case: same pixels as diffusers.
    let img = image::open(dir.join("seed-000000.png")).unwrap().to_rgb8();
    let refs =
        decorr_core::weights::read_tensors_f32(&fixtures().join("pipeline/reference.safetensors"))
            .unwrap();
    let (_, theirs) = &refs["ddim_cfg.image"];
    let worst = img
        .as_raw()
        .iter()
        .zip(theirs)
        .map(|(&a, &b)| (a as f32 - (b * 255.0).round()).abs())
        .fold(0.0, f32::max);
    assert!(
        worst <= 2.0,
        "CLI image differs from diffusers by {worst}/255"
    );

    // Resume: delete one image and the manifest, run again: only that image is made, the
    // manifest lists all three, the others are untouched.
    let before = std::fs::metadata(dir.join("seed-000000.png"))
        .unwrap()
        .modified()
        .unwrap();
    std::fs::remove_file(dir.join("seed-000002.png")).unwrap();
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let o = decorr(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("2 of 3 images already there"),
        "{}",
        text(&o)
    );
    let after = std::fs::metadata(dir.join("seed-000000.png"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "existing image rewritten");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let seeds: Vec<u64> = manifest["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(seeds, vec![0, 1, 2]);

    // Other parameters into the same folder are refused, naming what differs.
    assert_fails(
        &[
            "generate",
            "--weights",
            w,
            "--prompt",
            PROMPT,
            "--steps",
            "5",
            "--scheduler",
            "ddim",
            "--quiet",
            "--out",
            d,
        ],
        &["other parameters", "steps"],
    );
}

#[test]
fn generate_errors_name_the_problem() {
    let model = tiny_sd();
    let out = tempfile::tempdir().unwrap();
    let w = model.path().to_str().unwrap();
    let d = out.path().join("x");
    let d = d.to_str().unwrap();
    assert_fails(
        &[
            "generate",
            "--weights",
            w,
            "--prompt",
            "a",
            "--width",
            "20",
            "--out",
            d,
        ],
        &["--width 20", "multiple of 8"],
    );
    assert_fails(
        &[
            "generate",
            "--weights",
            w,
            "--prompt",
            "a",
            "--encoder",
            "/nonexistent/enc",
            "--out",
            d,
        ],
        &["/nonexistent/enc", "decorr finetune"],
    );
    let wide = fixtures().join("clip_tiny_b/text_encoder");
    assert_fails(
        &[
            "generate",
            "--weights",
            w,
            "--prompt",
            "a",
            "--encoder",
            wide.to_str().unwrap(),
            "--out",
            d,
        ],
        &["48-wide", "expects 16"],
    );
    assert_fails(
        &[
            "generate",
            "--weights",
            w,
            "--prompt",
            "a",
            "--scheduler",
            "heun",
            "--out",
            d,
        ],
        &["heun", "lms"],
    );
    assert_fails(
        &[
            "generate",
            "--weights",
            w,
            "--prompt",
            PROMPT,
            "--attention-maps",
            "horse",
            "--steps",
            "1",
            "--out",
            d,
        ],
        &["horse"],
    );
    assert!(!out.path().join("x").join("seed-000000.png").exists());
}

#[test]
fn fix_runs_end_to_end_and_writes_every_promised_file() {
    let model = tiny_sd();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("fix");
    let args = [
        "fix",
        "--weights",
        model.path().to_str().unwrap(),
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
        "2",
        "--steps-per-epoch",
        "2",
        "--lr",
        "1e-3",
        "--steps",
        "3",
        "--scheduler",
        "ddim",
        "--quiet",
        "--json",
        "--out",
        dir.to_str().unwrap(),
    ];
    let o = decorr(&args);
    assert!(o.status.success(), "{}", text(&o));
    for f in [
        "finetune/text_encoder/model.safetensors",
        "finetune/report.json",
        "finetune/losses.png",
        "finetune/losses.svg",
        "sd/seed-000000.png",
        "sd/seed-000001.png",
        "sd/manifest.json",
        "ours/seed-000000.png",
        "ours/seed-000001.png",
        "ours/manifest.json",
        "comparison.png",
        "report.html",
        "summary.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    let json_start = stdout.rfind("\n{").map_or(0, |i| i + 1);
    let summary: serde_json::Value = serde_json::from_str(&stdout[json_start..]).unwrap();
    assert_eq!(summary["target"], "train");
    assert_eq!(summary["corr"], "old");
    let fixed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ours/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(fixed["images"][0]["method"], "ours");
    assert!(fixed["images"][0]["encoder_sha256"].as_str().unwrap().len() == 64);
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(
        html.contains("comparison.png")
            && html.contains("finetune/losses.png")
            && html.contains("<b>old</b>")
    );
    // The loss curves are shown as SVG, the PNG linked.
    assert!(
        html.contains("<img src=\"finetune/losses.svg\"")
            && html.contains("<a href=\"finetune/losses.png\">"),
        "{html}"
    );
    // Figure 3's maps are shown inline, and the attention table marks the two columns.
    assert!(
        html.contains("<img src=\"ours/attention-000001.png\""),
        "{html}"
    );
    assert!(
        html.contains("<th class=\"t\">train<br><small>target</small></th>")
            && html.contains("<th class=\"c\">old<br><small>correlated</small></th>"),
        "{html}"
    );
    // Same seeds, different guidance: the images differ.
    assert_ne!(
        std::fs::read(dir.join("sd/seed-000000.png")).unwrap(),
        std::fs::read(dir.join("ours/seed-000000.png")).unwrap()
    );
    // A deleted attention map (the page links it) is made again with its image.
    std::fs::remove_file(dir.join("ours/attention-000001.png")).unwrap();
    let o = decorr(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("attention-000001.png beside it is missing; making it again"),
        "{}",
        text(&o)
    );
    assert!(dir.join("ours/attention-000001.png").is_file());
    // A second run reuses the fine-tuning and every image.
    let o = decorr(&args);
    assert!(
        o.status.success() && text(&o).contains("reusing"),
        "{}",
        text(&o)
    );
    // A fix folder an older decorr wrote (`pretrained/`, `fixed/`, manifests saying
    // `decorrelated`) is continued under its own names: nothing is made again.
    std::fs::rename(dir.join("sd"), dir.join("pretrained")).unwrap();
    std::fs::rename(dir.join("ours"), dir.join("fixed")).unwrap();
    let manifest = dir.join("fixed/manifest.json");
    let old = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("\"method\": \"ours\"", "\"method\": \"decorrelated\"");
    std::fs::write(&manifest, old).unwrap();
    let image = std::fs::read(dir.join("fixed/seed-000000.png")).unwrap();
    let o = decorr(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!dir.join("sd").exists() && !dir.join("ours").exists());
    assert_eq!(
        std::fs::read(dir.join("fixed/seed-000000.png")).unwrap(),
        image
    );
    assert!(
        std::fs::read_to_string(dir.join("report.html"))
            .unwrap()
            .contains("fixed/attention-000001.png")
    );
}

/// A mistake that can be checked on the loaded model (a target not in the prompt, a layer the
/// model lacks) stops fix before it writes anything, so the corrected run is not refused.
#[test]
fn fix_mistakes_leave_nothing_behind() {
    let model = tiny_sd();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("fix");
    let w = model.path().to_str().unwrap();
    let d = dir.to_str().unwrap();
    let base = [
        "fix",
        "--weights",
        w,
        "--prompt",
        PROMPT,
        "--quiet",
        "--out",
        d,
    ];
    for (extra, needles) in [
        (
            &["--target", "boat", "--layer", "1"][..],
            &["--target boat", "boat"][..],
        ),
        (
            &["--target", "train", "--layer", "11"][..],
            &["--layer 11", "layer"][..],
        ),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        assert_fails(&args, needles);
        assert!(
            !dir.exists(),
            "{extra:?} left {:?}",
            std::fs::read_dir(&dir).ok().map(|d| d.count())
        );
    }
}

#[test]
fn fix_without_weights_stops_at_once_with_the_how_to() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("fix");
    assert_fails(
        &[
            "fix",
            "--prompt",
            PROMPT,
            "--target",
            "train",
            "--out",
            dir.to_str().unwrap(),
        ],
        &["HF_HUB_OFFLINE", "--weights"],
    );
    assert!(!dir.exists(), "nothing written");
}

#[test]
fn single_file_weights_are_converted_or_refused_clearly() {
    let out = tempfile::tempdir().unwrap();
    let d = out.path().join("x");
    let bad = fixtures().join("convert/malicious.ckpt");
    assert_fails(
        &[
            "generate",
            "--weights",
            bad.to_str().unwrap(),
            "--prompt",
            "a",
            "--out",
            d.to_str().unwrap(),
        ],
        &["single-file", "system"],
    );
    // The tiny file is not SD 1.5-shaped: `auto` says so; with its configs it converts and loads
    // (its 200-token vocabulary then cannot encode CLIP ids, which is the next error).
    let tiny = fixtures().join("convert/tiny.safetensors");
    let cfg = fixtures().join("convert/diffusers");
    assert_fails(
        &[
            "analyze",
            "--weights",
            tiny.to_str().unwrap(),
            "--prompt",
            "a",
        ],
        &["single-file", "detect"],
    );
    assert_fails(
        &[
            "analyze",
            "--weights",
            tiny.to_str().unwrap(),
            "--checkpoint-config",
            cfg.to_str().unwrap(),
            "--prompt",
            "a",
            "--layer",
            "1",
        ],
        &["outside the text encoder's vocabulary"],
    );
    assert!(!d.exists());
}

/// `--weights FILE` converts the single file in memory: no temp dir is needed (TMPDIR names a
/// folder that does not exist, where a temporary folder could not be made), and the images are
/// the diffusers folder's, pixel for pixel.
#[test]
fn single_file_weights_load_in_memory_like_the_folder() {
    let model = tiny_sd();
    let work = tempfile::tempdir().unwrap();
    let single = work.path().join("tiny-sd.safetensors");
    decorr_convert::convert_diffusers_to_single_file(model.path(), &single, &Default::default())
        .unwrap();
    let tmp = work.path().join("no-such-tmp");
    let run = |out: &std::path::Path, weights: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_decorr"))
            .arg("generate")
            .args(weights)
            .args(["--prompt", PROMPT, "--steps", "2", "--scheduler", "ddim"])
            .args(["--quiet", "--out", out.to_str().unwrap()])
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", work.path().join("hf-home"))
            .env("TMPDIR", &tmp)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        image::open(out.join("seed-000000.png")).unwrap().to_rgb8()
    };
    let from_folder = run(
        &work.path().join("folder"),
        &["--weights", model.path().to_str().unwrap()],
    );
    let from_file = run(
        &work.path().join("file"),
        &[
            "--weights",
            single.to_str().unwrap(),
            "--checkpoint-config",
            model.path().to_str().unwrap(),
        ],
    );
    assert!(from_folder == from_file, "the images differ");
    assert!(!tmp.exists(), "something was written to TMPDIR");
    let chunks = read_text_chunks(&work.path().join("file/seed-000000.png")).unwrap();
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.contains("tiny-sd.safetensors (converted)"),
        "{params}"
    );
}

/// Two prompts x 3 seeds split over 2 shards: each shard writes only its share and its own
/// manifest, `--merge` refuses while a shard is missing and then joins them; the union equals an
/// unsharded run image for image.
#[test]
fn sharded_generation_merges_to_the_unsharded_result() {
    let model = tiny_sd();
    let out = tempfile::tempdir().unwrap();
    let w = model.path().to_str().unwrap();
    let run = |dir: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["--prompt", "a red cube"];
        args.extend_from_slice(extra);
        quick_generate(model.path(), dir, &args)
    };
    let sharded = out.path().join("sharded");
    let o = run(&sharded, &["--shard", "1/2"]);
    assert!(o.status.success(), "{}", text(&o));
    let folders: Vec<_> = {
        let mut v: Vec<_> = std::fs::read_dir(&sharded)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir()) // not the shard's lock file
            .collect();
        v.sort();
        v
    };
    assert_eq!(folders.len(), 2, "one folder per prompt: {folders:?}");
    assert!(
        folders[0].ends_with("000-rusty-tracks-with-an-old-train"),
        "{folders:?}"
    );
    // Work items are (prompt, seed) in order: shard 1 of 2 owns items 1, 3, 5.
    assert!(folders[0].join("seed-000001.png").is_file());
    assert!(!folders[0].join("seed-000000.png").exists());
    assert!(folders[1].join("seed-000000.png").is_file());
    assert!(folders[1].join("manifest.shard-1-of-2.json").is_file());
    assert!(!folders[1].join("manifest.json").exists());

    let merge = run(&sharded, &["--merge"]);
    assert!(!merge.status.success());
    let msg = text(&merge);
    assert!(
        msg.contains("3 of 6 images are missing") && msg.contains("shard j % 2"),
        "{msg}"
    );
    assert!(
        !folders[0].join("manifest.json").exists(),
        "nothing written on failure"
    );

    let o = run(&sharded, &["--shard", "0/2"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&sharded, &["--merge"]);
    assert!(o.status.success(), "{}", text(&o));

    let whole = out.path().join("whole");
    let o = run(&whole, &[]);
    assert!(o.status.success(), "{}", text(&o));
    for dir in &folders {
        let name = dir.file_name().unwrap();
        let merged: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap())
                .unwrap();
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(whole.join(name).join("manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(merged, reference);
        for seed in 0..3 {
            let f = format!("seed-{seed:06}.png");
            let a = image::open(dir.join(&f)).unwrap().to_rgb8();
            let b = image::open(whole.join(name).join(&f)).unwrap().to_rgb8();
            assert_eq!(a, b, "{f}");
        }
    }
    assert_fails(
        &[
            "generate",
            "--weights",
            w,
            "--prompt",
            PROMPT,
            "--shard",
            "2/2",
            "--out",
            "x",
        ],
        &["0-based"],
    );
}

/// Numeric flags of `generate` and `fix` are refused up front, naming the flag and the range;
/// seeds do not wrap around; a seed listed twice is refused; nothing is written by any of it.
#[test]
fn bad_numbers_and_seeds_are_refused_before_anything_is_written() {
    let model = tiny_sd();
    let work = tempfile::tempdir().unwrap();
    let w = model.path().to_str().unwrap();
    let d = work.path().join("x");
    let ds = d.to_str().unwrap();
    let gen_base = ["generate", "--weights", w, "--prompt", PROMPT, "--out", ds];
    let generate = |extra: &[&'static str]| [&gen_base[..], extra].concat();
    for (extra, needles) in [
        (
            &["--seed", "18446744073709551615", "--num-images", "2"][..],
            &["--seed", "--num-images", "18446744073709551614"][..],
        ),
        (&["--num-images", "0"], &["--num-images", "1..="]),
        (&["--steps", "0"], &["--steps", "1..=1000"]),
        (&["--steps", "100000"], &["--steps", "1..=1000"]),
        (&["--eta", "1.5"], &["--eta", "[0, 1]"]),
        (&["--eta", "NaN"], &["--eta", "finite"]),
        (
            &["--guidance-scale", "1e39"],
            &["--guidance-scale", "[0, 1000]"],
        ),
        (
            &["--guidance-scale", "nan"],
            &["--guidance-scale", "finite"],
        ),
        (&["--width", "100000"], &["--width", "8..=8192"]),
        (&["--height", "0"], &["--height", "8..=8192"]),
        (&["--batch-size", "0"], &["--batch-size"]),
        (&["--attention-slice", "0"], &["--attention-slice"]),
        (&["--attention-steps", "0"], &["--attention-steps"]),
    ] {
        assert_fails(&generate(extra), needles);
        assert!(!d.exists(), "{extra:?}: nothing written");
    }
    let fix_base = [
        "fix",
        "--weights",
        w,
        "--prompt",
        PROMPT,
        "--target",
        "train",
        "--layer",
        "1",
        "--out",
        ds,
    ];
    let fix = |extra: &[&'static str]| [&fix_base[..], extra].concat();
    for (extra, needles) in [
        (
            &["--seeds", "1,1,1"][..],
            &["--seeds 1,1,1", "seed 1 is listed more than once"][..],
        ),
        (
            &["--seeds", "0..18446744073709551615"],
            &["--seeds", "split the range"],
        ),
        (&["--lr=-1"], &["--lr", "> 0"]),
        (&["--tau=NaN"], &["--tau", "finite"]),
        (&["--epochs", "0"], &["--epochs"]),
        (&["--eta", "2"], &["--eta", "[0, 1]"]),
    ] {
        assert_fails(&fix(extra), needles);
        assert!(!d.exists(), "{extra:?}: nothing written");
    }
    // The last seed there is, alone, is fine.
    let o = decorr(&generate(&[
        "--seed",
        "18446744073709551615",
        "--steps",
        "1",
        "--scheduler",
        "ddim",
        "--quiet",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(d.join("seed-18446744073709551615.png").is_file());
}

/// `--attention-maps` may name any word of the prompt, the first one too: the figure only shows
/// cross-attention, so the fine-tuning's "nothing precedes it" does not apply.
#[test]
fn attention_maps_accept_the_first_word() {
    let model = tiny_sd();
    let work = tempfile::tempdir().unwrap();
    let d = work.path().join("maps");
    let o = decorr(&[
        "generate",
        "--weights",
        model.path().to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--steps",
        "2",
        "--scheduler",
        "ddim",
        "--attention-maps",
        "rusty,train",
        "--quiet",
        "--out",
        d.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(!t.contains("nothing it can be correlated with"), "{t}");
    assert!(d.join("attention-000000.png").is_file());
}

/// `--dtype` is recorded and a resume in another precision is refused; `--timings` writes one
/// time per denoising step; `finetune` refuses half precision before touching anything.
/// generate writes only into a new or empty folder or one of its own runs: never into `.`,
/// a folder of the user's or another command's output, and nothing there is touched.
#[test]
fn generate_refuses_folders_it_did_not_make() {
    let model = tiny_sd();
    let tmp = tempfile::tempdir().unwrap();
    let mine = tmp.path().join("mine");
    std::fs::create_dir_all(mine.join("data/sub")).unwrap();
    std::fs::write(mine.join("notes.txt"), "mine").unwrap();
    // Named like decorr's temps and burn's, with PIDs that are not running.
    std::fs::write(mine.join("data/.decorr-tmp-4000000-mine"), "mine").unwrap();
    std::fs::write(mine.join("data/sub/backup.4000000-1.tmp"), "mine").unwrap();
    let fix_like = tmp.path().join("fixed");
    std::fs::create_dir_all(&fix_like).unwrap();
    std::fs::write(fix_like.join("fix.json"), "{}").unwrap();
    for (out, foreign) in [(&mine, "data"), (&fix_like, "fix.json")] {
        let o = quick_generate(model.path(), out, &[]);
        let t = text(&o);
        assert!(!o.status.success(), "{t}");
        assert!(
            t.contains(foreign) && t.contains("not a generate output"),
            "{t}"
        );
    }
    assert!(mine.join("data/.decorr-tmp-4000000-mine").exists());
    assert!(mine.join("data/sub/backup.4000000-1.tmp").exists());
    let names: Vec<_> = std::fs::read_dir(&mine)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "nothing added: {names:?}");
    // An interrupted run's images without a manifest are its own: it continues.
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("seed-000009.png"), "partial run").unwrap();
    let o = quick_generate(model.path(), &run, &[]);
    assert!(o.status.success(), "{}", text(&o));
}

/// An output file that is a link is written through it (the link stays); a FIFO or device
/// gets the bytes as a stream and is not replaced.
#[cfg(unix)]
#[test]
fn output_files_follow_links_and_stream_to_devices() {
    let model = tiny_sd();
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("t.json");
    let link = tmp.path().join("link.json");
    std::fs::write(&target, "old").unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let o = quick_generate(
        model.path(),
        &tmp.path().join("a"),
        &["--timings", link.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert!(std::fs::read_to_string(&target).unwrap().contains("step_s"));
    let o = quick_generate(
        model.path(),
        &tmp.path().join("b"),
        &["--timings", "/dev/null"],
    );
    assert!(o.status.success(), "{}", text(&o));
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );
}

#[test]
fn precision_is_recorded_and_timings_are_written() {
    let model = tiny_sd();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("half");
    let timings = tmp.path().join("t.json");
    let o = quick_generate(
        model.path(),
        &out,
        &["--dtype", "f16", "--timings", timings.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["images"][0]["dtype"], "f16");
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&timings).unwrap()).unwrap();
    assert_eq!(t["dtype"], "f16");
    // The backend the tests run on (`DECORR_BACKEND`, as `--backend` reads it).
    let backend = std::env::var("DECORR_BACKEND").unwrap_or_else(|_| "flex".into());
    assert_eq!(t["backend"], backend.as_str());
    let steps = t["step_s"].as_array().unwrap();
    // 3 images of 2 DDIM steps, one batch each.
    assert_eq!(
        (t["steps"].as_u64(), t["batches"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(steps.len(), 6);
    assert!(steps.iter().all(|s| s.as_f64().unwrap() > 0.0));
    assert!(t["total_s"].as_f64().unwrap() >= t["decode_s"].as_f64().unwrap());

    // The same folder in f32 is another run.
    let o = quick_generate(model.path(), &out, &["--dtype", "f32"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("dtype"), "{}", text(&o));
    assert_fails(
        &[
            "generate", "--prompt", "a", "--dtype", "f8", "--out", "/tmp/x",
        ],
        &["f8", "f32, f16, bf16"],
    );

    let ft = tmp.path().join("ft");
    let w = model.path().to_str().unwrap();
    assert_fails(
        &[
            "finetune",
            "--weights",
            w,
            "--prompt",
            PROMPT,
            "--target",
            "train",
            "--dtype",
            "f16",
            "--out",
            ft.to_str().unwrap(),
        ],
        &["--dtype f16", "fine-tuning runs in f32"],
    );
    assert!(!ft.exists());
}
