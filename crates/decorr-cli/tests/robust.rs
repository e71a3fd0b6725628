//! Nothing lost or mixed up when runs overlap, fail, are interrupted or resume: output-folder
//! locks (two processes racing on one folder), `finetune --overwrite` that fails, `fix` re-run
//! with other settings, corrupt or foreign images on resume, stale temp files, Ctrl-C in `fix`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{PROMPT, decorr, fixtures, quick_generate, text, tiny_sd};

use decorr_core::io::OutputLock;

fn finetune(out: &Path, weights: &Path, extra: &[&str]) -> std::process::Output {
    finetune_lr(out, weights, "1e-3", extra)
}

fn finetune_lr(out: &Path, weights: &Path, lr: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "finetune",
        "--prompt",
        PROMPT,
        "--target",
        "train",
        "--layer",
        "1",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "2",
        "--lr",
        lr,
        "--quiet",
        "--weights",
        weights.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    decorr(&args)
}

/// The `decorr` record inside a PNG.
fn record(png: &Path) -> serde_json::Value {
    let chunks = decorr_pipeline::png::read_text_chunks(png).unwrap();
    let json = &chunks.iter().find(|(k, _)| k == "decorr").unwrap().1;
    serde_json::from_str(json).unwrap()
}

#[test]
fn a_locked_output_folder_is_refused_naming_the_holder() {
    let model = tiny_sd();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen");
    let lock = OutputLock::acquire(&out).unwrap();
    let me = format!("PID {}", std::process::id());
    let o = quick_generate(model.path(), &out, &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&me) && text(&o).contains("in use"),
        "{}",
        text(&o)
    );
    let ft = dir.path().join("ft");
    let ft_lock = OutputLock::acquire(&ft).unwrap();
    let o = finetune(&ft, &fixtures().join("clip_tiny_train"), &[]);
    assert!(text(&o).contains(&me), "{}", text(&o));
    drop((lock, ft_lock));
    let o = quick_generate(model.path(), &out, &[]);
    assert!(o.status.success(), "{}", text(&o));
}

/// An OUT that is a file is refused in plain words, the file untouched, the cause said once.
#[test]
fn an_output_path_that_is_a_file_is_refused() {
    let model = tiny_sd();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("notes.txt");
    std::fs::write(&out, "mine").unwrap();
    let o = quick_generate(model.path(), &out, &[]);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(msg.contains("is a file, not a folder"), "{msg}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "mine");
}

/// Two `generate` processes with different parameters start on one folder at once: exactly one
/// succeeds, and every image there is described by the manifest's parameters.
#[test]
fn two_processes_racing_on_one_folder_do_not_mix() {
    let model = tiny_sd();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen");
    let spawn = |scale: &str| {
        Command::new(env!("CARGO_BIN_EXE_decorr"))
            .args([
                "generate",
                "--weights",
                model.path().to_str().unwrap(),
                "--prompt",
                PROMPT,
                "--steps",
                "8",
                "--scheduler",
                "ddim",
                "--num-images",
                "3",
                "--guidance-scale",
                scale,
                "--quiet",
                "--out",
                out.to_str().unwrap(),
            ])
            .env("HF_HUB_OFFLINE", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("7.5"), spawn("3"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let ok = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "{}\n---\n{}", text(&a), text(&b));
    let loser = if a.status.success() { &b } else { &a };
    assert!(
        text(loser).contains("in use by another decorr run")
            || text(loser).contains("made with other parameters"),
        "{}",
        text(loser)
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let scale = &manifest["images"][0]["guidance_scale"];
    let mut pngs = 0;
    for e in std::fs::read_dir(&out).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "png") {
            assert_eq!(&record(&p)["guidance_scale"], scale, "{}", p.display());
            pngs += 1;
        }
    }
    assert_eq!(pngs, 3);
}

#[test]
fn a_failing_overwrite_keeps_the_previous_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ft");
    let weights = fixtures().join("clip_tiny_train");
    let o = finetune(&out, &weights, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let before = std::fs::read(out.join("text_encoder/model.safetensors")).unwrap();
    let report = std::fs::read(out.join("report.json")).unwrap();
    // Fails after OUT is in play: weights that do not load, and a step that turns non-finite.
    let empty = dir.path().join("no-weights");
    std::fs::create_dir_all(&empty).unwrap();
    for (weights, lr, needle) in [
        (empty.as_path(), "1e-3", "unchanged"),
        (weights.as_path(), "1e30", "unchanged"),
    ] {
        let o = finetune_lr(&out, weights, lr, &["--overwrite"]);
        assert!(!o.status.success(), "{}", text(&o));
        assert!(text(&o).contains(needle), "{}", text(&o));
        assert!(!text(&o).contains("panicked"), "{}", text(&o));
        assert_eq!(
            std::fs::read(out.join("text_encoder/model.safetensors")).unwrap(),
            before
        );
        assert_eq!(std::fs::read(out.join("report.json")).unwrap(), report);
        let beside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "no-weights")
            .collect();
        assert_eq!(beside, vec!["ft".to_string()], "no staging folder left");
    }
}

#[test]
fn a_fresh_out_that_completes_no_epoch_is_not_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ft");
    let o = finetune_lr(&out, &fixtures().join("clip_tiny_train"), "1e30", &[]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("non-finite"), "{}", text(&o));
    // The step turns non-finite before the first epoch ends: OUT is not left behind, so the
    // re-run is not refused as "already exists".
    assert!(!out.exists(), "{}", text(&o));
    let o = finetune(&out, &fixtures().join("clip_tiny_train"), &[]);
    assert!(o.status.success(), "{}", text(&o));
}

