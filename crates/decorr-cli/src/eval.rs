//! `decorr eval`: the paper's evaluation (section 6.1) and our omission rate.
//! `bertscore` scores sentence pairs, `fid` compares two image sets, and `run` evaluates the
//! folders `decorr generate` wrote: VLM captions, BERTScore recall of caption against prompt,
//! FID against reference images, the omission rate of the target object, and the table-3
//! report (`report.md`, `report.csv`, `report.json`, `report.png`). `run --shard K/N` does one
//! share of the images (partial results under `OUT/partial/`); `run --merge` joins them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::{Args, Subcommand};
use decorr_core::io::write_atomic;
use decorr_core::{BackendKind, ModelSource, select_device};
use decorr_eval::bertscore::{Baseline, ScoreOptions, Scorer};
use decorr_eval::captioner::{Answer, Captioner, CaptionerConfig, ImageInput, read_captions_file};
use decorr_eval::fid::{ActivationStats, frechet_distance, stats_of_path};
use decorr_eval::inception::{FidInception, load_inception};
use decorr_eval::npz::{NpyArray, read_npz, write_npz};
use decorr_eval::report::{ImageResult, Prf, Report};
use serde::{Deserialize, Serialize};

use crate::charts;
use crate::generate::{ImageRecord, MANIFEST, read_manifest};
use crate::heatmap::png_bytes;
use crate::shard::Shard;

/// bert_score's recommended model, as the paper used it (layer 40).
const DEFAULT_SCORER: &str = "microsoft/deberta-xlarge-mnli";
/// Where pytorch-fid keeps its Inception weights after its first run.
const FID_WEIGHTS_FILE: &str = "pt_inception-2015-12-05-6726825d.pth";
const FID_WEIGHTS_URL: &str = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth";

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    command: EvalCommand,
}

#[derive(Subcommand, Debug)]
enum EvalCommand {
    /// BERTScore (P/R/F) of candidate/reference pairs, with bert_score's recipe.
    Bertscore(BertscoreArgs),
    /// FID between two image folders (or saved `.npz` statistics), as pytorch-fid computes it.
    Fid(FidArgs),
    /// Evaluate `decorr generate` folders: captions, BERTScore, FID, omission rate; the report.
    Run(Box<RunArgs>),
}

#[derive(Args, Debug, Clone)]
struct DeviceArgs {
    /// Compute backend: flex (CPU, always built), wgpu, cuda (cargo features of decorr-cli).
    #[arg(long, default_value = "flex")]
    backend: BackendKind,
    /// GPU index for cuda.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
}

impl DeviceArgs {
    fn device(&self) -> Result<Device> {
        Ok(select_device(self.backend, self.gpu)?)
    }
}

#[derive(Args, Debug)]
struct BertscoreArgs {
    /// Scoring model: a local folder in transformers layout (BERT family or DeBERTa) or a hub
    /// repo id.
    #[arg(long, default_value = DEFAULT_SCORER)]
    model: String,
    /// Hidden layer compared (bert_score's `num_layers`); default 40 for DeBERTa-xlarge-MNLI,
    /// the last layer otherwise.
    #[arg(long)]
    layer: Option<usize>,
    /// Weight tokens by idf over the references.
    #[arg(long)]
    idf: bool,
    /// A bert_score baseline file (`LAYER,P,R,F` rows) to rescale with.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// DeBERTa only: encode sentences with a leading space, as bert_score did under
    /// transformers < 4.24 (scores differ noticeably; say which one you report).
    #[arg(long)]
    prefix_space: bool,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// JSONL, one `{"candidate": ..., "reference": ...}` per line.
    #[arg(long)]
    pairs: PathBuf,
    /// Where the per-pair scores and their means go.
    #[arg(long)]
    json: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args, Debug)]
