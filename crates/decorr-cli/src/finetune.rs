//! `decorr finetune`: METHOD.md's fine-tuning with checkpoint selection. OUT always holds a
//! consistent result: the selected epoch's `text_encoder/` (transformers naming), `report.json`
//! and `losses.png`, each replaced atomically whenever it changes; Ctrl-C stops after the
//! current step and keeps what was selected so far. The folder is `decorr_runs::finetune`'s.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use decorr_runs::finetune::{FinetuneJob, FinetuneOutcome, FinetuneSettings};
use decorr_trainer::{ParamPreset, TargetSpec};

use crate::model_args::ModelArgs;
use crate::progress::Bar;

#[derive(Args, Debug, Clone)]
pub struct FinetuneArgs {
    /// A training prompt; repeat for several (each needs its --target, in the same order).
    #[arg(long = "prompt", required = true)]
    pub(crate) prompts: Vec<String>,
    /// The object that goes missing in the matching prompt: a word (`train`), a repeated word's
    /// occurrence (`cat#2`) or a raw token index (`@6`).
    #[arg(long = "target", required = true)]
    pub(crate) targets: Vec<TargetSpec>,
    #[command(flatten)]
    pub(crate) layers: EncoderLayers,
    /// Epochs; each ends with a validation that may select it (the paper: 20).
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
    /// The device's random seed, recorded in report.json (the training draws no random numbers
    /// today: full-batch steps, no dropout).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Output folder (text_encoder/, report.json, losses.png/.svg).
    #[arg(long, value_parser = crate::flags::out_folder)]
    pub(crate) out: PathBuf,
    /// Replace an existing OUT.
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// No progress bar.
    #[arg(long)]
    pub(crate) quiet: bool,
}

/// Which encoder layer (and, on SDXL, which encoders) the fine-tuning decorrelates.
#[derive(Args, Debug, Clone)]
pub struct EncoderLayers {
    /// Encoder layer (0-based) whose self-attention is decorrelated; default the last layer
    /// whose output the UNet reads (11 for SD 1.5; on SDXL the second-to-last of the first
    /// encoder, as its UNet reads hidden_states[-2]).
    #[arg(long)]
    pub layer: Option<usize>,
    /// SDXL: the second text encoder's layer (default its second-to-last).
    #[arg(long)]
    pub layer_2: Option<usize>,
    /// SDXL: which text encoders to fine-tune: 1, 2 or both (default: those whose target row
    /// leans on an earlier token, as analyze shows; where neither does, the one that leans more).
    #[arg(long)]
    pub encoder: Option<decorr_runs::finetune::EncoderChoice>,
}

impl EncoderLayers {
    /// The layers and encoder choice for `source`, defaults resolved from its configs; the
    /// SDXL flags are refused on a checkpoint with one text encoder.
    pub fn resolve(
        &self,
        source: &decorr_core::ModelSource,
    ) -> Result<(
        usize,
        Option<usize>,
        Option<decorr_runs::finetune::EncoderChoice>,
    )> {
        let (first, second) = decorr_runs::finetune::default_layers(source)?;
        if second.is_none() && (self.layer_2.is_some() || self.encoder.is_some()) {
            anyhow::bail!(
                "--layer-2 and --encoder choose among SDXL's two text encoders; {} has one",
                source.describe()
            );
        }
        Ok((
            self.layer.unwrap_or(first),
            second.map(|d| self.layer_2.unwrap_or(d)),
            self.encoder,
        ))
    }

    /// Sets `s`'s layers and encoder choice for `source`.
    pub fn apply(&self, source: &decorr_core::ModelSource, s: &mut FinetuneSettings) -> Result<()> {
        (s.layer, s.layer_2, s.encoder) = self.resolve(source)?;
        Ok(())
    }
}

impl FinetuneArgs {
    /// The library's form of the training flags (the layer is set from the checkpoint by
    /// [`EncoderLayers::apply`]).
    pub fn settings(&self) -> Result<FinetuneSettings> {
        let mut s = Self::settings_of(
            0,
            self.epochs,
            self.steps_per_epoch,
            self.lr,
            self.weight_decay,
            self.tau,
            &self.params,
        )?;
        s.seed = self.seed;
        Ok(s)
    }

    /// The settings of these flags (training seed 0), for commands that fine-tune on the way.
    pub fn settings_of(
        layer: usize,
        epochs: usize,
        steps_per_epoch: usize,
        lr: f64,
        weight_decay: f32,
        tau: f64,
        params: &str,
    ) -> Result<FinetuneSettings> {
        let params: ParamPreset = params.parse()?;
        Ok(FinetuneSettings {
            layer,
            epochs,
            steps_per_epoch,
            lr,
            weight_decay,
            tau,
            params,
            seed: 0,
            layer_2: None,
            encoder: None,
        })
    }
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    let mut settings = args.settings()?;
    args.model.training_precision()?;
    let source = args.model.open()?;
    args.layers.apply(&source, &mut settings)?;
    let device = args.model.device()?;
    let job = FinetuneJob {
        source: &source,
        device: &device,
        pretrained: None,
        pretrained_2: None,
        prompts: args.prompts.clone(),
        targets: args.targets.clone(),
        settings,
        out: args.out.clone(),
        overwrite: args.overwrite,
    };
    let out = args.out.display();
    let outcome = decorr_runs::finetune::run(job, &mut Bar::new(args.quiet))?;
    let each = match outcome {
        FinetuneOutcome::Encoders(each) => each
            .into_iter()
            .map(|(n, o)| (format!("{out}/encoder-{n}"), o))
            .collect(),
        one => vec![(out.to_string(), one)],
    };
    for (out, outcome) in each {
        print_outcome(&out, outcome);
    }
    Ok(())
}

/// The line (and per-prompt ratios) of one fine-tuning folder.
fn print_outcome(out: &str, outcome: FinetuneOutcome) {
    match outcome {
        FinetuneOutcome::Done {
            selected, ratios, ..
        } => {
            println!(
                "selected epoch {selected}; wrote {out}/text_encoder, report.json, losses.png/.svg"
            );
            for (prompt, before, after) in &ratios {
                println!("  {prompt:?}: A[t,c]/A[t,t] {before:.3} -> {after:.3}");
            }
        }
        FinetuneOutcome::Encoders(each) => {
            for (n, o) in each {
                print_outcome(&format!("{out}/encoder-{n}"), o);
            }
        }
        FinetuneOutcome::NothingSelected => {
            println!("stopped before the first epoch ended; {out} was not written");
        }
        FinetuneOutcome::Discarded => {
            println!("interrupted: the new run was discarded; the previous {out} is unchanged");
        }
    }
}
