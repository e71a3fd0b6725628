//! `decorr fix`: the main job in one command. Fine-tunes the text encoder for the prompt's
//! missing object (with checkpoint selection), then generates the same seeds with the pre-trained
//! model (CFG) and with the decorrelated guidance, and writes a side-by-side grid and an HTML
//! report. OUT is resumable: a finished fine-tuning and the images already written are reused.
//!
//! OUT/finetune/ (text_encoder/, report.json, losses.png), OUT/pretrained/ and OUT/fixed/
//! (images + manifest.json), OUT/comparison.png, OUT/report.html, OUT/summary.json; with
//! `--compare pag,aae` also OUT/pag/ and OUT/aae/, rows of the grid and the report.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use decorr_core::io::{OutputLock, write_atomic};
use decorr_pipeline::{GenerateParams, Guidance, StableDiffusion};
use decorr_trainer::{Focus, TargetSpec, TrainPrompt, prepare, resolve_target};
use serde::Serialize;

use crate::finetune::FinetuneArgs;
use crate::generate::{SampleArgs, load, params};
use crate::grid;
use crate::guidance_args::GuidanceArgs;
use crate::heatmap::png_bytes;
use crate::model_args::ModelArgs;
use crate::progress::Bar;
use decorr_runs::finetune::FinetuneReport;
use decorr_runs::generate::{
    GenerateJob, MANIFEST, check_folder, generate_into, image_file, method_name, run_record,
};
use decorr_runs::pages::MethodRow;

/// The help heading of fix's fine-tuning options.
const FT: &str = "Fine-tuning (as decorr finetune)";

#[derive(Args, Debug)]
pub struct FixArgs {
    /// The prompt whose object goes missing, e.g. "rusty tracks with an old train".
    #[arg(long)]
    prompt: String,
    /// The object that goes missing (word, `word#N` or `@index`).
    #[arg(long)]
    target: TargetSpec,
    /// Seeds, as a range `A..B` (B excluded) or a list `1,5,9`.
    #[arg(long, default_value = "0..8")]
    seeds: String,
    /// Output folder: finetune/, pretrained/, fixed/, comparison.png, report.html (created;
    /// the same command resumes it).
    #[arg(long, value_parser = crate::flags::out_folder)]
    out: PathBuf,
    /// Print a JSON summary (paths, selected epoch, attention before/after) on stdout.
    #[arg(long)]
    json: bool,
    /// Fine-tune even when the target attends to itself more than to any earlier token (no
    /// unidirectional correlation, so the method has nothing to lower); without it fix stops.
    #[arg(long)]
    anyway: bool,
    /// Encoder layer whose self-attention is decorrelated.
    #[arg(long, default_value_t = 11, help_heading = FT)]
    layer: usize,
    /// Fine-tuning epochs; each ends with a validation that may select it.
    #[arg(long, default_value_t = 20,
          value_parser = crate::flags::usize_in(1, crate::flags::MAX_EPOCHS), help_heading = FT)]
    epochs: usize,
    /// Optimiser steps per epoch.
    #[arg(long, default_value_t = 10,
          value_parser = crate::flags::usize_in(1, crate::flags::MAX_STEPS_PER_EPOCH), help_heading = FT)]
    steps_per_epoch: usize,
    /// Learning rate (a finite number > 0).
    #[arg(long, default_value_t = 1e-5, value_parser = crate::flags::positive, help_heading = FT)]
    lr: f64,
    /// Weight of L_align in the validation loss (a finite number >= 0).
    #[arg(long, default_value_t = 5.0, value_parser = crate::flags::non_negative, help_heading = FT)]
    tau: f64,
    /// Trained parameters: all, attn, qk.
    #[arg(long, default_value = "all", help_heading = FT)]
    params: String,
    /// Also generate the same seeds with these baselines (pag: perturbed-attention guidance,
    /// aae: Attend-and-Excite), each into OUT/METHOD/,
    /// as rows of the grid and the report. Attend-and-Excite excites the target and its
    /// correlated token (or --excite's words).
    #[arg(
        long,
        value_delimiter = ',',
        help_heading = "Baselines (their options below)"
    )]
    compare: Vec<Compared>,
    #[command(flatten, next_help_heading = "Sampling (every method)")]
    sample: SampleArgs,
    #[command(flatten)]
    methods: GuidanceArgs,
    #[command(flatten, next_help_heading = "Model and device")]
    model: ModelArgs,
}