struct FidArgs {
    /// pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`, or the same keys
    /// as safetensors); default: pytorch-fid's own cached copy under ~/.cache/torch/hub.
    #[arg(long)]
    inception: Option<PathBuf>,
    /// Reference images: a folder, or statistics saved as `.npz`.
    #[arg(long)]
    real: PathBuf,
    /// Generated images: a folder, or statistics saved as `.npz`.
    #[arg(long)]
    fake: PathBuf,
    /// Save the reference side's statistics here (pytorch-fid `--save-stats` format) for reuse.
    #[arg(long)]
    save_real_stats: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    batch_size: usize,
    #[arg(long)]
    json: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Folders written by `decorr generate` (a folder with `manifest.json`, or one whose
    /// sub-folders have one, as a several-prompt run makes).
    #[arg(long, num_args = 1.., required = true)]
    runs: Vec<PathBuf>,
    /// Reference images for FID: a folder, or its statistics as `.npz`. No FID without it.
    #[arg(long)]
    reference_images: Option<PathBuf>,
    /// pytorch-fid's Inception weights (see `decorr eval fid --help`).
    #[arg(long)]
    inception: Option<PathBuf>,
    /// OpenAI-compatible endpoint for captions and yes/no questions, e.g.
    /// http://127.0.0.1:8000/v1 (vLLM, llama.cpp server, Ollama). OPENAI_API_KEY is sent if set.
    #[arg(long)]
    captioner: Option<String>,
    /// Model name the endpoint serves.
    #[arg(long, default_value = "Qwen/Qwen2-VL-7B-Instruct")]
    captioner_model: String,
    /// Instruction sent with each image for its caption (default: ours, see README).
    #[arg(long)]
    caption_instruction: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Captions made elsewhere: JSONL `{"image": FILE, "caption": TEXT}` (used before asking).
    #[arg(long)]
    captions: Option<PathBuf>,
    /// The object pair of every prompt, `FIRST,TARGET` (the target is the one that goes missing).
    #[arg(long, value_delimiter = ',', conflicts_with = "objects_file")]
    objects: Vec<String>,
    /// Object pairs per prompt: JSON `{"PROMPT": ["FIRST", "TARGET"], ...}`.
    #[arg(long)]
    objects_file: Option<PathBuf>,
    /// BERTScore model (folder or hub repo id).
    #[arg(long, default_value = DEFAULT_SCORER)]
    bertscore_model: String,
    #[arg(long)]
    bertscore_layer: Option<usize>,
    /// BERTScore with idf weights (over the prompts).
    #[arg(long)]
    idf: bool,
    /// BERTScore with DeBERTa: a leading space, as bert_score under transformers < 4.24.
    #[arg(long)]
    bertscore_prefix_space: bool,
    /// Evaluate only shard K of N (0-based) of the images; `--merge` makes the report.
    #[arg(long, value_name = "K/N", conflicts_with = "merge")]
    shard: Option<Shard>,
    /// Compute nothing per image: join the shards' partial results and write the report.
    #[arg(long)]
    merge: bool,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Output folder (report files, caches, partial results).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: EvalArgs) -> Result<()> {
    match args.command {
        EvalCommand::Bertscore(a) => bertscore(a),
        EvalCommand::Fid(a) => fid(a),
        EvalCommand::Run(a) => eval_run(*a),
    }
}

// ---------------------------------------------------------------- shared pieces

/// A scoring model's folder: `spec` itself when it is a folder, else the hub snapshot holding
/// its files (downloaded through the HF cache).
fn model_dir(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() || spec.starts_with('.') || spec.starts_with('/') {
        bail!("--model {spec}: not a folder; give a model folder or a hub repo id");
    }
    let hub = ModelSource::hub(spec);
    let config = hub.find("", &["config.json"])?;
    hub.find("", &["model.safetensors", "pytorch_model.bin"])?;
    // Tokenizer files: whichever the repo has.
    for f in [
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let _ = hub.find_optional("", &[f]);
    }
    Ok(config.parent().expect("a file has a folder").to_path_buf())
}

fn load_scorer(
    spec: &str,
    layer: Option<usize>,
    prefix_space: bool,
    device: &Device,
) -> Result<Scorer> {
    let dir = model_dir(spec)?;
    decorr_eval::bertscore::load_scorer(&dir, layer, prefix_space, device)
        .with_context(|| format!("loading the BERTScore model {spec}"))
}

fn inception_path(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let home = std::env::var_os("TORCH_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/torch")));
    let cached = home.map(|h| h.join("hub/checkpoints").join(FID_WEIGHTS_FILE));
    match cached {
        Some(p) if p.is_file() => Ok(p),
        _ => bail!(
            "no Inception weights: pass --inception FILE. Download pytorch-fid's weights once from \
             {FID_WEIGHTS_URL} (pytorch-fid also caches them under ~/.cache/torch/hub/checkpoints/)"
        ),
    }
}

