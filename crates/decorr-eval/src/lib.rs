//! Evaluation of generated images (the paper's section 6.1, METHOD.md "Evaluation"):
//! BERTScore between prompts and VLM captions ([`bert`], [`deberta`], [`bertscore`], the
//! encoder traits they share in [`encoder`]), FID on Inception-v3 pool features as pytorch-fid
//! computes it ([`inception`], [`fid`], [`npz`], the statistics both handle in [`stats`]), the
//! captioning / yes-no client for an OpenAI-compatible endpoint ([`captioner`]), the omission rate
//! with its Wilson interval ([`omission`]), and the table-3 style report ([`report`]).

pub mod bert;
pub mod bertscore;
pub mod captioner;
pub mod deberta;
pub mod encoder;
pub mod error;
pub mod fid;
pub mod inception;
pub mod npz;
pub mod omission;
pub mod report;
pub mod stats;

pub use error::EvalError;
