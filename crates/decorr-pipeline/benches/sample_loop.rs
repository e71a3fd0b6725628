//! Benchmark: one full image (text encoding, N DDIM steps with CFG at batch 2, VAE decode) on
//! flex (or `DECORR_BACKEND`) with random full-size SD 1.5 weights; seconds per step, total, peak RSS. Compare with
//! `python ../shared/reference/pyref/bench.py loop HW N` on the same machine:
//! `cargo bench -p decorr-pipeline --bench sample_loop -- HW [N] [cfg|pag|aae]` (HW: latent
//! size, 32 = 256 px). `pag` (scale 3, `mid`) and `aae` (tokens 2 and 6, the defaults) compare
//! with `python tests/pyref/bench_guidance.py pag|aae HW N` (diffusers' own pipelines).
//! `DECORR_BACKEND=wgpu` (built with `--features wgpu`) runs it on a GPU backend instead
//! (`tch`/`tch-cpu` with `--features tch`: LibTorch), and `DECORR_DTYPE=f16` in half precision.
//! `-- HW [N] sdxl` runs random SDXL base instead (both text encoders, the `text_time` UNet and
//! SDXL's VAE, their 3x3 convolution weights stored split per tap as loading stores them;
//! tokenizer_2 padding with `!`; SDXL's EulerDiscrete config), CFG at guidance 5, default 64 20
//! (512 px, 20 steps); compare with `python tests/pyref/bench_sdxl.py image HW N`
//! (diffusers' `StableDiffusionXLPipeline`). `DECORR_SDXL_CONFIGS=DIR` takes the configs from
//! the diffusers folder DIR (e.g. `tests/fixtures/sdxl_tiny` for a quick check).

// Tests read results back freely; clippy.toml keeps the library to decorr_core::readback.
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;
use decorr_clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use decorr_core::weights::read_json;
use decorr_pipeline::{GenerateParams, Guidance, StableDiffusion, XlText};
use decorr_scheduler::{SchedulerConfig, SchedulerKind};
use decorr_unet::{AutoencoderKL, UNet2DConditionModel, UNetConfig, VaeConfig};

fn peak_rss_gb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1e6)
}

/// SDXL base's scheduler config (EulerDiscrete, `leading` spacing, `steps_offset` 1).
const SDXL_SCHEDULER: &str =
    include_str!("../../decorr-convert/assets/sdxl/scheduler/scheduler_config.json");

/// Random SDXL with SDXL base's configs, or those of the diffusers folder `DECORR_SDXL_CONFIGS`
/// names; each UNet and VAE 3x3 convolution weight stored split per tap, as loading stores them.
fn random_sdxl(device: &Device) -> StableDiffusion {
    let dir = std::env::var_os("DECORR_SDXL_CONFIGS");
    let file = |component: &str, name: &str| {
        Path::new(dir.as_ref().expect("a folder"))
            .join(component)
            .join(name)
    };
    let (text_config, text_config_2, unet_config, vae_config, scheduler_config) = match &dir {
        None => (
            ClipTextConfig::sdxl_text_encoder(),
            ClipTextConfig::sdxl_text_encoder_2(),
            UNetConfig::sdxl(),
            VaeConfig::sdxl(),
            SchedulerConfig::from_json_str(SDXL_SCHEDULER).unwrap(),
        ),
        Some(_) => (
            read_json(&file("text_encoder", "config.json"), "a CLIP config").unwrap(),
            read_json(&file("text_encoder_2", "config.json"), "a CLIP config").unwrap(),
            read_json(&file("unet", "config.json"), "a UNet config").unwrap(),
            read_json(&file("vae", "config.json"), "a VAE config").unwrap(),
            SchedulerConfig::from_file(file("scheduler", "scheduler_config.json")).unwrap(),
        ),
    };
    let mut unet = UNet2DConditionModel::new(&unet_config, device);
    unet.store_conv_taps([unet_config.sample_size; 2]);
    let mut vae = AutoencoderKL::new(&vae_config, device);
    vae.store_conv_taps([vae_config.sample_size; 2]);
    StableDiffusion {
        tokenizer: ClipTokenizer::embedded(),
        text_encoder: ClipTextModel::new(&text_config, device),
        text_config,
        xl: Some(XlText {
            // SDXL base's tokenizer_2 pads with "!" after EOS.
            tokenizer: ClipTokenizer::embedded().with_pad_token("!").unwrap(),
            text_encoder: ClipTextModel::new(&text_config_2, device),
            text_config: text_config_2,
            force_zeros_for_empty_prompt: true,
        }),
        unet,
        unet_config,
        vae,
        vae_config,
        scheduler_config,
        model_id: "random sdxl".into(),
        device: device.clone(),
        precision: decorr_core::Precision::F32,
        timed: false,
    }
}

