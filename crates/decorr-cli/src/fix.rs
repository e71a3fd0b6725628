//! `decorr fix`: the main job's flags, and what it prints. The work (diagnosis, fine-tuning,
//! the methods side by side, the grid, the report page) is `decorr_runs::fix`'s; see there for
//! what OUT holds.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use decorr_runs::MethodKind;
use decorr_runs::fix::{FixJob, FixSettings};
use decorr_trainer::TargetSpec;

use crate::finetune::FinetuneArgs;
use crate::generate::SampleArgs;
use crate::guidance_args::GuidanceArgs;
use crate::model_args::ModelArgs;
use crate::progress::Bar;

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
    /// Output folder: finetune/, sd/, ours/, comparison.png, report.html (created;
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
    #[command(flatten, next_help_heading = FT)]
    layers: crate::finetune::EncoderLayers,
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
    /// The compared method of the library.
    fn method(self) -> MethodKind {
        match self {
            Compared::Pag => MethodKind::Pag,
            Compared::Aae => MethodKind::Aae,
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

/// The settings of these flags that decide a fix folder's results (`OUT/fix.json`), with the
/// fine-tuning's resolved layers.
fn settings(args: &FixArgs, ft: &decorr_runs::finetune::FinetuneSettings) -> FixSettings {
    let s = &args.sample;
    let m = &args.model;
    FixSettings {
        prompt: args.prompt.clone(),
        target: args.target.to_string(),
        layer: ft.layer,
        layer_2: ft.layer_2,
        encoder: args.layers.encoder.map(|e| {
            match e {
                decorr_runs::finetune::EncoderChoice::First => "1",
                decorr_runs::finetune::EncoderChoice::Second => "2",
                decorr_runs::finetune::EncoderChoice::Both => "both",
            }
            .to_string()
        }),
        epochs: args.epochs,
        steps_per_epoch: args.steps_per_epoch,
        lr: args.lr,
        tau: args.tau,
        params: args.params.clone(),
        sampling: (&s.sampling()).into(),
        weights: m.weights.clone(),
        model: m.model.clone(),
        revision: m.revision.clone(),
        checkpoint_config: m.checkpoint_config.clone(),
        checkpoint_prediction: m.checkpoint_prediction.map(|p| format!("{p:?}")),
    }
}

pub fn run(args: FixArgs) -> Result<()> {
    let seeds = parse_seeds(&args.seeds)?;
    // The fine-tuning's own flags, checked before OUT is touched.
    let mut finetune = FinetuneArgs::settings_of(
        0,
        args.epochs,
        args.steps_per_epoch,
        args.lr,
        0.01,
        args.tau,
        &args.params,
    )?;
    args.model.training_precision()?;
    let source = args.model.open()?;
    args.layers.apply(&source, &mut finetune)?;
    let device = args.model.device()?;
    let settings = settings(&args, &finetune);
    let job = FixJob {
        source: &source,
        device: &device,
        precision: args.model.precision(&device)?,
        prompt: args.prompt.clone(),
        target: args.target.clone(),
        seeds,
        out: args.out.clone(),
        finetune,
        sampling: args.sample.sampling(),
        pag: args.methods.pag(),
        excite: args.methods.excite_params(),
        excite_words: args.methods.excite.clone(),
        baselines: args.compare.iter().map(|c| c.method()).collect(),
        anyway: args.anyway,
        settings,
    };
    let summary = decorr_runs::fix::run(job, &mut Bar::new(args.sample.quiet))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let (r0, r1) = summary.ratio;
    // Only a lowered ratio is a fix; anything else is said as it is.
    let verdict = if r1 < r0 {
        "fixed"
    } else {
        "not fixed (the ratio did not fall)"
    };
    let folders: Vec<String> = summary
        .methods
        .iter()
        .map(|r| {
            format!(
                "{}/",
                r.dir.file_name().unwrap_or_default().to_string_lossy()
            )
        })
        .collect();
    println!(
        "{verdict} {:?}: A[t,c]/A[t,t] {r0:.3} -> {r1:.3} (epoch {}); {} seeds each in {}; see {}",
        args.prompt,
        summary.selected_epoch.unwrap_or_default(),
        summary.seeds.len(),
        folders.join(", "),
        summary.report.display()
    );
    Ok(())
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
