//! `decorr fix`, the main job, without a command line: checks on the loaded model what the fix
//! is about (target, layer, the correlation itself), fine-tunes the text encoder with selection
//! (reusing a finished fine-tuning), generates the same seeds with the pre-trained model (CFG),
//! the `--compare` baselines and the decorrelated guidance, and writes the grid, the report
//! page and `summary.json`. OUT is resumable; a run that stops on a mistake leaves nothing
//! that blocks the corrected one.
//!
//! OUT/fix.json (the settings that decide the results), OUT/finetune/ (text_encoder/,
//! report.json, losses.png/.svg; SDXL: encoder-N/ each), OUT/sd/, OUT/pag/, OUT/aae/, OUT/ours/
//! (images + manifest.json; folders an older decorr named `pretrained/` and `fixed/` are
//! continued under those names), OUT/comparison.png, OUT/report.html, OUT/summary.json.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use decorr_clip::Tokenized;
use decorr_core::io::{OutputLock, write_atomic};
use decorr_core::{ModelSource, Precision};
use decorr_pipeline::{ExciteParams, GenerateParams, Guidance, PagParams, StableDiffusion};
use decorr_trainer::{Focus, TargetSpec, TrainPrompt, prepare, resolve_target};
use serde::{Deserialize, Serialize};

use crate::error::{Context, Result, RunsError};
use crate::finetune::{
    EncoderChoice, FinetuneJob, FinetuneOutcome, FinetuneReport, FinetuneSettings,
};
use crate::generate::{
    GenerateJob, MANIFEST, Sampling, SamplingRecord, check_folder, excite_indices, generate_into,
    image_file, load_pipeline, run_record,
};
use crate::heatmap::png_bytes;
use crate::method::{Method, MethodKind};
use crate::pages::MethodRow;
use crate::progress::Progress;
use crate::{bail, grid};

/// The settings file of a fix folder.
pub const SETTINGS: &str = "fix.json";

/// Denoising steps each figure-3 panel shows (evenly spaced, the last included).
const FIGURE_STEPS: usize = 6;

/// `OUT/fix.json`: what a fix folder was made with, the settings that decide its results. A
/// re-run continues the folder only when these are equal; seeds may change (each image records
/// its own), as may settings that do not change the results (batch size, backend, progress).
/// The field names are the flags'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FixSettings {
    pub prompt: String,
    pub target: String,
    pub layer: usize,
    pub epochs: usize,
    pub steps_per_epoch: usize,
    pub lr: f64,
    pub tau: f64,
    pub params: String,
    #[serde(flatten)]
    pub sampling: SamplingRecord,
    pub weights: Option<PathBuf>,
    pub model: String,
    pub revision: String,
    pub checkpoint_config: String,
    pub checkpoint_prediction: Option<String>,
    /// SDXL: the second encoder's layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_2: Option<usize>,
    /// SDXL: `--encoder` (1, 2 or both), when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<String>,
}

/// What `decorr fix` was asked to do.
pub struct FixJob<'a> {
    pub source: &'a ModelSource,
    pub device: &'a Device,
    /// The sampling precision (fine-tuning runs in f32).
    pub precision: Precision,
    pub prompt: String,
    pub target: TargetSpec,
    pub seeds: Vec<u64>,
    pub out: PathBuf,
    pub finetune: FinetuneSettings,
    pub sampling: Sampling,
    pub pag: PagParams,
    /// Attend-and-Excite's settings; its objects are `token_indices` when given, else
    /// `excite_words` resolved in the prompt, else the correlated token and the target.
    pub excite: ExciteParams,
    pub excite_words: Vec<String>,
    /// The baselines to add (`MethodKind::Pag`, `MethodKind::Aae`).
    pub baselines: Vec<MethodKind>,
    /// Fine-tune even where there is no correlation to lower.
    pub anyway: bool,
    /// `OUT/fix.json`: the settings that decide the results; a re-run must match them.
    pub settings: FixSettings,
}

