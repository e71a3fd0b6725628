//! End-to-end parity with diffusers' `StableDiffusionXLPipeline` and
//! `StableDiffusionXLPAGPipeline` (fixtures by tests/pyref/make_sdxl_pipeline_fixtures.py) on
//! the tiny random SDXL model (tests/fixtures/sdxl_tiny, loaded as a diffusers folder): the
//! same initial latents (<= 1e-6), prompt embeddings and pooled embeddings (<= 1e-5), zeros for
//! an empty negative prompt (`force_zeros_for_empty_prompt`), the same image within 2/255 per
//! pixel, with its Euler scheduler (`timestep_spacing: leading`), a negative prompt, a non-square
//! image (its time ids), guidance 1, PAG on the mid block, and the decorrelated guidance with a
//! fine-tuned second encoder (laid out as `decorr finetune` writes SDXL's), with an empty
//! negative prompt (zeros) and with one (the pre-trained encoders').

// Tests read results back freely; clippy.toml keeps the library to decorr_core::readback.
#![allow(clippy::disallowed_methods)]

use decorr_core::ModelSource;
use decorr_core::weights::read_tensors_f32;
use decorr_pipeline::{GenerateParams, Guidance, PagParams, StableDiffusion, TextSide};

mod common;
use common::{fixtures, max_diff};

fn load() -> StableDiffusion {
    let device = decorr_core::device_from_env();
    StableDiffusion::load(&ModelSource::Local(fixtures().join("sdxl_tiny")), &device).unwrap()
}

#[test]
fn sdxl_matches_diffusers() {
    let sd = load();
    let xl = sd
        .xl
        .as_ref()
        .expect("detected as SDXL from text_encoder_2");
    assert!(xl.force_zeros_for_empty_prompt);
    let refs = read_tensors_f32(&fixtures().join("sdxl_pipeline/reference.safetensors")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("sdxl_pipeline/cases.json")).unwrap(),
    )
    .unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    let tuned = sd
        .load_tuned_encoder(&fixtures().join("sdxl_pipeline/tuned"))
        .unwrap();
    assert!(tuned.model_2.is_some());
    for case in cases {
        let c = case["name"].as_str().unwrap();
        let decorrelated = case["method"] == "decorrelated";
        let guidance = match case["method"].as_str().unwrap() {
            "cfg" | "decorrelated" => Guidance::Cfg,
            "pag" => Guidance::Pag(PagParams {
                scale: case["pag_scale"].as_f64().unwrap(),
                adaptive_scale: 0.0,
                layers: serde_json::from_value(case["pag_applied_layers"].clone()).unwrap(),
            }),
            other => panic!("method {other}"),
        };
        let p = GenerateParams {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative"].as_str().unwrap().into(),
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance_scale"].as_f64().unwrap(),
            width: case["width"].as_u64().unwrap() as usize,
            height: case["height"].as_u64().unwrap() as usize,
            scheduler: sd.default_scheduler().unwrap(),
            guidance,
            karras: None,
            eta: 0.0,
            attention_slice: None,
            capture_tokens: vec![],
            text: if decorrelated {
                TextSide::Decorrelated(tuned.clone())
            } else {
                TextSide::Pretrained
            },
        };
        let seeds: Vec<u64> = serde_json::from_value(case["seeds"].clone()).unwrap();
        let out = sd.generate(&p, &seeds, &mut |_, _| true).unwrap();
        let ts: Vec<f64> = serde_json::from_value(case["timesteps"].clone()).unwrap();
        assert_eq!(out.timesteps, ts, "{c}: timesteps");
        let d_init = max_diff(out.init_latents, &refs, &format!("{c}.init_latents"));
        assert!(d_init <= 1e-6, "{c}: initial latents differ by {d_init}");

        let second = if decorrelated {
            tuned.model_2.as_ref().unwrap()
        } else {
            &xl.text_encoder
        };
        let (emb, pooled) = sd.encode_xl(&tuned.model, second, xl, &p.prompt).unwrap();
        let d_emb = max_diff(emb, &refs, &format!("{c}.prompt_embeds"));
        let d_pool = max_diff(pooled, &refs, &format!("{c}.pooled"));
        assert!(d_emb <= 1e-5, "{c}: prompt embeddings differ by {d_emb}");
        assert!(d_pool <= 1e-5, "{c}: pooled embeddings differ by {d_pool}");
        if p.guidance_scale > 1.0 {
            let key = format!("{c}.negative_prompt_embeds");
            if p.negative_prompt.is_empty() {
                assert!(refs[&key].1.iter().all(|&v| v == 0.0), "{c}: zeros");
            } else {
                let (neg, neg_pooled) = sd
                    .encode_xl(&sd.text_encoder, &xl.text_encoder, xl, &p.negative_prompt)
                    .unwrap();
                let d = max_diff(neg, &refs, &key);
                let d2 = max_diff(neg_pooled, &refs, &format!("{c}.negative_pooled"));
                assert!(
                    d <= 1e-5 && d2 <= 1e-5,
                    "{c}: negative embeddings {d}, {d2}"
                );
            }
        }
        let d_lat = max_diff(out.latents, &refs, &format!("{c}.latents_final"));
        let d_img = max_diff(
            out.images.permute([0, 2, 3, 1]),
            &refs,
            &format!("{c}.image"),
        );
        println!(
            "{c}: init {d_init:.1e}, embeds {d_emb:.1e}, pooled {d_pool:.1e}, final latents \
             {d_lat:.1e}, image {d_img:.1e}"
        );
        assert!(d_img <= 2.0 / 255.0, "{c}: image differs by {d_img}");
    }
}

/// What SDXL does not run yet is refused by name: Attend-and-Excite, a fine-tuned encoder.
#[test]
fn sdxl_refuses_what_it_does_not_run() {
    let sd = load();
    let p = GenerateParams {
        prompt: "rusty tracks with an old train".into(),
        negative_prompt: String::new(),
        steps: 2,
        guidance_scale: 7.5,
        width: 16,
        height: 16,
        scheduler: sd.default_scheduler().unwrap(),
        guidance: Guidance::AttendAndExcite(decorr_pipeline::ExciteParams {
            token_indices: vec![2, 6],
            attn_res: [4, 4],
            ..Default::default()
        }),
        karras: None,
        eta: 0.0,
        attention_slice: None,
        capture_tokens: vec![],
        text: Default::default(),
    };
    let e = sd.check(&p).unwrap_err().to_string();
    assert!(e.contains("Attend-and-Excite") && e.contains("SDXL"), "{e}");
    let e = sd
        .load_tuned_encoder(&fixtures().join("pipeline/tuned_text_encoder"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("SDXL"), "{e}");
}
