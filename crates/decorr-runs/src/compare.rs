//! `decorr compare`: the paper's comparison (table 3, figure 6) in one run. For every prompt
//! with its object pair and the same seeds: the pre-trained model (`sd`), PAG (`pag`),
//! Attend-and-Excite exciting the two objects (`aae`), and ours (`ours`: the text encoder
//! fine-tuned for the pair's second object, then the decorrelated guidance).
//!
//! ```text
//! OUT/compare.json                 the settings that decide the images (a re-run must match)
//! OUT/objects.json                 {"PROMPT": ["FIRST", "TARGET"]}: `eval run --objects-file`
//! OUT/encoders/NNN-prompt/         ours' fine-tuning per prompt (as `decorr finetune` writes it)
//! OUT/<method>/NNN-prompt/         images + manifest.json (as `decorr generate` writes them)
//! OUT/grids/NNN-prompt.png         rows: methods, columns: seeds
//! OUT/index.html                   every prompt's grid and images
//! ```
//!
//! `decorr eval run --runs OUT/sd OUT/pag OUT/aae OUT/ours --objects-file OUT/objects.json`
//! then gives one report row per method. Resumable (images already there are skipped, finished
//! encoders reused) and shardable: shard K of N makes the baselines' (prompt, seed) work items
//! j = prompt x seeds + seed with j % N = K, as `generate` does, and for `ours` the fine-tuning
//! and every image of the prompts i with i % N = K (an encoder and its images stay on one
//! machine); `merge` checks that everything is there and writes the manifests, grids and page.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use decorr_core::ModelSource;
use decorr_core::io::write_atomic;
use decorr_disendiff::tokens::place_modifiers;
use decorr_pipeline::{ExciteParams, GenerateParams, Guidance, PagParams, StableDiffusion};
use decorr_trainer::{TargetSpec, resolve_target};
use serde::{Deserialize, Serialize};

use crate::bail;
use crate::error::{Context, Result, RunsError};
use crate::finetune::{self, FinetuneJob, FinetuneOutcome, FinetuneSettings};
use crate::generate::{
    GenerateJob, MANIFEST, Sampling, check_folder, excite_indices, generate_into, image_file,
    merge, method_name, prompt_folder_name, run_record,
};
use crate::grid;
use crate::heatmap::png_bytes;
use crate::progress::Progress;
use crate::shard::Shard;

/// A compared method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The pre-trained model with classifier-free guidance.
    Sd,
    /// Perturbed-attention guidance.
    Pag,
    /// Attend-and-Excite on the pair's two objects.
    Aae,
    /// The fine-tuned encoder with the decorrelated guidance (METHOD.md).
    Ours,
    /// DisenDiff (BASELINES.md section 3): trained per pair, then sampled with CFG and the
    /// modifiers in the prompt.
    Disendiff,
}

impl Method {
    /// Every method, in the rows' order.
    pub const ALL: [Method; 5] = [
        Method::Sd,
        Method::Pag,
        Method::Aae,
        Method::Disendiff,
        Method::Ours,
    ];

    /// Whether the method trains per prompt (its images of a prompt stay on one shard).
    pub fn trains(self) -> bool {
        matches!(self, Method::Ours | Method::Disendiff)
    }