/// `OUT/summary.json`, also what the command prints with `--json`.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub prompt: String,
    pub target: String,
    pub corr: String,
    pub selected_epoch: Option<usize>,
    pub attention_target_to_corr_before: f64,
    pub attention_target_to_corr_after: Option<f64>,
    /// `A[t,c] / A[t,t]` before and after (not written: the command's last line says them).
    #[serde(skip)]
    pub ratio: (f64, f64),
    pub seeds: Vec<u64>,
    /// The pre-trained model's folder (`sd/`).
    pub pretrained: PathBuf,
    /// The decorrelated guidance's folder (`ours/`).
    pub fixed: PathBuf,
    /// Every method's folder, in the grid's row order (`sd`, the `--compare` baselines,
    /// `ours`).
    pub methods: Vec<MethodRow>,
    pub comparison: PathBuf,
    pub report: PathBuf,
}

/// Runs the fix into `job.out` (see the module's documentation).
pub fn run(job: FixJob, progress: &mut dyn Progress) -> Result<Summary> {
    if (!job.excite_words.is_empty() || !job.excite.token_indices.is_empty())
        && !job.baselines.contains(&MethodKind::Aae)
    {
        bail!(
            "--excite/--excite-indices name Attend-and-Excite's objects; add --compare aae \
             (by default it excites the target and its correlated token)"
        );
    }
    let out = &job.out;
    // Decided before anything is loaded or written: a re-run either continues exactly what OUT
    // holds or stops here, naming what differs.
    let wanted = serde_json::to_value(&job.settings)?;
    let resuming = crate::output::check_settings(out, SETTINGS, &wanted, "fix")?;
    let _lock = OutputLock::acquire(out)?;
    let result = prepare_and_run(&job, progress);
    if result.is_err() && !resuming && !holds_usable(out) {
        // Nothing usable was written: the settings file would only block the corrected run.
        let _ = std::fs::remove_file(out.join(SETTINGS));
        crate::output::remove_if_empty(out);
    }
    result
}

/// Whether a fix folder holds something a re-run would reuse: a fine-tuned encoder or images.
fn holds_usable(out: &Path) -> bool {
    if ["finetune", "finetune/encoder-1", "finetune/encoder-2"]
        .iter()
        .any(|d| out.join(d).join("text_encoder/config.json").is_file())
    {
        return true;
    }
    let has_image = |dir: &Path| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|f| {
                let name = f.file_name();
                let name = name.to_string_lossy();
                name.starts_with("seed-") && name.ends_with(".png")
            })
    };
    std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| has_image(&e.path()))
}

