//! `decorr generate`: text-to-image with CFG, the decorrelated guidance, PAG or
//! Attend-and-Excite. Each image is a PNG with its parameters inside, written atomically as
//! `seed-NNNNNN.png`; `manifest.json` lists every image of the folder. Re-running the same
//! command skips the images already there, so an interrupted run resumes; a folder made with
//! other parameters is refused. Several prompts get a folder each; `--shard K/N` generates one
//! share of the prompts x seeds (its own `manifest.shard-K-of-N.json`) and `--merge` joins the
//! shards' manifests once all are done. The folders themselves are `decorr_runs::generate`'s.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use decorr_runs::generate::{GenerateOutcome, GenerateRun, Manifest, Sampling};
use decorr_scheduler::SchedulerKind;

use crate::guidance_args::GuidanceArgs;
use crate::model_args::ModelArgs;
use crate::progress::Bar;
use crate::shard::Shard;

/// Sampling options shared by `generate` and `fix`.
#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
    /// Text to steer away from: the unconditional branch's prompt (empty: none, as SD's default).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Denoising steps (1 to 1000).
    #[arg(long, default_value_t = decorr_runs::generate::DEFAULT_STEPS,
          value_parser = crate::flags::usize_in(1, crate::flags::MAX_STEPS))]
    pub steps: usize,
    /// Guidance scale s (diffusers' convention; 1 or less turns guidance off; 0 to 1000).
    #[arg(long, default_value_t = decorr_runs::generate::DEFAULT_GUIDANCE_SCALE,
          value_parser = crate::flags::guidance_scale)]
    pub guidance_scale: f64,
    /// Image width in pixels (multiple of 8); default the UNet's sample size x 8 (512 for SD 1.5).
    #[arg(long, value_parser = crate::flags::usize_in(8, crate::flags::MAX_SIDE))]
    pub width: Option<usize>,
    /// Image height in pixels (multiple of 8); default as --width.
    #[arg(long, value_parser = crate::flags::usize_in(8, crate::flags::MAX_SIDE))]
    pub height: Option<usize>,
    /// ddim, pndm, euler, euler-a, dpmpp-2m, lms; default the checkpoint's own (PNDM for SD 1.5).
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// Karras sigmas (euler, dpmpp-2m, lms).
    #[arg(long)]
    pub karras: bool,
    /// DDIM's eta (0: deterministic; 0 to 1).
    #[arg(long, default_value_t = 0.0, value_parser = crate::flags::unit_interval)]
    pub eta: f64,
    /// Images per UNet batch (memory vs speed; images do not depend on it).
    #[arg(long, default_value_t = 1, value_parser = crate::flags::usize_in(1, crate::flags::MAX_BATCH))]
    pub batch_size: usize,
    /// Compute attention in slices of N (batch x head) rows to bound memory (GPU backends;
    /// on the CPU, attention already runs in blocks of query rows and ignores it).
    #[arg(long, value_parser = crate::flags::usize_in(1, u32::MAX as u64))]
    pub attention_slice: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl SampleArgs {
    /// The library's form of these options.
    pub fn sampling(&self) -> Sampling {
        Sampling {
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            width: self.width,
            height: self.height,
            scheduler: self.scheduler,
            karras: self.karras,
            eta: self.eta,
            batch_size: self.batch_size,
            attention_slice: self.attention_slice,
        }
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The prompt; repeat for several (each gets a folder `OUT/NNN-words-of-the-prompt`).
    #[arg(long = "prompt", required_unless_present = "prompts_file")]
    prompts: Vec<String>,
    /// A text file of prompts, one per line (blank lines and lines starting with # skipped).
    #[arg(long, conflicts_with = "prompts")]
    prompts_file: Option<PathBuf>,
    /// The fine-tuned encoder (`OUT/text_encoder` of `decorr finetune`). With it the guidance
    /// defaults to `decorrelated`; `--guidance cfg` then uses it for both branches.
    #[arg(long)]
    encoder: Option<PathBuf>,
    /// A DisenDiff output (`--out` of `decorr disendiff`, or diffusers' Custom Diffusion folder):
    /// its k/v weights go into the UNet and `<new1>`/`<new2>` into the text encoder, and each
    /// prompt is sampled with the modifiers before its objects (the prompt recorded is that one).
    #[arg(long, conflicts_with = "encoder", value_name = "OUT")]
    disendiff: Option<PathBuf>,
    /// cfg, decorrelated (the paper's Eq. 6), pag (perturbed-attention guidance) or
    /// attend-and-excite (also `aae`). With --encoder, pag and attend-and-excite take the
    /// conditional embedding from the fine-tuned encoder (methods ours+pag/+aae).
    #[arg(long)]
    guidance: Option<decorr_runs::generate::GuidanceName>,
    /// Seed of the first image; image k uses seed + k (torch.Generator("cpu").manual_seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per prompt, with seeds --seed, --seed + 1, ...
    #[arg(long, default_value_t = 1,
          value_parser = crate::flags::usize_in(1, crate::flags::MAX_IMAGES))]
    num_images: usize,
    /// Words whose cross-attention over the denoising steps is saved as `attention-SEED.png`.
    #[arg(long, value_delimiter = ',')]
    attention_maps: Vec<String>,
    /// How many steps the attention figure shows (evenly spaced, last included).
    #[arg(long, default_value_t = 6,
          value_parser = crate::flags::usize_in(1, crate::flags::MAX_STEPS))]
    attention_steps: usize,
    #[command(flatten)]
    sample: SampleArgs,
    #[command(flatten)]
    methods: GuidanceArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Output folder (created; resumable).
    #[arg(long, value_parser = crate::flags::out_folder)]
    out: PathBuf,
    /// Print the manifest as JSON on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Write the seconds of each phase to FILE (JSON: encode_s, step_s per denoising step,
    /// decode_s, total_s, summed over batches). The device is waited for after every step so
    /// the times are its own: for benchmarks, as this costs a little speed on a GPU.
    #[arg(long, value_name = "FILE")]
    timings: Option<PathBuf>,
    /// Generate only shard K of N (0-based K) of the prompts x seeds, for array jobs; its images
    /// are listed in `manifest.shard-K-of-N.json` until `--merge`.
    #[arg(long, value_name = "K/N", conflicts_with = "merge")]
    shard: Option<Shard>,
    /// Generate nothing: check that every shard finished and write each folder's
    /// `manifest.json` from the shards' manifests (run once, after the array job).
    #[arg(long)]
    merge: bool,
}

