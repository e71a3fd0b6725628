//! End-to-end on the tiny SDXL model (`assets/sdxl-tiny`): `generate` with CFG and PAG writes
//! its images and manifests, `analyze` reads both text encoders at the layer the UNet reads and
//! names the one carrying the correlation, and what does not run on SDXL yet (`fix`, compare's
//! `ours`) is refused before any work, naming what does.

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
fn sdxl_refuses_fine_tuning_before_any_work() {
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
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("SDXL") && t.contains("generate"), "{t}");
    assert!(!out.exists(), "nothing is left behind");
}
