//! `decorr compare`: the pre-trained model, PAG, Attend-and-Excite and ours on the same seeds
//! for every prompt of a pairs file (the paper's table 3 and figure 6), in the folders
//! `decorr eval run` reads, with a grid per prompt and `index.html`. Parsing and printing only:
//! the run is `decorr_runs::compare`'s.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use decorr_runs::MethodKind;
use decorr_runs::compare::{CompareConfig, read_pairs};

use crate::generate::SampleArgs;
use crate::guidance_args::GuidanceArgs;
use crate::model_args::ModelArgs;
use crate::progress::Bar;
use crate::shard::Shard;

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Prompts with their object pairs: JSON lines such as
    /// {"prompt": "rusty tracks with an old train", "objects": ["tracks", "train"]}
    /// (the second object is the one that goes missing; `#` lines are comments).
    #[arg(long)]
    pairs: PathBuf,
    /// The methods, comma-separated: sd (pre-trained), pag, aae (Attend-and-Excite on the pair),
    /// ours (fine-tuned for the pair's second object, decorrelated guidance).
    #[arg(long, value_delimiter = ',', default_value = "sd,pag,aae,ours")]
    methods: Vec<MethodKind>,
    /// Seeds, as a range `A..B` (B excluded) or a list `1,5,9`; the same for every method.
    #[arg(long, default_value = "0..4")]
    seeds: String,
    #[command(flatten, next_help_heading = "Ours' fine-tuning (as decorr finetune)")]
    layers: crate::finetune::EncoderLayers,
    /// Epochs; each ends with a validation that may select it.
    #[arg(long, default_value_t = 20,
          value_parser = crate::flags::usize_in(1, crate::flags::MAX_EPOCHS),
          help_heading = "Ours' fine-tuning (as decorr finetune)")]
    epochs: usize,
    /// Optimiser steps per epoch.
    #[arg(long, default_value_t = 10,
          value_parser = crate::flags::usize_in(1, crate::flags::MAX_STEPS_PER_EPOCH),
          help_heading = "Ours' fine-tuning (as decorr finetune)")]
    steps_per_epoch: usize,
    /// Learning rate (a finite number > 0).
    #[arg(long, default_value_t = 1e-5, value_parser = crate::flags::positive,
          help_heading = "Ours' fine-tuning (as decorr finetune)")]
    lr: f64,
    /// AdamW's decoupled weight decay (a finite number >= 0).
    #[arg(long, default_value_t = 0.01, value_parser = crate::flags::non_negative_f32,
          help_heading = "Ours' fine-tuning (as decorr finetune)")]
    weight_decay: f32,
    /// Weight of L_align in the validation loss (a finite number >= 0).
    #[arg(long, default_value_t = 5.0, value_parser = crate::flags::non_negative,
          help_heading = "Ours' fine-tuning (as decorr finetune)")]
    tau: f64,
    /// Trained parameters: all, attn, qk.
    #[arg(
        long,
        default_value = "all",
        help_heading = "Ours' fine-tuning (as decorr finetune)"
    )]
    params: String,
    #[command(flatten)]
    sample: SampleArgs,
    #[command(flatten)]
    guidance: GuidanceArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Output folder (created; resumable).
    #[arg(long, value_parser = crate::flags::out_folder)]
    out: PathBuf,
    /// Make only shard K of N (0-based): the baselines' (prompt, seed) items j with j % N = K,
    /// and ours' fine-tuning and images of the prompts i with i % N = K.
    #[arg(long, value_name = "K/N", conflicts_with = "merge")]
    shard: Option<Shard>,
    /// Make nothing: check that every shard finished, write the manifests, grids and page.
    #[arg(long)]
    merge: bool,
}

pub fn run(args: CompareArgs) -> Result<()> {
    let seeds = crate::fix::parse_seeds(&args.seeds)?;
    if args.guidance.has_objects() {
        bail!("--excite/--excite-indices: compare excites each prompt's own objects, from --pairs");
    }
    let pairs = read_pairs(&args.pairs)?;
    let mut methods = Vec::new();
    for m in &args.methods {
        if !methods.contains(m) {
            methods.push(*m);
        }
    }
    let finetune = crate::finetune::FinetuneArgs::settings_of(
        0,
        args.epochs,
        args.steps_per_epoch,
        args.lr,
        args.weight_decay,
        args.tau,
        &args.params,
    )?;
    let mut config = CompareConfig {
        pairs,
        methods,
        seeds,
        sampling: args.sample.sampling(),
        pag: args.guidance.pag(),
        excite: args.guidance.excite_settings(),
        finetune,
        out: args.out.clone(),
        shard: args.shard,
        merge: args.merge,
    };
    // A run that failed before writing anything leaves no folder behind.
    crate::output::removed_if_failed_fresh(&args.out, || run_config(&args, &mut config))
}

fn run_config(args: &CompareArgs, config: &mut CompareConfig) -> Result<()> {
    let source = args.model.open()?;
    args.layers.apply(&source, &mut config.finetune)?;
    let config = &*config;
    // Decided before the checkpoint is loaded: a re-run continues exactly what OUT holds or
    // stops here, naming what differs.
    decorr_runs::compare::check_out(config, &source.describe())?;
    let device = args.model.device()?;
    let precision = args.model.precision(&device)?;
    let sd = decorr_runs::generate::load_pipeline(&source, &device, Some(precision))?;
    let outcome = decorr_runs::compare::run(config, sd, &source, &mut Bar::new(args.sample.quiet))?;
    let out = args.out.display();
    let names: Vec<&str> = config.methods.iter().map(|m| m.name()).collect();
    if let Some(s) = args.shard {
        println!(
            "shard {s}: {} images in {out}; once every shard is, run the same command with \
             --merge instead of --shard",
            outcome.images
        );
        return Ok(());
    }
    println!(
        "{} images of {} for {} prompt(s) in {out}; grids in {out}/grids, page {}",
        outcome.images,
        names.join(", "),
        config.pairs.len(),
        outcome
            .index
            .as_ref()
            .map_or_else(String::new, |p| p.display().to_string())
    );
    let runs: Vec<String> = outcome
        .eval_runs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    println!(
        "evaluate with: decorr eval run --runs {} --objects-file {} --captioner URL --out {out}/eval",
        runs.join(" "),
        outcome.objects_file.display()
    );
    Ok(())
}
