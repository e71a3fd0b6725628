//! `decorr finetune`: METHOD.md's fine-tuning with checkpoint selection. OUT always holds a
//! consistent result: the selected epoch's `text_encoder/` (transformers naming), `report.json`
//! and `losses.png`, each replaced atomically whenever it changes; Ctrl-C stops after the
//! current step and keeps what was selected so far.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::Args;
use decorr_clip::{ClipTextConfig, ClipTextModel, Tokenized, save_text_encoder};
use decorr_core::io::{OutputLock, remove_stale_temps, temp_dir_beside, write_atomic};
use decorr_trainer::{
    EpochMetrics, MethodError, ParamPreset, PromptState, TargetSpec, TrainConfig, TrainObserver,
    TrainPrompt, finetune_prepared, prepare, resolve_target,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::charts::{Series, panels};
use crate::heatmap::png_bytes;
use crate::model_args::ModelArgs;

#[derive(Args, Debug, Clone)]
pub struct FinetuneArgs {
    /// A training prompt; repeat for several (each needs its --target, in the same order).
    #[arg(long = "prompt", required = true)]
    pub(crate) prompts: Vec<String>,
    /// The object that goes missing in the matching prompt: a word (`train`), a repeated word's
    /// occurrence (`cat#2`) or a raw token index (`@6`).
    #[arg(long = "target", required = true)]
    pub(crate) targets: Vec<TargetSpec>,
    /// Encoder layer (0-based) whose self-attention is decorrelated.
    #[arg(long, default_value_t = 11)]
    pub(crate) layer: usize,
    #[arg(long, default_value_t = 20,
          value_parser = crate::flags::usize_in(1, crate::flags::MAX_EPOCHS))]
    pub(crate) epochs: usize,
    /// Optimiser steps per epoch (each over all prompts).
    #[arg(long, default_value_t = 10,
          value_parser = crate::flags::usize_in(1, crate::flags::MAX_STEPS_PER_EPOCH))]
    pub(crate) steps_per_epoch: usize,
    /// Learning rate (a finite number > 0).
    #[arg(long, default_value_t = 1e-5, value_parser = crate::flags::positive)]
    pub(crate) lr: f64,
    /// AdamW's decoupled weight decay (a finite number >= 0).
    #[arg(long, default_value_t = 0.01, value_parser = crate::flags::non_negative_f32)]
    pub(crate) weight_decay: f32,
    /// Weight of L_align in the validation loss (a finite number >= 0).
    #[arg(long, default_value_t = 5.0, value_parser = crate::flags::non_negative)]
    pub(crate) tau: f64,
    /// Trained parameters: all, attn (q/k/v/out), qk.
    #[arg(long, default_value = "all")]
    pub(crate) params: String,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Output folder (text_encoder/, report.json, losses.png).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Replace an existing OUT.
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// No progress bar.
    #[arg(long)]
    pub(crate) quiet: bool,
}

#[derive(Serialize)]
struct TokenRef {
    index: usize,
    text: String,
}

#[derive(Serialize)]
struct PromptReport {
    prompt: String,
    /// The real tokens (BOS to the first EOS), as the rows below index them.
    tokens: Vec<String>,
    target: TokenRef,
    corr: TokenRef,
    s: Vec<TokenRef>,
    /// Row `t` of `A_pre` (real tokens).
    row_before: Vec<f32>,
    /// Row `t` of `A_ft` at the selected epoch.
    row_after: Option<Vec<f32>>,
}

#[derive(Serialize)]
struct Report<'a> {
    model: String,
    config: &'a TrainConfig,
    prompts: &'a [PromptReport],
    epochs: &'a [EpochMetrics],
    selected_epoch: Option<usize>,
    step_losses: &'a [f64],
    finished: bool,
}

/// Writes OUT as the run goes.
struct OutWriter<'a> {
    out: &'a Path,
    source: String,
    config: &'a TrainConfig,
    enc_config: &'a ClipTextConfig,
    prompts: Vec<PromptReport>,
    states: Vec<PromptState>,
    epochs: Vec<EpochMetrics>,
    steps: Vec<f64>,
    selected: Option<usize>,
    bar: ProgressBar,
    stop: &'static AtomicBool,
}

