//! Command-line options shared by every command that loads a checkpoint: where the weights
//! are and which backend runs them; and, for a hub checkpoint that is not there, the exact
//! download each command needs.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use decorr_core::{CoreError, DEFAULT_MODEL, ModelSource, Precision, hub};

use crate::device::DeviceArgs;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A local diffusers-layout folder (with text_encoder/, tokenizer/, ...), a component folder,
    /// or a single-file SD 1.x/2.x checkpoint (`.safetensors` or `.ckpt` in the original naming),
    /// converted in memory as `cargo xtask convert-weights` would convert it to a folder.
    #[arg(long, conflicts_with = "model")]
    pub weights: Option<PathBuf>,
    /// For a single-file --weights: which configs describe it (auto, sd15, sd2, sdxl, or a
    /// diffusers folder whose unet/, vae/, text_encoder/ (and SDXL's text_encoder_2/) hold them).
    #[arg(long, default_value = "auto")]
    pub checkpoint_config: String,
    /// For a single-file --weights: the scheduler's prediction_type (epsilon or v_prediction).
    /// Default: the config's, i.e. epsilon for SD 1.x and v_prediction for SD 2.x as diffusers
    /// assumes; the 512 SD 2.x base models need epsilon.
    #[arg(long)]
    pub checkpoint_prediction: Option<decorr_convert::Prediction>,
    /// A Hugging Face hub repo id, read through the standard HF cache
    /// (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN are honoured).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Hub revision (branch, tag or commit) for --model.
    #[arg(long, default_value = "main")]
    pub revision: String,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Precision of the text encoder(s) and the UNet: f32, f16 or bf16. Default: f16 on a GPU,
    /// f32 on the CPU (flex, tch-cpu), as diffusers users run. The VAE decodes in f32;
    /// fine-tuning runs in f32 (`finetune` refuses another --dtype, `fix` samples in it).
    #[arg(long)]
    pub dtype: Option<Precision>,
}

impl ModelArgs {
    /// Where the model comes from. A single-file checkpoint is converted in memory (as
    /// `cargo xtask convert-weights` converts it to a folder, with the same code) and nothing is
    /// written to disk; the converted files are freed with the returned source.
    /// A hub checkpoint is checked (offline: in the cache; online: downloaded) for every folder
    /// the running command loads, so that a missing one stops the command at once with the
    /// download it needs.
    pub fn open(&self) -> Result<ModelSource> {
        let source = self.source()?;
        if let ModelSource::Hub { repo, revision } = &source
            && let Some(command) = COMMAND.get()
        {
            check_hub(&source, repo, revision, command)?;
        }
        Ok(source)
    }

    fn source(&self) -> Result<ModelSource> {
        // Neither a folder nor a file (a FIFO, a device): refused by name, not searched.
        if let Some(path) = &self.weights
            && path.exists()
            && !path.is_dir()
        {
            decorr_core::input::check_regular(
                path,
                "--weights (a diffusers folder or a single-file checkpoint)",
            )?;
        }
        Ok(match &self.weights {
            Some(file) if file.is_file() => {
                eprintln!(
                    "converting the single-file checkpoint {} (in memory) ...",
                    file.display()
                );
                let (model, _) = decorr_convert::convert_single_file(
                    file,
                    &decorr_convert::ToDiffusers {
                        config: self
                            .checkpoint_config
                            .parse()
                            .map_err(|e: String| anyhow::anyhow!("--checkpoint-config: {e}"))?,
                        prediction: self.checkpoint_prediction,
                        config_flag: "--checkpoint-config",
                        ..Default::default()
                    },
                )
                .with_context(|| {
                    format!(
                        "{} is a file, so it was read as a single-file SD checkpoint",
                        file.display()
                    )
                })?;
                ModelSource::Memory(Arc::new(model))
            }
            Some(dir) => ModelSource::Local(dir.clone()),
            None => ModelSource::Hub {
                repo: self.model.clone(),
                revision: self.revision.clone(),
            },
        })
    }

    pub fn device(&self) -> Result<Device> {
        self.device.device()
    }

    /// Fine-tuning runs in f32 (an AdamW step of lr 1e-5 is below f16's resolution of most
    /// weights): any other `--dtype` is refused rather than ignored.
    pub fn training_precision(&self) -> Result<Precision> {
        match self.dtype {
            None | Some(Precision::F32) => Ok(Precision::F32),
            Some(p) => anyhow::bail!(
                "--dtype {p}: fine-tuning runs in f32 (half-precision updates of lr ~1e-5 vanish); \
                 drop --dtype here (`decorr fix` and `generate` take it for sampling)"
            ),
        }
    }

