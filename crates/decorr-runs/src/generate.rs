//! Generation runs on disk: one folder per prompt and method, each image a PNG
//! (`seed-NNNNNN.png`) with its parameters inside, written atomically, and `manifest.json`
//! listing them; resumable (images already there are checked and skipped) and shardable
//! (`manifest.shard-K-of-N.json`, then [`merge`]). What `decorr generate`, `decorr fix` and
//! `decorr compare` write, and what `decorr eval run` reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use decorr_clip::Tokenized;
use decorr_core::io::write_atomic;
use decorr_pipeline::png::{encode_rgb8, parameters_text};
use decorr_pipeline::{
    ExciteParams, ExciteStep, GenerateParams, Guidance, PagParams, StableDiffusion, StepAttention,
    TextSide, to_rgb8,
};
use decorr_scheduler::SchedulerKind;
use decorr_trainer::{MethodError, TargetSpec, resolve_token};
use serde::{Deserialize, Serialize};

use crate::bail;
use crate::error::{Context, Result, RunsError};
use crate::grid;
use crate::heatmap::png_bytes;
use crate::method::{Method, current_name};
use crate::progress::Progress;

/// What `--guidance` names: the sampling-side method, with `decorrelated` for the Eq. 6
/// pairing (which needs `--encoder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuidanceName {
    Cfg,
    Decorrelated,
    Pag,
    AttendAndExcite,
}

impl std::fmt::Display for GuidanceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuidanceName::Cfg => "cfg",
            GuidanceName::Decorrelated => "decorrelated",
            GuidanceName::Pag => "pag",
            GuidanceName::AttendAndExcite => "attend-and-excite",
        })
    }
}

impl std::str::FromStr for GuidanceName {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cfg" => Ok(GuidanceName::Cfg),
            "decorrelated" => Ok(GuidanceName::Decorrelated),
            "pag" => Ok(GuidanceName::Pag),
            "attend-and-excite" | "aae" => Ok(GuidanceName::AttendAndExcite),
            other => Err(format!(
                "unknown guidance `{other}`; expected cfg, decorrelated, pag or attend-and-excite"
            )),
        }
    }
}

/// The sampling options of a run (what `generate`'s flags set), before they are resolved
/// against a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Default: the UNet's sample size x the VAE's factor.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Default: the checkpoint's own.
    pub scheduler: Option<SchedulerKind>,
    pub karras: bool,
    pub eta: f64,
    /// Images per UNet batch.
    pub batch_size: usize,
    pub attention_slice: Option<usize>,
}

/// The sampling settings that decide the images, as `fix.json` and `compare.json` record them
/// (the flags' names; the scheduler by name, `None` for the checkpoint's own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingRecord {
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub scheduler: Option<String>,
    pub karras: bool,
    pub eta: f64,
}

impl From<&Sampling> for SamplingRecord {
    fn from(s: &Sampling) -> Self {
        SamplingRecord {
            negative_prompt: s.negative_prompt.clone(),
            steps: s.steps,
            guidance_scale: s.guidance_scale,
            width: s.width,
            height: s.height,
            scheduler: s.scheduler.map(|k| k.name().to_string()),
            karras: s.karras,
            eta: s.eta,
        }
    }
}

/// Stable Diffusion's usual guidance scale (diffusers' default), the default of every command.
pub const DEFAULT_GUIDANCE_SCALE: f64 = 7.5;

/// Denoising steps by default (diffusers' default).
pub const DEFAULT_STEPS: usize = 50;

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            negative_prompt: String::new(),
            steps: DEFAULT_STEPS,
            guidance_scale: DEFAULT_GUIDANCE_SCALE,
            width: None,
            height: None,
            scheduler: None,
            karras: false,
            eta: 0.0,
            batch_size: 1,
            attention_slice: None,
        }
    }
}

