//! Developer tasks of the decorr workspace (`cargo xtask <task>`).
//!
//! - `clip-vocab --bpe FILE.gz [--out assets/clip]`: rebuild the embedded CLIP vocabulary
//!   (`vocab.json`, `merges.txt`) from OpenAI's BPE merge list as shipped in open_clip's wheel
//!   (`open_clip/bpe_simple_vocab_16e6.txt.gz`, MIT), by the same rule as CLIP's `SimpleTokenizer`.
//! - `convert-weights --from FILE --to DIR [--dtype f32|f16|bf16] [--config sd15|sd2|sdxl|auto|DIR]
//!   [--ema] [--prediction epsilon|v_prediction]`: a single-file SD 1.x/2.x/SDXL checkpoint in the original LDM naming (`.safetensors`, or a
//!   `.ckpt` read by a restricted unpickler) to a diffusers folder;
//!   `convert-weights --from DIR --to-single-file OUT.safetensors [--text-encoder DIR]
//!   [--text-encoder-2 DIR]`: back.
//! - `fuzz [--seconds N] [--target ckpt|safetensors|config|all] [--seed S]`: a bounded-time
//!   mutation fuzzer of the checkpoint, safetensors and config readers, seeded from
//!   `tests/fixtures` (see `fuzz.rs`); findings are saved under `target/fuzz-crashes/`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod fuzz;

#[derive(Parser)]
#[command(name = "xtask", about = "decorr developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Rebuild assets/clip/{vocab.json,merges.txt} from open_clip's bpe_simple_vocab_16e6.txt.gz.
    ClipVocab {
        /// Path to bpe_simple_vocab_16e6.txt.gz (in an installed open_clip_torch package).
        #[arg(long)]
        bpe: PathBuf,
        #[arg(long, default_value = "assets/clip")]
        out: PathBuf,
    },
    /// Convert a single-file LDM checkpoint to a diffusers folder (--to), or a diffusers
    /// folder to a single LDM-named safetensors file (--to-single-file).
    ConvertWeights {
        /// A `.safetensors`/`.ckpt` single file (with --to) or a diffusers folder (with
        /// --to-single-file).
        #[arg(long)]
        from: PathBuf,
        /// Output diffusers folder (must not exist).
        #[arg(long, conflicts_with = "to_single_file")]
        to: Option<PathBuf>,
        /// Output single file in LDM naming (must not exist).
        #[arg(long)]
        to_single_file: Option<PathBuf>,
        /// Cast float tensors (default: keep each tensor's dtype).
        #[arg(long, value_parser = decorr_convert::parse_dtype)]
        dtype: Option<decorr_convert::DType>,
        /// Model configs: sd15, sd2, sdxl, auto (detect from the text encoders: SD 1.x CLIP, SD 2.x
        /// OpenCLIP or SDXL's two), or a diffusers folder whose unet/, vae/, text_encoder/ (and
        /// for SDXL text_encoder_2/) hold the config.json files.
        #[arg(long, default_value = "auto")]
        config: String,
        /// Scheduler prediction_type: epsilon or v_prediction (default: the config's; sd2 is
        /// v_prediction as diffusers assumes, so pass epsilon for the 512 SD 2.x base models).
        #[arg(long, conflicts_with = "to_single_file")]
        prediction: Option<decorr_convert::Prediction>,
        /// Take the UNet from the checkpoint's EMA weights (`model_ema.*`).
        #[arg(long, conflicts_with = "to_single_file")]
        ema: bool,
        /// With --to-single-file: take the text encoder from this folder.
        #[arg(long, requires = "to_single_file")]
        text_encoder: Option<PathBuf>,
        /// With --to-single-file, SDXL: take the second text encoder from this folder.
        #[arg(long, requires = "to_single_file")]
        text_encoder_2: Option<PathBuf>,
    },
    /// Fuzz the checkpoint (.ckpt/.pth), safetensors and config readers for a bounded time,
    /// from the fixtures under tests/fixtures; exits non-zero on any panic, abort or hang,
    /// with the input saved under target/fuzz-crashes/.
    Fuzz {
        /// Total seconds, split evenly between the targets.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        #[arg(long, value_enum, default_value = "all")]
        target: fuzz::Target,
        /// RNG seed: the same seed gives the same inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Address-space limit of each worker process, in MiB.
        #[arg(long, default_value_t = 2048)]
        memory_mb: u64,
        /// Where findings are saved (default target/fuzz-crashes).
        #[arg(long)]
        crash_dir: Option<PathBuf>,
        /// Run one saved input through the target's readers and print their results.
        #[arg(long)]
        replay: Option<PathBuf>,
        #[arg(long, hide = true)]
        worker: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::ClipVocab { bpe, out } => clip_vocab(&bpe, &out),
        Task::ConvertWeights {
            from,
            to,
            to_single_file,
            dtype,
            config,
            prediction,
            ema,
            text_encoder,
            text_encoder_2,
        } => convert_weights(
            from,
            to,
            to_single_file,
            dtype,
            &config,
            ema,
            prediction,
            text_encoder,
            text_encoder_2,
        ),
        Task::Fuzz {
            seconds,
            target,
            seed,
            memory_mb,
            crash_dir,
            replay,
            worker,
        } => fuzz::run(fuzz::Options {
            seconds,
            target,
            seed,
            crash_dir,
            memory_mb,
            replay,
            worker,
        }),
    }
}

