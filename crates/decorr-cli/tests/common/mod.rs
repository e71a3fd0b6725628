//! Helpers shared by the CLI's end-to-end tests: run the `decorr` binary offline and check
//! its failures.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const PROMPT: &str = "rusty tracks with an old train";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Run `decorr` with no hub access (offline, empty cache).
pub fn decorr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_decorr"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env(
            "HF_HOME",
            std::env::temp_dir().join("decorr-test-empty-hf-home"),
        )
        .output()
        .expect("run decorr")
}

/// stdout and stderr together.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The command fails, without a panic, and its output names every needle.
pub fn assert_fails(args: &[&str], needles: &[&str]) {
    let o = decorr(args);
    let t = text(&o);
    assert!(!o.status.success(), "should fail: {args:?}\n{t}");
    for n in needles {
        assert!(t.contains(n), "missing {n:?} in:\n{t}");
    }
    assert!(!t.contains("panicked"), "{t}");
}

/// The tiny SD checkpoint (text encoder, UNet, VAE, scheduler fixtures) as one diffusers folder.
pub fn tiny_sd() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    for (part, from) in [
        ("text_encoder", f.join("clip_tiny_train/text_encoder")),
        ("unet", f.join("unet_tiny_a/unet")),
        ("vae", f.join("vae_tiny/vae")),
        ("scheduler", f.join("pipeline/scheduler")),
    ] {
        let to = tmp.path().join(part);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    tmp
}

/// `decorr generate` of 3 seeds with 2 DDIM steps on the tiny checkpoint `model` into `out`,
/// plus `extra` arguments (more prompts, an encoder, a shard).
pub fn quick_generate(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--weights",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--steps",
        "2",
        "--scheduler",
        "ddim",
        "--num-images",
        "3",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    decorr(&args)
}