impl OutWriter<'_> {
    fn write_report(&self, finished: bool) -> Result<(), MethodError> {
        let report = Report {
            model: self.source.clone(),
            config: self.config,
            prompts: &self.prompts,
            epochs: &self.epochs,
            selected_epoch: self.selected,
            step_losses: &self.steps,
            finished,
        };
        let json = serde_json::to_string_pretty(&report).expect("report serializes");
        write_atomic(&self.out.join("report.json"), json.as_bytes())
            .map_err(|e| MethodError::Output(e.to_string()))?;
        let series = [
            Series {
                name: "L_train (Eq. 2)",
                values: self.epochs.iter().map(|m| m.l_train).collect(),
            },
            Series {
                name: "L_corr (Eq. 3)",
                values: self.epochs.iter().map(|m| m.l_corr).collect(),
            },
            Series {
                name: "L_align (Eq. 4)",
                values: self.epochs.iter().map(|m| m.l_align).collect(),
            },
            Series {
                name: "L_val (Eq. 5)",
                values: self.epochs.iter().map(|m| m.l_val).collect(),
            },
        ];
        let title = match self.selected {
            Some(e) => format!("decorrelation fine-tuning; selected epoch {e} (red)"),
            None => "decorrelation fine-tuning".to_string(),
        };
        let img = panels(&title, "epoch", &series, self.selected);
        write_atomic(&self.out.join("losses.png"), &png_bytes(&img))
            .map_err(|e| MethodError::Output(e.to_string()))
    }
}

impl TrainObserver for OutWriter<'_> {
    fn on_step(&mut self, _step: usize, loss: f64) {
        self.steps.push(loss);
        self.bar.inc(1);
        self.bar.set_message(format!("L_train {loss:.5}"));
    }

    fn on_epoch(
        &mut self,
        m: &EpochMetrics,
        maps: &[Vec<Vec<f32>>],
        best: Option<&ClipTextModel>,
    ) -> Result<(), MethodError> {
        self.epochs.push(*m);
        let mark = if best.is_some() { "  <- selected" } else { "" };
        let line = format!(
            "epoch {:>3}: L_train {:.5}  L_corr {:+.5}  L_align {:.5}  L_val {:+.5}{mark}",
            m.epoch, m.l_train, m.l_corr, m.l_align, m.l_val
        );
        // A hidden bar (--quiet, or no terminal) swallows its println.
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
        if let Some(model) = best {
            // Model first, then the report that names it: a stop in between leaves an older
            // report describing an older epoch, never a report ahead of its weights.
            save_text_encoder(model, self.enc_config, &self.out.join("text_encoder"))?;
            self.selected = Some(m.epoch);
            for ((p, st), map) in self.prompts.iter_mut().zip(&self.states).zip(maps) {
                p.row_after = Some(map[st.focus.target].clone());
            }
        }
        self.write_report(false)
    }

    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

