//! Runs on disk, for the `decorr` binary and any other front end: which methods, which seeds,
//! which folders, what is already done. The command line only parses, prints and writes; this
//! crate decides the work and reports through [`Progress`] callbacks (no terminal code here).
//!
//! - [`method`]: the five methods, each named once ([`MethodKind`]), and a method with its
//!   settings ([`Method`]) as a request's guidance, text side and pipeline variant.
//! - [`generate`]: generation folders (PNG + `decorr` record per image, `manifest.json`,
//!   resume, shards and their merge); the manifests `decorr eval run` reads.
//! - [`finetune`]: the fine-tuning folder (`text_encoder/`, `report.json`, `losses.png` and
//!   `.svg`), kept consistent at every moment; SDXL's one folder per fine-tuned encoder.
//! - [`eval`]: `decorr eval run` (captions, BERTScore, FID, omission rate, the table-3 report).
//! - [`compare`]: `decorr compare`, the paper's comparison of methods on the same seeds.
//! - [`fix`]: `decorr fix`, the main job: diagnosis, fine-tuning, the methods side by side.
//! - [`grid`], [`heatmap`], [`charts`]: the figures (comparison grids, attention maps, curves).
//! - [`pages`]: the HTML pages (`fix`'s report, `compare`'s index), maud templates.
//! - [`output`], [`paths`], [`shard`]: output-folder locks, manifest path rules, `--shard K/N`.

pub mod charts;
pub mod compare;
pub mod disendiff;
pub mod error;
pub mod eval;
pub mod finetune;
pub mod fix;
pub mod generate;
pub mod grid;
pub mod heatmap;
pub mod method;
pub mod output;
pub mod pages;
pub mod paths;
pub mod progress;
pub mod shard;

pub use error::{Context, Result, RunsError};
pub use method::{Method, MethodKind};
pub use progress::{Progress, Silent};
pub use shard::Shard;