// ---------------------------------------------------------------- bertscore

#[derive(Deserialize)]
struct PairLine {
    candidate: String,
    reference: String,
}

#[derive(Serialize)]
struct ScoredPair<'a> {
    candidate: &'a str,
    reference: &'a str,
    precision: f64,
    recall: f64,
    f1: f64,
}

fn bertscore(a: BertscoreArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.pairs)
        .with_context(|| format!("reading --pairs {}", a.pairs.display()))?;
    let mut pairs = Vec::new();
    // A byte-order mark at the start (some Windows editors write one) is not JSON.
    let text = decorr_core::io::strip_bom(&text);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: PairLine = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: expected {{\"candidate\": ..., \"reference\": ...}}",
                a.pairs.display(),
                i + 1
            )
        })?;
        pairs.push(p);
    }
    if pairs.is_empty() {
        bail!("{} holds no pairs", a.pairs.display());
    }
    let device = a.device.device()?;
    let scorer = load_scorer(&a.model, a.layer, a.prefix_space, &device)?;
    let opts = ScoreOptions {
        idf: a.idf,
        baseline: a
            .baseline
            .as_deref()
            .map(|p| Baseline::read(p, scorer.layer()))
            .transpose()?,
        batch_size: a.batch_size.max(1),
    };
    let cands: Vec<String> = pairs.iter().map(|p| p.candidate.clone()).collect();
    let refs: Vec<String> = pairs.iter().map(|p| p.reference.clone()).collect();
    let scores = scorer.score(&cands, &refs, &opts)?;
    let n = scores.len() as f64;
    let mean =
        |f: fn(&decorr_eval::bertscore::PairScore) -> f64| scores.iter().map(f).sum::<f64>() / n;
    let out = serde_json::json!({
        "model": a.model,
        "layer": scorer.layer(),
        "idf": a.idf,
        "prefix_space": a.prefix_space,
        "baseline": a.baseline,
        "mean": {
            "precision": mean(|s| s.precision),
            "recall": mean(|s| s.recall),
            "f1": mean(|s| s.f1),
        },
        "pairs": pairs.iter().zip(&scores).map(|(p, s)| ScoredPair {
            candidate: &p.candidate,
            reference: &p.reference,
            precision: s.precision,
            recall: s.recall,
            f1: s.f1,
        }).collect::<Vec<_>>(),
    });
    write_atomic(&a.json, serde_json::to_string_pretty(&out)?.as_bytes())?;
    println!(
        "{} pairs: P {:.4}  R {:.4}  F1 {:.4} (layer {}); per pair in {}",
        scores.len(),
        out["mean"]["precision"].as_f64().unwrap_or(f64::NAN),
        out["mean"]["recall"].as_f64().unwrap_or(f64::NAN),
        out["mean"]["f1"].as_f64().unwrap_or(f64::NAN),
        scorer.layer(),
        a.json.display()
    );
    Ok(())
}

// ---------------------------------------------------------------- fid

