//! End-to-end on the tiny SDXL model (`assets/sdxl-tiny`): `generate` with CFG and PAG writes
//! its images and manifests, `analyze` reads both text encoders at the layer the UNet reads and
//! names the one carrying the correlation, `finetune` fine-tunes the chosen encoders into
//! `encoder-N/`, `generate` and `compare` sample with them, and what does not run on SDXL
//! (Attend-and-Excite) is refused before any work, naming what does.

mod common;
use common::{PROMPT, decorr, fixtures, text};

fn model() -> String {
    fixtures().join("sdxl_tiny").to_str().unwrap().to_string()
}

#[test]
fn sdxl_generates_with_cfg_and_pag() {
    let tmp = tempfile::tempdir().unwrap();
    for (guidance, method) in [("cfg", "sd"), ("pag", "pag")] {
        let out = tmp.path().join(guidance);
        let o = decorr(&[
            "generate",
            "--weights",
            &model(),
            "--prompt",
            PROMPT,
            "--steps",
            "3",
            "--num-images",
            "2",
            "--guidance",
            guidance,
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(m["images"].as_array().unwrap().len(), 2);
        assert_eq!(m["images"][0]["method"], method);
        assert_eq!(m["images"][0]["scheduler"], "euler", "SDXL's own scheduler");
        let img = image::open(out.join("seed-000001.png")).unwrap();
        assert_eq!((img.width(), img.height()), (16, 16));
    }
}

#[test]
fn sdxl_analyze_reads_both_encoders() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("a.json");
    let heat = tmp.path().join("h.png");
    let o = decorr(&[
        "analyze",
        "--weights",
        &model(),
        "--prompt",
        PROMPT,
        "--target",
        "train",
        "--json",
        json.to_str().unwrap(),
        "--heatmap",
        heat.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("text_encoder_2:") && t.contains("carried most by"),
        "{t}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // The UNet reads hidden_states[-2]: the second-to-last layer of each (3 and 4 layers).
    assert_eq!(r["text_encoder"]["layer"], 1);
    assert_eq!(r["text_encoder_2"]["layer"], 2);
    assert_eq!(r["text_encoder_2"]["target"]["text"], "train");
    assert!(heat.is_file() && tmp.path().join("h-2.png").is_file());
}

#[test]
fn sdxl_fine_tunes_the_chosen_encoders_and_samples_with_them() {
    let model = model();
    let tmp = tempfile::tempdir().unwrap();
    let ft = tmp.path().join("ft");
    let quick = [
        "--epochs",
        "2",
        "--steps-per-epoch",
        "2",
        "--lr",
        "1e-3",
        "--quiet",
    ];
    let mut args = vec![
        "finetune",
        "--weights",
        &model,
        "--prompt",
        PROMPT,
        "--target",
        "train",
        "--encoder",
        "both",
        "--out",
        ft.to_str().unwrap(),
    ];
    args.extend(quick);
    let o = decorr(&args);
    assert!(o.status.success(), "{}", text(&o));
    for n in [1, 2] {
        let dir = ft.join(format!("encoder-{n}"));
        assert!(dir.join("text_encoder/model.safetensors").is_file(), "{n}");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap())
                .unwrap();
        // The second-to-last layer of each: 1 of 3, 2 of 4.
        assert_eq!(report["config"]["layer"], n, "{report}");
    }
    // generate pairs them (Eq. 6); both encoders' digests are recorded.
    let out = tmp.path().join("gen");
    let o = decorr(&[
        "generate",
        "--weights",
        &model,
        "--prompt",
        PROMPT,
        "--steps",
        "2",
        "--encoder",
        ft.to_str().unwrap(),
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["images"][0]["method"], "ours");
    assert_eq!(
        m["images"][0]["encoder_sha256"].as_str().unwrap().len(),
        2 * 64 + 1
    );

    // compare runs sd, pag and ours on SDXL; Attend-and-Excite is refused by name.
    let pairs = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        format!("{{\"prompt\": \"{PROMPT}\", \"objects\": [\"tracks\", \"train\"]}}\n"),
    )
    .unwrap();
    let cmp = tmp.path().join("cmp");
    let mut args = vec![
        "compare",
        "--weights",
        &model,
        "--pairs",
        pairs.to_str().unwrap(),
        "--methods",
        "sd,pag,ours",
        "--seeds",
        "0..2",
        "--steps",
        "2",
        "--out",
        cmp.to_str().unwrap(),
    ];
    args.extend(quick);
    let o = decorr(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        cmp.join("ours/000-rusty-tracks-with-an-old-train/seed-000001.png")
            .is_file()
    );
    let o = decorr(&[
        "compare",
        "--weights",
        &model,
        "--pairs",
        pairs.to_str().unwrap(),
        "--methods",
        "sd,aae",
        "--out",
        tmp.path().join("cmp2").to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("SDXL") && t.contains("aae"),
        "{t}"
    );
    // The SDXL flags on a checkpoint with one encoder are refused by name.
    let o = decorr(&[
        "finetune",
        "--weights",
        fixtures().join("../../assets/sd-tiny").to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--target",
        "train",
        "--encoder",
        "2",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("--encoder"), "{t}");
}

/// An SDXL single file (written from the tiny folder by decorr-convert, in the original naming)
/// is detected, converted in memory and gives the images of the folder, pixel for pixel.
#[test]
fn sdxl_single_file_gives_the_folders_images() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("xl.safetensors");
    decorr_convert::convert_diffusers_to_single_file(
        &fixtures().join("sdxl_tiny"),
        &file,
        &Default::default(),
    )
    .unwrap();
    let run = |weights: &str, extra: &[&str], out: &std::path::Path| {
        let mut args = vec![
            "generate",
            "--weights",
            weights,
            "--prompt",
            PROMPT,
            "--steps",
            "2",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = decorr(&args);
        assert!(o.status.success(), "{}", text(&o));
        image::open(out.join("seed-000000.png")).unwrap().to_rgb8()
    };
    let config = model();
    let from_file = run(
        file.to_str().unwrap(),
        &["--checkpoint-config", &config],
        &tmp.path().join("a"),
    );
    let from_folder = run(&model(), &[], &tmp.path().join("b"));
    assert_eq!(from_file, from_folder);
}

/// `fix` on SDXL with `--encoder both`: both encoders fine-tuned into `finetune/encoder-N/`,
/// the page showing each one's target row, curves and numbers.
#[test]
fn sdxl_fix_writes_its_page_with_the_fine_tuned_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fix");
    let o = decorr(&[
        "fix",
        "--weights",
        &model(),
        "--prompt",
        PROMPT,
        "--target",
        "train",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "2",
        "--lr",
        "1e-3",
        "--steps",
        "2",
        "--seeds",
        "0..2",
        "--anyway",
        "--encoder",
        "both",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("the correlation is carried most by text_encoder"),
        "{t}"
    );
    // Each fine-tuned encoder's row and curves are on the page.
    let page = std::fs::read_to_string(out.join("report.html")).unwrap();
    for n in [1, 2] {
        let f = format!("finetune/encoder-{n}/report.json");
        assert!(out.join(&f).is_file() && page.contains(&f), "{f}: {t}");
    }
    for encoder in ["text_encoder, layer 1", "text_encoder_2, layer 2"] {
        assert!(page.contains(encoder), "{encoder}: {page}");
    }
    assert!(out.join("ours/seed-000001.png").is_file());
}