impl Sampling {
    /// The parameters of generating `prompt` with `method`, resolved against the checkpoint.
    pub fn params(
        &self,
        sd: &StableDiffusion,
        prompt: &str,
        method: &Method,
    ) -> Result<GenerateParams> {
        // From the UNet config only when a flag is missing, and then named as a config key.
        let side = |flag: Option<usize>| flag.map_or_else(|| sd.default_side(), Ok);
        let (width, height) = (side(self.width)?, side(self.height)?);
        Ok(GenerateParams {
            prompt: prompt.to_string(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            width,
            height,
            scheduler: match self.scheduler {
                Some(k) => k,
                None => sd.default_scheduler()?,
            },
            guidance: method.guidance(),
            text: method.text(),
            karras: self.karras.then_some(true),
            eta: self.eta,
            attention_slice: self.attention_slice,
            capture_tokens: Vec::new(),
        })
    }
}

/// Loads the Stable Diffusion checkpoint of `source` on `device` (the one loader of every
/// command that samples or trains on the pipeline), in the sampling precision when given
/// (fine-tuning keeps f32). Says on stderr what it loads, as that takes seconds to minutes.
pub fn load_pipeline(
    source: &decorr_core::ModelSource,
    device: &burn::tensor::Device,
    precision: Option<decorr_core::Precision>,
) -> Result<StableDiffusion> {
    eprintln!(
        "loading {} (text encoder, UNet, VAE) ...",
        source.describe()
    );
    let sd = StableDiffusion::load(source, device).with_context(|| {
        format!(
            "loading the Stable Diffusion checkpoint {}",
            source.describe()
        )
    })?;
    Ok(match precision {
        Some(p) => sd.with_precision(p),
        None => sd,
    })
}

/// The token index of each of `words` in the prompt `tok`, as `--attention-maps` and `--target`
/// resolve a word (its last BPE token; `word#N`, `@index`). Every word that is not in the prompt
/// is named in one error, with the prompt's words.
pub fn excite_indices(tok: &Tokenized, words: &[String]) -> Result<Vec<usize>> {
    let mut indices = Vec::new();
    let mut missing = Vec::new();
    for w in words {
        let w = w.trim();
        let spec: TargetSpec = w.parse().expect("infallible");
        match resolve_token(tok, &spec) {
            Ok(i) => indices.push(i),
            Err(MethodError::TargetNotInPrompt { .. }) => missing.push(w.to_string()),
            Err(e) => return Err(e).with_context(|| format!("--excite {w}")),
        }
    }
    if !missing.is_empty() {
        let words: Vec<&str> = tok.words.iter().map(|w| w.text.as_str()).collect();
        bail!(
            "--excite: {} {} not in the prompt {:?}; its words are: {}",
            missing
                .iter()
                .map(|m| format!("`{m}`"))
                .collect::<Vec<_>>()
                .join(", "),
            if missing.len() == 1 { "is" } else { "are" },
            tok.prompt,
            words.join(", ")
        );
    }
    Ok(indices)
}

/// One generation run into a folder.
pub struct GenerateJob<'a> {
    pub params: &'a GenerateParams,
    /// The method's name in the manifest ([`Method::name`]).
    pub method: &'a str,
    pub seeds: &'a [u64],
    /// Images per UNet batch.
    pub batch_size: usize,
    pub out: &'a Path,
    /// Words whose cross-attention figure is saved per image, and how many steps it shows.
    pub attention: Option<(&'a [String], usize)>,
    /// `manifest.json`, or a shard's `manifest.shard-K-of-N.json`.
    pub manifest_name: &'a str,
}

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
    /// `sd` (pre-trained, CFG), `pag`, `aae`, `ours` (Eq. 6), `disendiff`, `finetuned-cfg`, or
    /// the compositions `ours+pag`, `ours+aae` ([`Method::name`]); older names are read as
    /// today's (`decorrelated` is `ours`).
    #[serde(deserialize_with = "method_from_json")]
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
    /// The precision the text encoder and UNet ran in (`--dtype`; f32 in older manifests).
    #[serde(default = "f32_name")]
    pub dtype: String,
    /// SHA-256 of the fine-tuned encoder's weights, when one was used.
    pub encoder_sha256: Option<String>,
    /// PAG's settings (`--guidance pag` only; absent in older manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pag: Option<PagParams>,
    /// Attend-and-Excite's settings, token indices included (`--guidance attend-and-excite`
    /// only; absent in older manifests).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "excite_from_json"
    )]
    pub excite: Option<ExciteParams>,
}

fn method_from_json<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<String, D::Error> {
    String::deserialize(d).map(|m| current_name(&m))
}

