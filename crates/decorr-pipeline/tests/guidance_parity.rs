//! Parity of the compared methods with diffusers 0.42 on the tiny random models (fixtures by
//! tests/pyref/make_guidance_fixtures.py): `StableDiffusionPAGPipeline` (CFG and guidance 1,
//! the adaptive scale reaching its clamp, several `pag_applied_layers`, DDIM and PNDM) and
//! `StableDiffusionAttendAndExcitePipeline` (refinement at threshold positions,
//! `max_iter_to_alter` shorter than the run, DDIM and PNDM with its repeated timestep, a batch).
//! Per step: the latents the scheduler steps from and its result within 1e-4 of the largest
//! reference value; for Attend-and-Excite the loss of each step's first and last forward within
//! 1e-4 relative, the same number of refinement iterations and the same updates; the image
//! within 2/255.

// Tests read results back freely; clippy.toml keeps the library to decorr_core::readback.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use decorr_core::ModelSource;
use decorr_core::weights::{HostTensors, read_tensors_f32};
use decorr_pipeline::{
    ExciteParams, GenerateParams, Guidance, PagParams, StableDiffusion, TextSide,
};
use serde_json::Value;

mod common;
use common::{assemble, fixtures};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// max |ours − theirs| / max |theirs| over `theirs`' elements `offset..offset + ours.len()`.
fn rel_diff(ours: &[f32], theirs: &[f32]) -> f32 {
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
        / scale
}

fn params(case: &Value) -> GenerateParams {
    let mut pag = PagParams::default();
    let mut excite = ExciteParams::default();
    let method = case["method"].as_str().unwrap();
    match method {
        "pag" => {
            pag.scale = case["pag_scale"].as_f64().unwrap();
            pag.adaptive_scale = case["pag_adaptive_scale"].as_f64().unwrap();
            pag.layers = serde_json::from_value(case["pag_layers"].clone()).unwrap();
        }
        "attend-and-excite" | "aae" => {
            excite.token_indices = serde_json::from_value(case["token_indices"].clone()).unwrap();
            excite.max_iter_to_alter = case["max_iter_to_alter"].as_u64().unwrap() as usize;
            let th: BTreeMap<String, f64> =
                serde_json::from_value(case["thresholds"].clone()).unwrap();
            excite.thresholds = th
                .into_iter()
                .map(|(k, v)| (k.parse().unwrap(), v))
                .collect();
            excite.scale_factor = case["scale_factor"].as_f64().unwrap();
            excite.attn_res = serde_json::from_value(case["attn_res"].clone()).unwrap();
            excite.max_refinement_steps = case["max_refinement_steps"].as_u64().unwrap() as usize;
        }
        _ => panic!("unexpected method {method}"),
    }
    let guidance = if method == "pag" {
        Guidance::Pag(pag)
    } else {
        Guidance::AttendAndExcite(excite)
    };
    GenerateParams {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        width: case["width"].as_u64().unwrap() as usize,
        height: case["height"].as_u64().unwrap() as usize,
        scheduler: case["scheduler"].as_str().unwrap().parse().unwrap(),
        guidance,
        karras: None,
        eta: 0.0,
        attention_slice: None,
        capture_tokens: vec![],
        text: Default::default(),
    }
}

/// The reference `[T, B, ...]` tensor's step `i` as a flat vector.
fn step_of(refs: &HostTensors, key: &str, i: usize) -> Vec<f32> {
    let (shape, data) = &refs[key];
    let per = shape[1..].iter().product::<usize>();
    data[i * per..(i + 1) * per].to_vec()
}

