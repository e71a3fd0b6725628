//! `generate`, `fix` and `compare` make the same files and the same pixels as a recorded run of
//! an earlier decorr (before their work moved from the CLI into `decorr-runs`): the same
//! commands on the tiny models, compared file by file: every output's relative path, every
//! PNG's size, and every generated image's pixels (within 3/255: the CPU kernels' float order
//! may differ between machines). Pages, reports, figures and manifests are compared by presence
//! and size only (they hold temp paths and, for pages, intended changes). Paths renamed on
//! purpose since the recording are listed in [`RENAMED`], files added or redrawn on purpose in
//! [`added`] and [`redrawn`].
//!
//! The fixture `tests/fixtures/golden/digest.json` is written by this test itself from another
//! build: `DECORR_GOLDEN_WRITE=1 DECORR_GOLDEN_BIN=/path/to/old/decorr cargo test -p decorr-cli
//! --test golden`. Runs on flex only (pixels differ by backend).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{PROMPT, text};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The three commands, each writing into `out/NAME`.
fn commands(out: &Path) -> Vec<(&'static str, Vec<String>)> {
    let o = |name: &str| out.join(name).display().to_string();
    let tiny = "assets/sd-tiny".to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut generate = s(&[
        "generate",
        "--weights",
        &tiny,
        "--prompt",
        PROMPT,
        "--steps",
        "3",
        "--scheduler",
        "ddim",
        "--num-images",
        "2",
        "--attention-maps",
        "tracks,train",
        "--quiet",
        "--out",
    ]);
    generate.push(o("generate"));
    let mut fix = s(&[
        "fix",
        "--weights",
        &tiny,
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
        "1e-3",
        "--steps",
        "3",
        "--scheduler",
        "ddim",
        "--seeds",
        "0..2",
        "--compare",
        "pag,aae",
        "--excite-attn-res",
        "8",
        "--anyway",
        "--quiet",
        "--out",
    ]);
    fix.push(o("fix"));
    let mut compare = s(&[
        "compare",
        "--pairs",
        "assets/compare/example-pairs.jsonl",
        "--weights",
        &tiny,
        "--layer",
        "1",
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
        "--seeds",
        "0..2",
        "--excite-attn-res",
        "8",
        "--quiet",
        "--out",
    ]);
    compare.push(o("compare"));
    vec![("generate", generate), ("fix", fix), ("compare", compare)]
}

/// Largest difference allowed in a pixel value (of 255).
const TOLERANCE: u8 = 3;

/// Every file under `dir` (relative path) with, for PNGs, `WxH`, and for generated images
/// (`seed-*.png`) `WxH:` and their RGB pixels in hex.
fn digest(dir: &Path, prefix: &str, into: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".decorr") {
            continue;
        }
        let rel = format!("{prefix}{name}");
        let path = e.path();
        if path.is_dir() {
            digest(&path, &format!("{rel}/"), into);
        } else if name.ends_with(".png") {
            let img = image::open(&path).unwrap().to_rgb8();
            let mut value = format!("{}x{}", img.width(), img.height());
            if name.starts_with("seed-") {
                value.push(':');
                value.extend(img.as_raw().iter().map(|b| format!("{b:02x}")));
            }
            into.insert(rel, value);
        } else {
            into.insert(rel, "file".into());
        }
    }
}

fn run_all(bin: &Path) -> BTreeMap<String, String> {
    let tmp = tempfile::tempdir().unwrap();
    let mut all = BTreeMap::new();
    for (name, args) in commands(tmp.path()) {
        let o = Command::new(bin)
            .args(&args)
            .current_dir(root())
            .env("HF_HUB_OFFLINE", "1")
            .env("DECORR_BACKEND", "flex")
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", text(&o));
        digest(&tmp.path().join(name), &format!("{name}/"), &mut all);
    }
    all
}

#[test]
fn generate_fix_and_compare_make_the_recorded_files_and_pixels() {
    if std::env::var("DECORR_BACKEND").is_ok_and(|b| b != "flex") {
        eprintln!("skipped: pixels are recorded on flex");
        return;
    }
    let fixture = root().join("tests/fixtures/golden/digest.json");
    if std::env::var("DECORR_GOLDEN_WRITE").is_ok() {
        let bin =
            std::env::var("DECORR_GOLDEN_BIN").expect("DECORR_GOLDEN_BIN: the build to record");
        let all = run_all(Path::new(&bin));
        std::fs::write(&fixture, serde_json::to_string_pretty(&all).unwrap() + "\n").unwrap();
        return;
    }
    let recorded: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(&fixture).unwrap()).unwrap();
    let want: BTreeMap<String, String> = recorded
        .into_iter()
        .map(|(k, v)| (renamed(&k), v))
        .collect();
    let got = run_all(Path::new(env!("CARGO_BIN_EXE_decorr")));
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got
        .keys()
        .filter(|k| !want.contains_key(*k) && !added(k))
        .collect();
    let differ: Vec<&String> = want
        .iter()
        .filter(|(k, v)| !redrawn(k) && got.get(*k).is_some_and(|g| !same(v, g)))
        .map(|(k, _)| k)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "missing {missing:?}\nextra {extra:?}\ndiffering {differ:?}"
    );
}

/// Folders renamed on purpose since the recording: `fix` names each method's folder as
/// `compare` does (the pre-trained model `sd/`, the decorrelated guidance `ours/`).
const RENAMED: [(&str, &str); 2] = [("fix/pretrained/", "fix/sd/"), ("fix/fixed/", "fix/ours/")];

/// Files added on purpose since the recording: each chart's SVG beside its PNG.
fn added(path: &str) -> bool {
    path.ends_with("losses.svg")
}

/// Files redrawn on purpose since the recording (their size changed): the charts, now drawn
/// by plotters. They are compared by presence.
fn redrawn(path: &str) -> bool {
    path.ends_with("losses.png")
}

/// A recorded path as this build writes it.
fn renamed(path: &str) -> String {
    RENAMED
        .iter()
        .find_map(|(old, new)| path.strip_prefix(old).map(|rest| format!("{new}{rest}")))
        .unwrap_or_else(|| path.to_string())
}

/// Whether two digests of a file agree: equal, or images of one size whose pixels differ by at
/// most [`TOLERANCE`].
fn same(want: &str, got: &str) -> bool {
    if want == got {
        return true;
    }
    let (Some((ws, wp)), Some((gs, gp))) = (want.split_once(':'), got.split_once(':')) else {
        return false;
    };
    let bytes = |h: &str| -> Vec<u8> {
        (0..h.len() / 2)
            .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect()
    };
    let (w, g) = (bytes(wp), bytes(gp));
    ws == gs && w.len() == g.len() && w.iter().zip(&g).all(|(a, b)| a.abs_diff(*b) <= TOLERANCE)
}