/// A baseline `fix --compare` adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Compared {
    // No per-value docs: clap would list them in a long block of their own.
    Pag,
    #[value(alias = "attend-and-excite")]
    Aae,
}

impl Compared {
    fn guidance(self) -> Guidance {
        match self {
            Compared::Pag => Guidance::Pag,
            Compared::Aae => Guidance::AttendAndExcite,
        }
    }
    /// The method's name in manifests, and its folder in OUT.
    fn name(self) -> &'static str {
        method_name(self.guidance(), false)
    }
    fn label(self) -> &'static str {
        match self {
            Compared::Pag => "PAG",
            Compared::Aae => "Attend-and-Excite",
        }
    }
}

/// `0..8` or `1,5,9`.
pub fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let bad = || format!("--seeds {s:?}: expected a range like 0..8 or a list like 1,5,9");
    let seeds: Vec<u64> = if let Some((a, b)) = s.split_once("..") {
        let (a, b): (u64, u64) = (
            a.trim().parse().with_context(bad)?,
            b.trim().parse().with_context(bad)?,
        );
        if b.saturating_sub(a) > crate::flags::MAX_IMAGES {
            bail!(
                "--seeds {s}: {} seeds, more than the {} one run makes; split the range",
                b - a,
                crate::flags::MAX_IMAGES
            );
        }
        (a..b).collect()
    } else {
        s.split(',')
            .map(|x| x.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .with_context(bad)?
    };
    if seeds.is_empty() {
        bail!("{}: no seeds in it", bad());
    }
    // A repeated seed would be one image reported several times.
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = seeds.iter().find(|&&x| !seen.insert(x)) {
        bail!("--seeds {s}: seed {dup} is listed more than once; list each seed once");
    }
    Ok(seeds)
}

#[derive(Serialize)]
struct Summary {
    prompt: String,
    target: String,
    corr: String,
    selected_epoch: Option<usize>,
    attention_target_to_corr_before: f64,
    attention_target_to_corr_after: Option<f64>,
    seeds: Vec<u64>,
    pretrained: PathBuf,
    fixed: PathBuf,
    /// Every method's folder, in the grid's row order (`sd`, the `--compare` baselines,
    /// `decorrelated`).
    methods: Vec<MethodRow>,
    comparison: PathBuf,
    report: PathBuf,
}

/// What an OUT of `decorr fix` was made with (`OUT/fix.json`). A re-run continues the folder
/// only when these are equal; seeds may change (each image records its own), as may settings
/// that do not change the results (batch size, backend, progress).
fn settings(args: &FixArgs) -> serde_json::Value {
    let s = &args.sample;
    let m = &args.model;
    serde_json::json!({
        "prompt": args.prompt,
        "target": args.target.to_string(),
        "layer": args.layer,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "lr": args.lr,
        "tau": args.tau,
        "params": args.params,
        "negative_prompt": s.negative_prompt,
        "steps": s.steps,
        "guidance_scale": s.guidance_scale,
        "width": s.width,
        "height": s.height,
        "scheduler": s.scheduler.map(|k| k.name()),
        "karras": s.karras,
        "eta": s.eta,
        "weights": m.weights,
        "model": m.model,
        "revision": m.revision,
        "checkpoint_config": m.checkpoint_config,
        "checkpoint_prediction": m.checkpoint_prediction.map(|p| format!("{p:?}")),
    })
}

const SETTINGS: &str = "fix.json";

/// Checks that OUT is new, or a `decorr fix` folder made with `wanted`; nothing is written.
/// Returns whether OUT already holds a run.
fn check_out(out: &Path, wanted: &serde_json::Value) -> Result<bool> {
    Ok(crate::output::check_settings(out, SETTINGS, wanted, "fix")?)
}

