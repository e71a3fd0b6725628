//! `decorr eval`: the paper's evaluation (section 6.1) and our omission rate (the work itself
//! is `decorr_eval`'s, `eval run`'s orchestration `decorr_runs::eval`'s).
//! `bertscore` scores sentence pairs, `fid` compares two image sets, and `run` evaluates the
//! folders `decorr generate` wrote: VLM captions, BERTScore recall of caption against prompt,
//! FID against reference images, the omission rate of the target object, and the table-3
//! report (`report.md`, `report.csv`, `report.json`, `report.png`). `run --shard K/N` does one
//! share of the images (partial results under `OUT/partial/`); `run --merge` joins them.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use decorr_core::io::write_atomic;
use decorr_eval::bertscore::{Baseline, ScoreOptions};
use decorr_eval::fid::{frechet_distance, stats_of_path};
use decorr_eval::inception::{FidInception, load_inception};
use decorr_runs::eval::{DEFAULT_SCORER, EvalOutcome, EvalRunConfig, inception_path, load_scorer};
use serde::{Deserialize, Serialize};

use crate::device::DeviceArgs;
use crate::progress::Bar;
use crate::shard::Shard;

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
    /// Sentences per model call (memory vs speed; scores do not depend on it).
    #[arg(long, default_value_t = 64, value_parser = crate::flags::usize_in(1, crate::flags::MAX_BATCH))]
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
    /// Images per Inception call (memory vs speed; FID does not depend on it).
    #[arg(long, default_value_t = 50, value_parser = crate::flags::usize_in(1, crate::flags::MAX_BATCH))]
    batch_size: usize,
    /// Where FID and the two sets' sizes go (JSON).
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
    /// Instruction sent with each image for its caption (default: ours, see docs/commands/eval.md).
    #[arg(long)]
    caption_instruction: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4, value_parser = crate::flags::usize_in(1, 256))]
    concurrency: usize,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 120.0, value_parser = crate::flags::seconds)]
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
    /// The BERTScore model's layer whose embeddings are compared (default: bert_score's choice
    /// for that model).
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
    /// Images or sentences per model call (memory vs speed; results do not depend on it).
    #[arg(long, default_value_t = 16, value_parser = crate::flags::usize_in(1, crate::flags::MAX_BATCH))]
    batch_size: usize,
    /// Output folder (report files, caches, partial results).
    #[arg(long, value_parser = crate::flags::out_folder)]
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
    // A regular file of at most 16 MiB, without a leading byte-order mark.
    let text = decorr_core::input::read_text(&a.pairs, "the --pairs file (JSON lines)")?;
    let mut pairs = Vec::new();
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

fn eval_run(a: RunArgs) -> Result<()> {
    // Refuses a backend not compiled in before anything runs, and says which device tch took.
    a.device.device()?;
    let config = EvalRunConfig {
        runs: a.runs,
        reference_images: a.reference_images,
        inception: a.inception,
        captioner: a.captioner,
        captioner_model: a.captioner_model,
        caption_instruction: a.caption_instruction,
        concurrency: a.concurrency,
        timeout: a.timeout,
        captions: a.captions,
        objects: a.objects,
        objects_file: a.objects_file,
        bertscore_model: a.bertscore_model,
        bertscore_layer: a.bertscore_layer,
        idf: a.idf,
        bertscore_prefix_space: a.bertscore_prefix_space,
        shard: a.shard,
        merge: a.merge,
        batch_size: a.batch_size,
        out: a.out,
        backend: a.device.backend,
        gpu: a.device.gpu,
    };
    match decorr_runs::eval::run(&config, &mut Bar::plain(true))? {
        EvalOutcome::Shard { shard, images } => println!(
            "shard {shard}: {images} images evaluated; once every shard is, run the same command \
             with --merge"
        ),
        EvalOutcome::Report { report, .. } => {
            print!("{}", report.markdown());
            println!(
                "\nreport.md, report.csv, report.json and report.png in {}",
                config.out.display()
            );
        }
    }
    Ok(())
}
