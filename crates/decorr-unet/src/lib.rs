//! Stable Diffusion's UNet (`UNet2DConditionModel`) and VAE (`AutoencoderKL`) in burn.
//!
//! Not implemented yet: this crate is laid out so the workspace shows the architecture; the
//! models arrive with issue 4 (verified against diffusers). It exports nothing.
