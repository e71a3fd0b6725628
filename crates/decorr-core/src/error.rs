//! The error type of `decorr-core`.

use std::path::PathBuf;

/// Everything that can go wrong while picking a device or finding and loading weights.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(
        "backend `{0}` is not compiled into this build; rebuild with `--features {1}` \
         (available here: {2})"
    )]
    BackendNotCompiled(String, &'static str, String),
    #[error("unknown backend `{0}`; expected one of: flex, wgpu, vulkan, cuda, tch, tch-cpu")]
    UnknownBackend(String),
    #[error("--gpu {0}: PyTorch sees {1} CUDA device(s), numbered from 0")]
    NoSuchGpu(usize, usize),
    #[error("unknown precision `{0}`; expected one of: f32, f16, bf16")]
    UnknownPrecision(String),
    #[error(
        "the {1} device cannot compute in {0}; choose --dtype f32 (or another precision the \
         device supports)"
    )]
    UnsupportedPrecision(String, String),
    #[error("{0}")]
    NotFound(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An output path names something decorr will not replace by a file.
    #[error(
        "cannot write {path}: it is {kind}, not a regular file; decorr writes each output to a \
         temp file and renames it into place, which would replace it. Choose a file path"
    )]
    NotRegularOutput { path: PathBuf, kind: &'static str },
    /// An output folder's path names a file.
    #[error("{0} is a file, not a folder; choose another output folder")]
    NotAFolder(PathBuf),
    /// Another process holds an output folder's lock.
    #[error(
        "{path} is in use by another decorr run (PID {pid}); wait for it to finish, or choose \
         another output folder"
    )]
    Locked { path: PathBuf, pid: String },
    #[error("{path} is not valid JSON for {what}: {source}")]
    BadJson {
        path: PathBuf,
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("{path} is not a readable safetensors file: {message}")]
    BadSafetensors { path: PathBuf, message: String },
    #[error(
        "{path}: tensor `{tensor}` holds {bad} non-finite value(s) (NaN or infinity) of {total}; \
         the file is damaged or was saved from a run that diverged: re-download or re-convert it"
    )]
    NonFiniteWeights {
        path: PathBuf,
        tensor: String,
        bad: usize,
        total: usize,
    },
    /// A size or count beyond what decorr accepts or what the memory allows.
    #[error("{0}")]
    TooLarge(String),
    #[error("weights in {path} do not fit the model:\n{problems}")]
    WeightMismatch { path: PathBuf, problems: String },
    #[error("hub download of `{file}` from `{repo}` failed: {message}")]
    Hub {
        repo: String,
        file: String,
        message: String,
    },
    /// A hub checkpoint's file is neither in the hub cache nor downloadable (`HF_HUB_OFFLINE`,
    /// no network, no such file). `reason` says which and why, `advice` how to get it; callers
    /// that know every folder they need (the CLI) give their own advice instead.
    #[error("{reason}; {advice}")]
    HubUnavailable {
        repo: String,
        revision: String,
        reason: String,
        advice: String,
    },
    /// An input path (prompt file, JSON, config, image, weights) names something other than a
    /// regular file: reading a FIFO blocks forever, a device such as /dev/zero never ends.
    #[error(
        "{path} is {kind}, not a regular file; {what} must be a regular file (a symbolic link to \
         one is fine): check the path"
    )]
    NotRegularFile {
        path: PathBuf,
        kind: &'static str,
        what: String,
    },
    /// The hub server answered something decorr will not use as a cache path: not a failed
    /// download to retry under another file name, but a server not to trust.
    #[error("hub download of `{file}` from `{repo}` refused: {message}")]
    HubRefused {
        repo: String,
        file: String,
        message: String,
    },
}