/// Everything that can be checked on the loaded model before anything is written: the target
/// in the prompt, the layer, the correlation the method lowers (stopping when there is none,
/// unless `anyway`), the baselines; then the run.
fn prepare_and_run(job: &FixJob, progress: &mut dyn Progress) -> Result<Summary> {
    let out = &job.out;
    // Load everything first: a checkpoint that does not load stops here.
    let sd = load_pipeline(job.source, job.device, Some(job.precision))?;
    let tokenized = sd.tokenizer.encode(&job.prompt)?;
    let target = resolve_target(&tokenized, &job.target)
        .with_context(|| format!("--target {} (of the prompt {:?})", job.target, job.prompt))?;
    // Each text encoder's target row at its layer (SDXL has two; the fine-tuning picks among
    // them the same way).
    let mut encoders = vec![("", &sd.text_encoder, tokenized.clone(), job.finetune.layer)];
    if let Some(xl) = &sd.xl {
        let [_, layer_2] = crate::finetune::xl_layers(&job.finetune, job.source)?;
        encoders.push((
            "-2",
            &xl.text_encoder,
            xl.tokenizer.encode(&job.prompt)?,
            layer_2,
        ));
    }
    let mut focus = None;
    let mut leaning = Vec::new();
    for (suffix, encoder, tok, layer) in &encoders {
        let states = prepare(
            encoder,
            &[TrainPrompt {
                tokenized: tok.clone(),
                target,
            }],
            *layer,
            &sd.device,
        )
        .with_context(|| format!("--layer{suffix} {layer}"))?;
        let f = states[0].focus.clone();
        let row = &states[0].a_pre[f.target];
        let (to_corr, to_self) = (row[f.corr], row[f.target]);
        leaning.push((*suffix, *layer, tok.token_text(f.corr), to_corr, to_self));
        focus.get_or_insert(f);
    }
    let focus = focus.expect("one encoder at least");
    // SDXL: the encoders to fine-tune, as the fine-tuning would choose them from these same
    // rows (handed to it, so it does not analyse them again).
    let mut tune = job.finetune.encoder;
    if let [(_, l1, _, c1, t1), (_, l2, _, c2, t2)] = leaning.as_slice() {
        let (r1, r2) = (c1 / t1, c2 / t2);
        tune = tune.or(EncoderChoice::of(&crate::finetune::xl_encoders_to_tune([
            r1, r2,
        ])));
        let names: Vec<&str> = tune
            .map(EncoderChoice::encoders)
            .unwrap_or_default()
            .iter()
            .map(|&n| {
                if n == 1 {
                    "text_encoder"
                } else {
                    "text_encoder_2"
                }
            })
            .collect();
        progress.note(&format!(
            "A[t,c]/A[t,t] of {:?}: text_encoder {r1:.3} (layer {l1}), text_encoder_2 {r2:.3} \
             (layer {l2}); the correlation is carried most by {}; fine-tuning {}",
            tokenized.token_text(focus.target),
            if r2 > r1 {
                "text_encoder_2"
            } else {
                "text_encoder"
            },
            names.join(" and ")
        ));
    }
    if leaning
        .iter()
        .all(|(_, _, _, to_corr, to_self)| to_corr <= to_self)
    {
        let rows: Vec<String> = leaning
            .iter()
            .map(|(suffix, layer, corr, to_corr, to_self)| {
                format!(
                    "{}layer {layer}: itself {to_self:.3}, most to {corr:?} {to_corr:.3}",
                    if suffix.is_empty() {
                        ""
                    } else {
                        "text_encoder_2 "
                    }
                )
            })
            .collect();
        let msg = format!(
            "nothing to fix: in {:?}, {:?} attends to itself more than to any earlier token \
             ({}), so there is no unidirectional correlation for the fine-tuning to lower \
             (`decorr analyze` shows the whole table). If {:?} still goes missing, the cause \
             is elsewhere; pass --anyway to fine-tune regardless",
            job.prompt,
            tokenized.token_text(focus.target),
            rows.join("; "),
            tokenized.token_text(focus.target),
        );
        if !job.anyway {
            return Err(RunsError::Msg(msg));
        }
        progress.note(&format!("note: {msg}; going on (--anyway)"));
    }
    // The baselines' settings are checked (layers, resolution, objects, and what their folders
    // already hold) before the fine-tuning, so that a bad flag costs nothing.
    let mut methods = job.baselines.clone();
    methods.sort();
    methods.dedup();
    let mut baselines = Vec::new();
    for m in methods {
        let checked = baseline(job, m, &tokenized, &focus).and_then(|method| {
            let p = job.sampling.params(&sd, &job.prompt, &method)?;
            sd.check(&p)?;
            check_folder(&m.dir(out), &run_record(&sd, &p, m.name()), MANIFEST)?;
            Ok((method, p))
        });
        baselines.push(checked.with_context(|| format!("--compare {m}"))?);
    }
    write_atomic(
        &out.join(SETTINGS),
        serde_json::to_string_pretty(&job.settings)?.as_bytes(),
    )?;
    run_checked(job, sd, &tokenized, baselines, tune, progress)
}

