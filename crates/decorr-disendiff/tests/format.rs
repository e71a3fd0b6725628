//! The output folder: our writer against the files diffusers wrote for the reference's large-lr
//! run (tests/fixtures/disendiff/out), reading them back, the refusals of a delta that does not
//! fit, and sampling with the delta against diffusers' image for the same seed (within 2/255).
#![allow(clippy::disallowed_methods)]

mod common;

use common::*;
use decorr_core::ModelSource;
use decorr_disendiff::format::{WEIGHTS_FILE, read_out, token_file};
use decorr_disendiff::{MODIFIERS, with_delta, write_out};
use decorr_pipeline::{GenerateParams, Guidance, StableDiffusion};

fn report() -> decorr_disendiff::Report {
    decorr_disendiff::Report {
        method: "disendiff".into(),
        prompt: "p".into(),
        objects: ["tracks".into(), "train".into()],
        sampling_prompt: "s".into(),
        caption: "c".into(),
        modifiers: MODIFIERS.map(String::from),
        config: config(3e-3),
        base: decorr_disendiff::format::BaseInfo {
            model: "tiny".into(),
            probe: vec![],
            hidden_size: 16,
            vocab_size: 49408,
        },
        map_layers: vec![],
        map_resolution: 8,
        steps_done: 3,
        interrupted: false,
        micro_losses: vec![],
        step_losses: vec![],
        training_images: vec![],
        regularisation: "none".into(),
        seconds: 0.0,
        step_seconds: vec![],
    }
}

#[test]
fn our_files_match_diffusers_files() {
    let refs = refs();
    let device = decorr_core::device_from_env();
    let lr = cases()["large_lr"]["lr"].as_f64().unwrap();
    let mut tr = trainer(lr);
    for i in 0..6 {
        tr.micro_step(&batch(&refs, i, &device)).unwrap();
    }
    let ours = tempfile::tempdir().unwrap();
    write_out(ours.path(), &tr.trained(), &report()).unwrap();
    let theirs = fixtures().join("disendiff/out");
    for name in [
        WEIGHTS_FILE.to_string(),
        token_file(MODIFIERS[0]),
        token_file(MODIFIERS[1]),
    ] {
        let a = std::fs::read(ours.path().join(&name)).unwrap();
        let b = std::fs::read(theirs.join(&name)).unwrap();
        let (_, ma) = safetensors::SafeTensors::read_metadata(&a).unwrap();
        let (_, mb) = safetensors::SafeTensors::read_metadata(&b).unwrap();
        assert_eq!(ma.metadata(), mb.metadata(), "{name}: metadata");
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&a).unwrap(),
            safetensors::SafeTensors::deserialize(&b).unwrap(),
        );
        let mut ka = a.names();
        let mut kb = b.names();
        ka.sort();
        kb.sort();
        assert_eq!(ka, kb, "{name}: keys");
        for k in ka {
            let (x, y) = (a.tensor(k).unwrap(), b.tensor(k).unwrap());
            assert_eq!(x.shape(), y.shape(), "{k}");
            assert_eq!(x.dtype(), y.dtype(), "{k}");
            let f = |v: &[u8]| -> Vec<f32> {
                v.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            };
            let d = max_abs_diff(&f(x.data()), &f(y.data()));
            assert!(d <= 1e-5, "{k}: {d}");
        }
    }
    // Reading diffusers' folder back gives the trained values.
    let back = read_out(&theirs).unwrap();
    assert!(back.report.is_none());
    let t = tr.trained();
    assert_eq!(back.trained.kv.len(), t.kv.len());
    for ((p, s, v), (q, r, w)) in back.trained.kv.iter().zip(&t.kv) {
        assert_eq!((p, s), (q, r));
        assert!(max_abs_diff(v, w) <= 1e-5);
    }
}

