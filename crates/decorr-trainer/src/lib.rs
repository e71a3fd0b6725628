//! The decorrelation method of METHOD.md on the CLIP text encoder: resolving the target token
//! ([`target`]), the head-averaged attention map `A` and the paper's tables 1 and 2 with suspected
//! unidirectional correlations ([`analysis`]), the losses and selection rule ([`losses`]) and
//! the fine-tuning run itself ([`finetune`]).

pub mod adamw;
pub mod analysis;
pub mod finetune;
pub mod losses;
pub mod target;

pub use analysis::{AttentionAnalysis, RowEntry, Suspect, TokenInfo, analyze};
pub use finetune::{
    EpochMetrics, ParamPreset, PromptState, Silent, TrainConfig, TrainObserver, TrainOutcome,
    TrainPrompt, finetune, finetune_prepared, prepare,
};
pub use losses::Focus;
pub use target::{TargetSpec, resolve_target, resolve_token};

/// Errors of the method crate; each names the problem and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    #[error("target `{target}` is not a word of the prompt; its words are: {words}")]
    TargetNotInPrompt { target: String, words: String },
    #[error(
        "`{target}` is in the prompt but after the cut: CLIP's text encoder takes 75 tokens and \
         the prompt has {total}, so its last {cut} token(s) were dropped; shorten the prompt so \
         that `{target}` comes within the first 75 tokens"
    )]
    TargetCut {
        target: String,
        total: usize,
        cut: usize,
    },
    #[error(
        "`{target}` occurs {count} time(s) in the prompt, so there is no occurrence {asked}; \
         pick one of 1..={count}"
    )]
    OccurrenceOutOfRange {
        target: String,
        count: usize,
        asked: usize,
    },
    #[error("target token index {index} is not a content token of the prompt (valid: 1..={last})")]
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
    #[error("unknown parameter preset `{0}`; expected one of: all, attn, qk")]
    UnknownPreset(String),
    #[error("no training prompts: give at least one --prompt with its --target")]
    NoPrompts,
    #[error(
        "in {prompt:?} the token that `{token}` (index {target}) attends to most is another \
         `{token}` (index {corr}): a token cannot be decorrelated from itself; choose another \
         target or rephrase the prompt"
    )]
    CorrIsTarget {
        prompt: String,
        token: String,
        corr: usize,
        target: usize,
    },
    #[error(
        "non-finite {what} at step {step}: training stopped; the checkpoint already selected \
         (if any) is kept. Try a lower --lr"
    )]
    NonFinite { step: usize, what: &'static str },
    #[error(
        "the attention map of layer {layer} holds NaN or infinity{prompt}: the text encoder's \
         weights are not finite or overflow (a fine-tuning that diverged, an fp16 overflow); \
         re-download or re-convert the encoder"
    )]
    NonFiniteAttention { layer: usize, prompt: String },
    #[error("cannot write the output: {0}")]
    Output(String),
    #[error("the prompt is empty after tokenization; give a prompt with at least two words")]
    EmptyPrompt,
}