/// A baseline with its settings. Attend-and-Excite excites the pair the fix is about, the
/// correlated token `c` and the target `t`, unless the job names other objects.
fn baseline(job: &FixJob, m: MethodKind, tok: &Tokenized, focus: &Focus) -> Result<Method> {
    Ok(match m {
        MethodKind::Pag => Method::Pag(job.pag.clone()),
        MethodKind::Aae => {
            let mut excite = job.excite.clone();
            if excite.token_indices.is_empty() {
                excite.token_indices = if job.excite_words.is_empty() {
                    vec![focus.corr, focus.target]
                } else {
                    excite_indices(tok, &job.excite_words)?
                };
            }
            Method::AttendAndExcite(excite)
        }
        other => bail!("--compare takes pag and aae, not {other}"),
    })
}

/// One of fix's generation runs: every seed into its own folder, with the attention figure.
fn fix_job<'a>(
    params: &'a GenerateParams,
    method: &'a str,
    job: &'a FixJob,
    out: &'a Path,
    attention: Option<(&'a [String], usize)>,
) -> GenerateJob<'a> {
    GenerateJob {
        params,
        method,
        seeds: &job.seeds,
        batch_size: job.sampling.batch_size,
        out,
        attention,
        manifest_name: MANIFEST,
    }
}