fn token_ref(tok: &Tokenized, index: usize) -> TokenRef {
    TokenRef {
        index,
        text: tok.token_text(index),
    }
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    if args.prompts.len() != args.targets.len() {
        bail!(
            "{} --prompt but {} --target: give one --target per --prompt, in the same order",
            args.prompts.len(),
            args.targets.len()
        );
    }
    let params: ParamPreset = args.params.parse()?;
    // The argument parser already refused these (crate::flags); `fix` builds FinetuneArgs
    // itself, so check again before anything touches OUT.
    if args.epochs == 0 || args.steps_per_epoch == 0 {
        bail!("--epochs and --steps-per-epoch must be at least 1");
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr {}: must be a finite number > 0", args.lr);
    }
    if !(args.tau.is_finite() && args.tau >= 0.0) {
        bail!("--tau {}: must be a finite number >= 0", args.tau);
    }
    if !(args.weight_decay.is_finite() && args.weight_decay >= 0.0) {
        bail!(
            "--weight-decay {}: must be a finite number >= 0",
            args.weight_decay
        );
    }
    // Everything about OUT is decided before the model is loaded: a refusal costs nothing.
    let replacing = holds_results(&args.out)?;
    if replacing && !args.overwrite {
        bail!(
            "{} already exists; choose another --out or pass --overwrite to replace it",
            args.out.display()
        );
    }
    if replacing {
        check_finetune_folder(&args.out)?;
    }
    let _lock = OutputLock::acquire(&args.out)?;
    // A replaced OUT is built beside the old one and swapped in only when the run succeeds, so
    // a failed or interrupted run leaves the previous encoder as it was.
    let staging = if replacing {
        if let Some(parent) = args.out.parent() {
            remove_stale_temps(parent, 0);
        }
        Some(
            temp_dir_beside(&args.out)
                .with_context(|| format!("creating a folder beside {}", args.out.display()))?,
        )
    } else {
        None
    };
    let work = staging
        .as_ref()
        .map_or_else(|| args.out.clone(), |t| t.path().to_path_buf());
    let (result, selected) = train(&args, params, &work);
    let out = args.out.display();
    match (staging, result) {
        (None, Ok(trained)) if selected.is_some() => {
            print_result(&trained, selected, &args.out);
            Ok(())
        }
        (None, Err(e)) if selected.is_some() => Err(e.context(format!(
            "{out} keeps epoch {}",
            selected.unwrap_or_default()
        ))),
        // Nothing selected in a fresh OUT: remove it, so that a re-run is not refused.
        (None, result) => {
            let _ = std::fs::remove_dir_all(&args.out);
            match result {
                Ok(_) => {
                    println!("stopped before the first epoch ended; {out} was not written");
                    Ok(())
                }
                Err(e) => Err(e.context(format!("no epoch was completed; {out} was not written"))),
            }
        }
        (Some(_), Err(e)) => match selected {
            Some(ep) => Err(e.context(format!(
                "the run stopped at epoch {ep} and was discarded; the previous {out} is unchanged"
            ))),
            None => Err(e.context(format!("the previous {out} is unchanged"))),
        },
        (Some(_), Ok(trained)) if trained.interrupted || selected.is_none() => {
            println!("interrupted: the new run was discarded; the previous {out} is unchanged");
            Ok(())
        }
        (Some(staging), Ok(trained)) => {
            swap_in(staging, &args.out)?;
            print_result(&trained, selected, &args.out);
            Ok(())
        }
    }
}

/// What [`train`] leaves for the final message.
struct Trained {
    interrupted: bool,
    /// Per prompt: (prompt, A[t,c]/A[t,t] before, after).
    ratios: Vec<(String, f32, f32)>,
}

fn print_result(t: &Trained, selected: Option<usize>, out: &Path) {
    if let Some(e) = selected {
        println!(
            "selected epoch {e}; wrote {}/text_encoder, report.json, losses.png",
            out.display()
        );
        for (prompt, before, after) in &t.ratios {
            println!("  {prompt:?}: A[t,c]/A[t,t] {before:.3} -> {after:.3}");
        }
    }
}

/// Whether `out` holds anything but what a lock leaves (an empty folder left by a run that
/// completed no epoch is no result to protect).
fn holds_results(out: &Path) -> Result<bool> {
    Ok(crate::output::contents(out)?.is_some_and(|names| !names.is_empty()))
}

/// `--overwrite` replaces only what `decorr finetune` writes: a folder holding anything else
/// was not made by it, and is refused with the first foreign file named.
fn check_finetune_folder(out: &Path) -> Result<()> {
    let ours = |rel: &str| {
        matches!(
            rel,
            "text_encoder"
                | "text_encoder/config.json"
                | "text_encoder/model.safetensors"
                | "report.json"
                | "losses.png"
        ) || rel
            .rsplit('/')
            .next()
            .is_some_and(decorr_core::io::is_scratch)
    };
    for dir in [out.to_path_buf(), out.join("text_encoder")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let rel = e.path();
            let rel = rel
                .strip_prefix(out)
                .unwrap_or(&rel)
                .to_string_lossy()
                .replace('\\', "/");
            if !ours(&rel) {
                bail!(
                    "--overwrite refuses {}: it holds {rel}, which decorr finetune does not \
                     write, so it is not a decorr finetune output; move it away or choose \
                     another --out",
                    out.display()
                );
            }
        }
    }
    if !out.join("report.json").is_file() {
        bail!(
            "--overwrite refuses {}: it has no report.json, so it is not a decorr finetune \
             output; choose another --out",
            out.display()
        );
    }
    Ok(())
}

/// Replaces `out` by the finished `staging` folder: the old one is renamed aside first, so at
/// every moment `out` is either the old result or the new one.
fn swap_in(staging: tempfile::TempDir, out: &Path) -> Result<()> {
    let old = temp_dir_beside(out)
        .with_context(|| format!("creating a folder beside {}", out.display()))?;
    let aside = old.path().join("old");
    std::fs::rename(out, &aside)
        .with_context(|| format!("moving the previous {} aside", out.display()))?;
    if let Err(e) = std::fs::rename(staging.path(), out) {
        let _ = std::fs::rename(&aside, out);
        return Err(e).with_context(|| format!("moving the new result into {}", out.display()));
    }
    let _ = staging.keep();
    drop(old); // removes the previous result
    Ok(())
}