fn fix_args<'a>(model: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "fix",
        "--weights",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--target",
        "train",
        "--seeds",
        "0..1",
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
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

/// `args` with the value after `flag` replaced.
fn set<'a>(mut args: Vec<&'a str>, flag: &str, value: &'a str) -> Vec<&'a str> {
    let i = args.iter().position(|a| *a == flag).unwrap();
    args[i + 1] = value;
    args
}

/// Every file under `root` with its bytes.
fn snapshot(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn fix_rerun_with_other_settings_is_refused_before_anything_changes() {
    let model = tiny_sd();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fix");
    let o = decorr(&fix_args(model.path(), &out, &[]));
    assert!(o.status.success(), "{}", text(&o));
    let before = snapshot(&out);
    // Change the fine-tuning (lr, target), the prompt, or the sampling: refused, naming it.
    let with_lr = set(fix_args(model.path(), &out, &[]), "--lr", "2e-3");
    let with_target = set(fix_args(model.path(), &out, &[]), "--target", "old");
    let with_prompt = set(
        fix_args(model.path(), &out, &[]),
        "--prompt",
        "rusty tracks with a new train",
    );
    let with_scale = fix_args(model.path(), &out, &["--guidance-scale", "3"]);
    for (args, field) in [
        (with_lr, "lr"),
        (with_target, "target"),
        (with_prompt, "prompt"),
        (with_scale, "guidance_scale"),
    ] {
        let o = decorr(&args);
        assert!(!o.status.success(), "{field}: {}", text(&o));
        assert!(
            text(&o).contains("other settings") && text(&o).contains(&format!("{field}:")),
            "{}",
            text(&o)
        );
        assert_eq!(snapshot(&out), before, "{field}: nothing changed");
    }
    // A foreign folder is refused too.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "x").unwrap();
    let o = decorr(&fix_args(model.path(), &foreign, &[]));
    assert!(text(&o).contains("not a decorr fix output"), "{}", text(&o));
    // More seeds with the same settings continue the folder.
    let o = decorr(&set(fix_args(model.path(), &out, &[]), "--seeds", "0..2"));
    assert!(
        o.status.success() && text(&o).contains("reusing"),
        "{}",
        text(&o)
    );
    assert!(out.join("ours/seed-000001.png").is_file());
}

#[test]
fn resume_redoes_truncated_or_foreign_images_and_removes_stale_temps() {
    let model = tiny_sd();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen");
    let o = quick_generate(model.path(), &out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let name = |s: u64| format!("seed-{s:06}.png");
    let orig: Vec<Vec<u8>> = (0..3)
        .map(|s| std::fs::read(out.join(name(s))).unwrap())
        .collect();
    // seed 0 truncated, seed 1 from another prompt, seed 2 renamed from seed 1 (wrong seed);
    // stale temp files of a killed run.
    let other = dir.path().join("other");
    let o = quick_generate(model.path(), &other, &["--negative-prompt", "blurry"]);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::write(out.join(name(0)), &orig[0][..orig[0].len() / 2]).unwrap();
    std::fs::copy(other.join(name(1)), out.join(name(1))).unwrap();
    std::fs::write(out.join(name(2)), &orig[1]).unwrap();
    // A PID above Linux's pid_max: a dead run of this host, boot and PID namespace.
    let stale = out.join(format!(
        "{}a1b2c3",
        decorr_core::io::temp_prefix_of(4_294_967)
    ));
    std::fs::write(&stale, vec![0u8; 1000]).unwrap();
    let o = quick_generate(model.path(), &out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        text(&o).matches("making it again").count(),
        3,
        "{}",
        text(&o)
    );
    for s in 0..3 {
        assert_eq!(
            std::fs::read(out.join(name(s))).unwrap(),
            orig[s as usize],
            "seed {s}"
        );
    }
    assert!(!stale.exists(), "stale temp file removed");
    // A whole run resumes without redoing anything.
    let o = quick_generate(model.path(), &out, &[]);
    assert!(!text(&o).contains("making it again"), "{}", text(&o));
}

/// Ctrl-C (SIGINT) during `fix`'s sampling stops the whole command; what was written stays
/// whole, and the same command resumes.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_fix() {
    let model = tiny_sd();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fix");
    // Many slow images: the interrupt arrives while sampling.
    let args = set(fix_args(model.path(), &out, &[]), "--seeds", "0..40");
    let args = set(args, "--steps", "60");
    let mut child = Command::new(env!("CARGO_BIN_EXE_decorr"))
        .args(&args)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !out.join("sd/seed-000000.png").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "sampling never started"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "fix ended before sampling"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: sends SIGINT to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t1.elapsed() < Duration::from_secs(60), "fix did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let o = child.wait_with_output().unwrap();
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!status.success(), "{t}");
    assert!(t.contains("interrupted"), "{t}");
    assert!(
        !out.join("ours").exists(),
        "fix went on to the next stage:\n{t}"
    );
}
