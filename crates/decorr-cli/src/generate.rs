//! `decorr generate`: text-to-image with CFG or the decorrelated guidance. Each image is a PNG
//! with its parameters inside, written atomically as `seed-NNNNNN.png`; `manifest.json` lists
//! every image of the folder. Re-running the same command skips the images already there, so an
//! interrupted run resumes; a folder made with other parameters is refused. Several prompts get a
//! folder each; `--shard K/N` generates one share of the prompts x seeds (its own
//! `manifest.shard-K-of-N.json`) and `--merge` joins the shards' manifests once all are done.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use decorr_core::io::write_atomic;
use decorr_pipeline::png::{encode_rgb8, parameters_text};
use decorr_pipeline::{GenerateParams, Guidance, StableDiffusion, StepAttention, to_rgb8};
use decorr_scheduler::SchedulerKind;
use decorr_trainer::{TargetSpec, resolve_token};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::grid;
use crate::heatmap::png_bytes;
use crate::model_args::ModelArgs;
use crate::shard::Shard;

/// Sampling options shared by `generate` and `fix`.
#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
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
    #[arg(long, default_value_t = 1, value_parser = crate::flags::usize_in(1, 4096))]
    pub batch_size: usize,
    /// Compute attention in slices of N (batch x head) rows to bound memory (GPU backends;
    /// on the CPU, attention already runs in blocks of query rows and ignores it).
    #[arg(long, value_parser = crate::flags::usize_in(1, u32::MAX as u64))]
    pub attention_slice: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
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
    /// cfg or decorrelated (METHOD.md Eq. 6).
    #[arg(long)]
    guidance: Option<Guidance>,
    /// Seed of the first image; image k uses seed + k (torch.Generator("cpu").manual_seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
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
    model: ModelArgs,
    /// Output folder (created; resumable).
    #[arg(long)]
    out: PathBuf,
    /// Print the manifest as JSON on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Generate only shard K of N (0-based K) of the prompts x seeds, for array jobs; its images
    /// are listed in `manifest.shard-K-of-N.json` until `--merge`.
    #[arg(long, value_name = "K/N", conflicts_with = "merge")]
    shard: Option<Shard>,
    /// Generate nothing: check that every shard finished and write each folder's
    /// `manifest.json` from the shards' manifests (run once, after the array job).
    #[arg(long)]
    merge: bool,
}

/// One image's parameters, as the manifest and the PNG's `decorr` chunk record them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    pub file: String,
    pub seed: u64,
    #[serde(flatten)]
    pub run: RunRecord,
}

/// What every image of one folder shares.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    /// `sd` (pre-trained, CFG), `decorrelated` (Eq. 6) or `finetuned-cfg`.
    pub method: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub scheduler: String,
    pub guidance: String,
    pub guidance_scale: f64,
    pub width: usize,
    pub height: usize,
    pub karras: bool,
    pub eta: f64,
    pub model: String,
    /// SHA-256 of the fine-tuned encoder's weights, when one was used.
    pub encoder_sha256: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Manifest {
    pub images: Vec<ImageRecord>,
}

pub fn image_file(seed: u64) -> String {
    format!("seed-{seed:06}.png")
}

/// The manifest every finished folder has.
pub const MANIFEST: &str = "manifest.json";

/// Reads `dir/manifest.json` if present.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    read_manifest_file(&dir.join(MANIFEST))
}

