//! What the user hands decorr, end to end: a hub checkpoint that is not there gets the exact
//! download the command needs; a FIFO or device where a file should be is refused by name (no
//! hang, no endless read); a checkpoint's tokenizer/ is used whole or not at all.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `decorr ARGS` offline (as [`decorr`]), killed after `limit`: a hang fails the test instead
/// of stalling it. Returns (success, stdout + stderr).
fn decorr_within(args: &[&str], limit: Duration) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_decorr"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env(
            "HF_HOME",
            std::env::temp_dir().join("decorr-test-empty-hf-home"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run decorr");
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("decorr {args:?} still ran after {limit:?}:\n{}", text(&o));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    (o.status.success(), text(&o))
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

/// With an empty hub cache and no network, each command says which folders it needs, the exact
/// download, and what to pass to --weights: once, without a chain repeating itself or
/// template braces.
#[test]
fn no_weights_advice_names_what_each_command_needs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let out = out.to_str().unwrap();
    let model = "stable-diffusion-v1-5/stable-diffusion-v1-5";
    for (args, includes, lacks) in [
        (
            vec!["analyze", "--prompt", PROMPT],
            r#"--include "text_encoder/*" "tokenizer/*" --local-dir DIR"#,
            "unet",
        ),
        (
            vec!["fix", "--prompt", PROMPT, "--target", "train", "--out", out],
            r#"--include "text_encoder/*" "tokenizer/*" "unet/*" "vae/*" "scheduler/*" --local-dir DIR"#,
            "",
        ),
    ] {
        let o = decorr(&args);
        let t = text(&o);
        assert!(!o.status.success(), "{t}");
        let command = args[0];
        for needle in [
            format!("`decorr {command}` needs"),
            format!("huggingface-cli download {model} {includes}"),
            "then pass --weights DIR".to_string(),
            "HF_HUB_OFFLINE is set".to_string(),
            "has no text_encoder/".to_string(),
        ] {
            assert!(t.contains(&needle), "missing {needle:?} in:\n{t}");
        }
        if !lacks.is_empty() {
            assert!(!t.contains(lacks), "{t}");
        }
        assert!(!t.contains('{') && !t.contains('}'), "{t}");
        assert!(!t.contains("hub download"), "{t}");
        assert_eq!(t.matches("error:").count(), 1, "{t}");
        assert_eq!(t.matches("huggingface-cli").count(), 1, "{t}");
        assert!(!t.contains("panicked"), "{t}");
    }
    assert!(!Path::new(out).exists(), "a failed fix leaves no OUT");
}

/// A checkpoint file that is a FIFO or a link to /dev/zero is named as what it is, never
/// "no unet file found", and nothing blocks or reads without end.
#[cfg(unix)]
#[test]
fn special_checkpoint_files_are_named_not_missing() {
    let limit = Duration::from_secs(120);
    for (file, kind) in [
        (
            "unet/config.json",
            "is a character device, not a regular file",
        ),
        (
            "unet/config.json",
            "is a FIFO (named pipe), not a regular file",
        ),
        ("scheduler/scheduler_config.json", "is a FIFO"),
    ] {
        let model = tiny_sd();
        let p = model.path().join(file);
        std::fs::remove_file(&p).unwrap();
        if kind.contains("character device") {
            std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        } else {
            mkfifo(&p);
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("gen");
        let (ok, t) = decorr_within(
            &[
                "generate",
                "--weights",
                model.path().to_str().unwrap(),
                "--prompt",
                PROMPT,
                "--steps",
                "1",
                "--quiet",
                "--out",
                out.to_str().unwrap(),
            ],
            limit,
        );
        assert!(!ok, "{t}");
        assert!(t.contains(file) && t.contains(kind), "{file}: {t}");
        assert!(
            !t.contains("no unet file found") && !t.contains("panicked"),
            "{t}"
        );
    }
}

/// `disendiff --images` with a FIFO named like an image: refused by name at once.
#[cfg(unix)]
#[test]
fn a_fifo_among_the_images_is_refused_not_waited_on() {
    let model = tiny_sd();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    mkfifo(&images.join("f.png"));
    let out = dir.path().join("dd");
    let (ok, t) = decorr_within(
        &[
            "disendiff",
            "--weights",
            model.path().to_str().unwrap(),
            "--prompt",
            PROMPT,
            "--objects",
            "tracks,train",
            "--images",
            images.to_str().unwrap(),
            "--resolution",
            "16",
            "--map-resolution",
            "8",
            "--max-train-steps",
            "1",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ],
        Duration::from_secs(180),
    );
    assert!(!ok, "{t}");
    assert!(
        t.contains("f.png") && t.contains("is a FIFO (named pipe), not a regular file"),
        "{t}"
    );
}

/// A JSON input that is /dev/zero, or a regular file beyond the text cap, is refused before it
/// is read, naming the path, the problem and the cap.
#[cfg(unix)]
#[test]
fn json_inputs_are_regular_files_of_bounded_size() {
    let dir = tempfile::tempdir().unwrap();
    let bert = fixtures().join("bertscore/bert_tiny");
    let big = dir.path().join("big.jsonl");
    std::fs::File::create(&big)
        .unwrap()
        .set_len((16 << 20) + 1)
        .unwrap();
    for (pairs, needle) in [
        (
            "/dev/zero",
            "/dev/zero is a character device, not a regular file",
        ),
        (big.to_str().unwrap(), "holds more than 16 MiB"),
    ] {
        let json = dir.path().join("b.json");
        let (ok, t) = decorr_within(
            &[
                "eval",
                "bertscore",
                "--model",
                bert.to_str().unwrap(),
                "--pairs",
                pairs,
                "--json",
                json.to_str().unwrap(),
            ],
            Duration::from_secs(60),
        );
        assert!(!ok, "{t}");
        assert!(t.contains(needle) && t.contains("--pairs"), "{t}");
        assert!(!json.exists());
    }
}

/// Without tokenizer/ the embedded vocabulary is used and a note says so; a tokenizer/ missing
/// vocab.json is an error naming it, not a silent fallback.
#[test]
fn tokenizer_fallback_is_said_and_partial_folders_refused() {
    let weights = fixtures().join("clip_tiny_train");
    let o = decorr(&[
        "analyze",
        "--weights",
        weights.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--target",
        "train",
        "--layer",
        "1",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("note: no tokenizer/ in")
            && err.contains("using the embedded CLIP vocabulary"),
        "{err}"
    );
    assert_eq!(err.matches("note: no tokenizer/").count(), 1, "{err}");

    let dir = tempfile::tempdir().unwrap();
    let te = dir.path().join("text_encoder");
    std::fs::create_dir_all(&te).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(weights.join("text_encoder").join(f), te.join(f)).unwrap();
    }
    let tok = dir.path().join("tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/clip/merges.txt"),
        tok.join("merges.txt"),
    )
    .unwrap();
    assert_fails(
        &[
            "analyze",
            "--weights",
            dir.path().to_str().unwrap(),
            "--prompt",
            PROMPT,
        ],
        &["holds merges.txt but no vocab.json", "tokenizer"],
    );
}