fn tiny_pipeline() -> (tempfile::TempDir, StableDiffusion) {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    for (part, from) in [
        ("text_encoder", f.join("clip_tiny_train/text_encoder")),
        ("unet", f.join("unet_tiny_a/unet")),
        ("vae", f.join("vae_tiny/vae")),
        ("scheduler", f.join("pipeline/scheduler")),
        ("tokenizer", assets().join("sd-tiny/tokenizer")),
    ] {
        let to = dir.path().join(part);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let sd = StableDiffusion::load(
        &ModelSource::Local(dir.path().to_path_buf()),
        &decorr_core::device_from_env(),
    )
    .unwrap();
    (dir, sd)
}

#[test]
fn sampling_with_the_delta_matches_diffusers() {
    let refs = refs();
    let c = cases();
    let s = &c["sample"];
    let (_dir, sd) = tiny_pipeline();
    let delta = read_out(&fixtures().join("disendiff/out")).unwrap();
    let sd = with_delta(&sd, &delta).unwrap();
    let p = GenerateParams {
        prompt: s["prompt"].as_str().unwrap().into(),
        negative_prompt: String::new(),
        steps: s["steps"].as_u64().unwrap() as usize,
        guidance_scale: s["guidance_scale"].as_f64().unwrap(),
        width: 16,
        height: 16,
        scheduler: "ddim".parse().unwrap(),
        guidance: Guidance::Cfg,
        karras: None,
        eta: 0.0,
        attention_slice: None,
        capture_tokens: vec![],
        text: Default::default(),
    };
    let emb = sd.encode(&sd.text_encoder, &p.prompt).unwrap();
    let d_emb = max_abs_diff(&to_vec(emb), &refs["sample.prompt_embeds"].1);
    let out = sd.generate(&p, &[0], &mut |_, _| true).unwrap();
    let d_init = max_abs_diff(&to_vec(out.init_latents), &refs["sample.init_latents"].1);
    let d_img = max_abs_diff(
        &to_vec(out.images.permute([0, 2, 3, 1])),
        &refs["sample.image"].1,
    );
    println!(
        "embeds {d_emb:.1e}, init {d_init:.1e}, image {:.3}/255",
        d_img * 255.0
    );
    assert!(d_emb <= 1e-5 && d_init <= 1e-6);
    assert!(
        d_img <= 2.0 / 255.0,
        "image differs by {}/255",
        d_img * 255.0
    );
}

#[test]
fn a_delta_that_does_not_fit_is_refused() {
    let (_dir, sd) = tiny_pipeline();
    let good = read_out(&fixtures().join("disendiff/out")).unwrap();
    // A weight of the wrong shape.
    let mut bad = good.clone();
    bad.trained.kv[0].1 = [16, 32];
    bad.trained.kv[0].2 = vec![0.0; 512];
    let e = with_delta(&sd, &bad).err().unwrap().to_string();
    assert!(e.contains("does not fit"), "{e}");
    // A layer this UNet lacks.
    let mut bad = good.clone();
    bad.trained.kv[0].0 =
        "down_blocks.7.attentions.0.transformer_blocks.0.attn2.to_k.weight".into();
    let e = with_delta(&sd, &bad).err().unwrap().to_string();
    assert!(e.contains("does not have"), "{e}");
    // Rows of another width.
    let mut bad = good.clone();
    bad.trained.rows = [vec![0.0; 768], vec![0.0; 768]];
    let e = with_delta(&sd, &bad).err().unwrap().to_string();
    assert!(e.contains("another base model"), "{e}");
    // A report from another base model.
    let mut bad = good.clone();
    let mut r = report();
    r.base.probe = vec![0.5; 64 + 64];
    bad.report = Some(r);
    let e = with_delta(&sd, &bad).err().unwrap().to_string();
    assert!(e.contains("another base model"), "{e}");
    // Missing and broken files.
    let tmp = tempfile::tempdir().unwrap();
    let e = read_out(tmp.path()).unwrap_err().to_string();
    assert!(e.contains(WEIGHTS_FILE), "{e}");
    std::fs::write(tmp.path().join(WEIGHTS_FILE), b"not safetensors").unwrap();
    let e = read_out(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("not a readable safetensors file") && e.contains(WEIGHTS_FILE),
        "{e}"
    );
    let e = read_out(&tmp.path().join("nope")).unwrap_err().to_string();
    assert!(e.contains("not a folder"), "{e}");
}