fn fid(a: FidArgs) -> Result<()> {
    let device = a.device.device()?;
    // Loaded at most once, and only if one side is a folder of images.
    let mut net: Option<FidInception> = None;
    let mut load = || -> Result<FidInception> {
        if net.is_none() {
            let path = inception_path(a.inception.as_deref())?;
            net = Some(load_inception(&path, &device)?);
        }
        Ok(net.clone().expect("loaded above"))
    };
    let real = stats_of_path(&a.real, &mut load, a.batch_size, &device)?;
    if let Some(p) = &a.save_real_stats {
        decorr_eval::npz::write_stats(p, &real)?;
    }
    let fake = stats_of_path(&a.fake, &mut load, a.batch_size, &device)?;
    let d = frechet_distance(&real, &fake)?;
    let out = serde_json::json!({
        "fid": d,
        "real": a.real,
        "fake": a.fake,
        "dims": real.mu.len(),
    });
    write_atomic(&a.json, serde_json::to_string_pretty(&out)?.as_bytes())?;
    println!("FID {d:.4} ({} vs {})", a.real.display(), a.fake.display());
    Ok(())
}

// ---------------------------------------------------------------- run

/// One image of a run folder.
#[derive(Clone)]
struct Item {
    run: PathBuf,
    record: ImageRecord,
}

impl Item {
    fn path(&self) -> PathBuf {
        self.run.join(&self.record.file)
    }
    fn key(&self) -> String {
        format!("{}/{}", self.run.display(), self.record.file)
    }
}

/// Every image the runs list, in a fixed order (runs as given, then seed).
fn collect_items(runs: &[PathBuf]) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for run in runs {
        if !run.is_dir() {
            bail!("--runs {}: no such folder", run.display());
        }
        let mut folders = Vec::new();
        if run.join(MANIFEST).is_file() {
            folders.push(run.clone());
        } else {
            let mut subs: Vec<PathBuf> = std::fs::read_dir(run)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join(MANIFEST).is_file())
                .collect();
            subs.sort();
            folders.extend(subs);
        }
        if folders.is_empty() {
            bail!(
                "{} has no manifest.json (nor sub-folders with one): point --runs at a \
                 `decorr generate` output; after a sharded generate, run it with --merge first",
                run.display()
            );
        }
        for f in folders {
            for record in read_manifest(&f)?.images {
                // Only files inside the manifest's own folder (no absolute paths, no `..`, no
                // symbolic links leading out of it).
                crate::paths::inside(&f, &f.join(MANIFEST), &record.file)?;
                let item = Item {
                    run: f.clone(),
                    record,
                };
                if !item.path().is_file() {
                    bail!(
                        "{} lists {} but the file is missing; rerun the generate command to remake it",
                        f.join(MANIFEST).display(),
                        item.record.file
                    );
                }
                items.push(item);
            }
        }
    }
    Ok(items)
}

/// The object pair of each prompt.
fn pairs_of(a: &RunArgs, items: &[Item]) -> Result<HashMap<String, [String; 2]>> {
    let mut map = HashMap::new();
    if let Some(f) = &a.objects_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading --objects-file {}", f.display()))?;
        let text = decorr_core::io::strip_bom(&text);
        let m: BTreeMap<String, [String; 2]> = serde_json::from_str(text).with_context(|| {
            format!(
                "{}: expected {{\"PROMPT\": [\"FIRST\", \"TARGET\"], ...}}",
                f.display()
            )
        })?;
        map.extend(m);
        let missing: BTreeSet<&str> = items
            .iter()
            .map(|i| i.record.run.prompt.as_str())
            .filter(|p| !map.contains_key(*p))
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} names no object pair for: {}",
                f.display(),
                missing.into_iter().collect::<Vec<_>>().join(" | ")
            );
        }
    } else if !a.objects.is_empty() {
        let [first, target] = a.objects.as_slice() else {
            bail!(
                "--objects takes two objects, FIRST,TARGET (e.g. tracks,train); got {}",
                a.objects.len()
            );
        };
        for i in items {
            map.insert(
                i.record.run.prompt.clone(),
                [first.trim().to_string(), target.trim().to_string()],
            );
        }
    }
    Ok(map)
}