/// The fix itself, once every check passed and `fix.json` is written.
fn run_checked(
    job: &FixJob,
    sd: StableDiffusion,
    tok: &Tokenized,
    baselines: Vec<(Method, GenerateParams)>,
    tune: Option<EncoderChoice>,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    let out = &job.out;
    let seeds = &job.seeds;
    let ft_dir = out.join("finetune");
    if crate::finetune::finished(&ft_dir).is_some()
        || crate::finetune::finished_xl(&ft_dir).is_some()
    {
        progress.note(&format!(
            "{}: fine-tuning already finished, reusing it",
            ft_dir.display()
        ));
    } else {
        let finetune = FinetuneJob {
            source: job.source,
            device: job.device,
            pretrained: crate::finetune::Pretrained::of(&sd),
            pretrained_2: crate::finetune::Pretrained::of_second(&sd),
            prompts: vec![job.prompt.clone()],
            targets: vec![job.target.clone()],
            settings: FinetuneSettings {
                encoder: tune,
                ..job.finetune.clone()
            },
            out: ft_dir.clone(),
            overwrite: true,
        };
        let outcome = crate::finetune::run(finetune, progress)?;
        let outcomes = match outcome {
            FinetuneOutcome::Encoders(each) => each
                .into_iter()
                .map(|(n, o)| (ft_dir.join(format!("encoder-{n}")), o))
                .collect(),
            one => vec![(ft_dir.clone(), one)],
        };
        for (dir, outcome) in outcomes {
            if let FinetuneOutcome::Done {
                selected, ratios, ..
            } = outcome
            {
                progress.line(&format!(
                    "selected epoch {selected}; wrote {}/text_encoder, report.json, losses.png/.svg",
                    dir.display()
                ));
                for (prompt, before, after) in &ratios {
                    progress.line(&format!(
                        "  {prompt:?}: A[t,c]/A[t,t] {before:.3} -> {after:.3}"
                    ));
                }
            }
        }
    }
    if progress.should_stop() {
        return Err(RunsError::Interrupted(format!(
            "interrupted during fine-tuning; {} keeps what was done, and the same command resumes",
            out.display()
        )));
    }
    // The report the page shows: SDXL's encoder whose target row leaned most on the
    // correlated token before the fine-tuning.
    // (SDXL encoder, report, folder), the one that leaned most first: it names the target
    // and the correlated token.
    let mut fine_tuned: Vec<(Option<&str>, FinetuneReport, String)> =
        match crate::finetune::finished_xl(&ft_dir) {
            Some(each) => each
                .into_iter()
                .map(|(n, r)| {
                    let name = if n == 1 {
                        "text_encoder"
                    } else {
                        "text_encoder_2"
                    };
                    (Some(name), r, format!("finetune/encoder-{n}"))
                })
                .collect(),
            None => vec![(None, FinetuneReport::read(&ft_dir)?, "finetune".to_string())],
        };
    let ratio = |r: &FinetuneReport| {
        r.prompts
            .first()
            .and_then(|p| p.ratio(&p.row_before))
            .unwrap_or(f64::NEG_INFINITY)
    };
    fine_tuned.sort_by(|a, b| ratio(&b.1).total_cmp(&ratio(&a.1)));
    let report = &fine_tuned[0].1;
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

    // The pre-trained model, then the baselines with the pre-trained encoder (as their papers
    // run them), then ours.
    let mut methods = vec![Method::Sd];
    methods.extend(baselines.into_iter().map(|(m, _)| m));
    methods.push(Method::Decorrelated {
        encoder: sd.load_tuned_encoder(&ft_dir)?,
        guidance: Guidance::Cfg,
    });
    let mut rows = Vec::new();
    for method in &methods {
        let kind = method.kind().expect("a compared method");
        let p = job.sampling.params(&sd, &job.prompt, method)?;
        let dir = kind.dir(out);
        generate_into(
            &sd,
            &fix_job(&p, method.name(), job, &dir, figure),
            progress,
        )?;
        rows.push(MethodRow {
            method: method.name().into(),
            label: kind.label().into(),
            dir,
            excite: p.guidance.excite().map(|e| {
                let idx = e.token_indices.clone();
                let tokens = idx.iter().map(|&i| tok.token_text(i)).collect();
                (idx, tokens)
            }),
        });
    }
    let (pre_dir, fixed_dir) = (rows[0].dir.clone(), rows[rows.len() - 1].dir.clone());

    let mut cells = Vec::new();
    for row in &rows {
        let mut line = Vec::new();
        for &seed in seeds {
            let p = row.dir.join(image_file(seed));
            line.push(
                image::open(&p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .to_rgb8(),
            );
        }
        cells.push(line);
    }
    let cols: Vec<String> = seeds.iter().map(|s| format!("seed {s}")).collect();
    let labels: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
    let grid_img = grid::labelled(&format!("\"{}\"", job.prompt), &labels, &cols, &cells, 128);
    let comparison = out.join("comparison.png");
    write_atomic(&comparison, &png_bytes(&grid_img))?;

    let pages: Vec<crate::pages::FineTuned> = fine_tuned
        .iter()
        .map(|(encoder, report, dir)| crate::pages::FineTuned {
            encoder: *encoder,
            report,
            dir: dir.clone(),
        })
        .collect();
    let html = crate::pages::fix_report(&job.prompt, &pages, seeds, out, &rows);
    let report_html = out.join("report.html");
    write_atomic(&report_html, html.as_bytes())?;
    let summary = Summary {
        prompt: job.prompt.clone(),
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
        ratio: (
            p0.ratio(&p0.row_before).unwrap_or(f64::NAN),
            p0.row_after
                .as_deref()
                .and_then(|r| p0.ratio(r))
                .unwrap_or(f64::NAN),
        ),
        seeds: seeds.clone(),
        pretrained: pre_dir,
        fixed: fixed_dir,
        methods: rows,
        comparison,
        report: report_html,
    };
    write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fix.json as older decorr wrote it (keys sorted, from a JSON map) compares equal to the
    /// typed settings, so old fix folders resume; and the type reads back what it writes.
    #[test]
    fn settings_of_older_folders_still_match() {
        let old = r#"{"checkpoint_config":"auto","checkpoint_prediction":null,"epochs":20,
            "eta":0.0,"guidance_scale":7.5,"height":null,"karras":false,"layer":11,"lr":1e-05,
            "model":"stable-diffusion-v1-5/stable-diffusion-v1-5","negative_prompt":"",
            "params":"all","prompt":"rusty tracks with an old train","revision":"main",
            "scheduler":null,"steps":50,"steps_per_epoch":10,"target":"train","tau":5.0,
            "weights":null,"width":null}"#;
        let typed: FixSettings = serde_json::from_str(old).unwrap();
        let old: serde_json::Value = serde_json::from_str(old).unwrap();
        assert_eq!(serde_json::to_value(&typed).unwrap(), old);
        assert_eq!(typed.target, "train");
    }
}
