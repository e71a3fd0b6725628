//! The image side of Stable Diffusion in burn: the denoising UNet ([`unet`]), the VAE ([`vae`]),
//! their shared blocks ([`blocks`], [`attention`]), configs read from diffusers' `config.json`
//! ([`config`]) and loading ([`load`]); the CPU fast paths on flex ([`host`], and under
//! autodiff [`host_autodiff`]), both calling the slice-level kernels of [`kernels`], and
//! torch's fused kernels on LibTorch (`libtorch`, `tch` feature). Verified against diffusers on
//! tiny random models (SD 1.x-, 2.x- and XL-like) and a full-size SD 1.5 configuration
//! (docs/verification.md).

pub mod attention;
pub mod blocks;
pub mod config;
pub mod host;
pub mod host_autodiff;
pub mod kernels;
#[cfg(feature = "tch")]
pub mod libtorch;
pub mod load;
pub mod unet;
pub mod vae;

pub use attention::{AttentionMap, AttentionOptions, Capture};
pub use config::{PerBlock, UNetConfig, VaeConfig};
pub use load::{Loaded, WEIGHT_FILES, load_unet, load_vae};
pub use unet::{AddedConditions, AttentionSite, TextTimeDims, UNet2DConditionModel, UNetOutput};
pub use vae::{AutoencoderKL, Posterior};

/// Errors of the UNet/VAE crate.
#[derive(Debug, thiserror::Error)]
pub enum UNetError {
    #[error("UNet/VAE config: {0}")]
    Config(String),
    /// Inputs a pass cannot take (SDXL's added conditions missing, extra or misshapen).
    #[error("UNet input: {0}")]
    Input(String),
    #[error(transparent)]
    Core(#[from] decorr_core::CoreError),
}