/// Reads a manifest file if present (an empty manifest otherwise).
fn read_manifest_file(path: &Path) -> Result<Manifest> {
    if !path.exists() {
        return Ok(Manifest::default());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let text = decorr_core::io::strip_bom(&text);
    let manifest: Manifest = serde_json::from_str(text).with_context(|| {
        format!(
            "{} is not a decorr manifest; use another --out",
            path.display()
        )
    })?;
    // Entries may only name files inside the manifest's folder (a merge copies them into
    // manifest.json, which `eval run` reads).
    for image in &manifest.images {
        crate::paths::check_relative(path, &image.file)?;
    }
    Ok(manifest)
}

/// The parameters of a generation run, resolved against the checkpoint.
pub fn params(
    sd: &StableDiffusion,
    prompt: &str,
    s: &SampleArgs,
    guidance: Guidance,
) -> Result<GenerateParams> {
    // From the UNet config only when a flag is missing, and then named as a config key.
    let side = |flag: Option<usize>| flag.map_or_else(|| sd.default_side(), Ok);
    let (width, height) = (side(s.width)?, side(s.height)?);
    Ok(GenerateParams {
        prompt: prompt.to_string(),
        negative_prompt: s.negative_prompt.clone(),
        steps: s.steps,
        guidance_scale: s.guidance_scale,
        width,
        height,
        scheduler: match s.scheduler {
            Some(k) => k,
            None => sd.default_scheduler()?,
        },
        guidance,
        karras: s.karras.then_some(true),
        eta: s.eta,
        attention_slice: s.attention_slice,
        capture_tokens: Vec::new(),
    })
}

/// Generates `seeds` into `out` (skipping images already there), keeping the manifest
/// `manifest_name` (`manifest.json` unless sharded) in step. Returns that manifest.
#[allow(clippy::too_many_arguments)]
pub fn generate_into(
    sd: &StableDiffusion,
    p: &GenerateParams,
    method: &str,
    seeds: &[u64],
    s: &SampleArgs,
    out: &Path,
    attention: Option<(&[String], usize)>,
    manifest_name: &str,
) -> Result<Manifest> {
    sd.check(p)?;
    if s.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    // Before any folder or file is made: the largest batch this run will decode at once.
    sd.check_memory(p, s.batch_size.min(seeds.len().max(1)))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let run = RunRecord {
        method: method.to_string(),
        prompt: p.prompt.clone(),
        negative_prompt: p.negative_prompt.clone(),
        steps: p.steps,
        scheduler: p.scheduler.name().to_string(),
        guidance: serde_json::to_value(p.guidance)?
            .as_str()
            .unwrap_or("")
            .to_string(),
        guidance_scale: p.guidance_scale,
        width: p.width,
        height: p.height,
        karras: p.karras == Some(true),
        eta: p.eta,
        model: sd.model_id.clone(),
        encoder_sha256: sd.tuned.as_ref().map(|t| t.sha256.clone()),
    };
    let manifest_path = out.join(manifest_name);
    let mut manifest = read_manifest_file(&manifest_path)?;
    // A sharded run also checks against the merged manifest a finished run may have left.
    for other in [&manifest, &read_manifest(out)?] {
        if let Some(other) = other.images.first().map(|i| &i.run) {
            same_run(other, &run, out)?;
        }
    }

    let mut p = p.clone();
    let tokens = match attention {
        Some((words, _)) if !words.is_empty() => {
            let tok = sd.tokenizer.encode(&p.prompt)?;
            let mut idx = Vec::new();
            for w in words {
                let spec: TargetSpec = w.parse()?;
                // Any word of the prompt, the first one too: a map only shows cross-attention.
                idx.push(
                    resolve_token(&tok, &spec).with_context(|| format!("--attention-maps {w}"))?,
                );
            }
            p.capture_tokens = idx;
            words.to_vec()
        }
        _ => Vec::new(),
    };

    let record = |seed: u64| ImageRecord {
        file: image_file(seed),
        seed,
        run: run.clone(),
    };
    // An image already there counts as done only if it decodes whole and its own record is this
    // run's; anything else (truncated, another prompt's, edited) is made again.
    let mut todo = Vec::new();
    for &seed in seeds {
        let path = out.join(image_file(seed));
        if !path.exists() {
            todo.push(seed);
        } else if let Err(why) = check_image(&path, &record(seed)) {
            eprintln!("{}: {why}; making it again", path.display());
            manifest.images.retain(|i| i.seed != seed);
            todo.push(seed);
        }
    }
    let skipped = seeds.len() - todo.len();
    if skipped > 0 {
        eprintln!(
            "{}: {skipped} of {} images already there, skipped",
            out.display(),
            seeds.len()
        );
    }
    let bar = if s.quiet || todo.is_empty() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(todo.len() as u64).with_style(
            ProgressStyle::with_template(
                "{prefix} {bar:30} {pos}/{len} images {elapsed_precise} eta {eta} {msg}",
            )
            .expect("valid template"),
        )
    };
    bar.set_prefix(method.to_string());
    // Images present from an interrupted run get their entry back.
    for &seed in seeds {
        if !todo.contains(&seed) && !manifest.images.iter().any(|i| i.seed == seed) {
            manifest.images.push(record(seed));
        }
    }
    crate::interrupt::install();
    for batch in todo.chunks(s.batch_size) {
        let g = sd.generate(&p, batch, &mut |done, total| {
            bar.set_message(format!("step {done}/{total}"));
            !crate::interrupt::requested()
        });
        let g = match g {
            Err(decorr_pipeline::PipelineError::Interrupted) => {
                bar.finish_and_clear();
                write_manifest(&manifest_path, &mut manifest)?;
                bail!(
                    "interrupted: {} holds {} finished images; the same command resumes",
                    out.display(),
                    manifest.images.len()
                );
            }
            g => g?,
        };
        for (k, (w, h, rgb)) in to_rgb8(&g.images).into_iter().enumerate() {
            let seed = batch[k];
            let rec = record(seed);
            let params_text = parameters_text(&p, seed, &sd.model_id);
            let json = serde_json::to_string(&rec)?;
            let bytes = encode_rgb8(
                w,
                h,
                &rgb,
                &[("parameters", &params_text), ("decorr", &json)],
            )?;
            if !tokens.is_empty() {
                let fig = attention_figure(
                    &g.attention,
                    k,
                    &tokens,
                    attention.map_or(6, |a| a.1),
                    &p.prompt,
                    seed,
                );
                write_atomic(
                    &out.join(format!("attention-{seed:06}.png")),
                    &png_bytes(&fig),
                )?;
            }
            write_atomic(&out.join(&rec.file), &bytes)?;
            manifest.images.retain(|i| i.seed != seed);
            manifest.images.push(rec);
            bar.inc(1);
        }
        write_manifest(&manifest_path, &mut manifest)?;
    }
    bar.finish_and_clear();
    write_manifest(&manifest_path, &mut manifest)?;
    Ok(manifest)
}

