//! Benchmark: one DisenDiff micro-step with its optimiser step (text encoder and UNet forward,
//! both losses, backward into the 32 k/v weights and the two rows, AdamW) at batch 2 on
//! full-size SD 1.5 with random weights at 256 px (32x32 latents), on flex (or
//! `DECORR_BACKEND`); median and minimum
//! over N steps, and the process's peak resident memory. Compare with
//! `python tests/pyref/bench_disendiff_step.py` on the same machine:
//! `cargo bench -p decorr-disendiff --bench train_step [-- N]`.

use std::time::Instant;

use burn::tensor::Tensor;
use decorr_clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use decorr_disendiff::tokens::{extend_tokenizer, initial_rows, place_modifiers};
use decorr_disendiff::{DisenDiffConfig, MicroBatch, Trainer};
use decorr_unet::{UNet2DConditionModel, UNetConfig};

/// Peak resident memory (`VmHWM`) in GiB, where /proc has it.
fn peak_rss_gib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / (1024.0 * 1024.0))
}

fn main() {
    decorr_core::memory::retain_freed_memory();
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    // DECORR_BACKEND picks another backend (tch-cpu, tch: `--features decorr-unet/tch`).
    let device = decorr_core::device_from_env();
    device.seed(0);
    let text = ClipTextModel::new(&ClipTextConfig::sd15(), &device);
    let unet = UNet2DConditionModel::new(&UNetConfig::sd15(), &device);
    let tok = ClipTokenizer::embedded();
    let objects = ["tracks".to_string(), "train".to_string()];
    let p = place_modifiers(&tok, "rusty tracks with an old train", &objects).unwrap();
    let (ext, ids) = extend_tokenizer(&tok, text.vocab_size()).unwrap();
    let rows = initial_rows(&text).unwrap();
    // SD 1.5's schedule (scaled linear 0.00085..0.012).
    let betas: Vec<f32> = (0..1000)
        .map(|i| {
            let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
            let x = a + (b - a) * i as f64 / 999.0;
            (x * x) as f32
        })
        .collect();
    let acp = decorr_scheduler::schedule::alphas_cumprod(&betas);
    let config = DisenDiffConfig {
        grad_accum: 1,
        resolution: 256,
        ..Default::default()
    };
    let mut tr = Trainer::new(unet, text, rows, ids, acp, [32, 32], &config, &device).unwrap();
    let captions = [p.caption.clone(), format!("a far away {}", p.caption)];
    let batch = MicroBatch {
        ids: captions
            .iter()
            .map(|c| ext.encode(c).unwrap().ids)
            .collect(),
        z0: Tensor::random(
            [2, 4, 32, 32],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        ),
        noise: Tensor::random(
            [2, 4, 32, 32],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        ),
        timesteps: vec![999, 500],
        mask: Tensor::ones([2, 32, 32], &device),
    };
    println!(
        "DisenDiff micro-step + AdamW, SD 1.5 random weights, batch 2, 32x32 latents, {}, {} threads",
        decorr_core::describe(&device),
        rayon::current_num_threads()
    );
    let mut times = Vec::new();
    for i in 0..runs + 1 {
        let t = Instant::now();
        let (l, _) = tr.micro_step(&batch).unwrap();
        let s = t.elapsed().as_secs_f64();
        println!(
            "  step {i}: {s:.2} s (loss {:.4}){}",
            l.total,
            if i == 0 { " warm-up" } else { "" }
        );
        if i > 0 {
            times.push(s);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "median {:.2} s, min {:.2} s, peak RSS {:.2} GiB",
        times[times.len() / 2],
        times[0],
        peak_rss_gib().unwrap_or(f64::NAN)
    );
}