pub fn run(args: FixArgs) -> Result<()> {
    let seeds = parse_seeds(&args.seeds)?;
    if args.methods.has_objects() && !args.compare.contains(&Compared::Aae) {
        bail!(
            "--excite/--excite-indices name Attend-and-Excite's objects; add --compare aae \
             (by default it excites the target and its correlated token)"
        );
    }
    // The fine-tuning's own flags, checked before OUT is touched.
    FinetuneArgs::settings_of(
        args.layer,
        args.epochs,
        args.steps_per_epoch,
        args.lr,
        0.01,
        args.tau,
        &args.params,
    )?;
    args.model.training_precision()?;
    let out = &args.out;
    let wanted = settings(&args);
    // Decided before anything is loaded or written: a re-run either continues exactly what OUT
    // holds or stops here, naming what differs.
    let resuming = check_out(out, &wanted)?;
    let _lock = OutputLock::acquire(out)?;
    let result = prepare_and_run(&args, &seeds, &wanted);
    if result.is_err() && !resuming && !holds_usable(out) {
        // Nothing usable was written: the settings file would only block the corrected run.
        let _ = std::fs::remove_file(out.join(SETTINGS));
        crate::output::remove_if_empty(out);
    }
    result
}

/// Whether a fix folder holds something a re-run would reuse: a fine-tuned encoder or images.
fn holds_usable(out: &Path) -> bool {
    let ft = out.join("finetune");
    if ft.join("text_encoder/config.json").is_file() {
        return true;
    }
    std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read_dir(e.path())
                .into_iter()
                .flatten()
                .flatten()
                .any(|f| {
                    let name = f.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("seed-") && name.ends_with(".png")
                })
        })
}

/// Everything that can be checked on the loaded model before anything is written: the target
/// in the prompt, the layer, the correlation the method lowers (stopping when there is none,
/// unless `--anyway`), the baselines; then the run.
fn prepare_and_run(args: &FixArgs, seeds: &[u64], wanted: &serde_json::Value) -> Result<()> {
    let out = &args.out;
    // Load everything first: with no weights this stops at once with the how-to.
    let sd = load(&args.model, None)?;
    let tokenized = sd.tokenizer.encode(&args.prompt)?;
    let target = resolve_target(&tokenized, &args.target)
        .with_context(|| format!("--target {} (of the prompt {:?})", args.target, args.prompt))?;
    let states = prepare(
        &sd.text_encoder,
        &[TrainPrompt {
            tokenized: tokenized.clone(),
            target,
        }],
        args.layer,
        &sd.device,
    )
    .with_context(|| format!("--layer {}", args.layer))?;
    let focus = states[0].focus.clone();
    let row = &states[0].a_pre[focus.target];
    let (to_corr, to_self) = (row[focus.corr], row[focus.target]);
    if to_corr <= to_self {
        let msg = format!(
            "nothing to fix: in {:?}, {:?} attends to itself ({to_self:.3}) more than to any \
             earlier token (most to {:?}, {to_corr:.3}) at layer {}, so there is no \
             unidirectional correlation for the fine-tuning to lower (`decorr analyze` shows \
             the whole table). If {:?} still goes missing, the cause is elsewhere; pass \
             --anyway to fine-tune regardless",
            args.prompt,
            tokenized.token_text(focus.target),
            tokenized.token_text(focus.corr),
            args.layer,
            tokenized.token_text(focus.target),
        );
        if !args.anyway {
            bail!(msg);
        }
        eprintln!("note: {msg}; going on (--anyway)");
    }
    // The baselines' settings are checked (layers, resolution, objects, and what their folders
    // already hold) before the fine-tuning, so that a bad flag costs nothing.
    let mut compare = args.compare.clone();
    compare.sort();
    compare.dedup();
    let mut baselines = Vec::new();
    for &m in &compare {
        let checked = baseline_params(&sd, args, m, &focus).and_then(|p| {
            sd.check(&p)?;
            check_folder(
                &out.join(m.name()),
                &run_record(&sd, &p, m.name()),
                MANIFEST,
            )?;
            Ok(p)
        });
        baselines.push((
            m,
            checked.map_err(|e| e.context(format!("--compare {}", m.name())))?,
        ));
    }
    write_atomic(
        &out.join(SETTINGS),
        serde_json::to_string_pretty(wanted)?.as_bytes(),
    )?;
    run_checked(args, seeds, sd, baselines)
}

