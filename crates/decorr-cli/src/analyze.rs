//! `decorr analyze`: the token table, attention rows against the diagonal (paper's tables 1
//! and 2) and ranked suspects for one prompt; optional JSON and heatmap PNG. On SDXL, each of
//! its two text encoders is analysed at the last layer whose output reaches the UNet, and the
//! one whose target row leans more on an earlier token is named as carrying the correlation.

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
    /// Encoder layer (0-based) whose self-attention is read; default the last layer whose
    /// output reaches the UNet (SD 1.x/2.x: the last; SDXL: the second-to-last, as the UNet
    /// reads hidden_states[-2]). On SDXL it applies to the first encoder.
    #[arg(long)]
    layer: Option<usize>,
    /// SDXL: the second text encoder's layer (default its second-to-last).
    #[arg(long)]
    layer_2: Option<usize>,
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
    let precision = args.model.precision(&device)?;
    let encoder = decorr_clip::load_text_encoder(source, &device)
        .with_context(|| format!("loading the text encoder of {}", source.describe()))?;
    // The last layer whose output the UNet reads (SDXL reads hidden_states[-2]).
    let (default_1, default_2) = decorr_runs::finetune::default_layers(source)?;
    let layer = args.layer.unwrap_or(default_1);
    let first = analyze_one(&args, &encoder.model, precision, &tok, layer, target, "")?;
    let Some(default_2) = default_2 else {
        return write_outputs(&args, &first, None, source, &tok, target);
    };
    println!();
    let tokenizer_2 = decorr_clip::load_tokenizer_component(source, "tokenizer_2")?;
    let tok_2 = tokenizer_2.encode(&args.prompt)?;
    let encoder_2 = decorr_clip::load_text_encoder_component(source, "text_encoder_2", &device)
        .with_context(|| format!("loading text_encoder_2 of {}", source.describe()))?;
    let layer_2 = args.layer_2.unwrap_or(default_2);
    let second = analyze_one(
        &args,
        &encoder_2.model,
        precision,
        &tok_2,
        layer_2,
        target,
        "2",
    )?;
    if let Some(t) = target {
        let ratio =
            |a: &AttentionAnalysis| a.corr(t).map(|c| a.attention[t][c] / a.attention[t][t]);
        let (r1, r2) = (ratio(&first), ratio(&second));
        println!();
        match (r1, r2) {
            (Some(r1), Some(r2)) => println!(
                "A[t,c]/A[t,t]: text_encoder {r1:.3}, text_encoder_2 {r2:.3}; the correlation is \
                 carried most by {}",
                if r2 > r1 {
                    "text_encoder_2"
                } else {
                    "text_encoder"
                }
            ),
            _ => println!("the target has no earlier token in one of the encoders' prompts"),
        }
    }
    write_outputs(&args, &first, Some(&second), source, &tok, target)
}

/// Analyses one encoder at `layer` and prints its tables (`which`: "" or "2", for headings).
fn analyze_one(
    args: &AnalyzeArgs,
    model: &decorr_clip::ClipTextModel,
    precision: decorr_core::Precision,
    tok: &decorr_clip::Tokenized,
    layer: usize,
    target: Option<usize>,
    which: &str,
) -> Result<AttentionAnalysis> {
    let device = args.model.device()?;
    // The attention probabilities are computed in f32 whatever the encoder's precision.
    let model = decorr_core::cast_module(model.clone(), precision);
    let analysis = analyze(&model, tok, layer, &device).with_context(|| {
        format!(
            "--layer{} {layer}",
            if which.is_empty() { "" } else { "-2" }
        )
    })?;
    if !which.is_empty() {
        println!("text_encoder_{which}:");
    }
    print_tokens(&analysis);
    let rows: Vec<usize> = match target {
        Some(t) => vec![t],
        None => analysis.content().skip(1).collect(),
    };
    for &t in &rows {
        print_row(&analysis, t);
    }
    print_suspects(&analysis);
    Ok(analysis)
}

/// The JSON report and heatmaps asked for (SDXL: the second encoder's beside the first's,
/// `NAME-2.EXT` for its heatmap).
fn write_outputs(
    args: &AnalyzeArgs,
    first: &AttentionAnalysis,
    second: Option<&AttentionAnalysis>,
    source: &decorr_core::ModelSource,
    tok: &decorr_clip::Tokenized,
    target: Option<usize>,
) -> Result<()> {
    fn report<'a>(
        analysis: &'a AttentionAnalysis,
        target: Option<usize>,
        model: String,
        truncated_tokens: usize,
    ) -> Report<'a> {
        Report {
            analysis,
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
            model,
            truncated_tokens,
        }
    }
    let report = |a| report(a, target, source.describe(), tok.truncated);
    if let Some(path) = &args.json {
        let text = match second {
            None => serde_json::to_string_pretty(&report(first))?,
            Some(second) => serde_json::to_string_pretty(&serde_json::json!({
                "text_encoder": report(first),
                "text_encoder_2": report(second),
            }))?,
        };
        write_atomic(path, text.as_bytes())?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.heatmap {
        let mut maps = vec![(first, path.clone())];
        if let Some(second) = second {
            let stem = path.file_stem().unwrap_or_default().to_string_lossy();
            let ext = path
                .extension()
                .map_or(String::new(), |e| format!(".{}", e.to_string_lossy()));
            maps.push((second, path.with_file_name(format!("{stem}-2{ext}"))));
        }
        for (analysis, path) in maps {
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
            write_atomic(&path, &heatmap::png_bytes(&img))?;
            println!("wrote {}", path.display());
        }
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
