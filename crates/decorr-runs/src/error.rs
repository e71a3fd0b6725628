//! The crate's one error type, and the small helpers (`bail!`, [`Context`]) that let the
//! orchestration code say what it was doing when something failed, as the binaries' anyhow
//! messages do: `reading OUT/manifest.json: ...`.

use std::fmt::Display;

/// Errors of the orchestration: a message naming the problem and the fix, or a lower crate's
/// error, with what was being done around it.
#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    #[error("{0}")]
    Msg(String),
    /// `context: inner` (the inner error's text is part of this one's, so a chain printer
    /// does not repeat it).
    #[error("{context}: {inner}")]
    Context {
        context: String,
        inner: Box<RunsError>,
    },
    /// The stop callback asked to stop (Ctrl-C); what was finished is kept.
    #[error("{0}")]
    Interrupted(String),
    #[error(transparent)]
    Pipeline(#[from] decorr_pipeline::PipelineError),
    #[error(transparent)]
    Method(#[from] decorr_trainer::MethodError),
    #[error(transparent)]
    Clip(#[from] decorr_clip::ClipError),
    #[error(transparent)]
    Eval(#[from] decorr_eval::EvalError),
    #[error(transparent)]
    DisenDiff(#[from] decorr_disendiff::DisenDiffError),
    #[error(transparent)]
    Core(#[from] decorr_core::CoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Image(#[from] image::ImageError),
}

impl RunsError {
    /// Whether this (or the error it wraps) is an interruption.
    pub fn is_interrupted(&self) -> bool {
        match self {
            RunsError::Interrupted(_) => true,
            RunsError::Context { inner, .. } => inner.is_interrupted(),
            _ => false,
        }
    }
}

pub type Result<T, E = RunsError> = std::result::Result<T, E>;

/// What was being done, added to an error (as anyhow's `Context`).
pub trait Context<T> {
    fn context<C: Display>(self, context: C) -> Result<T>;
    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T>;
}

impl<T, E: Into<RunsError>> Context<T> for std::result::Result<T, E> {
    fn context<C: Display>(self, context: C) -> Result<T> {
        self.map_err(|e| RunsError::Context {
            context: context.to_string(),
            inner: Box::new(e.into()),
        })
    }
    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(|e| RunsError::Context {
            context: f().to_string(),
            inner: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context<C: Display>(self, context: C) -> Result<T> {
        self.ok_or_else(|| RunsError::Msg(context.to_string()))
    }
    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.ok_or_else(|| RunsError::Msg(f().to_string()))
    }
}

/// Returns early with a [`RunsError::Msg`].
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::RunsError::Msg(format!($($t)*)))
    };
}
