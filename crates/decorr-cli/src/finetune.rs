//! `decorr finetune`: METHOD.md's fine-tuning with checkpoint selection. OUT always holds a
//! consistent result: the selected epoch's `text_encoder/` (transformers naming), `report.json`
//! and `losses.png`, each replaced atomically whenever it changes; Ctrl-C stops after the
//! current step and keeps what was selected so far.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::Args;
use decorr_clip::{ClipTextConfig, ClipTextModel, Tokenized, save_text_encoder};
use decorr_core::io::write_atomic;
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
    #[arg(long, default_value_t = 20)]
    pub(crate) epochs: usize,
    /// Optimiser steps per epoch (each over all prompts).
    #[arg(long, default_value_t = 10)]
    pub(crate) steps_per_epoch: usize,
    #[arg(long, default_value_t = 1e-5)]
    pub(crate) lr: f64,
    #[arg(long, default_value_t = 0.01)]
    pub(crate) weight_decay: f32,
    /// Weight of L_align in the validation loss.
    #[arg(long, default_value_t = 5.0)]
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
    stop: Arc<AtomicBool>,
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
    if args.epochs == 0 || args.steps_per_epoch == 0 {
        bail!("--epochs and --steps-per-epoch must be at least 1");
    }
    if args.out.exists() && !args.overwrite {
        bail!(
            "{} already exists; choose another --out or pass --overwrite to replace it",
            args.out.display()
        );
    }
    let source = &args.model.open()?;
    let device = args.model.device()?;
    let tokenizer = decorr_clip::load_tokenizer(source)?;
    let mut prompts = Vec::new();
    for (p, t) in args.prompts.iter().zip(&args.targets) {
        let tokenized = tokenizer.encode(p)?;
        let target = resolve_target(&tokenized, t).with_context(|| format!("prompt {p:?}"))?;
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
    if args.out.exists() {
        std::fs::remove_dir_all(&args.out)
            .with_context(|| format!("removing the old {}", args.out.display()))?;
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C falls through to the default (immediate exit); files stay whole anyway.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: stopping after this step; OUT keeps the selected epoch");
        });
    }
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
        out: &args.out,
        source: source.describe(),
        config: &config,
        enc_config: &encoder.config,
        prompts: prompt_reports,
        states,
        epochs: Vec::new(),
        steps: Vec::new(),
        selected: None,
        bar,
        stop,
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
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            let kept = match writer.selected {
                Some(ep) => format!("{} keeps epoch {ep}", args.out.display()),
                None => format!(
                    "no epoch was completed; {} holds no encoder",
                    args.out.display()
                ),
            };
            return Err(anyhow::Error::new(e).context(kept));
        }
    };
    writer.write_report(!outcome.interrupted)?;
    match outcome.selected_epoch {
        Some(e) => {
            println!(
                "selected epoch {e}; wrote {}/text_encoder, report.json, losses.png",
                args.out.display()
            );
            for (p, st) in writer.prompts.iter().zip(&writer.states) {
                if let Some(after) = &p.row_after {
                    let (t, c) = (st.focus.target, st.focus.corr);
                    println!(
                        "  {:?}: A[t,c]/A[t,t] {:.3} -> {:.3}",
                        p.prompt,
                        p.row_before[c] / p.row_before[t],
                        after[c] / after[t]
                    );
                }
            }
        }
        None => println!(
            "stopped before the first epoch ended; {} holds no encoder",
            args.out.display()
        ),
    }
    Ok(())
}