fn f32_name() -> String {
    "f32".into()
}

/// `excite` through a JSON value: inside the flattened record serde buffers the map, and its
/// buffered keys (`"0"`, `"10"`) no longer parse as the thresholds' integer positions.
fn excite_from_json<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<ExciteParams>, D::Error> {
    let v: Option<serde_json::Value> = Option::deserialize(d)?;
    v.map(|v| serde_json::from_value(v).map_err(serde::de::Error::custom))
        .transpose()
}

/// The Attend-and-Excite log of one image (`excite-NNNNNN.json` beside it).
#[derive(Debug, Serialize, Deserialize)]
pub struct ExciteLog {
    pub seed: u64,
    pub token_indices: Vec<usize>,
    /// The tokens at those indices, as the tokenizer wrote them.
    pub tokens: Vec<String>,
    pub steps: Vec<ExciteLogStep>,
}

/// One denoising step of [`ExciteLog`].
#[derive(Debug, Serialize, Deserialize)]
pub struct ExciteLogStep {
    /// Position in the scheduler's timesteps (what the thresholds count).
    pub step: usize,
    /// The loss at the step's first forward.
    pub loss: f64,
    /// Iterative-refinement updates at this step (0: none ran).
    pub refinement_iters: usize,
    /// The loss the final update used.
    pub loss_final: f64,
    /// Whether the one-step update was applied.
    pub updated: bool,
}

