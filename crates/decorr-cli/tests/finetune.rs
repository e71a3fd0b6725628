//! End-to-end tests of `decorr finetune` on `clip_tiny_train` (vocab 49408, so the real
//! tokenizer feeds it): the files of OUT, the reload of the saved encoder by transformers
//! (recorded by the fixture script) and by our loader, the round trip through `decorr analyze`,
//! and the error paths.

use std::path::Path;
use std::process::Output;

mod common;
use common::{PROMPT, assert_fails, decorr, fixtures, text};

use burn::tensor::{Device, Int, Tensor, TensorData};
use decorr_clip::load_text_encoder;
use decorr_core::ModelSource;

/// The run whose saved encoder `make_fixtures.py --check-saved` loaded with transformers
/// (see the script's docstring for the exact command).
fn train(out: &Path, epochs: &str, extra: &[&str]) -> Output {
    let w = fixtures().join("clip_tiny_train");
    let mut args = vec![
        "finetune",
        "--prompt",
        PROMPT,
        "--target",
        "train",
        "--layer",
        "1",
        "--epochs",
        epochs,
        "--steps-per-epoch",
        "3",
        "--lr",
        "1e-3",
        "--quiet",
        "--weights",
        w.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    decorr(&args)
}

#[test]
fn finetune_writes_every_promised_file_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = train(&out, "3", &[]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("selected epoch"), "{t}");
    assert!(
        t.contains("epoch   3: L_train"),
        "per-epoch numbers are printed: {t}"
    );

    let mut files: Vec<String> = walk(&out);
    files.sort();
    assert_eq!(
        files,
        [
            ".decorr.lock",
            "losses.png",
            "losses.svg",
            "report.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors"
        ],
        "no temp files or extras"
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["epochs"].as_array().unwrap().len(), 3);
    // The typed record fix and compare read is the file as written.
    let typed = decorr_runs::finetune::FinetuneReport::read(&out).unwrap();
    assert!(typed.finished);
    assert_eq!(
        serde_json::to_string_pretty(&typed).unwrap(),
        std::fs::read_to_string(out.join("report.json")).unwrap(),
        "read back unchanged"
    );
    assert!(decorr_runs::finetune::finished(&out).is_some());
    for k in ["l_train", "l_corr", "l_align", "l_val"] {
        assert!(r["epochs"][0][k].is_number(), "{k}");
    }
    assert_eq!(r["step_losses"].as_array().unwrap().len(), 9);
    assert_eq!(r["finished"], true);
    let sel = r["selected_epoch"].as_u64().unwrap();
    assert!((1..=3).contains(&sel));
    let p = &r["prompts"][0];
    assert_eq!(p["target"]["index"], 6);
    assert_eq!(p["target"]["text"], "train");
    let c = p["corr"]["index"].as_u64().unwrap() as usize;
    assert!((1..6).contains(&c));
    assert_eq!(p["s"].as_array().unwrap().len(), 5, "S = 1..t");
    let before: Vec<f32> = serde_json::from_value(p["row_before"].clone()).unwrap();
    let after: Vec<f32> = serde_json::from_value(p["row_after"].clone()).unwrap();
    assert_eq!(before.len(), 8);
    assert!(
        after[c] < before[c],
        "A[t,c] lowered: {} -> {}",
        before[c],
        after[c]
    );
    let img = image::open(out.join("losses.png")).unwrap();
    assert!(img.width() >= 800);
    // The same chart as SVG: its text, and the selected epoch in the marker's red.
    let svg = std::fs::read_to_string(out.join("losses.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("L_val (Eq. 5)"),
        "{svg}"
    );
    assert!(svg.contains(&format!("selected epoch {sel}")) && svg.contains("#D62728"));

    // transformers loaded an encoder saved by this same run (fixture script, --check-saved):
    // our loader must give the hidden states transformers gave.
    let reference = read(&fixtures().join("finetune/saved_reload.safetensors"));
    let device = Device::flex();
    let enc = load_text_encoder(&ModelSource::Local(out.clone()), &device).unwrap();
    let (ids, shape) = &reference["input_ids"];
    let ids: Vec<i64> = ids.iter().map(|&v| v as i64).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, shape.clone()), &device);
    let hidden = enc
        .model
        .forward(input)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap();
    let (want, _) = &reference["last_hidden_state"];
    let worst = hidden
        .iter()
        .zip(want)
        .map(|(a, b)| (a - *b as f32).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= 1e-4,
        "saved encoder differs from what transformers loaded: {worst}"
    );

    // Round trip: analyze on OUT shows the fine-tuned row.
    let json = dir.path().join("a.json");
    let o = decorr(&[
        "analyze",
        "--prompt",
        PROMPT,
        "--target",
        "train",
        "--layer",
        "1",
        "--weights",
        out.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let a: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let row: Vec<f32> = serde_json::from_value(a["attention"][6].clone()).unwrap();
    for j in 0..8 {
        assert!(
            (row[j] - after[j]).abs() < 1e-5,
            "A[t,{j}] {} vs report {}",
            row[j],
            after[j]
        );
    }
}

/// Tensors as f64 with shapes, any float/int dtype of the fixture.
fn read(path: &Path) -> std::collections::HashMap<String, (Vec<f64>, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let d: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{other:?}"),
            };
            (k, (d, v.shape().to_vec()))
        })
        .collect()
}

fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            for f in walk(&p) {
                out.push(format!("{}/{f}", p.file_name().unwrap().to_string_lossy()));
            }
        } else {
            out.push(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    out
}

#[test]
fn existing_out_is_refused_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = train(&out, "3", &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--overwrite"), "{}", text(&o));
    // A folder decorr did not write is not replaced, even with --overwrite.
    let o = train(&out, "1", &["--overwrite"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("keep.txt") && text(&o).contains("not a decorr finetune output"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine",
        "nothing lost"
    );
    std::fs::remove_file(out.join("keep.txt")).unwrap();
    let o = train(&out, "1", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = train(&out, "2", &["--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.join("text_encoder/model.safetensors").is_file());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        report["epochs"].as_array().unwrap().len(),
        2,
        "the new run replaced the old"
    );
    // Nothing of the swap is left beside OUT.
    let beside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside, vec![std::ffi::OsString::from("out")]);
}

/// `--out LINK --overwrite` replaces the folder the link names, not the link: the linked
/// folder holds the new encoder, the link stays a link, under the umask's permissions.
#[cfg(unix)]
#[test]
fn a_linked_out_is_written_through() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    let link = dir.path().join("link");
    assert!(train(&real, "1", &[]).status.success());
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let o = train(&link, "2", &["--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(real.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        report["epochs"].as_array().unwrap().len(),
        2,
        "the linked folder is new"
    );
    // The staging folder was private (0700); the result is not.
    let mode = std::fs::metadata(&real).unwrap().permissions().mode() & 0o777;
    assert_ne!(mode, 0o700, "{mode:o}");
    let mode = std::fs::metadata(real.join("report.json"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_ne!(mode, 0o600, "{mode:o}");
}

#[test]
fn bad_input_gives_clear_errors_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let w = fixtures().join("clip_tiny_train");
    let w = w.to_str().unwrap();
    let base = [
        "finetune",
        "--weights",
        w,
        "--out",
        o,
        "--layer",
        "1",
        "--quiet",
    ];
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    assert_fails(
        &with(&["--prompt", PROMPT, "--target", "train", "--params", "mlp"]),
        &["mlp", "all, attn, qk"],
    );
    assert_fails(
        &with(&["--prompt", PROMPT, "--target", "rusty"]),
        &["nothing", "rusty"],
    );
    assert_fails(
        &with(&["--prompt", PROMPT, "--target", "plane"]),
        &["plane", "rusty, tracks"],
    );
    assert_fails(
        &with(&["--prompt", "cat cat", "--target", "cat#2"]),
        &["cannot be decorrelated from itself"],
    );
    assert_fails(
        &with(&[
            "--prompt",
            PROMPT,
            "--prompt",
            "a cat with a dog",
            "--target",
            "train",
        ]),
        &["2 --prompt but 1 --target"],
    );
    assert_fails(
        &[
            "finetune",
            "--weights",
            w,
            "--out",
            o,
            "--prompt",
            PROMPT,
            "--target",
            "train",
            "--layer",
            "11",
        ],
        &["layer 11", "0..=2"],
    );
    assert!(!out.exists(), "a refused run leaves no OUT behind");
}

/// Numeric flags are refused by the argument parser, naming the flag and the allowed range,
/// before anything is loaded or written; a repeated word's occurrence is named as finetune
/// takes it (`cat#3`), not as a flag it does not have.
#[test]
fn bad_numbers_and_occurrences_name_the_right_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let w = fixtures().join("clip_tiny_train");
    let w = w.to_str().unwrap();
    let base = [
        "finetune",
        "--weights",
        w,
        "--out",
        o,
        "--layer",
        "1",
        "--quiet",
        "--prompt",
        PROMPT,
        "--target",
        "train",
    ];
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    for (flag, needles) in [
        ("--lr=-1", &["--lr", "> 0"][..]),
        ("--lr=0", &["--lr", "> 0"]),
        ("--lr=NaN", &["--lr", "finite"]),
        ("--lr=inf", &["--lr", "finite"]),
        ("--tau=-5", &["--tau", ">= 0"]),
        ("--tau=NaN", &["--tau", "finite"]),
        ("--weight-decay=nan", &["--weight-decay", "finite"]),
        ("--weight-decay=-0.1", &["--weight-decay", ">= 0"]),
        ("--epochs=0", &["--epochs", "1..=100000"]),
        ("--steps-per-epoch=0", &["--steps-per-epoch", "1..=100000"]),
    ] {
        let o = decorr(&with(&[flag]));
        let t = text(&o);
        assert!(!o.status.success(), "{flag}: {t}");
        for n in needles {
            assert!(t.contains(n), "{flag}: missing {n:?} in {t}");
        }
        assert!(!t.contains("try a lower --lr"), "{flag}: {t}");
        assert!(!out.exists(), "{flag}: a refused run leaves no OUT behind");
    }
    let o = decorr(&[
        "finetune",
        "--weights",
        w,
        "--out",
        o,
        "--layer",
        "1",
        "--quiet",
        "--prompt",
        "a cat and a cat",
        "--target",
        "cat#3",
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("cat#3") && t.contains("2 time(s)"), "{t}");
    assert!(
        !t.contains("--occurrence"),
        "finetune has no --occurrence: {t}"
    );
    assert!(!out.exists());
}
