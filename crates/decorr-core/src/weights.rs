//! Loading safetensors files into burn modules with burn's store. PyTorch naming is adapted
//! (Linear weights transposed, norm weight/bias to gamma/beta), fp16/bf16 files are cast to f32,
//! and every missing, unexpected or mis-shaped tensor is reported by name with the file.
//! Files come from disk or from memory ([`ModelFile`]).

use std::path::Path;

use burn::module::Module;
use burn::store::{
    ApplyError, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter,
    SafetensorsStore,
};
use burn::tensor::DType;

use crate::CoreError;
use crate::source::{AsModelFile, ModelFile};

/// How a file's keys relate to the module's parameter paths.
#[derive(Debug, Clone, Default)]
pub struct KeyMap<'a> {
    /// `(regex, replacement)` pairs applied to file keys before matching.
    pub remap: &'a [(&'a str, &'a str)],
    /// Regexes of file keys that are known to be unused (buffers such as `position_ids`).
    pub ignore: &'a [&'a str],
    /// `(module, file)` literal fragments that turn a module path back into the file's naming
    /// in messages, where `remap` renamed a key the module cannot spell (`.self_.` for `.self.`).
    pub file_names: &'a [(&'a str, &'a str)],
}

/// Load `file` (a path, or a [`ModelFile`] on disk or in memory) into `module`. All parameters
/// must be present with the right shape, and every tensor of the file must be used or listed in
/// `keys.ignore`.
pub fn load_safetensors<M: Module>(
    module: &mut M,
    file: &(impl AsModelFile + ?Sized),
    keys: &KeyMap<'_>,
) -> Result<(), CoreError> {
    let file = file.to_model_file();
    let store = match &file {
        ModelFile::Path(path) => {
            if !path.is_file() {
                return Err(CoreError::NotFound(format!(
                    "weights file {} does not exist",
                    path.display()
                )));
            }
            SafetensorsStore::from_file(path)
        }
        // burn's store owns its buffer: the copy lives while this component loads.
        ModelFile::Memory { bytes, .. } => SafetensorsStore::from_bytes(Some(bytes.to_vec())),
    };
    let path = file.error_path();
    let path = path.as_path();
    let mut store = store
        .with_from_adapter(PyTorchToBurnAdapter.chain(FloatCastAdapter::to(DType::F32)))
        .validate(false)
        .allow_partial(true);
    for (from, to) in keys.remap {
        store = store.with_key_remapping(*from, *to);
    }
    let result = module
        .load_from(&mut store)
        .map_err(|e| CoreError::BadSafetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;

    let ignore: Vec<regex::Regex> = keys
        .ignore
        .iter()
        .map(|r| regex::Regex::new(r).expect("ignore patterns are literals of this crate"))
        .collect();
    // Module paths back to the file's naming, for messages.
    let named = |p: &str| {
        keys.file_names
            .iter()
            .fold(p.to_string(), |n, (module, file)| n.replace(module, file))
    };
    let mut problems = Vec::new();
    for e in &result.errors {
        problems.push(match e {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => format!(
                "  tensor `{}` has shape {:?}, the model's config expects {:?}",
                named(path),
                found.as_slice(),
                expected.as_slice()
            ),
            other => format!("  {}", named(&other.to_string())),
        });
    }
    for (name, _) in &result.missing {
        problems.push(format!(
            "  tensor `{}` is missing from the file",
            named(name)
        ));
    }
    for name in &result.unused {
        if !ignore.iter().any(|r| r.is_match(name)) {
            problems.push(format!(
                "  tensor `{}` in the file is not part of the model (wrong config.json or file?)",
                named(name)
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        problems.sort();
        Err(CoreError::WeightMismatch {
            path: path.to_path_buf(),
            problems: problems.join("\n"),
        })
    }
}

/// Read a JSON config file (a path, or a [`ModelFile`] on disk or in memory) into `T`.
pub fn read_json<T: serde::de::DeserializeOwned>(
    file: &(impl AsModelFile + ?Sized),
    what: &'static str,
) -> Result<T, CoreError> {
    let file = file.to_model_file();
    let text = file.read_to_string()?;
    serde_json::from_str(&text).map_err(|source| CoreError::BadJson {
        path: file.error_path(),
        what,
        source,
    })
}

/// Tensors by name as `(shape, f32 values)`.
pub type HostTensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Every tensor of a safetensors file as `(shape, f32 values)`, any float dtype converted.
/// For reference data and small files (tests, fixtures); models load through [`load_safetensors`].
pub fn read_tensors_f32(path: &Path) -> Result<HostTensors, CoreError> {
    use safetensors::Dtype;
    let bad = |message: String| CoreError::BadSafetensors {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|source| CoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = HostTensors::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => {
                return Err(bad(format!(
                    "tensor `{name}` has dtype {other:?}, not a float"
                )));
            }
        };
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}