/// The side file of an Attend-and-Excite image.
pub fn excite_file(seed: u64) -> String {
    format!("excite-{seed:06}.json")
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
pub fn read_manifest_file(path: &Path) -> Result<Manifest> {
    if !decorr_core::input::exists_at_all(path) {
        return Ok(Manifest::default());
    }
    let text = decorr_core::input::read_text(path, "a manifest")?;
    let manifest: Manifest = serde_json::from_str(&text).with_context(|| {
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
pub fn run_record(sd: &StableDiffusion, p: &GenerateParams, method: &str) -> RunRecord {
    // The guidance recorded for the decorrelated text side is the Eq. 6 pairing's name (what
    // manifests have always said).
    let guidance = match (&p.text, &p.guidance) {
        (TextSide::Decorrelated(_), Guidance::Cfg) => "decorrelated",
        (_, g) => g.name(),
    };
    RunRecord {
        method: method.to_string(),
        prompt: p.prompt.clone(),
        negative_prompt: p.negative_prompt.clone(),
        steps: p.steps,
        scheduler: p.scheduler.name().to_string(),
        guidance: guidance.to_string(),
        guidance_scale: p.guidance_scale,
        width: p.width,
        height: p.height,
        karras: p.karras == Some(true),
        eta: p.eta,
        model: sd.model_id.clone(),
        dtype: sd.precision.to_string(),
        encoder_sha256: p.text.tuned().map(|t| t.sha256.clone()),
        pag: p.guidance.pag().cloned(),
        excite: p.guidance.excite().cloned(),
    }
}

/// Refuses an existing `--out` that is not a `decorr generate` output: a run writes only into a
/// new or empty folder or one holding nothing but what generate writes (images, attention
/// figures, Attend-and-Excite logs, manifests, prompt folders `NNN-...` of the same), so that
/// `--out .` or another command's output folder is never filled with images, manifests and
/// locks.
pub fn check_out_folder(out: &Path) -> Result<()> {
    let Some(names) = crate::output::contents(out)? else {
        return Ok(());
    };
    /// Whether `name` is `PREFIX` + digits + `SUFFIX`.
    fn numbered(name: &str, prefix: &str, suffix: &str) -> bool {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(suffix))
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    }
    let generated = |n: &str| {
        n == MANIFEST
            || (n.starts_with("manifest.shard-") && n.ends_with(".json"))
            || numbered(n, "seed-", ".png")
            || numbered(n, "attention-", ".png")
            || numbered(n, "excite-", ".json")
    };
    let prompt_folder = |n: &str| {
        let b = n.as_bytes();
        b.len() > 4 && b[..3].iter().all(u8::is_ascii_digit) && b[3] == b'-'
    };
    let foreign = |dir: &Path, n: &str| -> Option<String> {
        if generated(n) {
            return None;
        }
        let sub = dir.join(n);
        if prompt_folder(n) && sub.is_dir() {
            let inner = crate::output::contents(&sub).ok().flatten()?;
            return inner
                .into_iter()
                .find(|m| !generated(m))
                .map(|m| format!("{n}/{m}"));
        }
        Some(n.to_string())
    };
    if let Some(name) = names.iter().find_map(|n| foreign(out, n)) {
        bail!(
            "{} already holds {name}, which decorr generate does not write, so it is not a \
             generate output folder; choose a new or empty --out (or the folder of an earlier \
             generate run to continue it)",
            out.display()
        );
    }
    Ok(())
}

/// Refuses, before anything is generated, a folder whose images were made with other
/// parameters than `run` (naming the fields that differ).
pub fn check_folder(out: &Path, run: &RunRecord, manifest_name: &str) -> Result<()> {
    for other in [
        &read_manifest_file(&out.join(manifest_name))?,
        &read_manifest(out)?,
    ] {
        if let Some(other) = other.images.first().map(|i| &i.run) {
            same_run(other, run, out)?;
        }
    }
    Ok(())
}

/// Generates the job's seeds into its folder (skipping images already there), keeping its
/// manifest in step. Returns that manifest. A stop request ([`Progress::should_stop`]) ends the
/// run at the next denoising step with [`RunsError::Interrupted`]; finished images stay.
pub fn generate_into(
    sd: &StableDiffusion,
    job: &GenerateJob,
    progress: &mut dyn Progress,
) -> Result<Manifest> {
    let GenerateJob {
        params: p,
        method,
        seeds,
        batch_size,
        out,
        attention,
        manifest_name,
    } = *job;
    sd.check(p)?;
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    // Before any folder or file is made: the largest batch this run will decode at once.
    sd.check_memory(p, batch_size.min(seeds.len().max(1)))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let run = run_record(sd, p, method);
    let manifest_path = out.join(manifest_name);
    // A sharded run also checks against the merged manifest a finished run may have left.
    check_folder(out, &run, manifest_name)?;
    let mut manifest = read_manifest_file(&manifest_path)?;

    let mut p = p.clone();
    let tokens = match attention {
        Some((words, _)) if !words.is_empty() => {
            let tok = sd.tokenizer.encode(&p.prompt)?;
            let mut idx = Vec::new();
            for w in words {
                let spec: TargetSpec = w.parse().expect("infallible");
                // Any word of the prompt, the first one too: a map only shows cross-attention.
                idx.push(
                    resolve_token(&tok, &spec).with_context(|| format!("--attention-maps {w}"))?,
                );
            }
            // Rows are labelled by the token's word; an `@index` keeps its index beside it.
            let labels = words
                .iter()
                .zip(&idx)
                .map(|(w, &i)| {
                    if w.trim_start().starts_with('@') {
                        format!("{} ({})", tok.token_text(i), w.trim())
                    } else {
                        w.clone()
                    }
                })
                .collect();
            p.capture_tokens = idx;
            labels
        }
        _ => Vec::new(),
    };

    let record = |seed: u64| ImageRecord {
        file: image_file(seed),
        seed,
        run: run.clone(),
    };
    // The files written beside each image (before it), which pages link: a seed whose image is
    // there but one of these is not is made again.
    let side_files = |seed: u64| {
        let mut files = Vec::new();
        if !tokens.is_empty() {
            files.push(format!("attention-{seed:06}.png"));
        }
        if p.guidance.excite().is_some() {
            files.push(excite_file(seed));
        }
        files
    };
    // An image already there counts as done only if it decodes whole, its own record is this
    // run's and its side files are there; anything else (truncated, another prompt's, edited,
    // a deleted map) is made again.
    let mut todo = Vec::new();
    for &seed in seeds {
        let path = out.join(image_file(seed));
        if !path.exists() {
            todo.push(seed);
            continue;
        }
        let why = check_image(&path, &record(seed)).err().or_else(|| {
            side_files(seed)
                .into_iter()
                .find(|f| !out.join(f).is_file())
                .map(|f| format!("{f} beside it is missing"))
        });
        if let Some(why) = why {
            progress.note(&format!("{}: {why}; making it again", path.display()));
            manifest.images.retain(|i| i.seed != seed);
            todo.push(seed);
        }
    }
    let skipped = seeds.len() - todo.len();
    if skipped > 0 {
        progress.note(&format!(
            "{}: {skipped} of {} images already there, skipped",
            out.display(),
            seeds.len()
        ));
    }
    // Images present from an interrupted run get their entry back.
    for &seed in seeds {
        if !todo.contains(&seed) && !manifest.images.iter().any(|i| i.seed == seed) {
            manifest.images.push(record(seed));
        }
    }
    if !todo.is_empty() {
        progress.begin(method, todo.len() as u64, "images");
    }
    for batch in todo.chunks(batch_size) {
        let g = sd.generate(&p, batch, &mut |done, total| {
            progress.message(&step_message(done, total, p.steps));
            !progress.should_stop()
        });
        let g = match g {
            Err(decorr_pipeline::PipelineError::Interrupted) => {
                progress.end();
                write_manifest(&manifest_path, &mut manifest)?;
                return Err(RunsError::Interrupted(format!(
                    "interrupted: {} holds {} finished images; the same command resumes",
                    out.display(),
                    manifest.images.len()
                )));
            }
            g => g?,
        };
        progress.timings(&g.timings);
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
            if p.guidance.excite().is_some() {
                let log = excite_log(sd, &p, seed, k, &g.excite)?;
                write_atomic(
                    &out.join(excite_file(seed)),
                    serde_json::to_string_pretty(&log)?.as_bytes(),
                )?;
            }
            write_atomic(&out.join(&rec.file), &bytes)?;
            manifest.images.retain(|i| i.seed != seed);
            manifest.images.push(rec);
            progress.advance(1);
        }
        write_manifest(&manifest_path, &mut manifest)?;
    }
    if !todo.is_empty() {
        progress.end();
    }
    write_manifest(&manifest_path, &mut manifest)?;
    Ok(manifest)
}

/// The progress line of a denoising loop: `step 3/10`, or, where the scheduler calls the UNet
/// more often than `--steps` (PNDM's warm-up: 10 steps make 11 calls), which count it is.
pub fn step_message(done: usize, total: usize, steps: usize) -> String {
    if total == steps {
        format!("step {done}/{total}")
    } else {
        format!("UNet call {done}/{total} ({steps} steps)")
    }
}

/// Whether the PNG at `path` is a whole image made by the run `rec` describes: it decodes, has
/// the run's size, and its `decorr` chunk is `rec`. The reason when not.
fn check_image(path: &Path, rec: &ImageRecord) -> std::result::Result<(), String> {
    decorr_core::input::check_regular(path, "an image").map_err(|e| e.to_string())?;
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
    let bytes =
        decorr_core::input::read_image_bytes(path, "an image").map_err(|e| e.to_string())?;
    let img = image::load_from_memory(&bytes).map_err(|e| format!("it does not decode ({e})"))?;
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

/// Image `k`'s steps of an Attend-and-Excite run.
fn excite_log(
    sd: &StableDiffusion,
    p: &GenerateParams,
    seed: u64,
    k: usize,
    steps: &[ExciteStep],
) -> Result<ExciteLog> {
    let tok = sd.tokenizer.encode(&p.prompt)?;
    let indices = p
        .guidance
        .excite()
        .map(|e| e.token_indices.clone())
        .unwrap_or_default();
    Ok(ExciteLog {
        seed,
        tokens: indices.iter().map(|&i| tok.token_text(i)).collect(),
        token_indices: indices,
        steps: steps
            .iter()
            .filter(|s| s.image == k)
            .map(|s| ExciteLogStep {
                step: s.step,
                loss: s.loss,
                refinement_iters: s.refinement_iters,
                loss_final: s.loss_final,
                updated: s.updated,
            })
            .collect(),
    })
}

/// Writes a manifest (images sorted by seed), atomically.
pub fn write_manifest(path: &Path, manifest: &mut Manifest) -> Result<()> {
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

/// Where each prompt's images go: OUT itself for one prompt, `OUT/NNN-words` for several.
pub fn prompt_folders(out: &Path, prompts: &[String]) -> Vec<PathBuf> {
    if prompts.len() == 1 {
        return vec![out.to_path_buf()];
    }
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| out.join(prompt_folder_name(i, p)))
        .collect()
}

/// `NNN-words-of-the-prompt`: prompt `i`'s folder name (at most 48 characters of the prompt, in
/// lower-case letters and digits).
pub fn prompt_folder_name(i: usize, prompt: &str) -> String {
    let mut slug = String::new();
    for c in prompt.to_lowercase().chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug: String = slug.trim_matches('-').chars().take(48).collect();
    format!("{i:03}-{}", slug.trim_end_matches('-'))
}

/// `--merge`: every folder's shard manifests joined into `manifest.json`, after checking that
/// each expected image is there; missing ones are named with the shard that owes them.
pub fn merge(folders: &[PathBuf], seeds: &[u64]) -> Result<Vec<Manifest>> {
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

/// What `decorr generate` was asked to do (the flags, resolved; the prompts and seeds given).
pub struct GenerateRun<'a> {
    pub source: &'a decorr_core::ModelSource,
    pub device: &'a burn::tensor::Device,
    pub precision: decorr_core::Precision,
    pub prompts: Vec<String>,
    pub seeds: Vec<u64>,
    pub out: PathBuf,
    /// A fine-tuned encoder (`decorr finetune`'s `text_encoder/`): the guidance then defaults to
    /// `decorrelated`, and `cfg` uses it for both branches.
    pub encoder: Option<PathBuf>,
    /// A DisenDiff output: its k/v weights into the UNet, its modifiers into the prompts.
    pub disendiff: Option<PathBuf>,
    /// The guidance; `None` is the default for the encoder given or not.
    pub guidance: Option<GuidanceName>,
    pub sampling: Sampling,
    pub pag: PagParams,
    /// Attend-and-Excite's settings; its objects are `token_indices` when given, else
    /// `excite_words` resolved in each prompt.
    pub excite: ExciteParams,
    pub excite_words: Vec<String>,
    /// Words whose cross-attention figure is saved per image, and how many steps it shows.
    pub attention: Option<(Vec<String>, usize)>,
    pub shard: Option<crate::shard::Shard>,
    /// Join the shards' manifests instead of generating.
    pub merge: bool,
    /// Record the phase times of every batch ([`Progress::timings`]).
    pub timed: bool,
}

/// One prompt's folder after a run.
pub struct FolderDone {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub manifest_name: String,
    pub params: GenerateParams,
}

/// What a `generate` run did.
pub enum GenerateOutcome {
    /// `--merge`: the joined manifests.
    Merged(Vec<Manifest>),
    /// The folders this run (or shard) wrote, the method name and the precision it sampled in.
    Generated {
        folders: Vec<FolderDone>,
        method: &'static str,
        precision: decorr_core::Precision,
    },
}

/// Runs `decorr generate`: checks and locks OUT, then generates each prompt's seeds (this
/// shard's share) into its folder, or merges the shards' manifests.
pub fn run(job: GenerateRun, progress: &mut dyn Progress) -> Result<GenerateOutcome> {
    let folders = prompt_folders(&job.out, &job.prompts);
    check_out_folder(&job.out)?;
    // One run at a time per output; the shards of an array job share the folder by design, so
    // each locks its own part, and --merge waits for none of them to be running.
    let _locks = crate::output::lock_output(&job.out, job.shard, job.merge)?;
    if job.merge {
        return Ok(GenerateOutcome::Merged(merge(&folders, &job.seeds)?));
    }
    let name = job.guidance.unwrap_or(if job.encoder.is_some() {
        GuidanceName::Decorrelated
    } else {
        GuidanceName::Cfg
    });
    let has_objects = !job.excite_words.is_empty() || !job.excite.token_indices.is_empty();
    if has_objects && name != GuidanceName::AttendAndExcite {
        bail!(
            "--excite/--excite-indices name the objects of Attend-and-Excite; add \
             --guidance attend-and-excite (this run uses --guidance {name})"
        );
    }
    if name == GuidanceName::Decorrelated && job.encoder.is_none() {
        bail!(
            "--guidance decorrelated needs the fine-tuned encoder: pass --encoder \
             OUT/text_encoder (from `decorr finetune`)"
        );
    }
    let mut sd = load_pipeline(job.source, job.device, Some(job.precision))?;
    sd.timed = job.timed;
    let encoder = match &job.encoder {
        Some(dir) => Some(sd.load_tuned_encoder(dir)?),
        None => None,
    };
    let mut prompts = job.prompts.clone();
    let delta = match &job.disendiff {
        Some(dir) => Some(std::sync::Arc::new(decorr_disendiff::read_out(dir)?)),
        None => None,
    };
    // The method of one prompt (Attend-and-Excite's objects are resolved in each; without a
    // prompt, they are left as given).
    let method_of = |sd: &StableDiffusion, prompt: Option<&str>| -> Result<Method> {
        let guidance = match name {
            GuidanceName::Cfg | GuidanceName::Decorrelated => Guidance::Cfg,
            GuidanceName::Pag => Guidance::Pag(job.pag.clone()),
            GuidanceName::AttendAndExcite => {
                let mut excite = job.excite.clone();
                if let Some(prompt) = prompt
                    && excite.token_indices.is_empty()
                    && !job.excite_words.is_empty()
                {
                    excite.token_indices =
                        excite_indices(&sd.tokenizer.encode(prompt)?, &job.excite_words)?;
                }
                Guidance::AttendAndExcite(excite)
            }
        };
        Ok(match (&delta, &encoder, guidance) {
            (Some(delta), _, Guidance::Cfg) => Method::DisenDiff {
                delta: delta.clone(),
            },
            (Some(_), _, g) => bail!(
                "--disendiff samples with classifier-free guidance; drop --guidance {}",
                g.name()
            ),
            (None, Some(encoder), Guidance::Cfg) if name == GuidanceName::Cfg => {
                Method::FinetunedCfg {
                    encoder: encoder.clone(),
                }
            }
            (None, Some(encoder), guidance) => Method::Decorrelated {
                encoder: encoder.clone(),
                guidance,
            },
            (None, None, Guidance::Cfg) => Method::Sd,
            (None, None, Guidance::Pag(p)) => Method::Pag(p),
            (None, None, Guidance::AttendAndExcite(e)) => Method::AttendAndExcite(e),
        })
    };
    // DisenDiff samples with its own variant of the pipeline (its weights, its modifiers).
    let probe = method_of(&sd, None)?;
    let sd = probe.pipeline(&sd)?.into_owned();
    if let Some(delta) = &delta {
        prompts = prompts
            .iter()
            .map(|p| disendiff_prompt(&sd, delta, p))
            .collect::<Result<_>>()?;
    }
    let attention = job
        .attention
        .as_ref()
        .filter(|(words, _)| !words.is_empty())
        .map(|(words, steps)| (words.as_slice(), *steps));
    let manifest_name = match job.shard {
        Some(s) => format!("manifest.{}.json", s.tag()),
        None => MANIFEST.to_string(),
    };
    let mut done = Vec::new();
    for (pi, (prompt, dir)) in prompts.iter().zip(&folders).enumerate() {
        let n = job.seeds.len();
        let mine: Vec<u64> = job
            .seeds
            .iter()
            .enumerate()
            .filter(|(si, _)| job.shard.is_none_or(|s| s.owns(pi * n + si)))
            .map(|(_, &seed)| seed)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let method = method_of(&sd, Some(prompt))?;
        let p = job.sampling.params(&sd, prompt, &method)?;
        let gen_job = GenerateJob {
            params: &p,
            method: method.name(),
            seeds: &mine,
            batch_size: job.sampling.batch_size,
            out: dir,
            attention,
            manifest_name: &manifest_name,
        };
        let manifest = generate_into(&sd, &gen_job, progress)?;
        done.push(FolderDone {
            dir: dir.clone(),
            manifest,
            manifest_name: manifest_name.clone(),
            params: p,
        });
    }
    Ok(GenerateOutcome::Generated {
        folders: done,
        method: probe.name(),
        precision: sd.precision,
    })
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
        RunsError::Msg(format!(
            "--prompt {prompt:?} does not name both objects the delta was trained on ({} and \
             {}); name them, or write <new1>/<new2> into the prompt",
            report.objects[0], report.objects[1]
        ))
    })
}