    /// The method's folder in OUT (`sd`, `pag`, `aae`, `ours`).
    pub fn folder(self) -> &'static str {
        match self {
            Method::Sd => "sd",
            Method::Pag => "pag",
            Method::Aae => "aae",
            Method::Ours => "ours",
            Method::Disendiff => "disendiff",
        }
    }

    pub fn guidance(self) -> Guidance {
        match self {
            Method::Sd => Guidance::Cfg,
            Method::Pag => Guidance::Pag,
            Method::Aae => Guidance::AttendAndExcite,
            Method::Ours => Guidance::Decorrelated,
            Method::Disendiff => Guidance::Cfg,
        }
    }

    /// The `method` its manifests record (and `eval run`'s report rows show): `sd`, `pag`,
    /// `aae`, `decorrelated`.
    pub fn manifest_name(self) -> &'static str {
        match self {
            Method::Disendiff => "disendiff",
            m => method_name(m.guidance(), m == Method::Ours),
        }
    }

    /// The grid's row label.
    pub fn label(self) -> &'static str {
        match self {
            Method::Sd => "pre-trained (CFG)",
            Method::Pag => "PAG",
            Method::Aae => "Attend-and-Excite",
            Method::Ours => "decorrelated (ours)",
            Method::Disendiff => "DisenDiff",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.folder())
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "sd" => Ok(Method::Sd),
            "pag" => Ok(Method::Pag),
            "aae" | "attend-and-excite" => Ok(Method::Aae),
            "ours" | "decorrelated" => Ok(Method::Ours),
            "disendiff" => Ok(Method::Disendiff),
            other => Err(format!(
                "unknown method `{other}`; the methods are sd, pag, aae (attend-and-excite), \
                 disendiff and ours (decorrelated)"
            )),
        }
    }
}

/// A prompt and its object pair (the pair's second object is the one that goes missing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairPrompt {
    pub prompt: String,
    /// `[FIRST, TARGET]`, words of the prompt (`word#N` and `@index` also work).
    pub objects: [String; 2],
}

/// The format a pairs file's lines must have, for messages.
const PAIR_FORMAT: &str =
    r#"{"prompt": "rusty tracks with an old train", "objects": ["tracks", "train"]}"#;

/// Reads a pairs file: JSON lines, one [`PairPrompt`] each; blank lines and lines starting with
/// `#` are skipped. A prompt listed twice, an empty prompt or object is refused, naming the line.
pub fn read_pairs(path: &Path) -> Result<Vec<PairPrompt>> {
    let text = decorr_core::input::read_text(path, "the --pairs file")?;
    let mut pairs: Vec<PairPrompt> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let pair: PairPrompt = serde_json::from_str(line)
            .with_context(|| format!("{}: expected a JSON line such as {PAIR_FORMAT}", at()))?;
        if pair.prompt.trim().is_empty() || pair.objects.iter().any(|o| o.trim().is_empty()) {
            bail!("{}: the prompt and both objects must not be empty", at());
        }
        if pairs.iter().any(|p| p.prompt == pair.prompt) {
            bail!(
                "{}: the prompt {:?} is listed twice; list each prompt once",
                at(),
                pair.prompt
            );
        }
        pairs.push(pair);
    }
    if pairs.is_empty() {
        bail!(
            "{} lists no prompts; write one JSON line per prompt, e.g. {PAIR_FORMAT}",
            path.display()
        );
    }
    Ok(pairs)
}

/// What `decorr compare` was asked to do.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    pub pairs: Vec<PairPrompt>,
    pub methods: Vec<Method>,
    pub seeds: Vec<u64>,
    pub sampling: Sampling,
    pub pag: PagParams,
    /// Attend-and-Excite's settings; the token indices are each prompt's objects.
    pub excite: ExciteParams,
    /// Ours' fine-tuning.
    pub finetune: FinetuneSettings,
    pub out: PathBuf,
    pub shard: Option<Shard>,
    pub merge: bool,
}

/// What a compare run did.
pub struct CompareOutcome {
    /// Images of this run (made or already there), over every method.
    pub images: usize,
    /// The page and grids, when written (unsharded runs and `merge`).
    pub index: Option<PathBuf>,
    pub grids: Vec<PathBuf>,
    /// The `decorr eval run` arguments that evaluate the methods.
    pub eval_runs: Vec<PathBuf>,
    pub objects_file: PathBuf,
}

/// The settings that decide the images (`OUT/compare.json`). Prompts, methods and seeds may
/// change between runs (each folder and image records its own); these may not.
fn settings(c: &CompareConfig, model: &str) -> serde_json::Value {
    let s = &c.sampling;
    let mut excite = serde_json::to_value(&c.excite).unwrap_or_default();
    if let Some(o) = excite.as_object_mut() {
        o.remove("token_indices");
    }
    serde_json::json!({
        "model": model,
        "negative_prompt": s.negative_prompt,
        "steps": s.steps,
        "guidance_scale": s.guidance_scale,
        "width": s.width,
        "height": s.height,
        "scheduler": s.scheduler.map(|k| k.name()),
        "karras": s.karras,
        "eta": s.eta,
        "pag": c.pag,
        "excite": excite,
        "finetune": c.finetune,
    })
}

