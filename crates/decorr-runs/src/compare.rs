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

use decorr_core::ModelSource;
use decorr_core::io::write_atomic;
use decorr_disendiff::tokens::place_modifiers;
use decorr_pipeline::{ExciteParams, GenerateParams, PagParams, StableDiffusion};
use decorr_trainer::{TargetSpec, resolve_target};
use serde::{Deserialize, Serialize};

use crate::bail;
use crate::error::{Context, Result, RunsError};
use crate::finetune::{self, FinetuneJob, FinetuneSettings};
use crate::generate::{
    GenerateJob, MANIFEST, Sampling, SamplingRecord, check_folder, excite_indices, generate_into,
    image_file, merge, prompt_folder_name, run_record,
};
use crate::grid;
use crate::heatmap::png_bytes;
use crate::method::{Method, MethodKind};
use crate::progress::Progress;
use crate::shard::Shard;

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
    pub methods: Vec<MethodKind>,
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

/// `OUT/compare.json`: the settings that decide the images. Prompts, methods and seeds may
/// change between runs (each folder and image records its own); these may not. The field
/// names are the flags'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareSettings {
    /// The weights, as `ModelSource::describe` names them.
    pub model: String,
    #[serde(flatten)]
    pub sampling: SamplingRecord,
    pub pag: PagParams,
    /// Attend-and-Excite's settings without its objects (each pair's own).
    #[serde(with = "without_objects")]
    pub excite: ExciteParams,
    pub finetune: FinetuneSettings,
}

/// [`ExciteParams`] without `token_indices`, which compare sets per pair.
mod without_objects {
    use decorr_pipeline::ExciteParams;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(e: &ExciteParams, s: S) -> Result<S::Ok, S::Error> {
        let mut v = serde_json::to_value(e).map_err(serde::ser::Error::custom)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("token_indices");
        }
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ExciteParams, D::Error> {
        let mut v = serde_json::Value::deserialize(d)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("token_indices".into(), serde_json::json!([]));
        }
        serde_json::from_value(v).map_err(serde::de::Error::custom)
    }
}

fn settings(c: &CompareConfig, model: &str) -> CompareSettings {
    CompareSettings {
        model: model.to_string(),
        sampling: (&c.sampling).into(),
        pag: c.pag.clone(),
        excite: ExciteParams {
            token_indices: Vec::new(),
            ..c.excite.clone()
        },
        finetune: c.finetune.clone(),
    }
}

const SETTINGS: &str = "compare.json";

