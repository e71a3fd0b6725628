//! `decorr analyze`: the token table, attention rows against the diagonal (paper's tables 1
//! and 2) and ranked suspects for one prompt; optional JSON and heatmap PNG.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use decorr_core::io::write_atomic;
use decorr_trainer::{AttentionAnalysis, RowEntry, TargetSpec, analyze, resolve_target};
use serde::Serialize;

use crate::heatmap;
use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// The prompt to analyse.
    #[arg(long)]
    prompt: String,
    /// The object that goes missing, as a word of the prompt (its last BPE token is used).
    #[arg(long, conflicts_with = "target_index")]
    target: Option<String>,
    /// Which occurrence of a repeated target word (1-based).
    #[arg(long, requires = "target")]
    occurrence: Option<usize>,
    /// The target as a raw token index (BOS is 0).
    #[arg(long)]
    target_index: Option<usize>,
    /// Encoder layer (0-based) whose self-attention is read.
    #[arg(long, default_value_t = 11)]
    layer: usize,
    #[command(flatten)]
    model: ModelArgs,
    /// Write the analysis as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a labelled heatmap PNG of the attention map here.
    #[arg(long)]
    heatmap: Option<PathBuf>,
}

/// The target's part of the report.
#[derive(Serialize)]
struct TargetReport {
    index: usize,
    text: String,
    corr: usize,
    corr_text: String,
    row: Vec<RowEntry>,
}

#[derive(Serialize)]
struct Report<'a> {
    #[serde(flatten)]
    analysis: &'a AttentionAnalysis,
    target: Option<TargetReport>,
    model: String,
    truncated_tokens: usize,
}

pub fn run(args: AnalyzeArgs) -> Result<()> {
    let source = &args.model.open()?;
    let device = args.model.device()?;
    let tokenizer = decorr_clip::load_tokenizer(source)?;
    let tok = tokenizer.encode(&args.prompt)?;
    let spec = match (&args.target, args.target_index) {
        (Some(w), _) => Some(TargetSpec::Word {
            word: w.clone(),
            occurrence: args.occurrence,
        }),
        (None, Some(i)) => Some(TargetSpec::Index(i)),
        (None, None) => None,
    };
    // Resolve the target before loading weights: a typo should not cost a model load.
    let target = spec
        .as_ref()
        .map(|s| {
            resolve_target(&tok, s).with_context(|| match s {
                TargetSpec::Word {
                    word,
                    occurrence: Some(n),
                } => format!("--target {word} --occurrence {n}"),
                TargetSpec::Word { word, .. } => format!("--target {word}"),
                TargetSpec::Index(i) => format!("--target-index {i}"),
            })
        })
        .transpose()?;
    let encoder = decorr_clip::load_text_encoder(source, &device)
        .with_context(|| format!("loading the text encoder of {}", source.describe()))?;
    // The attention probabilities are computed in f32 whatever the encoder's precision.
    let model = decorr_core::cast_module(encoder.model, args.model.precision(&device)?);
    let analysis = analyze(&model, &tok, args.layer, &device)?;

    print_tokens(&analysis);
    let rows: Vec<usize> = match target {
        Some(t) => vec![t],
        None => analysis.content().skip(1).collect(),
    };
    for &t in &rows {
        print_row(&analysis, t);
    }
    print_suspects(&analysis);

    if let Some(path) = &args.json {
        let report = Report {
            analysis: &analysis,
            target: target.map(|t| {
                let corr = analysis.corr(t).expect("resolved targets have t >= 2");
                TargetReport {
                    index: t,
                    text: analysis.tokens[t].text.clone(),
                    corr,
                    corr_text: analysis.tokens[corr].text.clone(),
                    row: analysis.row(t),
                }
            }),
            model: source.describe(),
            truncated_tokens: tok.truncated,
        };
        write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.heatmap {
        let labels: Vec<String> = analysis
            .tokens
            .iter()
            .map(|t| format!("{} {}", t.index, t.text))
            .collect();
        let title = format!(
            "layer {} self-attention (head mean); colour scale excludes BOS column",
            analysis.layer
        );
        let img = heatmap::render(&analysis.attention, &labels, &title);
        write_atomic(path, &heatmap::png_bytes(&img))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn print_tokens(a: &AttentionAnalysis) {
    println!("prompt: {:?}   layer {}", a.prompt, a.layer);
    println!("{:>5}  {:>6}  {:<18} word", "index", "id", "token");
    for t in &a.tokens {
        println!(
            "{:>5}  {:>6}  {:<18} {}",
            t.index,
            t.id,
            t.text,
            t.word.as_deref().unwrap_or("")
        );
    }
}

fn print_row(a: &AttentionAnalysis, t: usize) {
    let row = a.row(t);
    let corr = a.corr(t);
    println!();
    println!(
        "row of {:?} (index {t}): attention to earlier tokens vs to itself",
        a.tokens[t].text
    );
    println!(
        "{:>5}  {:<18} {:>8}  {:>8}  {:>6}",
        "j", "token", "A[t,j]", "A[t,t]", "ratio"
    );
    for e in &row {
        let mark = if Some(e.index) == corr {
            "  <- corr (max over earlier tokens)"
        } else if e.index == t {
            "  (self)"
        } else {
            ""
        };
        println!(
            "{:>5}  {:<18} {:>8.4}  {:>8.4}  {:>6.3}{mark}",
            e.index, e.text, e.attention, e.to_self, e.ratio
        );
    }
    if let Some(c) = corr {
        let verdict = if a.attention[t][c] > a.attention[t][t] {
            "exceeds its attention to itself: unidirectional correlation suspected"
        } else {
            "stays below its attention to itself"
        };
        println!("  attention to {:?} {verdict}", a.tokens[c].text);
    }
}

fn print_suspects(a: &AttentionAnalysis) {
    println!();
    if a.suspects.is_empty() {
        println!(
            "no suspected unidirectional correlations (no token attends more to an earlier token than to itself)"
        );
        return;
    }
    println!("suspected unidirectional correlations, strongest first:");
    for s in &a.suspects {
        println!(
            "  {:>3} {:<14} -> {:>3} {:<14} {:.4} > self {:.4}  (x{:.2})",
            s.token,
            s.token_text,
            s.earlier,
            s.earlier_text,
            s.attention_to_earlier,
            s.attention_to_self,
            s.ratio
        );
    }
}
