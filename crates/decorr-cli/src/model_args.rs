//! Command-line options shared by every command that loads a checkpoint: where the weights
//! are and which backend runs them.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use burn::tensor::Device;
use clap::Args;
use decorr_core::{DEFAULT_MODEL, ModelSource, Precision};

use crate::device::DeviceArgs;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A local diffusers-layout folder (with text_encoder/, tokenizer/, ...), a component folder,
    /// or a single-file SD 1.x/2.x checkpoint (`.safetensors` or `.ckpt` in the original naming),
    /// converted in memory as `cargo xtask convert-weights` would convert it to a folder.
    #[arg(long, conflicts_with = "model")]
    pub weights: Option<PathBuf>,
    /// For a single-file --weights: which configs describe it (auto, sd15, sd2, or a diffusers
    /// folder whose unet/, vae/, text_encoder/ hold them).
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
    pub fn open(&self) -> Result<ModelSource> {
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
