//! Bad numbers in configs, weights and sizes, end to end: each run fails before writing
//! anything, naming the config key and file when the value came from a config and the flag when
//! it came from a flag.

use std::path::Path;
use std::process::Command;

mod common;
use common::{PROMPT, assert_fails, text, tiny_sd};

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn generate_args<'a>(model: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "generate",
        "--weights",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--steps",
        "2",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]
}

#[test]
fn config_values_are_named_as_config_keys_not_flags() {
    let sd = tiny_sd();
    edit_json(&sd.path().join("unet/config.json"), |c| {
        c["sample_size"] = 0.into()
    });
    let out = sd.path().join("out");
    assert_fails(
        &generate_args(sd.path(), &out),
        &["`sample_size` = 0", "unet/config.json"],
    );
    let o = common::decorr(&generate_args(sd.path(), &out));
    assert!(!text(&o).contains("--width 0"), "{}", text(&o));
    assert!(!out.exists());

    let sd = tiny_sd();
    edit_json(&sd.path().join("vae/config.json"), |c| {
        c["norm_num_groups"] = 0.into()
    });
    assert_fails(
        &generate_args(sd.path(), &out),
        &["`norm_num_groups` = 0", "vae/config.json"],
    );
    let sd = tiny_sd();
    edit_json(&sd.path().join("scheduler/scheduler_config.json"), |c| {
        c["beta_end"] = 1.5.into()
    });
    assert_fails(
        &generate_args(sd.path(), &out),
        &["`beta_end` = 1.5", "scheduler_config.json"],
    );
}

#[test]
fn activations_beyond_the_memory_limit_name_the_flags() {
    let sd = tiny_sd();
    let out = sd.path().join("out");
    let mut args = generate_args(sd.path(), &out);
    args.extend(["--width", "512", "--height", "512"]);
    let o = Command::new(env!("CARGO_BIN_EXE_decorr"))
        .args(&args)
        .env("HF_HUB_OFFLINE", "1")
        .env(decorr_core::limits::MEMORY_LIMIT_ENV, "40M")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("--width 512 --height 512")
            && t.contains("needs about")
            && t.contains("40.0 MiB")
            && t.contains("DECORR_MEMORY_LIMIT"),
        "{t}"
    );
    assert!(!out.exists(), "nothing written");
}

/// Count flags are bounded by the argument parser, naming the flag and the allowed range,
/// before anything is read or allocated.
#[test]
fn count_flags_are_bounded() {
    for (args, flag) in [
        (
            &[
                "eval",
                "fid",
                "--real",
                "r",
                "--fake",
                "f",
                "--json",
                "j.json",
                "--batch-size",
                "0",
            ][..],
            "--batch-size",
        ),
        (
            &[
                "eval",
                "run",
                "--runs",
                "r",
                "--out",
                "o",
                "--batch-size",
                "18446744073709551615",
            ][..],
            "--batch-size",
        ),
        (
            &[
                "eval",
                "run",
                "--runs",
                "r",
                "--out",
                "o",
                "--concurrency",
                "100000",
            ][..],
            "--concurrency",
        ),
        (
            &["eval", "run", "--runs", "r", "--out", "o", "--timeout=-1"][..],
            "--timeout",
        ),
        (
            &[
                "generate",
                "--prompt",
                "a",
                "--out",
                "o",
                "--batch-size",
                "5000",
            ][..],
            "--batch-size",
        ),
    ] {
        assert_fails(args, &[flag, "1..=", "invalid value"]);
    }
}