fn eval_run(a: RunArgs) -> Result<()> {
    let items = collect_items(&a.runs)?;
    if items.is_empty() {
        bail!("the --runs folders list no images");
    }
    let pairs = pairs_of(&a, &items)?;
    let partial = a.out.join("partial");
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let _locks = crate::output::lock_output(&a.out, a.shard, a.merge)?;
    if a.merge {
        return merge(&a, &items);
    }
    let shard = a.shard.unwrap_or(Shard { index: 0, count: 1 });
    let mine: Vec<&Item> = items
        .iter()
        .enumerate()
        .filter(|(j, _)| shard.owns(*j))
        .map(|(_, i)| i)
        .collect();
    let device = a.device.device()?;
    let inputs: Vec<ImageInput> = mine
        .iter()
        .map(|i| ImageInput::from_path(i.path()))
        .collect();

    // Captions: from the file first, then from the endpoint.
    let given = a.captions.as_deref().map(read_captions_file).transpose()?;
    let captioner = match &a.captioner {
        Some(url) => {
            let mut cfg = CaptionerConfig {
                url: url.clone(),
                model: a.captioner_model.clone(),
                api_key: std::env::var("OPENAI_API_KEY").ok(),
                concurrency: a.concurrency.max(1),
                timeout: std::time::Duration::from_secs_f64(a.timeout.max(1.0)),
                ..CaptionerConfig::default()
            };
            if let Some(i) = &a.caption_instruction {
                cfg.caption_instruction = i.clone();
            }
            let cache = a.out.join(format!("vlm-cache.{}.jsonl", shard.tag()));
            Some(Captioner::new(cfg, Some(&cache))?)
        }
        None => None,
    };
    let mut captions: Vec<Option<String>> = vec![None; mine.len()];
    if let Some(g) = &given {
        for (k, i) in mine.iter().enumerate() {
            captions[k] = decorr_eval::captioner::caption_for(g, &i.path()).map(str::to_string);
        }
    }
    let ask: Vec<usize> = (0..mine.len()).filter(|&k| captions[k].is_none()).collect();
    match (&captioner, ask.is_empty(), &given) {
        (Some(c), false, _) => {
            eprintln!(
                "captioning {} images through {}",
                ask.len(),
                c.shown_endpoint()
            );
            let got = c.caption_all(&ask.iter().map(|&k| inputs[k].clone()).collect::<Vec<_>>())?;
            for (k, cap) in ask.iter().zip(got) {
                captions[*k] = Some(cap);
            }
        }
        (None, false, Some(_)) => bail!(
            "--captions has no caption for {} of the images (e.g. {}); add them or pass --captioner URL",
            ask.len(),
            mine[ask[0]].path().display()
        ),
        _ => {}
    }

    if captioner.is_some() && pairs.is_empty() {
        eprintln!(
            "no --objects / --objects-file: captions only, the omission rate is not computed"
        );
    }
    // Yes/no answers for both objects of the pair.
    let mut answers: Vec<BTreeMap<String, Answer>> = vec![BTreeMap::new(); mine.len()];
    if let Some(c) = &captioner {
        let mut queries = Vec::new();
        let mut slots = Vec::new();
        for (k, i) in mine.iter().enumerate() {
            if let Some(pair) = pairs.get(&i.record.run.prompt) {
                for o in pair {
                    queries.push((inputs[k].clone(), o.clone()));
                    slots.push((k, o.clone()));
                }
            }
        }
        if !queries.is_empty() {
            eprintln!("asking {} yes/no questions", queries.len());
            for ((k, o), ans) in slots.into_iter().zip(c.ask_all(&queries)?) {
                answers[k].insert(o, ans);
            }
        }
    }

    // BERTScore recall of each caption (candidate) against its prompt (reference).
    let mut scores: Vec<Option<Prf>> = vec![None; mine.len()];
    let scored: Vec<usize> = (0..mine.len()).filter(|&k| captions[k].is_some()).collect();
    if !scored.is_empty() {
        let scorer = load_scorer(
            &a.bertscore_model,
            a.bertscore_layer,
            a.bertscore_prefix_space,
            &device,
        )?;
        let cands: Vec<String> = scored
            .iter()
            .map(|&k| captions[k].clone().unwrap_or_default())
            .collect();
        let refs: Vec<String> = scored
            .iter()
            .map(|&k| mine[k].record.run.prompt.clone())
            .collect();
        let opts = ScoreOptions {
            idf: a.idf,
            baseline: None,
            batch_size: a.batch_size.max(1),
        };
        for (k, s) in scored.iter().zip(scorer.score(&cands, &refs, &opts)?) {
            scores[*k] = Some(Prf {
                precision: s.precision,
                recall: s.recall,
                f1: s.f1,
            });
        }
    }

    // Inception features, for the FID the merge computes per method.
    if a.reference_images.is_some() {
        let net = load_inception(&inception_path(a.inception.as_deref())?, &device)?;
        let paths: Vec<PathBuf> = mine.iter().map(|i| i.path()).collect();
        let feats = decorr_eval::fid::features_of_files(&net, &paths, a.batch_size, &device)?;
        let dims = feats.len() / mine.len().max(1);
        // f32 features stored as f64: exact, and the .npz stays readable by numpy.
        let flat: Vec<f64> = feats.into_iter().map(f64::from).collect();
        let arr = NpyArray::new(vec![mine.len(), dims], flat);
        write_npz(
            &partial.join(format!("features.{}.npz", shard.tag())),
            &[("features", &arr)],
        )?;
    }

    let results: Vec<ImageResult> = mine
        .iter()
        .enumerate()
        .map(|(k, i)| ImageResult {
            run: i.run.display().to_string(),
            method: i.record.run.method.clone(),
            prompt: i.record.run.prompt.clone(),
            seed: i.record.seed,
            file: i.record.file.clone(),
            caption: captions[k].clone(),
            bertscore: scores[k],
            pair: pairs.get(&i.record.run.prompt).cloned(),
            answers: answers[k].clone(),
        })
        .collect();
    let mut jsonl = String::new();
    for r in &results {
        jsonl += &serde_json::to_string(r)?;
        jsonl.push('\n');
    }
    write_atomic(
        &partial.join(format!("results.{}.jsonl", shard.tag())),
        jsonl.as_bytes(),
    )?;
    if a.shard.is_some() {
        println!(
            "shard {shard}: {} images evaluated; once every shard is, run the same command with --merge",
            mine.len()
        );
        return Ok(());
    }
    merge(&a, &items)
}

