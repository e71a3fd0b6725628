//! The error type of `decorr-eval`.

use std::path::PathBuf;

/// Everything that can go wrong while evaluating: loading a scoring model, reading images or
/// statistics, talking to the captioning endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Core(#[from] decorr_core::CoreError),
    #[error(transparent)]
    Convert(#[from] decorr_convert::error::ConvertError),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Input(String),
    #[error("request to {url} failed: {message}")]
    Http { url: String, message: String },
    #[error("unexpected reply from {url}: {message}")]
    BadReply { url: String, message: String },
}