const SETTINGS: &str = "compare.json";

/// Refuses an OUT made with other settings, naming each difference; an OUT holding anything
/// without `compare.json` is not a compare output.
fn check_settings(out: &Path, wanted: &serde_json::Value) -> Result<()> {
    crate::output::check_settings(out, SETTINGS, wanted, "compare").map(|_| ())
}

/// One prompt's resolved work.
pub(crate) struct Prompt<'a> {
    index: usize,
    pub(crate) pair: &'a PairPrompt,
    pub(crate) folder: String,
    /// The pair's tokens (first, target).
    objects: [usize; 2],
}

impl CompareConfig {
    fn method_dir(&self, m: Method, p: &Prompt) -> PathBuf {
        self.out.join(m.folder()).join(&p.folder)
    }
    fn encoder_dir(&self, p: &Prompt) -> PathBuf {
        self.out.join("encoders").join(&p.folder)
    }
    fn manifest_name(&self) -> String {
        match self.shard {
            Some(s) => format!("manifest.{}.json", s.tag()),
            None => MANIFEST.to_string(),
        }
    }
    /// The seeds of prompt `pi` that this run makes for `m`.
    fn seeds_of(&self, m: Method, pi: usize) -> Vec<u64> {
        let n = self.seeds.len();
        self.seeds
            .iter()
            .enumerate()
            .filter(|(si, _)| match (self.shard, m) {
                (None, _) => true,
                (Some(s), m) if m.trains() => s.owns(pi),
                (Some(s), _) => s.owns(pi * n + si),
            })
            .map(|(_, &seed)| seed)
            .collect()
    }
    /// The shard that owes image (`m`, prompt `pi`, seed position `si`).
    fn owner(&self, m: Method, pi: usize, si: usize, count: usize) -> usize {
        if m.trains() {
            pi % count
        } else {
            (pi * self.seeds.len() + si) % count
        }
    }
    fn params(&self, sd: &StableDiffusion, m: Method, p: &Prompt) -> Result<GenerateParams> {
        let mut excite = self.excite.clone();
        excite.token_indices = p.objects.to_vec();
        self.sampling
            .params(sd, &p.pair.prompt, m.guidance(), &self.pag, &excite)
    }
}

/// Refuses, before anything is loaded, an OUT that holds a compare run made with other
/// settings (naming each difference), or anything that is not a compare run. `model` describes
/// the weights (`ModelSource::describe`).
pub fn check_out(c: &CompareConfig, model: &str) -> Result<()> {
    check_settings(&c.out, &settings(c, model))
}

