//! The device a command runs on, chosen from `--backend`/`--gpu`, with the choice printed where
//! the backend picks it (tch: CUDA, MPS or the CPU, whichever PyTorch has).

use anyhow::Result;
use burn::tensor::Device;
use decorr_core::{BackendKind, describe, select_device};

/// The device for `--backend backend --gpu gpu`; tch says on stderr which device it took.
pub fn select(backend: BackendKind, gpu: usize) -> Result<Device> {
    let device = select_device(backend, gpu)?;
    if matches!(backend, BackendKind::Tch | BackendKind::TchCpu) {
        eprintln!("backend: {}", describe(&device));
    }
    Ok(device)
}
