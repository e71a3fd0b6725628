//! Benchmark: full-size SD 1.5 UNet forward (batch 2, 77-token context) and VAE decode with
//! random weights on flex (or `DECORR_BACKEND`); median of N runs after one warm-up, and the process's peak RSS.
//! Compare with `python ../shared/reference/pyref/bench.py unet|vae HW` on the same machine:
//! `cargo bench -p decorr-unet --bench unet -- unet|vae HW [N]` (HW: latent size, 64 or 32);
//! `conv HW N [C]` times one 3x3 convolution (its weight as built, then stored split per tap as
//! loading stores it) and one group norm + SiLU (C channels, default 320),
//! `attn HW N [C]` one self- and one cross-attention, `convgrad HW N [C [CI]]` one 3x3
//! convolution and its input gradient (`decorr_unet::host_autodiff`'s backward).
//! `DECORR_HOST_KERNELS=0` runs burn's own flex kernels instead of decorr's host fast paths.
//! `sdxl HW N` times one call of the SDXL base UNet (random weights, 3x3 convolution weights
//! stored split per tap as loading stores them) at batch 2 (CFG's batch), then at batch 1, with
//! `forward_added`: context `[B, 77, 2048]`, pooled text embeds `[B, 1280]`, the six time ids of a
//! `8 HW` px image; compare with `python tests/pyref/bench_sdxl.py unet HW N`.
//! `DECORR_SDXL_CONFIGS=DIR` takes the UNet config from `DIR/unet/config.json` (a diffusers
//! folder, e.g. `tests/fixtures/sdxl_tiny` for a quick check) instead of SDXL base's.

use std::time::Instant;

use burn::tensor::{Distribution, Tensor, TensorData};
use decorr_unet::{
    AddedConditions, AttentionOptions, AutoencoderKL, UNet2DConditionModel, UNetConfig, VaeConfig,
};

fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn peak_rss_gb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1e6)
}

/// CPU seconds (user + system) this process has used: on a shared machine a steadier measure
/// of the work done than wall time.
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

