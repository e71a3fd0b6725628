//! The text-to-image pipeline: prompt encoding, the scheduler loop with classifier-free or
//! decorrelated guidance (METHOD.md Eq. 6), VAE decode, PNG output.
//!
//! Implemented so far: [`rng`], PyTorch's CPU generator and `torch.randn` reproduced bit for bit,
//! so a seed gives the same initial latents (and ancestral-sampler noise) as diffusers. The rest
//! is laid out for issue 5.

pub mod rng;
