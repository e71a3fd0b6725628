//! Command-line options shared by every command that loads a checkpoint: where the weights
//! are and which backend runs them.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::Device;
use clap::Args;
use decorr_core::{BackendKind, DEFAULT_MODEL, ModelSource, select_device};

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A local diffusers-layout folder (with text_encoder/, tokenizer/, ...) or a component folder.
    #[arg(long, conflicts_with = "model")]
    pub weights: Option<PathBuf>,
    /// A Hugging Face hub repo id, read through the standard HF cache
    /// (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN are honoured).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Hub revision (branch, tag or commit) for --model.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Compute backend: flex (CPU, always built), wgpu, cuda (cargo features of decorr-cli).
    #[arg(long, default_value = "flex")]
    pub backend: BackendKind,
    /// GPU index for cuda.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
}

impl ModelArgs {
    pub fn source(&self) -> ModelSource {
        match &self.weights {
            Some(dir) => ModelSource::Local(dir.clone()),
            None => ModelSource::Hub {
                repo: self.model.clone(),
                revision: self.revision.clone(),
            },
        }
    }

    pub fn device(&self) -> Result<Device> {
        Ok(select_device(self.backend, self.gpu)?)
    }
}