fn time(n: usize, mut f: impl FnMut()) -> f64 {
    f();
    let cpu = cpu_s();
    let t = median(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    println!("  ({:.3} CPU s per run)", (cpu_s() - cpu) / n as f64);
    t
}

/// SDXL base's UNet config, or `unet/config.json` of the diffusers folder `DECORR_SDXL_CONFIGS`
/// names.
fn sdxl_config() -> UNetConfig {
    let Some(dir) = std::env::var_os("DECORR_SDXL_CONFIGS") else {
        return UNetConfig::sdxl();
    };
    let path = std::path::Path::new(&dir).join("unet").join("config.json");
    let config: UNetConfig =
        decorr_core::weights::read_json(&path, "a diffusers UNet config").unwrap();
    config.validate().unwrap();
    config
}

fn main() {
    // The CLI's heap settings, so timings are the CLI's.
    decorr_core::memory::retain_freed_memory();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mode = args.first().map_or("unet", String::as_str).to_string();
    let hw: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    // DECORR_BACKEND picks another backend (tch-cpu, tch: `--features decorr-unet/tch`).
    let device = decorr_core::device_from_env();
    device.seed(0);
    let normal = Distribution::Normal(0.0, 1.0);
    let t = match mode.as_str() {
        "unet" => {
            let unet = UNet2DConditionModel::new(&UNetConfig::sd15(), &device);
            let x = Tensor::<4>::random([2, 4, hw, hw], normal, &device);
            let ctx = Tensor::<3>::random([2, 77, 768], normal, &device);
            time(n, || {
                let y = unet.forward(x.clone(), &[981.0, 981.0], &ctx);
                let _ = y.into_data();
            })
        }
        // SDXL's UNet at batch 2 (CFG's batch) and at batch 1: the batch-2 time is the one
        // returned (the last line), each batch's on a line of its own.
        "sdxl" => {
            let config = sdxl_config();
            let mut unet = UNet2DConditionModel::new(&config, &device);
            // One copy of the convolution weights, split per tap as `load_unet` leaves them (at
            // the config's sample size, as it does): no second, cached copy (flex only).
            unet.store_conv_taps([config.sample_size; 2]);
            let dims = unet
                .text_time_dims()
                .expect("an SDXL (text_time) UNet config");
            let pooled = dims.input_dim - 6 * dims.time_embed_dim;
            let width = config.cross_attention_dim.get(0);
            let px = (hw * 8) as f32;
            let run = |b: usize| {
                let x = Tensor::<4>::random([b, config.in_channels, hw, hw], normal, &device);
                let ctx = Tensor::<3>::random([b, 77, width], normal, &device);
                let added = AddedConditions {
                    text_embeds: Tensor::random([b, pooled], normal, &device),
                    time_ids: Tensor::from_data(
                        TensorData::new([px, px, 0.0, 0.0, px, px].repeat(b), [b, 6]),
                        &device,
                    ),
                };
                let timesteps = vec![981.0; b];
                let opts = AttentionOptions::default();
                let t = time(n, || {
                    let y = unet
                        .forward_added(x.clone(), &timesteps, &ctx, Some(&added), &opts)
                        .unwrap()
                        .sample;
                    let _ = y.into_data();
                });
                println!(
                    "sdxl unet call, batch {b}, {hw}x{hw} ({}, median of {n}): {t:.3} s",
                    decorr_core::describe(&device)
                );
                t
            };
            let t = run(2);
            run(1);
            t
        }
        "vae" => {
            let vae = AutoencoderKL::new(&VaeConfig::sd15(), &device);
            let z = Tensor::<4>::random([1, 4, hw, hw], normal, &device);
            time(n, || {
                let _ = vae.decode(z.clone(), None).into_data();
            })
        }
        // Where the UNet's time goes: one 3x3 convolution and one group norm + SiLU of a level
        // (320 channels at hw x hw, batch 2, unless asked), each alone.
        "conv" => {
            let c: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(320);
            let conv = decorr_unet::blocks::conv(c, c, 3, &device);
            let x = Tensor::<4>::random([2, c, hw, hw], normal, &device);
            let t = time(n, || {
                let _ = decorr_unet::host::conv2d(&conv, x.clone()).into_data();
            });
            // The weight stored split per tap (as loading leaves it), read in place.
            let mut stored = conv.clone();
            decorr_unet::host::store_taps(&mut stored, [hw, hw]);
            let s = time(n, || {
                let _ = decorr_unet::host::conv2d(&stored, x.clone()).into_data();
            });
            println!("conv, weight stored split per tap {hw}x{hw}: {s:.4} s");
            let norm = decorr_unet::blocks::group_norm(32, c, 1e-5, &device);
            let g = time(n, || {
                let _ = decorr_unet::host::group_norm(&norm, x.clone(), true).into_data();
            });
            println!("group norm + SiLU {hw}x{hw}: {g:.4} s");
            t
        }
        // One 3x3 convolution's forward and its input gradient, as training runs them
        // (batch 2, C channels out, CI in; default C).
        "convgrad" => {
            let c: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(320);
            let ci: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(c);
            let conv = decorr_unet::blocks::conv(ci, c, 3, &device);
            let x = Tensor::<4>::random([2, ci, hw, hw], normal, &device);
            let xs = x.into_data().try_into_vec::<f32>().unwrap();
            let dy = Tensor::<4>::random([2, c, hw, hw], normal, &device);
            let dys = dy.into_data().try_into_vec::<f32>().unwrap();
            let w = conv
                .weight
                .val()
                .try_into_primitive::<burn::backend::Flex>()
                .ok()
                .unwrap();
            let t = time(n, || {
                let _ = decorr_unet::host::conv3x3_cached(&xs, &w, None, [2, ci, hw, hw], c, 1);
            });
            let g = time(n, || {
                let _ = decorr_unet::host::conv3x3_input_grad(&dys, &w, [2, ci, hw, hw], c, 1);
            });
            println!("input gradient {hw}x{hw}: {g:.4} s");
            t
        }
        // The attention of a level alone (batch 2, hw x hw query pixels, C channels in 8
        // heads, default 320): self-attention, then cross-attention to 77 tokens.
        "attn" => {
            let c: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(320);
            let attn = decorr_unet::attention::Attention::new(c, c, 8, c / 8, false, &device);
            let cross = decorr_unet::attention::Attention::new(c, 768, 8, c / 8, false, &device);
            let x = Tensor::<3>::random([2, hw * hw, c], normal, &device);
            let ctx = Tensor::<3>::random([2, 77, 768], normal, &device);
            let t = time(n, || {
                let _ = attn.forward(x.clone(), None, None, false).0.into_data();
            });
            let t2 = time(n, || {
                let _ = cross
                    .forward(x.clone(), Some(&ctx), None, false)
                    .0
                    .into_data();
            });
            println!("cross-attention {hw}x{hw}: {t2:.4} s");
            t
        }
        // The feed-forward's linear maps of a level alone (C to 8C, 4C to C).
        "linear" => {
            let c: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(320);
            let up = burn::nn::LinearConfig::new(c, 8 * c).init(&device);
            let down = burn::nn::LinearConfig::new(4 * c, c).init(&device);
            let x = Tensor::<3>::random([2, hw * hw, c], normal, &device);
            let h = Tensor::<3>::random([2, hw * hw, 4 * c], normal, &device);
            let t = time(n, || {
                let _ = decorr_unet::host::linear(&up, x.clone()).into_data();
            });
            let t2 = time(n, || {
                let _ = decorr_unet::host::linear(&down, h.clone()).into_data();
            });
            println!("linear {}->{c}: {t2:.4} s", 4 * c);
            t
        }
        // Attend-and-Excite's gradient pass: batch 1 under autodiff up to the last cross-attention
        // at a quarter of the latent size, then the gradient of one map entry w.r.t. the latent.
        "grad" => {
            let unet = UNet2DConditionModel::new(&UNetConfig::sd15(), &device);
            let x = Tensor::<4>::random([1, 4, hw, hw], normal, &device);
            let ctx = Tensor::<3>::random([1, 77, 768], normal, &device);
            let sites: Vec<String> = unet
                .attention_sites([hw, hw])
                .into_iter()
                .filter(|s| s.cross && s.height == hw / 4)
                .map(|s| s.path)
                .collect();
            let opts = decorr_unet::AttentionOptions {
                capture_cross: decorr_unet::Capture::Prefixes(sites.clone()),
                ..Default::default()
            };
            let last = sites
                .last()
                .expect("a quarter-size cross-attention")
                .clone();
            let mut fwd = Vec::new();
            let t = time(n, || {
                let t0 = Instant::now();
                let leaf = x.clone().autodiff().require_grad();
                let maps = unet.cross_attention_until(leaf.clone(), &[981.0], &ctx, &opts, &last);
                let y = maps
                    .into_iter()
                    .map(|m| m.probs.narrow(1, 5, 1).narrow(2, 3, 1).reshape([1]))
                    .reduce(|a, b| a + b)
                    .unwrap();
                let _ = y.clone().inner().into_data();
                fwd.push(t0.elapsed().as_secs_f64());
                let g = leaf.grad(&y.backward()).unwrap();
                let _ = g.inner().into_data();
            });
            let plain = time(n, || {
                let _ = unet.forward(x.clone(), &[981.0], &ctx).into_data();
            });
            println!(
                "grad pass {hw}x{hw} batch 1: forward under autodiff {:.3} s; plain full forward \
                 {plain:.3} s",
                median(fwd)
            );
            t
        }
        other => panic!("unknown mode {other}: unet, sdxl, vae, conv, attn, linear or grad"),
    };
    println!(
        "{mode} {hw}x{hw} ({}, median of {n}): {t:.3} s, peak RSS {:.2} GB",
        decorr_core::describe(&device),
        peak_rss_gb()
    );
}