#[test]
fn pag_and_attend_and_excite_match_diffusers() {
    let dir = assemble();
    let device = decorr_core::device_from_env();
    let sd = StableDiffusion::load(&ModelSource::Local(dir.path().to_path_buf()), &device).unwrap();
    let refs = read_tensors_f32(&fixtures().join("guidance/reference.safetensors")).unwrap();
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("guidance/cases.json")).unwrap(),
    )
    .unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 7, "PAG and AaE cases");
    let mut refined = 0;
    for case in cases {
        let c = case["name"].as_str().unwrap();
        let p = params(case);
        let seeds: Vec<u64> = serde_json::from_value(case["seeds"].clone()).unwrap();
        let mut trace = Vec::new();
        let out = sd
            .generate_traced(&p, &seeds, &mut |_, _| true, Some(&mut trace))
            .unwrap();
        let ts: Vec<f64> = serde_json::from_value(case["timesteps"].clone()).unwrap();
        assert_eq!(out.timesteps, ts, "{c}: timesteps");
        let (_, init) = &refs[&format!("{c}.init_latents")];
        let d = rel_diff(&values(out.init_latents.clone()), init);
        assert!(d <= 1e-6, "{c}: initial latents differ by {d}");

        let mut worst = 0f32;
        for (i, step) in trace.iter().enumerate() {
            if p.guidance.excite().is_some() {
                let d = rel_diff(
                    &values(step.input.clone()),
                    &step_of(&refs, &format!("{c}.aae_latents"), i),
                );
                assert!(
                    d <= 1e-4,
                    "{c}: step {i}: updated latents differ by {d} (relative)"
                );
                worst = worst.max(d);
            }
            let d = rel_diff(
                &values(step.output.clone()),
                &step_of(&refs, &format!("{c}.latents"), i),
            );
            assert!(d <= 1e-4, "{c}: step {i}: latents differ by {d} (relative)");
            worst = worst.max(d);
        }
        if let Some(excite) = p.guidance.excite() {
            let per_step = case["per_step"].as_array().unwrap();
            for st in per_step {
                let i = st["i"].as_u64().unwrap() as usize;
                for (image, r) in st["images"].as_array().unwrap().iter().enumerate() {
                    let iters = r["refinement_iters"].as_u64().unwrap() as usize;
                    let Some(ours) = out.excite.iter().find(|e| e.step == i && e.image == image)
                    else {
                        // diffusers' forward there is discarded; ours skips it.
                        assert!(
                            i >= excite.max_iter_to_alter
                                && !excite.thresholds.contains_key(&i)
                                && !r["updated"].as_bool().unwrap()
                                && iters == 0,
                            "{c}: no excite record at step {i} image {image}"
                        );
                        continue;
                    };
                    assert_eq!(
                        ours.refinement_iters, iters,
                        "{c}: step {i}: refinement iterations"
                    );
                    assert_eq!(
                        ours.updated,
                        r["updated"].as_bool().unwrap(),
                        "{c}: step {i}: update"
                    );
                    refined += iters;
                    for (key, v) in [("loss_first", ours.loss), ("loss_final", ours.loss_final)] {
                        let want = r[key].as_f64().unwrap();
                        let d = (v - want).abs() / want.abs().max(1e-3);
                        assert!(d <= 1e-4, "{c}: step {i}: {key} {v} vs {want}");
                    }
                }
            }
        }
        let img = values(out.images.clone().permute([0, 2, 3, 1]));
        let (_, want) = &refs[&format!("{c}.image")];
        let d_img = img
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{c}: per-step latents {worst:.1e} (relative), image {d_img:.1e}");
        assert!(d_img <= 2.0 / 255.0, "{c}: image differs by {d_img}");
    }
    assert!(refined > 0, "some case must run the refinement loop");
}

#[test]
fn bad_settings_name_what_exists() {
    let (_dir, sd) = common::tiny();
    let base = common::quick_params(&sd);
    let err = |p: GenerateParams| common::error_of(&sd, p);
    let e = err(GenerateParams {
        guidance: Guidance::Pag(PagParams {
            layers: vec!["down_blocks.7".into()],
            ..Default::default()
        }),
        ..base.clone()
    });
    assert!(
        e.contains("down_blocks.7")
            && e.contains("mid_block.attentions.0.transformer_blocks.0.attn1"),
        "{e}"
    );
    let e = err(GenerateParams {
        guidance: Guidance::Pag(PagParams {
            layers: vec!["mid(".into()],
            ..Default::default()
        }),
        ..base.clone()
    });
    assert!(e.contains("regular expression"), "{e}");
    let aae = |excite: ExciteParams| GenerateParams {
        guidance: Guidance::AttendAndExcite(excite),
        ..base.clone()
    };
    // 16x16 px: 8x8 latents; cross-attention at 8 (down 0, up 1) and 4 (mid).
    let e = err(aae(ExciteParams {
        token_indices: vec![2],
        ..Default::default()
    }));
    assert!(
        e.contains("--excite-attn-res 16") && e.contains("4, 8"),
        "{e}"
    );
    for bad in [0, 76] {
        let e = err(aae(ExciteParams {
            token_indices: vec![bad],
            attn_res: [8, 8],
            ..Default::default()
        }));
        assert!(
            e.contains(&format!("--excite-indices {bad}")) && e.contains("1..=75"),
            "{e}"
        );
    }
    let e = err(aae(ExciteParams {
        attn_res: [8, 8],
        ..Default::default()
    }));
    assert!(e.contains("--excite"), "{e}");
    let e = err(aae(ExciteParams {
        token_indices: vec![2],
        attn_res: [1, 1],
        ..Default::default()
    }));
    assert!(
        e.contains("--excite-attn-res 1") && e.contains("2x2"),
        "{e}"
    );
}

/// Composition: with the decorrelated text side, PAG with scale 0 is the decorrelated
/// guidance bit for bit (its conditional branch is the fine-tuned encoder's), and PAG differs
/// from PAG on the pre-trained encoder.
#[test]
fn pag_composes_and_scale_zero_is_cfg() {
    let (_dir, sd) = common::tiny();
    let tuned = sd
        .load_tuned_encoder(&fixtures().join("pipeline/tuned_text_encoder"))
        .unwrap();
    let base = GenerateParams {
        text: TextSide::Decorrelated(tuned),
        ..common::quick_params(&sd)
    };
    let run = |p: &GenerateParams| values(sd.generate(p, &[0], &mut |_, _| true).unwrap().latents);
    let cfg = run(&base);
    let pag0 = run(&GenerateParams {
        guidance: Guidance::Pag(PagParams {
            scale: 0.0,
            ..Default::default()
        }),
        ..base.clone()
    });
    assert_eq!(cfg, pag0);
    let pag = GenerateParams {
        guidance: Guidance::Pag(PagParams::default()),
        ..base.clone()
    };
    let with_tuned = run(&pag);
    let plain = sd
        .generate(
            &GenerateParams {
                text: TextSide::Pretrained,
                ..pag.clone()
            },
            &[0],
            &mut |_, _| true,
        )
        .unwrap()
        .latents;
    assert_ne!(
        with_tuned,
        values(plain),
        "the tuned encoder must reach PAG's conditional branch"
    );
}
