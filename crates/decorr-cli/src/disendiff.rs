//! `decorr disendiff`: trains DisenDiff (BASELINES.md section 3) for one prompt and its object
//! pair into OUT, in diffusers' Custom Diffusion format. Parsing and printing only: the run is
//! `decorr_runs::disendiff`'s, the method `decorr_disendiff`'s.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use decorr_disendiff::DisenDiffConfig;
use decorr_runs::disendiff::{DisenDiffJob, DisenDiffOutcome, Regularisation};

use crate::model_args::ModelArgs;
use crate::progress::Bar;

#[derive(Args, Debug)]
pub struct DisenDiffArgs {
    /// The prompt, without modifiers ("rusty tracks with an old train").
    #[arg(long)]
    prompt: String,
    /// The two objects, words of the prompt of one BPE token each (`tracks,train`).
    #[arg(long, value_delimiter = ',', required = true)]
    objects: Vec<String>,
    /// A folder of training images; without it the pre-trained model generates them for the
    /// prompt (the paper's setting), one per --seeds, into OUT/train_images.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Seeds of the generated training images: a range `0..8` or a list `1,5,9`.
    #[arg(long, default_value = "0..8", conflicts_with = "images")]
    seeds: String,
    /// Denoising steps of the generated training images (the checkpoint's scheduler, CFG 7.5).
    #[arg(long, default_value_t = 50, value_parser = crate::flags::usize_in(1, crate::flags::MAX_STEPS))]
    sample_steps: usize,
    /// Regularisation set: targets (the training images captioned with the plain prompt; our
    /// reading of a choice DisenDiff's paper leaves open) or none.
    #[arg(long, default_value = "targets")]
    reg: String,
    /// Optimiser steps of the whole training.
    #[arg(long, default_value_t = 250, value_parser = crate::flags::usize_in(1, 100_000))]
    max_train_steps: usize,
    /// Learning rate, constant (DisenDiff's recipe: 1e-5 x accumulation 4 x batch 2).
    #[arg(long, default_value_t = 8e-5, value_parser = crate::flags::positive)]
    lr: f64,
    /// Images per micro-step.
    #[arg(long, default_value_t = 2, value_parser = crate::flags::usize_in(1, 64))]
    batch_size: usize,
    /// Micro-steps whose gradients are summed into one optimiser step.
    #[arg(long, default_value_t = 4, value_parser = crate::flags::usize_in(1, 1024))]
    grad_accum: usize,
    /// Weight of the attention-calibration loss.
    #[arg(long, default_value_t = 0.01, value_parser = crate::flags::non_negative)]
    attn_weight: f64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.01, value_parser = crate::flags::non_negative_f32)]
    weight_decay: f32,
    /// Training image size in pixels.
    #[arg(long, default_value_t = 512, value_parser = crate::flags::usize_in(16, 2048))]
    resolution: usize,
    /// Side of the cross-attention maps L_attn reads (default: the second-smallest size the
    /// UNet's cross-attentions run at: SD 1.5's 16x16 layers at 512 px).
    #[arg(long, value_parser = crate::flags::usize_in(1, 1024))]
    map_resolution: Option<usize>,
    /// Seed of the data order, augmentation, timesteps and noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write OUT and a resumable state every this many optimiser steps.
    #[arg(long, default_value_t = 25, value_parser = crate::flags::usize_in(1, 100_000))]
    save_every: usize,
    #[command(flatten)]
    model: ModelArgs,
    /// Output folder: pytorch_custom_diffusion_weights.safetensors, <new1>.safetensors,
    /// <new2>.safetensors, report.json, losses.png/.svg. Running again resumes an unfinished run.
    #[arg(long, value_parser = crate::flags::out_folder)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: DisenDiffArgs) -> Result<()> {
    // A run that failed before writing anything leaves no folder behind.
    crate::output::removed_if_failed_fresh(&args.out.clone(), || run_locked(args))
}

fn run_locked(args: DisenDiffArgs) -> Result<()> {
    args.model.training_precision()?;
    let regularisation: Regularisation = args.reg.parse()?;
    if args.objects.len() != 2 {
        bail!("--objects takes exactly two words, e.g. --objects tracks,train");
    }
    let seeds = crate::fix::parse_seeds(&args.seeds)?;
    let source = args.model.open()?;
    let device = args.model.device()?;
    let _lock = crate::output::lock_output(&args.out, None, false)?;
    let job = DisenDiffJob {
        source: &source,
        device: &device,
        prompt: args.prompt.clone(),
        objects: args.objects.clone(),
        images: args.images.clone(),
        seeds,
        sample_steps: args.sample_steps,
        guidance_scale: decorr_runs::generate::DEFAULT_GUIDANCE_SCALE,
        regularisation,
        config: DisenDiffConfig {
            max_train_steps: args.max_train_steps,
            lr: args.lr,
            batch_size: args.batch_size,
            grad_accum: args.grad_accum,
            attn_weight: args.attn_weight,
            weight_decay: args.weight_decay,
            resolution: args.resolution,
            map_resolution: args.map_resolution,
            seed: args.seed,
            ..Default::default()
        },
        save_every: args.save_every,
        out: args.out.clone(),
    };
    let out = args.out.display();
    match decorr_runs::disendiff::run(job, &mut Bar::new(args.quiet))? {
        DisenDiffOutcome::Done {
            steps,
            resumed_from,
        } => {
            let resumed = if resumed_from > 0 {
                format!(" (resumed at step {resumed_from})")
            } else {
                String::new()
            };
            println!(
                "{steps} steps{resumed}; wrote {out}: the Custom Diffusion weights, <new1>/<new2>, \
                 report.json, losses.png/.svg. Sample with: decorr generate --disendiff {out} --prompt {:?}",
                args.prompt
            );
        }
        DisenDiffOutcome::Interrupted { steps } => {
            println!("interrupted: {out} holds step {steps}; run the same command to resume");
        }
        DisenDiffOutcome::AlreadyDone => println!("{out} is already finished"),
    }
    Ok(())
}
