//! Host tensors as raw little-endian bytes, read from and written to safetensors.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::ConvertError;

/// Element types of checkpoint tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
    fn to_st(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::F64 => S::F64,
            DType::F32 => S::F32,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::I64 => S::I64,
            DType::I32 => S::I32,
            DType::I16 => S::I16,
            DType::I8 => S::I8,
            DType::U8 => S::U8,
            DType::Bool => S::BOOL,
        }
    }
    fn from_st(d: safetensors::Dtype) -> Option<Self> {
        use safetensors::Dtype as S;
        Some(match d {
            S::F64 => DType::F64,
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            S::I16 => DType::I16,
            S::I8 => DType::I8,
            S::U8 => DType::U8,
            S::BOOL => DType::Bool,
            _ => return None,
        })
    }
}

/// One tensor: dtype, shape and row-major little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    /// Cast a float tensor to another float dtype (round to nearest even); others unchanged.
    pub fn cast(self, to: DType) -> Tensor {
        if !self.dtype.is_float() || !to.is_float() || self.dtype == to {
            return self;
        }
        let vals: Vec<f64> = match self.dtype {
            DType::F64 => self
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DType::F16 => self
                .data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            DType::BF16 => self
                .data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            _ => unreachable!(),
        };
        let mut data = Vec::with_capacity(vals.len() * to.size());
        for v in vals {
            match to {
                DType::F64 => data.extend_from_slice(&v.to_le_bytes()),
                DType::F32 => data.extend_from_slice(&(v as f32).to_le_bytes()),
                // Via f32 as torch does (f64 sources are rare); exact for f16/bf16/f32 sources.
                DType::F16 => data.extend_from_slice(&half::f16::from_f32(v as f32).to_le_bytes()),
                DType::BF16 => {
                    data.extend_from_slice(&half::bf16::from_f32(v as f32).to_le_bytes())
                }
                _ => unreachable!(),
            }
        }
        Tensor {
            dtype: to,
            shape: self.shape,
            data,
        }
    }
}

/// Tensors by name.
pub type StateDict = BTreeMap<String, Tensor>;

/// Read every tensor of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<StateDict, ConvertError> {
    let bytes = decorr_core::input::read_bytes(path, "a weights file", None)?;
    read_safetensors_bytes(&bytes, path)
}

/// Read every tensor of a safetensors file held in memory; `path` only names it in errors.
/// The header's length and every tensor's offsets are checked against the bytes there (by the
/// `safetensors` crate, with checked arithmetic) before anything is copied.
pub fn read_safetensors_bytes(bytes: &[u8], path: &Path) -> Result<StateDict, ConvertError> {
    let bad = |message: String| ConvertError::BadSafetensors {
        path: path.to_path_buf(),
        message,
    };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        bad(format!(
            "{e}; the file is truncated or corrupt (its header does not describe its {} bytes): \
             re-download it",
            bytes.len()
        ))
    })?;
    let mut out = StateDict::new();
    for (name, view) in st.tensors() {
        let dtype = DType::from_st(view.dtype()).ok_or_else(|| {
            bad(format!(
                "tensor `{name}` has unsupported dtype {:?}",
                view.dtype()
            ))
        })?;
        out.insert(
            name,
            Tensor {
                dtype,
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            },
        );
    }
    Ok(out)
}

fn views(
    tensors: &StateDict,
) -> Result<Vec<(String, safetensors::tensor::TensorView<'_>)>, ConvertError> {
    tensors
        .iter()
        .map(|(k, t)| {
            safetensors::tensor::TensorView::new(t.dtype.to_st(), t.shape.clone(), &t.data)
                .map(|v| (k.clone(), v))
                .map_err(|e| ConvertError::Unsupported(format!("tensor `{k}`: {e}")))
        })
        .collect()
}

fn pt_metadata() -> Option<std::collections::HashMap<String, String>> {
    Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]))
}

/// Serialize tensors to safetensors bytes (with `format: pt` metadata, as diffusers writes).
pub fn to_safetensors_bytes(tensors: &StateDict) -> Result<Vec<u8>, ConvertError> {
    safetensors::serialize(views(tensors)?, pt_metadata())
        .map_err(|e| ConvertError::Unsupported(format!("serializing safetensors: {e}")))
}

/// Write tensors as a safetensors file, streamed (plain write: callers write into a temp
/// folder or file that is renamed into place).
pub fn write_safetensors(path: &Path, tensors: &StateDict) -> Result<(), ConvertError> {
    safetensors::serialize_to_file(views(tensors)?, pt_metadata(), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => ConvertError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => ConvertError::Unsupported(format!("writing {}: {other}", path.display())),
    })
}
