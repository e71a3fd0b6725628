//! The text-to-image pipeline: prompt encoding, the scheduler loop, VAE decode ([`pipeline`]);
//! one strategy per guidance method ([`guidance`]: classifier-free, decorrelated (METHOD.md
//! Eq. 6), PAG, Attend-and-Excite); PyTorch's CPU generator
//! and `torch.randn` reproduced bit for bit ([`rng`]), so a seed gives the same initial latents
//! (and ancestral-sampler noise) as diffusers; PNG files with their parameters ([`png`]).

pub mod guidance;
pub mod pipeline;
pub mod png;
pub mod rng;

pub use guidance::{ExciteParams, ExciteStep, Guidance, PagParams};
pub use pipeline::{
    GenerateParams, Generated, StableDiffusion, StepAttention, StepTrace, TextSide, Timings,
    TunedEncoder, XlText, to_rgb8,
};

/// Errors of the pipeline crate.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Input(String),
    /// The step callback asked to stop (Ctrl-C).
    #[error("interrupted")]
    Interrupted,
    /// A model output turned NaN or infinite; the message names the stage and likely causes.
    #[error("{0}")]
    NonFinite(String),
    #[error(transparent)]
    Clip(#[from] decorr_clip::ClipError),
    #[error(transparent)]
    UNet(#[from] decorr_unet::UNetError),
    #[error(transparent)]
    Scheduler(#[from] decorr_scheduler::SchedulerError),
    #[error(transparent)]
    Core(#[from] decorr_core::CoreError),
}
