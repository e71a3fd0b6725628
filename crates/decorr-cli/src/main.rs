//! `decorr`: find and fix object omission in Stable Diffusion (see README).

mod analyze;
mod compare;
mod device;
mod disendiff;
mod eval;
mod finetune;
mod fix;
mod flags;
mod generate;
mod guidance_args;
mod interrupt;
mod model_args;
mod progress;
mod study;

// The figures, output folders and shards are the library's (decorr-runs).
use decorr_runs::{heatmap, output, shard};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "decorr",
    version,
    about = "Find and fix object omission in Stable Diffusion"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a prompt's text-encoder self-attention and flag unidirectional correlations
    /// (the paper's tables 1 and 2).
    Analyze(analyze::AnalyzeArgs),
    /// Fine-tune the text encoder to lower the target's attention to its correlated token
    /// (the paper's Eq. 2), selecting the best epoch (Eqs. 3 to 5).
    Finetune(finetune::FinetuneArgs),
    /// Generate images with classifier-free, decorrelated (the paper's Eq. 6), perturbed-attention
    /// or Attend-and-Excite guidance.
    Generate(generate::GenerateArgs),
    /// The main job: fine-tune for a prompt's missing object, then generate the same seeds
    /// with the pre-trained model and with the decorrelated guidance, side by side.
    Fix(fix::FixArgs),
    /// Evaluate: BERTScore of VLM captions, FID, omission rate, and the paper's table 3.
    Eval(eval::EvalArgs),
    /// The paper's comparison: the pre-trained model, PAG, Attend-and-Excite and ours on the
    /// same seeds for prompts with object pairs, ready for `decorr eval run`.
    Compare(Box<compare::CompareArgs>),
    /// DisenDiff, the last compared method: fine-tune the UNet's cross-attention k/v and two new
    /// tokens for a prompt's object pair (diffusers' Custom Diffusion format).
    Disendiff(Box<disendiff::DisenDiffArgs>),
    /// The human study of table 4: blind rating pages over the runs' images, and its report.
    Study(study::StudyArgs),
}

fn main() {
    decorr_core::memory::retain_freed_memory();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {}", message(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, as `{:#}` prints them, without a cause whose text an outer message
/// already quotes (the crates' errors name their `source` in their own text).
fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    // What the command loads decides the advice when the weights are not there.
    model_args::set_command(match &cli.command {
        Command::Analyze(_) => "analyze",
        Command::Finetune(_) => "finetune",
        Command::Generate(_) => "generate",
        Command::Fix(_) => "fix",
        Command::Eval(_) => "eval",
        Command::Compare(_) => "compare",
        Command::Disendiff(_) => "disendiff",
        Command::Study(_) => "study",
    });
    match cli.command {
        Command::Analyze(args) => analyze::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Fix(args) => fix::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Compare(args) => compare::run(*args),
        Command::Disendiff(args) => disendiff::run(*args),
        Command::Study(args) => study::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::message;

    /// Every option and argument of every command says what it is for in `--help`, and no help
    /// points at files a clone of the repository does not have.
    #[test]
    fn every_option_is_described() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            for text in [cmd.get_about(), cmd.get_long_about()]
                .into_iter()
                .flatten()
            {
                let text = text.to_string();
                if text.contains("METHOD.md") || text.contains("BASELINES.md") {
                    missing.push(format!("{path}: about names a file outside the repository"));
                }
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                match arg.get_help() {
                    None => missing.push(format!("{path} --{id}")),
                    Some(h) => {
                        // A document a help text names is one of the repository's own.
                        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
                        for word in h.to_string().split(|c: char| {
                            c.is_whitespace() || matches!(c, '(' | ')' | ',' | ';')
                        }) {
                            let word = word.trim_end_matches('.');
                            if word.ends_with(".md")
                                && (word.contains("..") || !root.join(word).is_file())
                            {
                                missing.push(format!(
                                    "{path} --{id}: names {word}, not in the repository"
                                ));
                            }
                        }
                    }
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "undescribed:\n{}", missing.join("\n"));
    }

    /// An error that quotes its source in its own text, as the crates' `Io`/`Write` errors do.
    #[derive(Debug, thiserror::Error)]
    #[error("cannot write out: {source}")]
    struct Quoting {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_quoted_is_not_repeated() {
        let io = || std::io::Error::new(std::io::ErrorKind::AlreadyExists, "File exists");
        let e = anyhow::Error::new(Quoting { source: io() });
        assert_eq!(
            format!("{e:#}"),
            "cannot write out: File exists: File exists"
        );
        assert_eq!(message(&e), "cannot write out: File exists");
        // A context whose cause adds something keeps it.
        let e = anyhow::Error::new(io()).context("saving OUT");
        assert_eq!(message(&e), "saving OUT: File exists");
    }
}
