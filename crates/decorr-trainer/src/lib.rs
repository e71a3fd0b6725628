//! The decorrelation method of METHOD.md on the CLIP text encoder: resolving the target token
//! ([`target`]), the head-averaged attention map `A` and the paper's tables 1 and 2 with suspected
//! unidirectional correlations ([`analysis`]). Fine-tuning (Eq. 2) and checkpoint selection
//! (Eqs. 3 to 5) come with issue 3.

pub mod analysis;
pub mod target;

pub use analysis::{AttentionAnalysis, RowEntry, Suspect, TokenInfo, analyze};
pub use target::{TargetSpec, resolve_target};

/// Errors of the method crate; each names the problem and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    #[error("target `{target}` is not a word of the prompt; its words are: {words}")]
    TargetNotInPrompt { target: String, words: String },
    #[error(
        "target `{target}` occurs {count} time(s) in the prompt; --occurrence must be 1..={count}"
    )]
    OccurrenceOutOfRange {
        target: String,
        count: usize,
    },
    #[error(
        "target token index {index} is not a content token of the prompt (valid: 1..={last})"
    )]
    IndexOutOfRange { index: usize, last: usize },
    #[error(
        "target `{0}` is the first token of the prompt (index 1): no token precedes it, so there is \
         nothing it can be correlated with; pick a later word"
    )]
    NothingPrecedes(String),
    #[error("layer {layer} is out of range: this text encoder has layers 0..={last}; pass --layer")]
    LayerOutOfRange { layer: usize, last: usize },
    #[error(transparent)]
    Clip(#[from] decorr_clip::ClipError),
    #[error("the prompt is empty after tokenization; give a prompt with at least two words")]
    EmptyPrompt,
}
