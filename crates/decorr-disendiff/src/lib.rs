//! DisenDiff (BASELINES.md section 3), the paper's last compared method: Custom Diffusion's
//! fine-tuning of every UNet cross-attention's key/value projections and two new token embeddings
//! (`<new1>`, `<new2>`), with a denoising loss plus an attention-calibration loss that pulls each
//! new token's cross-attention map towards its class word's and pushes the two class maps apart.
//!
//! [`tokens`] places the modifiers and builds the captions, [`augment`] the training crops and
//! loss masks, [`calibration`] the maps and the IoU loss, [`train`] the run (autodiff, AdamW,
//! accumulation, resumable state), [`format`] the output folder in diffusers' Custom Diffusion
//! format, read back for sampling, and [`apply`] puts a delta's tensors into the models (for
//! both).

pub mod apply;
pub mod augment;
pub mod calibration;
pub mod format;
pub mod tokens;
pub mod train;

pub use format::{DeltaFiles, Report, read_out, with_delta, write_out};
pub use tokens::{MODIFIERS, Placement, place_modifiers};
pub use train::{DisenDiffConfig, MicroBatch, MicroLosses, Trained, Trainer};

/// Errors of DisenDiff; each names the problem and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DisenDiffError {
    #[error("{0}")]
    Objects(String),
    #[error("base model: {0}")]
    Base(String),
    #[error("{0}")]
    Config(String),
    #[error("training images: {0}")]
    Images(String),
    #[error("DisenDiff delta: {0}")]
    Delta(String),
    #[error("saved training state: {0}")]
    State(String),
    #[error("cannot write the output: {0}")]
    Output(String),
    #[error(
        "non-finite {what} at optimiser step {step}: training stopped; the last finished step is \
         kept. Try a lower --lr"
    )]
    NonFinite { step: usize, what: &'static str },
    #[error(transparent)]
    Clip(#[from] decorr_clip::ClipError),
    #[error(transparent)]
    UNet(#[from] decorr_unet::UNetError),
    #[error(transparent)]
    Core(#[from] decorr_core::CoreError),
}
