//! The text side of Stable Diffusion: CLIP's tokenizer ([`tokenizer`]), the text-encoder config
//! ([`config`]) and transformer ([`text_encoder`]) with attention maps, and loading a checkpoint's
//! `tokenizer/` and `text_encoder/` ([`load`]); for SDXL also `tokenizer_2/` and
//! `text_encoder_2/` with its projection, and the conditioning SDXL reads from each encoder
//! ([`ClipTextModel::sdxl_conditioning`]).

pub mod config;
pub mod load;
pub mod text_encoder;
pub mod tokenizer;

pub use config::{Activation, ClipTextConfig};
pub use load::{
    TextEncoder, load_text_encoder, load_text_encoder_component, load_text_encoder_dir,
    load_tokenizer, load_tokenizer_component, save_text_encoder,
};
pub use text_encoder::{
    ClipTextModel, ForwardOptions, SdxlConditioning, TextEncoderOutput, head_average,
};
pub use tokenizer::{ClipTokenizer, MAX_LEN, Tokenized, Word};

/// Errors of the CLIP crate.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("text-encoder config: {0}")]
    Config(String),
    #[error(
        "token id {id} is outside the text encoder's vocabulary of {vocab}: the tokenizer does not \
         belong to this encoder (give the checkpoint's own tokenizer/ folder)"
    )]
    IdOutOfVocab { id: u32, vocab: usize },
    /// A forward request that does not fit the encoder or its input (a layer out of range,
    /// ragged rows, a pooling position outside the sequence, ...).
    #[error("text-encoder input: {0}")]
    Input(String),
    #[error(transparent)]
    Core(#[from] decorr_core::CoreError),
}