/// Loads the model and fine-tunes into `work`. Returns the outcome and the epoch selected so far
/// (also when the run failed: what `work` then holds).
fn train(
    args: &FinetuneArgs,
    params: ParamPreset,
    work: &Path,
) -> (Result<Trained>, Option<usize>) {
    let mut selected = None;
    let r = train_inner(args, params, work, &mut selected);
    (r, selected)
}

fn train_inner(
    args: &FinetuneArgs,
    params: ParamPreset,
    work: &Path,
    selected_out: &mut Option<usize>,
) -> Result<Trained> {
    let source = &args.model.open()?;
    let device = args.model.device()?;
    let tokenizer = decorr_clip::load_tokenizer(source)?;
    let mut prompts = Vec::new();
    for (p, t) in args.prompts.iter().zip(&args.targets) {
        let tokenized = tokenizer.encode(p)?;
        let target = resolve_target(&tokenized, t)
            .with_context(|| format!("--target {t} (of the prompt {p:?})"))?;
        prompts.push(TrainPrompt { tokenized, target });
    }
    let encoder = decorr_clip::load_text_encoder(source, &device)
        .with_context(|| format!("loading the text encoder of {}", source.describe()))?;
    let config = TrainConfig {
        layer: args.layer,
        epochs: args.epochs,
        steps_per_epoch: args.steps_per_epoch,
        lr: args.lr,
        weight_decay: args.weight_decay,
        tau: args.tau,
        params,
        seed: args.seed,
        ..Default::default()
    };
    let states = prepare(&encoder.model, &prompts, config.layer, &device)?;

    crate::interrupt::install();
    let total = (config.epochs * config.steps_per_epoch) as u64;
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps {elapsed_precise} eta {eta} {msg}",
            )
            .expect("valid template"),
        )
    };
    let prompt_reports = prompts
        .iter()
        .zip(&states)
        .map(|(p, st)| PromptReport {
            prompt: p.tokenized.prompt.clone(),
            tokens: (0..st.focus.n_real)
                .map(|i| p.tokenized.token_text(i))
                .collect(),
            target: token_ref(&p.tokenized, st.focus.target),
            corr: token_ref(&p.tokenized, st.focus.corr),
            s: st.focus.s().map(|i| token_ref(&p.tokenized, i)).collect(),
            row_before: st.a_pre[st.focus.target].clone(),
            row_after: None,
        })
        .collect();
    for (p, st) in prompts.iter().zip(&states) {
        println!(
            "{:?}: target {:?} ({}), corr {:?} ({}), A_pre[t,c] {:.4} vs A_pre[t,t] {:.4}",
            p.tokenized.prompt,
            p.tokenized.token_text(st.focus.target),
            st.focus.target,
            p.tokenized.token_text(st.focus.corr),
            st.focus.corr,
            st.a_pre[st.focus.target][st.focus.corr],
            st.a_pre[st.focus.target][st.focus.target],
        );
    }
    let mut writer = OutWriter {
        out: work,
        source: source.describe(),
        config: &config,
        enc_config: &encoder.config,
        prompts: prompt_reports,
        states,
        epochs: Vec::new(),
        steps: Vec::new(),
        selected: None,
        bar,
        stop: crate::interrupt::flag(),
    };
    let states = writer.states.clone();
    let result = finetune_prepared(
        encoder.model,
        &prompts,
        states,
        &config,
        &device,
        &mut writer,
    );
    writer.bar.finish_and_clear();
    *selected_out = writer.selected;
    let outcome = result?;
    writer.write_report(!outcome.interrupted)?;
    let ratios = writer
        .prompts
        .iter()
        .zip(&writer.states)
        .filter_map(|(p, st)| {
            let after = p.row_after.as_ref()?;
            let (t, c) = (st.focus.target, st.focus.corr);
            Some((
                p.prompt.clone(),
                p.row_before[c] / p.row_before[t],
                after[c] / after[t],
            ))
        })
        .collect();
    Ok(Trained {
        interrupted: outcome.interrupted,
        ratios,
    })
}