fn main() {
    // The CLI's heap settings, so timings are the CLI's.
    decorr_core::memory::retain_freed_memory();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.parse::<usize>().is_err() && !a.starts_with('-'))
        .collect();
    let sdxl = words.iter().any(|w| w == "sdxl");
    let hw = args.first().copied().unwrap_or(if sdxl { 64 } else { 32 });
    let steps = args.get(1).copied().unwrap_or(if sdxl { 20 } else { 50 });
    let guidance: Guidance = words
        .iter()
        .find(|w| *w != "sdxl")
        .map_or(Guidance::Cfg, |g| match g.as_str() {
            "cfg" => Guidance::Cfg,
            "pag" => Guidance::Pag(Default::default()),
            "aae" | "attend-and-excite" => {
                Guidance::AttendAndExcite(decorr_pipeline::ExciteParams {
                    token_indices: vec![2, 6],
                    ..Default::default()
                })
            }
            other => panic!("{other}: cfg, pag or aae"),
        });
    let device: Device = decorr_core::device_from_env();
    let backend = decorr_core::describe(&device);
    device.seed(0);
    let sd = if sdxl {
        random_sdxl(&device)
    } else {
        StableDiffusion {
            tokenizer: ClipTokenizer::embedded(),
            text_encoder: ClipTextModel::new(&ClipTextConfig::sd15(), &device),
            text_config: ClipTextConfig::sd15(),
            xl: None,
            unet: UNet2DConditionModel::new(&UNetConfig::sd15(), &device),
            unet_config: UNetConfig::sd15(),
            vae: AutoencoderKL::new(&VaeConfig::sd15(), &device),
            vae_config: VaeConfig::sd15(),
            scheduler_config: SchedulerConfig::sd15(),
            model_id: "random sd15".into(),
            device: device.clone(),
            precision: decorr_core::Precision::F32,
            timed: false,
        }
    }
    .with_precision(
        std::env::var("DECORR_DTYPE").map_or(decorr_core::Precision::F32, |d| {
            d.parse().expect("DECORR_DTYPE: f32, f16, bf16")
        }),
    );
    let p = GenerateParams {
        prompt: "rusty tracks with an old train".into(),
        negative_prompt: String::new(),
        steps,
        // diffusers' defaults: 7.5 for SD 1.5, 5 for SDXL (the time does not depend on it).
        guidance_scale: if sdxl { 5.0 } else { 7.5 },
        width: hw * 8,
        height: hw * 8,
        scheduler: if sdxl {
            SchedulerKind::Euler
        } else {
            SchedulerKind::Ddim
        },
        guidance: guidance.clone(),
        karras: None,
        eta: 0.0,
        attention_slice: None,
        capture_tokens: Vec::new(),
        text: Default::default(),
    };
    // Materialise the lazily initialised weights before timing.
    let _ = sd.generate(
        &GenerateParams {
            steps: 1,
            ..p.clone()
        },
        &[42],
        &mut |_, _| true,
    );
    let t0 = Instant::now();
    let mut marks = Vec::new();
    let g = sd
        .generate(&p, &[42], &mut |_, _| {
            marks.push(Instant::now());
            true
        })
        .expect("generation");
    let _ = g.images.into_data();
    let total = t0.elapsed().as_secs_f64();
    let mut per_step: Vec<f64> = marks
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    per_step.sort_by(f64::total_cmp);
    let median_step = per_step
        .get(per_step.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);
    if sdxl {
        println!(
            "SDXL {guidance}, Euler {steps} steps, {}x{} ({backend}): total {total:.3} s, median \
             step {median_step:.3} s, peak RSS {:.2} GB",
            hw * 8,
            hw * 8,
            peak_rss_gb()
        );
        return;
    }
    println!(
        "{guidance}, DDIM {steps} steps, {}x{} ({backend}): total {total:.1} s, median step {:.2} s, peak RSS {:.2} GB",
        hw * 8,
        hw * 8,
        median_step,
        peak_rss_gb()
    );
}