/// Whether the PNG at `path` is a whole image made by the run `rec` describes: it decodes, has
/// the run's size, and its `decorr` chunk is `rec`. The reason when not.
fn check_image(path: &Path, rec: &ImageRecord) -> std::result::Result<(), String> {
    let chunks = decorr_pipeline::png::read_text_chunks(path).map_err(|e| e.to_string())?;
    let Some((_, json)) = chunks.iter().find(|(k, _)| k == "decorr") else {
        return Err("it has no decorr record, so decorr did not make it".into());
    };
    let theirs: ImageRecord = serde_json::from_str(json)
        .map_err(|e| format!("its decorr record does not parse ({e})"))?;
    if theirs.seed != rec.seed || theirs.file != rec.file {
        return Err(format!("its record says seed {}", theirs.seed));
    }
    if theirs.run != rec.run {
        return Err(format!(
            "it was made with other parameters (differing: {})",
            differing(&theirs.run, &rec.run).join(", ")
        ));
    }
    let img = image::open(path).map_err(|e| format!("it does not decode ({e})"))?;
    if (img.width() as usize, img.height() as usize) != (rec.run.width, rec.run.height) {
        return Err(format!(
            "it is {}x{}, not {}x{}",
            img.width(),
            img.height(),
            rec.run.width,
            rec.run.height
        ));
    }
    Ok(())
}

fn write_manifest(path: &Path, manifest: &mut Manifest) -> Result<()> {
    manifest.images.sort_by_key(|i| i.seed);
    write_atomic(path, serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    Ok(())
}

/// Refuses to mix images of two parameter sets in one folder, naming what differs.
fn same_run(existing: &RunRecord, run: &RunRecord, out: &Path) -> Result<()> {
    if existing == run {
        return Ok(());
    }
    bail!(
        "{} holds images made with other parameters (differing: {}); use another --out",
        out.display(),
        differing(existing, run).join(", ")
    );
}

/// The fields in which two runs' records differ.
fn differing(a: &RunRecord, b: &RunRecord) -> Vec<String> {
    let (a, b) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    a.as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| b.get(k.as_str()) != Some(v))
        .map(|(k, _)| k.clone())
        .collect()
}

/// The prompts of a `generate` command, from `--prompt` or `--prompts-file`.
fn prompts_of(args: &GenerateArgs) -> Result<Vec<String>> {
    let prompts: Vec<String> = match &args.prompts_file {
        Some(path) => decorr_core::io::strip_bom(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading --prompts-file {}", path.display()))?,
        )
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

/// Where each prompt's images go: OUT itself for one prompt, `OUT/NNN-words` for several.
pub fn prompt_folders(out: &Path, prompts: &[String]) -> Vec<PathBuf> {
    if prompts.len() == 1 {
        return vec![out.to_path_buf()];
    }
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut slug = String::new();
            for c in p.to_lowercase().chars() {
                if c.is_ascii_alphanumeric() {
                    slug.push(c);
                } else if !slug.ends_with('-') {
                    slug.push('-');
                }
            }
            let slug: String = slug.trim_matches('-').chars().take(48).collect();
            out.join(format!("{i:03}-{}", slug.trim_end_matches('-')))
        })
        .collect()
}