/// The prompts of a `generate` command, from `--prompt` or `--prompts-file`.
fn prompts_of(args: &GenerateArgs) -> Result<Vec<String>> {
    let prompts: Vec<String> = match &args.prompts_file {
        Some(path) => decorr_core::input::read_text(path, "a --prompts-file")?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect(),
        None => args.prompts.clone(),
    };
    if prompts.is_empty() {
        bail!("no prompt given: pass --prompt TEXT or a --prompts-file with one prompt per line");
    }
    if prompts.iter().any(|p| p.trim().is_empty()) {
        bail!("--prompt is empty; give the text to generate from");
    }
    Ok(prompts)
}

pub fn run(args: GenerateArgs) -> Result<()> {
    // A run that failed before writing anything leaves no folder behind.
    crate::output::removed_if_failed_fresh(&args.out.clone(), || run_locked(args))
}

fn run_locked(args: GenerateArgs) -> Result<()> {
    // Seeds first: --seed near 2^64 with several images must not wrap around to seed 0.
    let seeds = crate::flags::seed_range(args.seed, args.num_images)?;
    let prompts = prompts_of(&args)?;
    let source = args.model.open()?;
    let device = args.model.device()?;
    let job = GenerateRun {
        source: &source,
        device: &device,
        precision: args.model.precision(&device)?,
        prompts,
        seeds,
        out: args.out.clone(),
        encoder: args.encoder.clone(),
        disendiff: args.disendiff.clone(),
        guidance: args.guidance,
        sampling: args.sample.sampling(),
        pag: args.methods.pag(),
        excite: args.methods.excite_params(),
        excite_words: args.methods.excite.clone(),
        attention: Some((args.attention_maps.clone(), args.attention_steps)),
        shard: args.shard,
        merge: args.merge,
        timed: args.timings.is_some(),
    };
    let mut bar = Bar::new(args.sample.quiet);
    let (folders, method, precision) = match decorr_runs::generate::run(job, &mut bar)? {
        GenerateOutcome::Merged(manifests) => {
            let n: usize = manifests.iter().map(|m| m.images.len()).sum();
            println!(
                "merged: {n} images in {} folder(s) under {}",
                manifests.len(),
                args.out.display()
            );
            return Ok(());
        }
        GenerateOutcome::Generated {
            folders,
            method,
            precision,
        } => (folders, method, precision),
    };
    let mut all = Vec::new();
    for f in folders {
        if !args.json {
            println!(
                "{} images in {} ({method}, {} steps, {}, guidance {}); {} lists them",
                f.manifest.images.len(),
                f.dir.display(),
                f.params.steps,
                f.params.scheduler.name(),
                f.params.guidance_scale,
                f.manifest_name
            );
        }
        all.extend(f.manifest.images);
    }
    if let Some(path) = &args.timings {
        write_timings(path, &bar.timings, &args.model, precision)?;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Manifest { images: all })?
        );
    }
    if let Some(s) = args.shard {
        eprintln!(
            "shard {s} done; once every shard is, run the same command with --merge instead of --shard"
        );
    }
    Ok(())
}

/// `--timings FILE`: the phase times of every batch, summed (steps listed in order).
fn write_timings(
    path: &Path,
    batches: &[decorr_pipeline::Timings],
    model: &ModelArgs,
    precision: decorr_core::Precision,
) -> Result<()> {
    let sum = |f: fn(&decorr_pipeline::Timings) -> f64| batches.iter().map(f).sum::<f64>();
    let step_s: Vec<f64> = batches.iter().flat_map(|t| t.step_s.clone()).collect();
    let json = serde_json::json!({
        "backend": model.device.backend.to_string(),
        "dtype": precision.to_string(),
        "batches": batches.len(),
        "steps": batches.first().map_or(0, |t| t.step_s.len()),
        "encode_s": sum(|t| t.encode_s),
        "step_s": step_s,
        "decode_s": sum(|t| t.decode_s),
        "total_s": sum(|t| t.total_s),
    });
    decorr_core::io::write_atomic(path, serde_json::to_string_pretty(&json)?.as_bytes())
        .with_context(|| format!("--timings {}", path.display()))?;
    Ok(())
}