/// What a reference folder's statistics depend on: the folder, each image's name, size and
/// modification time, and the Inception weights named.
fn reference_key(reference: &Path, weights: Option<&Path>) -> Result<String> {
    let mut key = format!(
        "folder {}\nweights {}\n",
        reference.display(),
        weights.map_or("(pytorch-fid's cached file)".into(), |w| w
            .display()
            .to_string())
    );
    for f in decorr_eval::fid::list_images(reference)? {
        let m = std::fs::metadata(&f).with_context(|| format!("reading {}", f.display()))?;
        let modified = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        key += &format!("{} {} {modified}\n", f.display(), m.len());
    }
    Ok(key)
}

/// Joins the partial results of every shard (or the one unsharded pass), computes FID per
/// method and writes the report.
fn merge(a: &RunArgs, items: &[Item]) -> Result<()> {
    let partial = a.out.join("partial");
    let mut counts = BTreeSet::new();
    let mut results: HashMap<String, ImageResult> = HashMap::new();
    let mut features: HashMap<String, Vec<f64>> = HashMap::new();
    for entry in std::fs::read_dir(&partial)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(tag) = name
            .strip_prefix("results.")
            .and_then(|t| t.strip_suffix(".jsonl"))
        else {
            continue;
        };
        counts.insert(tag.rsplit("-of-").next().unwrap_or("").to_string());
        let path = partial.join(&name);
        let text = std::fs::read_to_string(&path)?;
        let rs: Vec<ImageResult> = decorr_core::io::strip_bom(&text)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| format!("{} is not a results file of decorr eval", path.display()))?;
        let fpath = partial.join(format!("features.{tag}.npz"));
        let feats = if fpath.is_file() {
            let arrays = read_npz(&fpath)?;
            let arr = arrays
                .get("features")
                .with_context(|| format!("{} has no `features` array", fpath.display()))?;
            let dims = arr.shape.get(1).copied().unwrap_or(0);
            if arr.shape.first() != Some(&rs.len()) {
                bail!(
                    "{} does not match {}; rerun that shard",
                    fpath.display(),
                    path.display()
                );
            }
            Some((arr.data.clone(), dims))
        } else {
            None
        };
        for (k, r) in rs.into_iter().enumerate() {
            let key = format!("{}/{}", r.run, r.file);
            if let Some((data, dims)) = &feats {
                features.insert(key.clone(), data[k * dims..(k + 1) * dims].to_vec());
            }
            results.insert(key, r);
        }
    }
    if counts.len() > 1 {
        bail!(
            "{} holds partial results of different shard counts ({}); remove the stale ones",
            partial.display(),
            counts.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    let missing: Vec<(usize, &Item)> = items
        .iter()
        .enumerate()
        .filter(|(_, i)| !results.contains_key(&i.key()))
        .collect();
    if !missing.is_empty() {
        let n = counts.iter().next().and_then(|c| c.parse::<usize>().ok());
        let owed: BTreeSet<usize> = missing
            .iter()
            .map(|(j, _)| n.map_or(0, |n| j % n))
            .collect();
        bail!(
            "{} of {} images have no results yet (e.g. {}); {}",
            missing.len(),
            items.len(),
            missing[0].1.path().display(),
            match n {
                Some(n) => format!(
                    "run shard(s) {} of {n} first",
                    owed.iter()
                        .map(|k| k.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => "run `decorr eval run` without --merge first".to_string(),
            }
        );
    }
    let ordered: Vec<ImageResult> = items.iter().map(|i| results[&i.key()].clone()).collect();

    // FID per method against the reference images.
    let mut fid = BTreeMap::new();
    if let Some(reference) = &a.reference_images {
        let device = a.device.device()?;
        // A folder's statistics are kept in OUT and reused while the folder and the weights
        // are unchanged (reference-stats.key says what they were computed from).
        let cached = a.out.join("reference-stats.npz");
        let key_file = a.out.join("reference-stats.key");
        let key = reference
            .is_dir()
            .then(|| reference_key(reference, a.inception.as_deref()))
            .transpose()?;
        let fresh =
            key.is_some() && cached.is_file() && std::fs::read_to_string(&key_file).ok() == key;
        let reference_stats = if fresh {
            decorr_eval::npz::read_stats(&cached)?
        } else {
            let net = || -> Result<FidInception> {
                Ok(load_inception(
                    &inception_path(a.inception.as_deref())?,
                    &device,
                )?)
            };
            let s = stats_of_path(reference, net, a.batch_size, &device)?;
            if let Some(key) = &key {
                decorr_eval::npz::write_stats(&cached, &s)?;
                write_atomic(&key_file, key.as_bytes())?;
            }
            s
        };
        let mut by_method: BTreeMap<&str, Vec<f32>> = BTreeMap::new();
        for i in items {
            let f = features.get(&i.key()).with_context(|| {
                format!(
                    "no Inception features for {}: the partial results were made without \
                     --reference-images; rerun them with it",
                    i.path().display()
                )
            })?;
            by_method
                .entry(&i.record.run.method)
                .or_default()
                .extend(f.iter().map(|&v| v as f32));
        }
        for (m, feats) in by_method {
            let stats = ActivationStats::from_features(&feats, reference_stats.dim())?;
            fid.insert(m.to_string(), frechet_distance(&reference_stats, &stats)?);
        }
    }

    let report = Report::build(&ordered, &fid);
    std::fs::create_dir_all(&a.out)?;
    write_atomic(&a.out.join("report.md"), report.markdown().as_bytes())?;
    write_atomic(&a.out.join("report.csv"), report.csv().as_bytes())?;
    let json = serde_json::json!({
        "report": report,
        "fid": fid,
        "images": ordered,
        "settings": {
            "bertscore_model": a.bertscore_model,
            "bertscore_layer": a.bertscore_layer,
            "idf": a.idf,
            "prefix_space": a.bertscore_prefix_space,
            // Credentials in the URL never reach the report.
            "captioner": a.captioner.as_deref().map(decorr_eval::captioner::redact_url),
            "captioner_model": a.captioner_model,
            "reference_images": a.reference_images,
        },
    });
    write_atomic(
        &a.out.join("report.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    let overall = &report.tables[0].rows;
    let labels: Vec<String> = overall.iter().map(|r| r.method.clone()).collect();
    let panels = [
        charts::Bars {
            name: "BERTScore recall (mean)",
            labels: labels.clone(),
            values: overall
                .iter()
                .map(|r| r.bertscore_recall.map_or(f64::NAN, |m| m.0))
                .collect(),
            intervals: overall
                .iter()
                .map(|r| r.bertscore_recall.map(|(m, s)| (m - s, m + s)))
                .collect(),
        },
        charts::Bars {
            name: "FID (lower is better)",
            labels: labels.clone(),
            values: overall.iter().map(|r| r.fid.unwrap_or(f64::NAN)).collect(),
            intervals: vec![None; overall.len()],
        },
        charts::Bars {
            name: "omission rate (95% CI)",
            labels,
            values: overall
                .iter()
                .map(|r| r.omission.map_or(f64::NAN, |o| o.rate))
                .collect(),
            intervals: overall
                .iter()
                .map(|r| r.omission.filter(|o| o.total > 0).map(|o| (o.low, o.high)))
                .collect(),
        },
    ];
    let chart = charts::bars(&format!("decorr eval: {} images", ordered.len()), &panels);
    write_atomic(&a.out.join("report.png"), &png_bytes(&chart))?;
    print!("{}", report.markdown());
    println!(
        "\nreport.md, report.csv, report.json and report.png in {}",
        a.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached reference statistics are reused only for the same images and weights.
    #[test]
    fn reference_key_follows_the_folder_and_the_weights() {
        let dir = tempfile::tempdir().unwrap();
        let png = |name: &str, v: u8| {
            image::RgbImage::from_pixel(4, 4, image::Rgb([v, v, v]))
                .save(dir.path().join(name))
                .unwrap()
        };
        png("a.png", 1);
        png("b.png", 2);
        let key = reference_key(dir.path(), None).unwrap();
        assert_eq!(key, reference_key(dir.path(), None).unwrap());
        assert_ne!(
            key,
            reference_key(dir.path(), Some(Path::new("w.pth"))).unwrap()
        );
        png("c.png", 3);
        let more = reference_key(dir.path(), None).unwrap();
        assert_ne!(key, more, "an added image");
        std::fs::write(dir.path().join("c.png"), b"not the same bytes").unwrap();
        assert_ne!(
            more,
            reference_key(dir.path(), None).unwrap(),
            "a changed image"
        );
    }
}
