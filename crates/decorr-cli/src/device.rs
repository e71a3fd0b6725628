//! `--backend` and `--gpu`, shared by every command that runs a model, and the device they
//! choose, printed where the backend picks it (tch: CUDA, MPS or the CPU, whichever PyTorch has).

use anyhow::Result;
use burn::tensor::Device;
use clap::Args;
use decorr_core::{BackendKind, describe, select_device};

#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Compute backend: flex (CPU, always built); wgpu, vulkan, cuda, and tch (LibTorch: its
    /// CUDA GPU, else Apple's MPS, else the CPU) or tch-cpu, each a cargo feature of decorr-cli.
    #[arg(long, env = "DECORR_BACKEND", default_value = "flex")]
    pub backend: BackendKind,
    /// GPU index for cuda and tch.
    #[arg(long, env = "DECORR_GPU", default_value_t = 0)]
    pub gpu: usize,
}

impl DeviceArgs {
    /// The device for `--backend --gpu`; tch says on stderr which device it took.
    pub fn device(&self) -> Result<Device> {
        let device = select_device(self.backend, self.gpu)?;
        if matches!(self.backend, BackendKind::Tch | BackendKind::TchCpu) {
            eprintln!("backend: {}", describe(&device));
        }
        Ok(device)
    }
}