/// Runs the comparison (or, with `merge`, joins the shards and writes the grids and page). `sd`
/// is the loaded checkpoint (without a fine-tuned encoder); `source` and `device` are where it
/// came from, for ours' fine-tuning.
pub fn run(
    c: &CompareConfig,
    sd: StableDiffusion,
    source: &ModelSource,
    progress: &mut dyn Progress,
) -> Result<CompareOutcome> {
    if c.methods.is_empty() {
        bail!("--methods names no method; give some of sd, pag, aae, ours");
    }
    if c.seeds.is_empty() {
        bail!("--seeds names no seed");
    }
    let wanted = settings(c, &source.describe());
    check_settings(&c.out, &wanted)?;
    let _locks = crate::output::lock_output(&c.out, c.shard, c.merge)?;
    let mut sd = sd;
    sd.tuned = None;

    // Every prompt resolved and every method checked before anything is made.
    let mut prompts = Vec::new();
    for (index, pair) in c.pairs.iter().enumerate() {
        let tok = sd.tokenizer.encode(&pair.prompt)?;
        let at = || format!("the pair of {:?}", pair.prompt);
        let objects = excite_indices(&tok, &pair.objects).with_context(at)?;
        if objects[0] == objects[1] {
            bail!(
                "{}: both objects ({:?} and {:?}) are the same token of the prompt; name two \
                 different objects (`word#2` picks a word's second occurrence)",
                at(),
                pair.objects[0],
                pair.objects[1]
            );
        }
        if c.methods.contains(&Method::Ours) {
            let spec: TargetSpec = pair.objects[1].parse().expect("infallible");
            resolve_target(&tok, &spec).with_context(at)?;
        }
        if c.methods.contains(&Method::Disendiff) {
            place_modifiers(&sd.tokenizer, &pair.prompt, &pair.objects)
                .map_err(|e| RunsError::Msg(format!("DisenDiff: {e}")))
                .with_context(at)?;
        }
        prompts.push(Prompt {
            index,
            pair,
            folder: prompt_folder_name(index, &pair.prompt),
            objects: [objects[0], objects[1]],
        });
    }
    let manifest_name = c.manifest_name();
    for p in &prompts {
        for &m in &c.methods {
            let mut params = c.params(&sd, m, p)?;
            if m == Method::Ours {
                // The fine-tuned encoder comes later; everything else is checked now.
                params.guidance = Guidance::Cfg;
            }
            sd.check(&params)
                .map_err(RunsError::from)
                .with_context(|| format!("{m} for {:?}", p.pair.prompt))?;
            if !m.trains() {
                let run = run_record(&sd, &params, m.manifest_name());
                check_folder(&c.method_dir(m, p), &run, &manifest_name)?;
            }
        }
    }

    if c.merge {
        return merge_all(c, &prompts);
    }
    std::fs::create_dir_all(&c.out).with_context(|| format!("creating {}", c.out.display()))?;
    write_atomic(
        &c.out.join(SETTINGS),
        serde_json::to_string_pretty(&wanted)?.as_bytes(),
    )?;

    let mut images = 0;
    for p in &prompts {
        progress.note(&format!(
            "prompt {}/{}: {:?} ({}, {})",
            p.index + 1,
            prompts.len(),
            p.pair.prompt,
            p.pair.objects[0],
            p.pair.objects[1]
        ));
        for &m in c.methods.iter().filter(|&&m| !m.trains()) {
            let seeds = c.seeds_of(m, p.index);
            if seeds.is_empty() {
                continue;
            }
            let params = c.params(&sd, m, p)?;
            let dir = c.method_dir(m, p);
            let job = GenerateJob {
                params: &params,
                method: m.manifest_name(),
                seeds: &seeds,
                batch_size: c.sampling.batch_size,
                out: &dir,
                attention: None,
                manifest_name: &manifest_name,
            };
            images += generate_into(&sd, &job, progress)?.images.len();
        }
        if c.methods.contains(&Method::Disendiff) {
            let seeds = c.seeds_of(Method::Disendiff, p.index);
            if !seeds.is_empty() {
                images += disendiff_images(c, p, &sd, source, &seeds, progress)?;
            }
        }
        if c.methods.contains(&Method::Ours) {
            let seeds = c.seeds_of(Method::Ours, p.index);
            if seeds.is_empty() {
                continue;
            }
            let encoder = encoder_for(c, p, source, &sd.device, progress)?;
            sd = sd.with_tuned_encoder(&encoder)?;
            let params = c.params(&sd, Method::Ours, p)?;
            let dir = c.method_dir(Method::Ours, p);
            let job = GenerateJob {
                params: &params,
                method: Method::Ours.manifest_name(),
                seeds: &seeds,
                batch_size: c.sampling.batch_size,
                out: &dir,
                attention: None,
                manifest_name: &manifest_name,
            };
            let made = generate_into(&sd, &job, progress);
            // The baselines of the next prompt run with the pre-trained encoder.
            sd.tuned = None;
            images += made?.images.len();
        }
    }
    if c.shard.is_some() {
        return Ok(CompareOutcome {
            images,
            index: None,
            grids: Vec::new(),
            eval_runs: eval_runs(c),
            objects_file: c.out.join("objects.json"),
        });
    }
    let mut outcome = write_pages(c, &prompts)?;
    outcome.images = images;
    Ok(outcome)
}

