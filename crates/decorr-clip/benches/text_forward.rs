//! Benchmark: full-size SD 1.5 text encoder (random weights), forward of one 77-token prompt on
//! flex (or `DECORR_BACKEND`), median of N runs. Compare with `python ../shared/reference/pyref/bench.py text_fwd` run
//! on the same machine: `cargo bench -p decorr-clip --bench text_forward [-- RUNS]`.

use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use decorr_clip::{ClipTextConfig, ClipTextModel, ClipTokenizer, ForwardOptions};

fn main() {
    // The CLI's heap settings, so timings are the CLI's.
    decorr_core::memory::retain_freed_memory();
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    // DECORR_BACKEND picks another backend (tch, tch-cpu with --features decorr-core/tch).
    let device = decorr_core::device_from_env();
    device.seed(0);
    let model = ClipTextModel::new(&ClipTextConfig::sd15(), &device);
    let tok = ClipTokenizer::embedded()
        .encode("rusty tracks with an old train")
        .unwrap();
    let ids: Vec<i64> = tok.ids.iter().map(|&i| i as i64).collect();
    let input = || Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, 77]), &device);

    let time = |opts: &ForwardOptions| {
        let _ = model
            .forward_with(input(), opts)
            .last_hidden_state
            .map(|t| t.into_data());
        let mut v: Vec<f64> = (0..runs)
            .map(|_| {
                let t0 = Instant::now();
                let out = model.forward_with(input(), opts);
                let _ = out.last_hidden_state.expect("full pass").into_data();
                t0.elapsed().as_secs_f64()
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let plain = time(&ForwardOptions::default());
    let with_attn = time(&ForwardOptions {
        attention_layers: (0..12).collect(),
        ..Default::default()
    });
    println!(
        "text encoder forward 1x77 ({}, {runs} runs, median): {plain:.4} s",
        decorr_core::describe(&device)
    );
    println!("  ... returning all 12 attention maps:                 {with_attn:.4} s");
}
