//! Shared plumbing of decorr: which device runs the maths and in which precision ([`device`]), where a model's files
//! come from ([`source`]: local diffusers folder, Hugging Face hub repo through [`hub`], or files in memory), and how safetensors
//! weights get into a burn module with errors that name the tensor and the file ([`weights`]);
//! counted read-backs to the host ([`readback`]); the binaries' heap settings ([`memory`]); atomic writes and output-folder locks ([`io`]);
//! reading the files users hand decorr, regular files only and text capped in size ([`input`]).

pub mod device;
pub mod error;
pub mod hub;
pub mod input;
pub mod io;
pub mod limits;
pub mod memory;
pub mod precision;
pub mod readback;
pub mod source;
pub mod weights;

pub use device::{BackendKind, Precision, describe, device_from_env, is_cpu, select_device};
pub use error::CoreError;
pub use precision::{cast_module, norm_f32};
pub use source::{AsModelFile, DEFAULT_MODEL, MemoryModel, ModelFile, ModelSource};