#[allow(clippy::too_many_arguments)]
fn convert_weights(
    from: PathBuf,
    to: Option<PathBuf>,
    to_single_file: Option<PathBuf>,
    dtype: Option<decorr_convert::DType>,
    config: &str,
    ema: bool,
    prediction: Option<decorr_convert::Prediction>,
    text_encoder: Option<PathBuf>,
    text_encoder_2: Option<PathBuf>,
) -> Result<()> {
    let summary = match (to, to_single_file) {
        (Some(to), None) => {
            let config: decorr_convert::ConfigChoice =
                config.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            let opts = decorr_convert::ToDiffusers {
                dtype,
                config,
                ema,
                prediction,
                ..Default::default()
            };
            let s = decorr_convert::convert_single_file_to_diffusers(&from, &to, &opts)?;
            println!("wrote {}", to.display());
            s
        }
        (None, Some(out)) => {
            let opts = decorr_convert::ToSingleFile {
                dtype,
                text_encoder,
                text_encoder_2,
            };
            let s = decorr_convert::convert_diffusers_to_single_file(&from, &out, &opts)?;
            println!("wrote {}", out.display());
            s
        }
        _ => bail!("give one of --to DIR or --to-single-file FILE"),
    };
    let text_encoder_2 = match summary.text_encoder_2 {
        0 => String::new(),
        n => format!(", text encoder 2: {n}"),
    };
    println!(
        "  text encoder: {} tensors{text_encoder_2}, unet: {}, vae: {}, ignored: {}",
        summary.text_encoder, summary.unet, summary.vae, summary.ignored
    );
    Ok(())
}

/// CLIP's byte-to-unicode table, in CLIP's order: printable bytes first, then the rest mapped
/// to code points from 256 on.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(u32::from('¡')..=u32::from('¬'))
        .chain(u32::from('®')..=u32::from('ÿ'))
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter()
        .map(|c| char::from_u32(c).expect("valid code point"))
        .collect()
}

fn clip_vocab(bpe: &Path, out: &Path) -> Result<()> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(bpe).with_context(|| format!("open {}", bpe.display()))?,
    )
    .read_to_string(&mut text)
    .with_context(|| format!("{} is not a gzip'd text file", bpe.display()))?;
    let lines: Vec<&str> = text.split('\n').collect();
    // CLIP uses merges 1..=48894 of the file (49152 - 256 - 2 entries after the header).
    let n_merges = 49152 - 256 - 2;
    if lines.len() < n_merges + 1 {
        bail!(
            "{} has {} lines, expected at least {}",
            bpe.display(),
            lines.len(),
            n_merges + 1
        );
    }
    let merges = &lines[1..=n_merges];
    let base = bytes_to_unicode();
    let mut vocab: Vec<String> = base.iter().map(|c| c.to_string()).collect();
    vocab.extend(base.iter().map(|c| format!("{c}</w>")));
    for m in merges {
        vocab.push(m.replace(' ', ""));
    }
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    if vocab.len() != 49408 {
        bail!("built {} vocabulary entries, CLIP has 49408", vocab.len());
    }
    let unique: std::collections::HashSet<&String> = vocab.iter().collect();
    if unique.len() != vocab.len() {
        bail!("the merge list yields duplicate vocabulary entries");
    }
    // Written in id order, as CLIP's own vocab.json.
    let entries: Vec<String> = vocab
        .iter()
        .enumerate()
        .map(|(i, v)| Ok(format!("{}: {i}", serde_json::to_string(v)?)))
        .collect::<Result<_>>()?;
    std::fs::create_dir_all(out)?;
    write_atomic(
        &out.join("vocab.json"),
        format!("{{{}}}", entries.join(", ")).as_bytes(),
    )?;
    let merges_txt = format!("#version: 0.2\n{}\n", merges.join("\n"));
    write_atomic(&out.join("merges.txt"), merges_txt.as_bytes())?;
    println!(
        "wrote {} tokens and {} merges to {}",
        vocab.len(),
        merges.len(),
        out.display()
    );
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