    /// The sampling precision: `--dtype`, or the backend's default; refused when `device`
    /// cannot compute in it.
    pub fn precision(&self, device: &Device) -> Result<Precision> {
        let p = self.dtype.unwrap_or_else(|| Precision::default_for(device));
        p.check(device, self.device.backend)?;
        Ok(p)
    }
}

/// The running command (`fix`, `analyze`, ...), set once by `main`: what it loads decides the
/// advice when a hub checkpoint is not there.
static COMMAND: OnceLock<&'static str> = OnceLock::new();

/// Records the running command for [`ModelArgs::open`]'s check and advice.
pub fn set_command(name: &'static str) {
    let _ = COMMAND.set(name);
}

/// The checkpoint folders `command` loads: the text encoder's side for `analyze` and
/// `finetune`, the whole pipeline for the commands that generate images.
pub fn needed_folders(command: &str) -> &'static [&'static str] {
    match command {
        "analyze" | "finetune" => &["text_encoder", "tokenizer"],
        _ => &["text_encoder", "tokenizer", "unet", "vae", "scheduler"],
    }
}

/// The files (each a list of alternatives, as the loaders try them) a folder must hold.
/// `tokenizer/` is not required: without one the embedded CLIP vocabulary stands in.
fn required_files(folder: &str) -> Vec<&'static [&'static str]> {
    match folder {
        "text_encoder" => vec![&["config.json"], decorr_clip::load::WEIGHT_FILES],
        "unet" | "vae" => vec![&["config.json"], decorr_unet::WEIGHT_FILES],
        "scheduler" => vec![&["scheduler_config.json"]],
        _ => vec![],
    }
}

/// Every folder `command` needs of the hub checkpoint `repo@revision`, from the cache or
/// downloaded; a missing one stops here with [`advice`] (with `HF_HUB_OFFLINE` all missing
/// folders are listed, online the first failed download is reported).
fn check_hub(source: &ModelSource, repo: &str, revision: &str, command: &str) -> Result<()> {
    let offline = hub::offline();
    let mut missing: Vec<&str> = Vec::new();
    let mut failed = None;
    'folders: for folder in needed_folders(command) {
        for candidates in required_files(folder) {
            match source.find(folder, candidates) {
                Ok(_) => {}
                Err(CoreError::HubUnavailable { reason, .. }) => {
                    missing.push(folder);
                    if !offline {
                        failed = Some(reason);
                        break 'folders;
                    }
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let why = match failed {
        Some(reason) => format!("{reason}."),
        None => format!(
            "HF_HUB_OFFLINE is set and the hub cache at {} has no {} of {repo}@{revision}.",
            hub::cache_dir().display(),
            list(&missing.iter().map(|f| format!("{f}/")).collect::<Vec<_>>())
        ),
    };
    let fallback = if offline {
        " (or unset HF_HUB_OFFLINE to let decorr download them into the hub cache)"
    } else {
        ""
    };
    bail!("{why}\n{}{fallback}.", advice(command, repo, revision))
}

/// What `command` needs of a checkpoint and the exact download of it: the folders, the
/// `huggingface-cli` command for `repo@revision`, and the folder to pass to `--weights`.
pub fn advice(command: &str, repo: &str, revision: &str) -> String {
    let folders = needed_folders(command);
    let what = if folders.contains(&"unet") {
        "the whole pipeline"
    } else {
        "the text encoder and its tokenizer"
    };
    let includes: Vec<String> = folders.iter().map(|f| format!("{f}/*")).collect();
    let includes: Vec<&str> = includes.iter().map(String::as_str).collect();
    format!(
        "`decorr {command}` needs {what}: {}. Download them once with\n  {}\nthen pass \
         --weights DIR",
        list(&folders.iter().map(|f| format!("{f}/")).collect::<Vec<_>>()),
        hub::download_command(repo, revision, &includes)
    )
}

/// `a, b and c`.
fn list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_names_the_folders_each_command_needs() {
        let a = advice("analyze", DEFAULT_MODEL, "main");
        assert!(
            a.contains("text_encoder/ and tokenizer/")
                && a.contains(&format!(
                    "huggingface-cli download {DEFAULT_MODEL} --include \"text_encoder/*\" \
                     \"tokenizer/*\" --local-dir DIR"
                ))
                && a.contains("then pass --weights DIR")
                && !a.contains("unet"),
            "{a}"
        );
        for command in ["generate", "fix", "compare", "disendiff"] {
            let a = advice(command, "org/sd", "v2");
            assert!(
                a.contains(&format!("`decorr {command}` needs the whole pipeline"))
                    && a.contains(
                        "huggingface-cli download org/sd --revision v2 --include \
                         \"text_encoder/*\" \"tokenizer/*\" \"unet/*\" \"vae/*\" \
                         \"scheduler/*\" --local-dir DIR"
                    ),
                "{a}"
            );
        }
    }
}
