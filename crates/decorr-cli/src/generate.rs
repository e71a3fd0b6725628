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
use decorr_pipeline::{ExciteParams, GenerateParams, Guidance, StableDiffusion};
use decorr_runs::generate::{
    GenerateJob, MANIFEST, Manifest, Sampling, generate_into, merge, method_name, prompt_folders,
};
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
    #[arg(long, default_value_t = 50,
          value_parser = crate::flags::usize_in(1, crate::flags::MAX_STEPS))]
    pub steps: usize,
    /// Guidance scale s (diffusers' convention; 1 or less turns guidance off; 0 to 1000).
    #[arg(long, default_value_t = 7.5, value_parser = crate::flags::guidance_scale)]
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

/// The parameters of a generation run, resolved against the checkpoint (Attend-and-Excite's
/// `--excite` words against the prompt's tokens).
pub fn params(
    sd: &StableDiffusion,
    prompt: &str,
    s: &SampleArgs,
    g: &GuidanceArgs,
    guidance: Guidance,
) -> Result<GenerateParams> {
    let excite = if guidance == Guidance::AttendAndExcite {
        let tok = sd.tokenizer.encode(prompt)?;
        g.excite(&tok, &[])?
    } else {
        ExciteParams::default()
    };
    Ok(s.sampling()
        .params(sd, prompt, guidance, &g.pag(), &excite)?)
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
    /// conditional embedding from the fine-tuned encoder (methods decorrelated+pag/+aae).
    #[arg(long)]
    guidance: Option<Guidance>,
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

/// Loads the checkpoint (and the fine-tuned encoder) for `generate`/`fix`.
pub fn load(model: &ModelArgs, encoder: Option<&Path>) -> Result<StableDiffusion> {
    let source = &model.open()?;
    let device = model.device()?;
    let precision = model.precision(&device)?;
    Ok(decorr_runs::generate::load_pipeline(
        source,
        &device,
        encoder,
        Some(precision),
    )?)
}

pub fn run(args: GenerateArgs) -> Result<()> {
    // A run that failed before writing anything leaves no folder behind.
    crate::output::removed_if_failed_fresh(&args.out.clone(), || run_locked(args))
}

fn run_locked(args: GenerateArgs) -> Result<()> {
    // Seeds first: --seed near 2^64 with several images must not wrap around to seed 0.
    let seeds = crate::flags::seed_range(args.seed, args.num_images)?;
    let prompts = prompts_of(&args)?;
    let folders = prompt_folders(&args.out, &prompts);
    decorr_runs::generate::check_out_folder(&args.out)?;
    // One run at a time per output; the shards of an array job share the folder by design, so
    // each locks its own part, and --merge waits for none of them to be running.
    let _locks = crate::output::lock_output(&args.out, args.shard, args.merge)?;
    if args.merge {
        let manifests = merge(&folders, &seeds)?;
        let n: usize = manifests.iter().map(|m| m.images.len()).sum();
        println!(
            "merged: {n} images in {} folder(s) under {}",
            folders.len(),
            args.out.display()
        );
        return Ok(());
    }
    let guidance = args.guidance.unwrap_or(if args.encoder.is_some() {
        Guidance::Decorrelated
    } else {
        Guidance::Cfg
    });
    if args.methods.has_objects() && guidance != Guidance::AttendAndExcite {
        bail!(
            "--excite/--excite-indices name the objects of Attend-and-Excite; add \
             --guidance attend-and-excite (this run uses --guidance {guidance})"
        );
    }
    let mut sd = load(&args.model, args.encoder.as_deref())?;
    sd.timed = args.timings.is_some();
    let mut method = method_name(guidance, args.encoder.is_some());
    let mut prompts = prompts;
    if let Some(dir) = &args.disendiff {
        let delta = decorr_disendiff::read_out(dir)?;
        decorr_disendiff::apply_to_pipeline(&mut sd, &delta)
            .with_context(|| format!("--disendiff {}", dir.display()))?;
        prompts = prompts
            .iter()
            .map(|p| disendiff_prompt(&sd, &delta, p))
            .collect::<Result<_>>()?;
        method = "disendiff";
    }
    if guidance == Guidance::Cfg && args.encoder.is_some() {
        // One encoder for both branches: the fine-tuned one.
        let tuned = sd.tuned.as_ref().expect("loaded");
        sd.text_encoder = tuned.model.clone();
    }
    let attention = (!args.attention_maps.is_empty())
        .then_some((args.attention_maps.as_slice(), args.attention_steps));
    let manifest_name = match args.shard {
        Some(s) => format!("manifest.{}.json", s.tag()),
        None => MANIFEST.to_string(),
    };
    let mut all = Vec::new();
    let mut bar = Bar::new(args.sample.quiet);
    for (pi, (prompt, dir)) in prompts.iter().zip(&folders).enumerate() {
        let mine: Vec<u64> = seeds
            .iter()
            .enumerate()
            .filter(|(si, _)| args.shard.is_none_or(|s| s.owns(pi * seeds.len() + si)))
            .map(|(_, &seed)| seed)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let p = params(&sd, prompt, &args.sample, &args.methods, guidance)?;
        let job = GenerateJob {
            params: &p,
            method,
            seeds: &mine,
            batch_size: args.sample.batch_size,
            out: dir,
            attention,
            manifest_name: &manifest_name,
        };
        let manifest = generate_into(&sd, &job, &mut bar)?;
        if !args.json {
            println!(
                "{} images in {} ({method}, {} steps, {}, guidance {}); {manifest_name} lists them",
                manifest.images.len(),
                dir.display(),
                p.steps,
                p.scheduler.name(),
                p.guidance_scale
            );
        }
        all.extend(manifest.images);
    }
    if let Some(path) = &args.timings {
        write_timings(path, &bar.timings, &args.model, &sd)?;
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

/// The prompt DisenDiff samples for `prompt`: as given when it has the modifiers, the run's
/// sampling prompt for its own prompt, else the modifiers placed before the run's objects.
fn disendiff_prompt(
    sd: &StableDiffusion,
    delta: &decorr_disendiff::DeltaFiles,
    prompt: &str,
) -> Result<String> {
    if decorr_disendiff::MODIFIERS
        .iter()
        .all(|m| prompt.contains(m))
    {
        return Ok(prompt.to_string());
    }
    let Some(report) = &delta.report else {
        bail!(
            "this DisenDiff folder has no report.json naming its objects: write <new1> and <new2> \
             into --prompt before the objects"
        );
    };
    if prompt == report.prompt {
        return Ok(report.sampling_prompt.clone());
    }
    decorr_disendiff::tokens::place_in(&sd.tokenizer, prompt, &report.objects).ok_or_else(|| {
        anyhow::anyhow!(
            "--prompt {prompt:?} does not name both objects the delta was trained on ({} and \
             {}); name them, or write <new1>/<new2> into the prompt",
            report.objects[0],
            report.objects[1]
        )
    })
}

/// `--timings FILE`: the phase times of every batch, summed (steps listed in order).
fn write_timings(
    path: &Path,
    batches: &[decorr_pipeline::Timings],
    model: &ModelArgs,
    sd: &StableDiffusion,
) -> Result<()> {
    let sum = |f: fn(&decorr_pipeline::Timings) -> f64| batches.iter().map(f).sum::<f64>();
    let step_s: Vec<f64> = batches.iter().flat_map(|t| t.step_s.clone()).collect();
    let json = serde_json::json!({
        "backend": model.device.backend.to_string(),
        "dtype": sd.precision.to_string(),
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