/// `--merge`: every folder's shard manifests joined into `manifest.json`, after checking that
/// each expected image is there; missing ones are named with the shard that owes them.
fn merge(folders: &[PathBuf], seeds: &[u64]) -> Result<Vec<Manifest>> {
    let mut merged = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    let mut counts = std::collections::BTreeSet::new();
    for (pi, dir) in folders.iter().enumerate() {
        let mut by_seed: BTreeMap<u64, ImageRecord> = read_manifest(dir)?
            .images
            .into_iter()
            .map(|i| (i.seed, i))
            .collect();
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("{} does not exist; run the shards first", dir.display()))?;
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let Some(tag) = name
                .strip_prefix("manifest.shard-")
                .and_then(|t| t.strip_suffix(".json"))
            else {
                continue;
            };
            if let Some((_, n)) = tag.split_once("-of-") {
                counts.insert(n.to_string());
            }
            for img in read_manifest_file(&dir.join(&name))?.images {
                if let Some(first) = by_seed.values().next() {
                    same_run(&first.run, &img.run, dir)?;
                }
                by_seed.insert(img.seed, img);
            }
        }
        for (si, seed) in seeds.iter().enumerate() {
            let present = by_seed.contains_key(seed) && dir.join(image_file(*seed)).exists();
            if !present {
                missing.push(format!(
                    "{} seed {seed} (work item {})",
                    dir.display(),
                    pi * seeds.len() + si
                ));
            }
        }
        by_seed.retain(|s, _| seeds.contains(s));
        merged.push((
            dir.clone(),
            Manifest {
                images: by_seed.into_values().collect(),
            },
        ));
    }
    if counts.len() > 1 {
        bail!(
            "the folders hold manifests of different shard counts ({}); rerun with one --shard K/N count",
            counts.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    if !missing.is_empty() {
        let hint = match counts.iter().next().and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => format!(" (work item j belongs to shard j % {n}); rerun those shards"),
            None => "; run the shards (--shard K/N) first".to_string(),
        };
        bail!(
            "{} of {} images are missing, nothing merged{hint}:\n  {}",
            missing.len(),
            folders.len() * seeds.len(),
            missing
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
    let mut out = Vec::new();
    for (dir, mut manifest) in merged {
        write_manifest(&dir.join(MANIFEST), &mut manifest)?;
        out.push(manifest);
    }
    Ok(out)
}

/// Rows: the words; columns: `shown` evenly spaced steps (last included).
fn attention_figure(
    steps: &[StepAttention],
    image: usize,
    words: &[String],
    shown: usize,
    prompt: &str,
    seed: u64,
) -> image::RgbImage {
    let n = steps.len();
    let shown = shown.clamp(1, n.max(1));
    let picks: Vec<usize> = (0..shown)
        .map(|j| {
            if shown == 1 {
                n - 1
            } else {
                j * (n - 1) / (shown - 1)
            }
        })
        .collect();
    let cols: Vec<String> = picks
        .iter()
        .map(|&i| format!("step {} (t={:.0})", i + 1, steps[i].timestep))
        .collect();
    let cells: Vec<Vec<image::RgbImage>> = (0..words.len())
        .map(|w| {
            picks
                .iter()
                .map(|&i| grid::heat(&steps[i].maps[image][w], steps[i].height, steps[i].width))
                .collect()
        })
        .collect();
    grid::labelled(
        &format!("cross-attention over the denoising: \"{prompt}\", seed {seed}"),
        words,
        &cols,
        &cells,
        96,
    )
}

/// Loads the checkpoint (and the fine-tuned encoder) for `generate`/`fix`.
pub fn load(model: &ModelArgs, encoder: Option<&Path>) -> Result<StableDiffusion> {
    let source = &model.open()?;
    let device = model.device()?;
    let sd = StableDiffusion::load(source, &device).with_context(|| {
        format!(
            "loading the Stable Diffusion checkpoint {}",
            source.describe()
        )
    })?;
    Ok(match encoder {
        Some(dir) => sd.with_tuned_encoder(dir)?,
        None => sd,
    })
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let out = args.out.clone();
    let fresh = !out.exists();
    let result = run_locked(args);
    // A run that failed before writing anything leaves no folder behind.
    if result.is_err() && fresh {
        crate::output::remove_if_empty(&out);
    }
    result
}

fn run_locked(args: GenerateArgs) -> Result<()> {
    // Seeds first: --seed near 2^64 with several images must not wrap around to seed 0.
    let seeds = crate::flags::seed_range(args.seed, args.num_images)?;
    let prompts = prompts_of(&args)?;
    let folders = prompt_folders(&args.out, &prompts);
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
    let mut sd = load(&args.model, args.encoder.as_deref())?;
    let method = match (guidance, args.encoder.is_some()) {
        (Guidance::Decorrelated, _) => "decorrelated",
        (Guidance::Cfg, true) => {
            // One encoder for both branches: the fine-tuned one.
            let tuned = sd.tuned.as_ref().expect("loaded");
            sd.text_encoder = tuned.model.clone();
            "finetuned-cfg"
        }
        (Guidance::Cfg, false) => "sd",
    };
    let attention = (!args.attention_maps.is_empty())
        .then_some((args.attention_maps.as_slice(), args.attention_steps));
    let manifest_name = match args.shard {
        Some(s) => format!("manifest.{}.json", s.tag()),
        None => MANIFEST.to_string(),
    };
    let mut all = Vec::new();
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
        let p = params(&sd, prompt, &args.sample, guidance)?;
        let manifest = generate_into(
            &sd,
            &p,
            method,
            &mine,
            &args.sample,
            dir,
            attention,
            &manifest_name,
        )?;
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