/// Refuses an OUT made with other settings, naming each difference; an OUT holding anything
/// without `compare.json` is not a compare output.
fn check_settings(out: &Path, wanted: &CompareSettings) -> Result<()> {
    let wanted = serde_json::to_value(wanted)?;
    crate::output::check_settings(out, SETTINGS, &wanted, "compare").map(|_| ())
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
    fn method_dir(&self, m: MethodKind, p: &Prompt) -> PathBuf {
        self.out.join(m.name()).join(&p.folder)
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
    fn seeds_of(&self, m: MethodKind, pi: usize) -> Vec<u64> {
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
    fn owner(&self, m: MethodKind, pi: usize, si: usize, count: usize) -> usize {
        if m.trains() {
            pi % count
        } else {
            (pi * self.seeds.len() + si) % count
        }
    }
    /// The method `m` for prompt `p`, without what it trains (ours' encoder, DisenDiff's
    /// delta: `None` for those).
    fn method(&self, m: MethodKind, p: &Prompt) -> Option<Method> {
        match m {
            MethodKind::Sd => Some(Method::Sd),
            MethodKind::Pag => Some(Method::Pag(self.pag.clone())),
            MethodKind::Aae => Some(Method::AttendAndExcite(ExciteParams {
                token_indices: p.objects.to_vec(),
                ..self.excite.clone()
            })),
            MethodKind::Ours | MethodKind::Disendiff => None,
        }
    }
    /// The sampling parameters of `method` for prompt `p`.
    fn params(&self, sd: &StableDiffusion, method: &Method, p: &Prompt) -> Result<GenerateParams> {
        self.sampling.params(sd, &p.pair.prompt, method)
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
    if sd.xl.is_some()
        && let Some(m) = c
            .methods
            .iter()
            .find(|m| matches!(m, MethodKind::Aae | MethodKind::Disendiff))
    {
        bail!(
            "--methods {m}: {} is an SDXL checkpoint, on which Attend-and-Excite and DisenDiff \
             do not run (they are SD 1.x methods here); pass --methods sd,pag,ours",
            source.describe()
        );
    }
    let wanted = settings(c, &source.describe());
    check_settings(&c.out, &wanted)?;
    let _locks = crate::output::lock_output(&c.out, c.shard, c.merge)?;

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
        if c.methods.contains(&MethodKind::Ours) {
            let spec: TargetSpec = pair.objects[1].parse().expect("infallible");
            resolve_target(&tok, &spec).with_context(at)?;
        }
        if c.methods.contains(&MethodKind::Disendiff) {
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
            // Ours and DisenDiff are checked as the pre-trained model they sample on; what
            // they train comes later.
            let method = c.method(m, p).unwrap_or(Method::Sd);
            let params = c.params(&sd, &method, p)?;
            sd.check(&params)
                .map_err(RunsError::from)
                .with_context(|| format!("{m} for {:?}", p.pair.prompt))?;
            if !m.trains() {
                let run = run_record(&sd, &params, m.name());
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
        // Through a JSON value, as it is compared: the f32 weight decay is then written with
        // the digits older compare.json files hold.
        serde_json::to_string_pretty(&serde_json::to_value(&wanted)?)?.as_bytes(),
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
            let method = c.method(m, p).expect("a method that does not train");
            images += sample(c, p, &sd, &method, &seeds, progress)?;
        }
        if c.methods.contains(&MethodKind::Disendiff) {
            let seeds = c.seeds_of(MethodKind::Disendiff, p.index);
            if !seeds.is_empty() {
                let delta = disendiff_delta(c, p, &sd, source, progress)?;
                images += sample(c, p, &sd, &Method::DisenDiff { delta }, &seeds, progress)?;
            }
        }
        if c.methods.contains(&MethodKind::Ours) {
            let seeds = c.seeds_of(MethodKind::Ours, p.index);
            if seeds.is_empty() {
                continue;
            }
            let dir = encoder_for(c, p, &sd, source, progress)?;
            let method = Method::Decorrelated {
                encoder: sd.load_tuned_encoder(&dir)?,
                guidance: decorr_pipeline::Guidance::Cfg,
            };
            images += sample(c, p, &sd, &method, &seeds, progress)?;
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

/// Samples `seeds` of prompt `p` with `method` into the method's folder (DisenDiff with the
/// modifiers in its prompt); the number of images the folder then holds.
fn sample(
    c: &CompareConfig,
    p: &Prompt,
    sd: &StableDiffusion,
    method: &Method,
    seeds: &[u64],
    progress: &mut dyn Progress,
) -> Result<usize> {
    let kind = method.kind().expect("a compared method");
    let sd = method.pipeline(sd)?;
    let mut params = c.params(&sd, method, p)?;
    if let Method::DisenDiff { delta } = method
        && let Some(report) = &delta.report
    {
        params.prompt = report.sampling_prompt.clone();
    }
    let dir = c.method_dir(kind, p);
    let manifest_name = c.manifest_name();
    let job = GenerateJob {
        params: &params,
        method: method.name(),
        seeds,
        batch_size: c.sampling.batch_size,
        out: &dir,
        attention: None,
        manifest_name: &manifest_name,
    };
    Ok(generate_into(&sd, &job, progress)?.images.len())
}

/// DisenDiff for prompt `p`: trains (or resumes, or reuses) its delta in
/// `OUT/disendiff-train/<prompt>` with BASELINES.md's defaults on images the pre-trained model
/// generates for the prompt (the paper's setting; seeds 0..8, at the comparison's size), then
/// returns the delta (sampled with the modifiers in the prompt).
fn disendiff_delta(
    c: &CompareConfig,
    p: &Prompt,
    sd: &StableDiffusion,
    source: &ModelSource,
    progress: &mut dyn Progress,
) -> Result<std::sync::Arc<decorr_disendiff::DeltaFiles>> {
    let train_dir = c.out.join("disendiff-train").join(&p.folder);
    let params = c.params(sd, &Method::Sd, p)?;
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
    Ok(std::sync::Arc::new(delta))
}

/// Ours' encoder for prompt `p` (its folder): reused when `OUT/encoders/NNN-prompt/` holds a
/// finished fine-tuning of that prompt and target, else fine-tuned there from `sd`'s encoder
/// (an unfinished one is replaced).
fn encoder_for(
    c: &CompareConfig,
    p: &Prompt,
    sd: &StableDiffusion,
    source: &ModelSource,
    progress: &mut dyn Progress,
) -> Result<PathBuf> {
    let dir = c.encoder_dir(p);
    let finished = finetune::finished(&dir).or_else(|| {
        finetune::finished_xl(&dir).and_then(|each| each.into_iter().next().map(|(_, r)| r))
    });
    if let Some(report) = finished {
        let theirs = report.prompts.first();
        if let Some(theirs) = theirs
            && theirs.prompt == p.pair.prompt
            && theirs.target.index == p.objects[1]
        {
            progress.note(&format!(
                "{}: fine-tuning already finished, reusing it",
                dir.display()
            ));
            return Ok(dir);
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
        device: &sd.device,
        pretrained: finetune::Pretrained::of(sd),
        pretrained_2: finetune::Pretrained::of_second(sd),
        prompts: vec![p.pair.prompt.clone()],
        targets: vec![p.pair.objects[1].parse().expect("infallible")],
        settings: c.finetune.clone(),
        out: dir.clone(),
        overwrite: true,
    };
    if finetune::run(job, progress)?.complete() {
        return Ok(dir);
    }
    Err(RunsError::Interrupted(format!(
        "interrupted during the fine-tuning of {:?}; {} keeps what was done, and the same \
         command resumes",
        p.pair.prompt,
        c.out.display()
    )))
}

/// The folders `decorr eval run --runs` takes, one report row each.
fn eval_runs(c: &CompareConfig) -> Vec<PathBuf> {
    c.methods.iter().map(|m| c.out.join(m.name())).collect()
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

    fn config() -> CompareConfig {
        CompareConfig {
            pairs: Vec::new(),
            methods: MethodKind::ALL.to_vec(),
            seeds: vec![0, 1, 2],
            sampling: Sampling::default(),
            pag: PagParams::default(),
            excite: ExciteParams::default(),
            finetune: FinetuneSettings::default(),
            out: PathBuf::from("x"),
            shard: Some(Shard { index: 1, count: 2 }),
            merge: false,
        }
    }

    /// compare.json as older decorr wrote it (a `json!` map, Attend-and-Excite's settings
    /// without the objects) compares equal to the typed settings, so old compare folders
    /// resume; and the type reads back what it writes.
    #[test]
    fn settings_of_older_folders_still_match() {
        let c = config();
        let mut excite = serde_json::to_value(&c.excite).unwrap();
        excite.as_object_mut().unwrap().remove("token_indices");
        let s = &c.sampling;
        let old = serde_json::json!({
            "model": "m", "negative_prompt": s.negative_prompt, "steps": s.steps,
            "guidance_scale": s.guidance_scale, "width": s.width, "height": s.height,
            "scheduler": s.scheduler.map(|k| k.name()), "karras": s.karras, "eta": s.eta,
            "pag": c.pag, "excite": excite, "finetune": c.finetune,
        });
        let typed = settings(&c, "m");
        assert_eq!(serde_json::to_value(&typed).unwrap(), old);
        let back: CompareSettings = serde_json::from_value(old).unwrap();
        assert_eq!(back, typed);
    }

    #[test]
    fn ours_stays_on_one_shard_per_prompt() {
        let c = config();
        // Baselines: items j = 3 * prompt + seed, shard 1 of 2 owns odd j.
        assert_eq!(c.seeds_of(MethodKind::Sd, 0), vec![1]);
        assert_eq!(c.seeds_of(MethodKind::Pag, 1), vec![0, 2]);
        // Ours: every seed of the odd prompts.
        assert!(c.seeds_of(MethodKind::Ours, 0).is_empty());
        assert_eq!(c.seeds_of(MethodKind::Ours, 1), vec![0, 1, 2]);
        assert_eq!(c.owner(MethodKind::Ours, 3, 2, 2), 1);
        assert_eq!(c.owner(MethodKind::Aae, 1, 2, 2), 1);
    }
}