/// The fix itself, once every check passed and `fix.json` is written.
fn run_checked(
    args: &FixArgs,
    seeds: &[u64],
    sd: StableDiffusion,
    baselines: Vec<(Compared, GenerateParams)>,
) -> Result<()> {
    let out = &args.out;
    let seeds = seeds.to_vec();
    let ft_dir = out.join("finetune");
    if decorr_runs::finetune::finished(&ft_dir).is_some() {
        eprintln!(
            "{}: fine-tuning already finished, reusing it",
            ft_dir.display()
        );
    } else {
        crate::finetune::run(FinetuneArgs {
            prompts: vec![args.prompt.clone()],
            targets: vec![args.target.clone()],
            layer: args.layer,
            epochs: args.epochs,
            steps_per_epoch: args.steps_per_epoch,
            lr: args.lr,
            weight_decay: 0.01,
            tau: args.tau,
            params: args.params.clone(),
            seed: 0,
            model: args.model.clone(),
            out: ft_dir.clone(),
            overwrite: true,
            quiet: args.sample.quiet,
        })?;
    }
    if crate::interrupt::requested() {
        bail!(
            "interrupted during fine-tuning; {} keeps what was done, and the same command resumes",
            out.display()
        );
    }
    let report = FinetuneReport::read(&ft_dir)?;
    if report.selected_epoch.is_none() {
        bail!("fine-tuning selected no epoch; nothing to generate with");
    }
    let Some(p0) = report.prompts.first() else {
        bail!("{} names no prompt; run the fix again", ft_dir.display());
    };
    // The paper's figure 3 for every method: the cross-attention of the correlated token and
    // the target over the denoising steps (`attention-NNNNNN.png` beside each image).
    let figure_tokens = [
        format!("@{}", p0.corr.index),
        format!("@{}", p0.target.index),
    ];
    let figure = Some((figure_tokens.as_slice(), FIGURE_STEPS));

    let pre = params(
        &sd,
        &args.prompt,
        &args.sample,
        &args.methods,
        Guidance::Cfg,
    )?;
    let pre_dir = out.join("pretrained");
    let mut progress = Bar::new(args.sample.quiet);
    let batch = args.sample.batch_size;
    generate_into(
        &sd,
        &fix_job(&pre, "sd", &seeds, batch, &pre_dir, figure),
        &mut progress,
    )?;
    // The baselines, with the pre-trained encoder (as their papers run them).
    let mut rows = vec![MethodRow {
        method: "sd".into(),
        label: "pre-trained (CFG)".into(),
        dir: pre_dir.clone(),
        excite: None,
    }];
    for (m, p) in &baselines {
        let dir = out.join(m.name());
        generate_into(
            &sd,
            &fix_job(p, m.name(), &seeds, batch, &dir, figure),
            &mut progress,
        )?;
        let tok = sd.tokenizer.encode(&args.prompt)?;
        rows.push(MethodRow {
            method: m.name().into(),
            label: m.label().into(),
            dir,
            excite: (*m == Compared::Aae).then(|| {
                let idx = p.excite.token_indices.clone();
                let tokens = idx.iter().map(|&i| tok.token_text(i)).collect();
                (idx, tokens)
            }),
        });
    }
    let sd = sd.with_tuned_encoder(&ft_dir.join("text_encoder"))?;
    let fixed = params(
        &sd,
        &args.prompt,
        &args.sample,
        &args.methods,
        Guidance::Decorrelated,
    )?;
    let fixed_dir = out.join("fixed");
    generate_into(
        &sd,
        &fix_job(&fixed, "decorrelated", &seeds, batch, &fixed_dir, figure),
        &mut progress,
    )?;

    let read = |dir: &Path, seed: u64| -> Result<image::RgbImage> {
        let p = dir.join(image_file(seed));
        Ok(image::open(&p)
            .with_context(|| format!("reading {}", p.display()))?
            .to_rgb8())
    };
    rows.push(MethodRow {
        method: "decorrelated".into(),
        label: "decorrelated (ours)".into(),
        dir: fixed_dir.clone(),
        excite: None,
    });
    let mut cells = Vec::new();
    for row in &rows {
        cells.push(
            seeds
                .iter()
                .map(|&seed| read(&row.dir, seed))
                .collect::<Result<Vec<_>>>()?,
        );
    }
    let cols: Vec<String> = seeds.iter().map(|s| format!("seed {s}")).collect();
    let labels: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
    let grid_img = grid::labelled(&format!("\"{}\"", args.prompt), &labels, &cols, &cells, 128);
    let comparison = out.join("comparison.png");
    write_atomic(&comparison, &png_bytes(&grid_img))?;

    let html = decorr_runs::pages::fix_report(&args.prompt, &report, &seeds, out, &rows);
    let report_html_path = out.join("report.html");
    write_atomic(&report_html_path, html.as_bytes())?;
    let summary = Summary {
        prompt: args.prompt.clone(),
        target: p0.target.text.clone(),
        corr: p0.corr.text.clone(),
        selected_epoch: report.selected_epoch,
        attention_target_to_corr_before: p0
            .row_before
            .get(p0.corr.index)
            .map_or(f64::NAN, |&v| v as f64),
        attention_target_to_corr_after: p0
            .row_after
            .as_ref()
            .and_then(|r| r.get(p0.corr.index))
            .map(|&v| v as f64),
        seeds: seeds.clone(),
        pretrained: pre_dir,
        fixed: fixed_dir,
        methods: rows,
        comparison,
        report: report_html_path.clone(),
    };
    write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let (r0, r1) = (
            p0.ratio(&p0.row_before).unwrap_or(f64::NAN),
            p0.row_after
                .as_deref()
                .and_then(|r| p0.ratio(r))
                .unwrap_or(f64::NAN),
        );
        // Only a lowered ratio is a fix; anything else is said as it is.
        let verdict = if r1 < r0 {
            "fixed"
        } else {
            "not fixed (the ratio did not fall)"
        };
        println!(
            "{verdict} {:?}: A[t,c]/A[t,t] {r0:.3} -> {r1:.3} (epoch {}); {} seeds each in {}; \
             see {}",
            args.prompt,
            summary.selected_epoch.unwrap_or_default(),
            seeds.len(),
            summary
                .methods
                .iter()
                .map(|r| format!(
                    "{}/",
                    r.dir.file_name().unwrap_or_default().to_string_lossy()
                ))
                .collect::<Vec<_>>()
                .join(", "),
            report_html_path.display()
        );
    }
    Ok(())
}

