//! Benchmark: one decorrelation fine-tuning step (forward to layer 11's attention, backward,
//! AdamW) on the full-size SD 1.5 text encoder with random weights, on flex (or `DECORR_BACKEND`), per parameter
//! preset; median over N steps. Compare with `python ../shared/reference/pyref/bench.py
//! text_train` on the same machine: `cargo bench -p decorr-trainer --bench train_step [-- N]
//! [all|attn|qk ...]` (every preset unless some are named).

use std::time::Instant;

use decorr_clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use decorr_trainer::{
    ParamPreset, TargetSpec, TrainConfig, TrainObserver, TrainPrompt, finetune, resolve_target,
};

/// Records when each step ends; the gaps are the step times.
struct Clock(Vec<Instant>);

impl TrainObserver for Clock {
    fn on_step(&mut self, _step: usize, _loss: f64) {
        self.0.push(Instant::now());
    }
}

fn main() {
    // The CLI's heap settings, so timings are the CLI's.
    decorr_core::memory::retain_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5);
    let mut presets: Vec<ParamPreset> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if presets.is_empty() {
        presets = vec![ParamPreset::All, ParamPreset::Attn, ParamPreset::Qk];
    }
    // DECORR_BACKEND picks another backend (tch, tch-cpu with --features decorr-core/tch).
    let device = decorr_core::device_from_env();
    device.seed(0);
    let tokenized = ClipTokenizer::embedded()
        .encode("rusty tracks with an old train")
        .unwrap();
    let target = resolve_target(&tokenized, &TargetSpec::word("train")).unwrap();
    let prompts = [TrainPrompt { tokenized, target }];
    for preset in presets {
        let model = ClipTextModel::new(&ClipTextConfig::sd15(), &device);
        let config = TrainConfig {
            epochs: 1,
            steps_per_epoch: runs + 1,
            params: preset,
            ..Default::default()
        };
        let mut clock = Clock(Vec::new());
        finetune(model, &prompts, &config, &device, &mut clock).unwrap();
        let mut gaps: Vec<f64> = clock
            .0
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        gaps.sort_by(f64::total_cmp);
        println!(
            "fine-tuning step, full-size SD 1.5 text encoder, preset {preset:?} ({}, median of {}): {:.4} s",
            decorr_core::describe(&device),
            gaps.len(),
            gaps[gaps.len() / 2]
        );
    }
}