/// Ours' encoder for prompt `p`: reused when `OUT/encoders/NNN-prompt/` holds a finished
/// fine-tuning of that prompt and target, else fine-tuned there (an unfinished one is
/// replaced).
/// DisenDiff for prompt `p`: trains (or resumes, or reuses) its delta in
/// `OUT/disendiff-train/<prompt>` with BASELINES.md's defaults on images the pre-trained model
/// generates for the prompt (the paper's setting; seeds 0..8, at the comparison's size), then
/// samples `seeds` with the delta and the modifiers in the prompt.
fn disendiff_images(
    c: &CompareConfig,
    p: &Prompt,
    sd: &StableDiffusion,
    source: &ModelSource,
    seeds: &[u64],
    progress: &mut dyn Progress,
) -> Result<usize> {
    let train_dir = c.out.join("disendiff-train").join(&p.folder);
    let params = c.params(sd, Method::Sd, p)?;
    let job = crate::disendiff::DisenDiffJob {
        source,
        device: &sd.device,
        prompt: p.pair.prompt.clone(),
        objects: p.pair.objects.to_vec(),
        images: None,
        seeds: (0..8).collect(),
        sample_steps: params.steps,
        guidance_scale: params.guidance_scale,
        regularisation: Default::default(),
        config: decorr_disendiff::DisenDiffConfig {
            resolution: params.width.min(params.height),
            ..Default::default()
        },
        save_every: 25,
        out: train_dir.clone(),
    };
    match crate::disendiff::run(job, progress)? {
        crate::disendiff::DisenDiffOutcome::Interrupted { steps } => {
            return Err(RunsError::Interrupted(format!(
                "interrupted while training DisenDiff for {:?} (step {steps} kept in {}); run \
                 again to resume",
                p.pair.prompt,
                train_dir.display()
            )));
        }
        crate::disendiff::DisenDiffOutcome::Done { .. }
        | crate::disendiff::DisenDiffOutcome::AlreadyDone => {}
    }
    let delta =
        decorr_disendiff::read_out(&train_dir).map_err(|e| RunsError::Msg(e.to_string()))?;
    let mut tuned = sd.clone();
    decorr_disendiff::apply_to_pipeline(&mut tuned, &delta)
        .map_err(|e| RunsError::Msg(e.to_string()))?;
    let sampling_prompt = delta
        .report
        .as_ref()
        .map(|r| r.sampling_prompt.clone())
        .unwrap_or_else(|| p.pair.prompt.clone());
    let mut params = params;
    params.prompt = sampling_prompt;
    let dir = c.method_dir(Method::Disendiff, p);
    let manifest_name = c.manifest_name();
    let job = GenerateJob {
        params: &params,
        method: Method::Disendiff.manifest_name(),
        seeds,
        batch_size: c.sampling.batch_size,
        out: &dir,
        attention: None,
        manifest_name: &manifest_name,
    };
    Ok(generate_into(&tuned, &job, progress)?.images.len())
}

fn encoder_for(
    c: &CompareConfig,
    p: &Prompt,
    source: &ModelSource,
    device: &burn::tensor::Device,
    progress: &mut dyn Progress,
) -> Result<PathBuf> {
    let dir = c.encoder_dir(p);
    if let Some(report) = finetune::finished(&dir) {
        let theirs = report.prompts.first();
        if let Some(theirs) = theirs
            && theirs.prompt == p.pair.prompt
            && theirs.target.index == p.objects[1]
        {
            progress.note(&format!(
                "{}: fine-tuning already finished, reusing it",
                dir.display()
            ));
            return Ok(dir.join("text_encoder"));
        }
        bail!(
            "{} holds the fine-tuning of another prompt or target ({} / {}); the pairs file \
             changed order? Remove that folder or choose another --out",
            dir.display(),
            theirs.map_or("", |t| t.prompt.as_str()),
            theirs.map_or("", |t| t.target.text.as_str())
        );
    }
    let job = FinetuneJob {
        source,
        device,
        prompts: vec![p.pair.prompt.clone()],
        targets: vec![p.pair.objects[1].parse().expect("infallible")],
        settings: c.finetune.clone(),
        out: dir.clone(),
        overwrite: true,
    };
    match finetune::run(job, progress)? {
        FinetuneOutcome::Done {
            interrupted: false, ..
        } => Ok(dir.join("text_encoder")),
        FinetuneOutcome::Done { .. }
        | FinetuneOutcome::NothingSelected
        | FinetuneOutcome::Discarded => Err(RunsError::Interrupted(format!(
            "interrupted during the fine-tuning of {:?}; {} keeps what was done, and the same \
             command resumes",
            p.pair.prompt,
            c.out.display()
        ))),
    }
}

