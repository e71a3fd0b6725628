//! Errors of the converter, each naming the file or tensor at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is neither a safetensors file nor a PyTorch zip checkpoint (first bytes {magic})"
    )]
    UnknownFormat { path: PathBuf, magic: String },
    #[error("{path}: bad safetensors file: {message}")]
    BadSafetensors { path: PathBuf, message: String },
    #[error("{path}: bad checkpoint: {message}")]
    BadCheckpoint { path: PathBuf, message: String },
    #[error(
        "{path}: refused to load: the pickle references `{global}`, which is not part of a plain state dict (nothing was executed)"
    )]
    RefusedGlobal { path: PathBuf, global: String },
    #[error("unknown tensor names (not a Stable Diffusion 1.x/2.x or SDXL checkpoint?): {keys}")]
    UnknownKeys { keys: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("missing component: {0}")]
    Missing(String),
    #[error("{path}: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error("output {0} already exists; remove it or choose another path")]
    OutputExists(PathBuf),
    #[error(transparent)]
    Core(#[from] decorr_core::CoreError),
}