/// Denoising steps each figure-3 panel shows (evenly spaced, the last included).
const FIGURE_STEPS: usize = 6;

/// One of fix's generation runs: every seed into its own folder, with the attention figure.
fn fix_job<'a>(
    params: &'a GenerateParams,
    method: &'a str,
    seeds: &'a [u64],
    batch_size: usize,
    out: &'a Path,
    attention: Option<(&'a [String], usize)>,
) -> GenerateJob<'a> {
    GenerateJob {
        params,
        method,
        seeds,
        batch_size,
        out,
        attention,
        manifest_name: MANIFEST,
    }
}

/// The sampling parameters of a `--compare` baseline. Attend-and-Excite excites the pair the
/// fix is about, the correlated token `c` and the target `t` (as the fine-tuning resolves them),
/// unless `--excite`/`--excite-indices` name other objects.
fn baseline_params(
    sd: &StableDiffusion,
    args: &FixArgs,
    m: Compared,
    focus: &Focus,
) -> Result<GenerateParams> {
    let mut p = params(sd, &args.prompt, &args.sample, &args.methods, m.guidance())?;
    if m == Compared::Aae && p.excite.token_indices.is_empty() {
        p.excite.token_indices = vec![focus.corr, focus.target];
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_as_range_or_list() {
        assert_eq!(parse_seeds("0..3").unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_seeds("5, 9").unwrap(), vec![5, 9]);
        assert!(parse_seeds("3..3").is_err());
        let e = parse_seeds("1,1,1").unwrap_err().to_string();
        assert!(
            e.contains("--seeds") && e.contains("seed 1 is listed more than once"),
            "{e}"
        );
        assert!(
            parse_seeds("4, 2,4")
                .unwrap_err()
                .to_string()
                .contains("seed 4")
        );
        let e = parse_seeds("0..18446744073709551615")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--seeds") && e.contains("split the range"),
            "{e}"
        );
        assert!(
            parse_seeds("a..b")
                .unwrap_err()
                .to_string()
                .contains("--seeds")
        );
    }
}