/// The folders `decorr eval run --runs` takes, one report row each.
fn eval_runs(c: &CompareConfig) -> Vec<PathBuf> {
    c.methods.iter().map(|m| c.out.join(m.folder())).collect()
}

/// `merge`: every shard's images must be there (the missing ones are named with the shard
/// that owes them, and nothing is written); then each folder's manifest, the grids and page.
fn merge_all(c: &CompareConfig, prompts: &[Prompt]) -> Result<CompareOutcome> {
    let mut counts = std::collections::BTreeSet::new();
    for p in prompts {
        for &m in &c.methods {
            if let Ok(entries) = std::fs::read_dir(c.method_dir(m, p)) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let Some(n) = name
                        .strip_prefix("manifest.shard-")
                        .and_then(|t| t.strip_suffix(".json"))
                        .and_then(|t| t.split_once("-of-"))
                        .and_then(|(_, n)| n.parse::<usize>().ok())
                    {
                        counts.insert(n);
                    }
                }
            }
        }
    }
    if counts.len() > 1 {
        bail!(
            "{} holds manifests of different shard counts ({:?}); rerun with one --shard K/N count",
            c.out.display(),
            counts
        );
    }
    let count = counts.iter().next().copied();
    let mut missing = Vec::new();
    let mut owed = std::collections::BTreeSet::new();
    for p in prompts {
        for &m in &c.methods {
            for (si, &seed) in c.seeds.iter().enumerate() {
                let f = c.method_dir(m, p).join(image_file(seed));
                if !f.is_file() {
                    missing.push(f.display().to_string());
                    if let Some(n) = count {
                        owed.insert(c.owner(m, p.index, si, n));
                    }
                }
            }
        }
    }
    if !missing.is_empty() {
        let total = prompts.len() * c.methods.len() * c.seeds.len();
        let hint = match count {
            Some(n) => format!(
                "; rerun shard(s) {} of {n}",
                owed.iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => "; run the shards (--shard K/N) first".into(),
        };
        bail!(
            "{} of {total} images are missing, nothing merged{hint}:\n  {}",
            missing.len(),
            missing
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
    let mut images = 0;
    for &m in &c.methods {
        let folders: Vec<PathBuf> = prompts.iter().map(|p| c.method_dir(m, p)).collect();
        images += merge(&folders, &c.seeds)?
            .iter()
            .map(|x| x.images.len())
            .sum::<usize>();
    }
    let mut outcome = write_pages(c, prompts)?;
    outcome.images = images;
    Ok(outcome)
}

/// `objects.json`, one grid per prompt and `index.html`.
fn write_pages(c: &CompareConfig, prompts: &[Prompt]) -> Result<CompareOutcome> {
    let objects: serde_json::Map<String, serde_json::Value> = prompts
        .iter()
        .map(|p| (p.pair.prompt.clone(), serde_json::json!(p.pair.objects)))
        .collect();
    let objects_file = c.out.join("objects.json");
    write_atomic(
        &objects_file,
        serde_json::to_string_pretty(&objects)?.as_bytes(),
    )?;
    let grids_dir = c.out.join("grids");
    std::fs::create_dir_all(&grids_dir)
        .with_context(|| format!("creating {}", grids_dir.display()))?;
    let cols: Vec<String> = c.seeds.iter().map(|s| format!("seed {s}")).collect();
    let rows: Vec<String> = c.methods.iter().map(|m| m.label().to_string()).collect();
    let mut grids = Vec::new();
    for p in prompts {
        let mut cells = Vec::new();
        for &m in &c.methods {
            let mut row = Vec::new();
            for &seed in &c.seeds {
                let f = c.method_dir(m, p).join(image_file(seed));
                row.push(
                    image::open(&f)
                        .with_context(|| format!("reading {}", f.display()))?
                        .to_rgb8(),
                );
            }
            cells.push(row);
        }
        let title = format!(
            "\"{}\" ({}, {})",
            p.pair.prompt, p.pair.objects[0], p.pair.objects[1]
        );
        let img = grid::labelled(&title, &rows, &cols, &cells, 128);
        let path = grids_dir.join(format!("{}.png", p.folder));
        write_atomic(&path, &png_bytes(&img))?;
        grids.push(path);
    }
    let index = c.out.join("index.html");
    write_atomic(&index, crate::pages::compare_index(c, prompts).as_bytes())?;
    Ok(CompareOutcome {
        images: 0,
        index: Some(index),
        grids,
        eval_runs: eval_runs(c),
        objects_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_skip_comments_and_refuse_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pairs.jsonl");
        std::fs::write(
            &f,
            "\u{feff}# ours\n\n{\"prompt\": \"a cat and a dog\", \"objects\": [\"cat\", \"dog\"]}\n",
        )
        .unwrap();
        let pairs = read_pairs(&f).unwrap();
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].objects[1], "dog");
        for (text, needle) in [
            ("{\"prompt\": \"x\"}", "line 1"),
            (
                "{\"prompt\": \"x\", \"objects\": [\"a\"]}",
                "expected a JSON line",
            ),
            (
                "{\"prompt\": \"\", \"objects\": [\"a\", \"b\"]}",
                "must not be empty",
            ),
            (
                "{\"prompt\": \"a b\", \"objects\": [\"a\", \"b\"]}\n{\"prompt\": \"a b\", \"objects\": [\"a\", \"b\"]}",
                "listed twice",
            ),
            ("# nothing\n", "lists no prompts"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = read_pairs(&f).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn methods_parse_and_name_their_folders() {
        assert_eq!("aae".parse::<Method>().unwrap(), Method::Aae);
        assert_eq!("decorrelated".parse::<Method>().unwrap(), Method::Ours);
        assert!("disendiff".parse::<Method>().unwrap() == Method::Disendiff);
        assert!("x".parse::<Method>().unwrap_err().contains("sd, pag"));
        let names: Vec<&str> = Method::ALL.iter().map(|m| m.manifest_name()).collect();
        assert_eq!(names, ["sd", "pag", "aae", "disendiff", "decorrelated"]);
    }

    #[test]
    fn ours_stays_on_one_shard_per_prompt() {
        let c = CompareConfig {
            pairs: Vec::new(),
            methods: Method::ALL.to_vec(),
            seeds: vec![0, 1, 2],
            sampling: Sampling::default(),
            pag: PagParams::default(),
            excite: ExciteParams::default(),
            finetune: FinetuneSettings::default(),
            out: PathBuf::from("x"),
            shard: Some(Shard { index: 1, count: 2 }),
            merge: false,
        };
        // Baselines: items j = 3 * prompt + seed, shard 1 of 2 owns odd j.
        assert_eq!(c.seeds_of(Method::Sd, 0), vec![1]);
        assert_eq!(c.seeds_of(Method::Pag, 1), vec![0, 2]);
        // Ours: every seed of the odd prompts.
        assert!(c.seeds_of(Method::Ours, 0).is_empty());
        assert_eq!(c.seeds_of(Method::Ours, 1), vec![0, 1, 2]);
        assert_eq!(c.owner(Method::Ours, 3, 2, 2), 1);
        assert_eq!(c.owner(Method::Aae, 1, 2, 2), 1);
    }
}
