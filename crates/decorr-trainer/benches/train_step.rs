//! Benchmark: one decorrelation fine-tuning step (forward to layer 11's attention, backward,
//! AdamW) on the full-size SD 1.5 text encoder with random weights, on flex (or `DECORR_BACKEND`), per parameter
//! preset; median over N steps. Compare with `python ../shared/reference/pyref/bench.py
//! text_train` on the same machine: `cargo bench -p decorr-trainer --bench train_step [-- N]
//! [all|attn|qk ...]` (every preset unless some are named).
//! `sdxl1`, `sdxl2` (or `sdxl`: both) fine-tune SDXL base's text encoders instead (CLIP-L, 12
//! layers of width 768; OpenCLIP bigG, 32 layers of width 1280 with its projection), each at
//! layer n-2, the one SDXL's UNet reads, tokenized as SDXL's tokenizers do (`tokenizer_2` pads
//! with `!`); compare with `python tests/pyref/bench_sdxl.py finetune 1|2 N`.
//! `DECORR_SDXL_CONFIGS=DIR` takes their configs from `DIR/text_encoder{,_2}/config.json` (a
//! diffusers folder, e.g. `tests/fixtures/sdxl_tiny` for a quick check).

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

/// One encoder to fine-tune: what to call it, its config, its tokenizer and layer.
struct Encoder {
    name: String,
    config: ClipTextConfig,
    tokenizer: ClipTokenizer,
    layer: usize,
}

/// SDXL base's encoder `n` (1 or 2), or the one of the diffusers folder `DECORR_SDXL_CONFIGS`
/// names, at layer n-2 (`hidden_states[-2]`, what SDXL's UNet reads).
fn sdxl_encoder(n: usize) -> Encoder {
    let folder = if n == 1 {
        "text_encoder"
    } else {
        "text_encoder_2"
    };
    let config = match std::env::var_os("DECORR_SDXL_CONFIGS") {
        Some(dir) => {
            let path = std::path::Path::new(&dir).join(folder).join("config.json");
            let config: ClipTextConfig =
                decorr_core::weights::read_json(&path, "a CLIP text-encoder config").unwrap();
            config.validate().unwrap();
            config
        }
        None if n == 1 => ClipTextConfig::sdxl_text_encoder(),
        None => ClipTextConfig::sdxl_text_encoder_2(),
    };
    let tokenizer = if n == 1 {
        ClipTokenizer::embedded()
    } else {
        ClipTokenizer::embedded().with_pad_token("!").unwrap()
    };
    let layer = config.num_hidden_layers - 2;
    Encoder {
        name: format!(
            "SDXL {folder} ({} layers, width {}, layer {layer})",
            config.num_hidden_layers, config.hidden_size
        ),
        config,
        tokenizer,
        layer,
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
    let mut encoders: Vec<Encoder> = Vec::new();
    for a in &args {
        match a.as_str() {
            "sdxl1" => encoders.push(sdxl_encoder(1)),
            "sdxl2" => encoders.push(sdxl_encoder(2)),
            "sdxl" => encoders.extend([sdxl_encoder(1), sdxl_encoder(2)]),
            _ => {}
        }
    }
    if encoders.is_empty() {
        encoders.push(Encoder {
            name: "full-size SD 1.5 text encoder".into(),
            config: ClipTextConfig::sd15(),
            tokenizer: ClipTokenizer::embedded(),
            layer: TrainConfig::default().layer,
        });
    }
    // DECORR_BACKEND picks another backend (tch, tch-cpu with --features decorr-core/tch).
    let device = decorr_core::device_from_env();
    device.seed(0);
    for encoder in &encoders {
        let tokenized = encoder
            .tokenizer
            .encode("rusty tracks with an old train")
            .unwrap();
        let target = resolve_target(&tokenized, &TargetSpec::word("train")).unwrap();
        let prompts = [TrainPrompt { tokenized, target }];
        for &preset in &presets {
            let model = ClipTextModel::new(&encoder.config, &device);
            let config = TrainConfig {
                layer: encoder.layer,
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
                "fine-tuning step, {}, preset {preset:?} ({}, median of {}): {:.4} s",
                encoder.name,
                decorr_core::describe(&device),
                gaps.len(),
                gaps[gaps.len() / 2]
            );
        }
    }
}
