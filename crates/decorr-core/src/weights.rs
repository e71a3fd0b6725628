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
            if !crate::input::exists_at_all(path) {
                return Err(CoreError::NotFound(format!(
                    "weights file {} does not exist",
                    path.display()
                )));
            }
            // Large by nature: no size cap, but a FIFO or a device is refused by name.
            crate::input::check_regular(path, "a weights file")?;
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
        check_finite(&file)
    } else {
        problems.sort();
        Err(CoreError::WeightMismatch {
            path: path.to_path_buf(),
            problems: crate::limits::capped_list(&problems),
        })
    }
}

/// Refuses a safetensors file (on disk or in memory) holding a NaN or an infinity in any float
/// tensor, naming the first such tensor (in file order) and the file. One sequential pass over
/// the data in 1 MiB chunks, so memory stays flat whatever the file's size; fp32, fp16, bf16 and
/// f64 are checked, other dtypes skipped. A header it cannot read is left to the loader to report.
pub fn check_finite(file: &(impl AsModelFile + ?Sized)) -> Result<(), CoreError> {
    let file = file.to_model_file();
    let path = file.error_path();
    let io = |source| CoreError::Io {
        path: path.clone(),
        source,
    };
    match &file {
        ModelFile::Path(p) => {
            let f = crate::input::open(p, "a weights file")?;
            scan_finite(std::io::BufReader::with_capacity(1 << 16, f), &path).map_err(io)?
        }
        ModelFile::Memory { bytes, .. } => scan_finite(bytes.as_slice(), &path).map_err(io)?,
    }
}

/// [`check_finite`] over a reader at the start of a safetensors file. The outer `Err` is an I/O
/// error, the inner one the verdict.
fn scan_finite(mut r: impl std::io::Read, path: &Path) -> std::io::Result<Result<(), CoreError>> {
    use std::io::Read;
    let mut len = [0u8; 8];
    if r.read_exact(&mut len).is_err() {
        return Ok(Ok(()));
    }
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Ok(Ok(()));
    }
    let mut header = vec![0u8; n as usize];
    if r.read_exact(&mut header).is_err() {
        return Ok(Ok(()));
    }
    let Ok(serde_json::Value::Object(header)) = serde_json::from_slice(&header) else {
        return Ok(Ok(()));
    };
    // (start, end, element bytes, exponent mask, name), in file order.
    let mut tensors: Vec<(u64, u64, usize, u64, String)> = header
        .iter()
        .filter_map(|(name, info)| {
            let (size, mask) = match info.get("dtype")?.as_str()? {
                "F32" => (4, 0x7f80_0000u64),
                "F16" => (2, 0x7c00),
                "BF16" => (2, 0x7f80),
                "F64" => (8, 0x7ff0_0000_0000_0000),
                _ => return None,
            };
            let off = info.get("data_offsets")?.as_array()?;
            let (a, b) = (off.first()?.as_u64()?, off.get(1)?.as_u64()?);
            (b >= a).then(|| (a, b, size, mask, name.clone()))
        })
        .collect();
    tensors.sort();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for (a, b, size, mask, name) in tensors {
        if a < pos {
            continue; // overlapping entries: not a file the loader accepts
        }
        std::io::copy(&mut (&mut r).take(a - pos), &mut std::io::sink())?;
        let mut left = b - a;
        let mut bad = 0usize;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            if r.read_exact(&mut buf[..k]).is_err() {
                return Ok(Ok(())); // truncated: the loader reports it
            }
            bad += count_non_finite(&buf[..k], size, mask);
            left -= k as u64;
        }
        pos = b;
        if bad > 0 {
            return Ok(Err(CoreError::NonFiniteWeights {
                path: path.to_path_buf(),
                tensor: name,
                bad,
                total: ((b - a) / size as u64) as usize,
            }));
        }
    }
    Ok(Ok(()))
}

/// Values of `data` (little-endian, `size` bytes each) whose exponent bits are all set (NaN,
/// infinity), and f64 values that f32 cannot hold.
fn count_non_finite(data: &[u8], size: usize, mask: u64) -> usize {
    match size {
        2 => data
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) as u64 & mask == mask)
            .count(),
        4 => data
            .chunks_exact(4)
            .filter(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64 & mask == mask)
            .count(),
        // f64 is cast to f32 on loading: beyond f32's range it turns infinite too.
        _ => data
            .chunks_exact(8)
            .filter(|c| {
                let v = f64::from_le_bytes(std::array::from_fn(|i| c[i]));
                v.to_bits() & mask == mask || v.abs() > f32::MAX as f64
            })
            .count(),
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
    let bytes = crate::input::read_bytes(path, "a weights file", None)?;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::Device;
    use safetensors::tensor::{Dtype, TensorView, serialize};

    use super::*;

    fn file(tensors: &[(&str, Dtype, Vec<u8>)]) -> Vec<u8> {
        let views: Vec<(&str, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, dtype, bytes)| {
                let n = bytes.len() * 8 / dtype.bitsize();
                (*name, TensorView::new(*dtype, vec![n], bytes).unwrap())
            })
            .collect();
        serialize(views, None).unwrap()
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn memory(bytes: Vec<u8>) -> ModelFile {
        ModelFile::Memory {
            name: "mem unet/w.safetensors".into(),
            bytes: Arc::new(bytes),
        }
    }

    #[test]
    fn non_finite_weights_are_refused_by_name() {
        let good = file(&[
            ("a", Dtype::F32, f32s(&[1.0, -2.0, f32::MAX])),
            ("i", Dtype::I64, vec![0xff; 16]), // not a float: never read as one
        ]);
        check_finite(&memory(good)).unwrap();

        let bad = file(&[
            ("a.weight", Dtype::F32, f32s(&[1.0, 2.0])),
            (
                "b.weight",
                Dtype::F32,
                f32s(&[1.0, f32::NAN, f32::INFINITY, 0.0]),
            ),
        ]);
        let e = check_finite(&memory(bad.clone())).unwrap_err().to_string();
        assert!(
            e.contains("mem unet/w.safetensors")
                && e.contains("`b.weight`")
                && e.contains("2 non-finite value(s)")
                && e.contains("of 4"),
            "{e}"
        );
        // The same from disk.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        std::fs::write(&p, &bad).unwrap();
        let e = check_finite(p.as_path()).unwrap_err().to_string();
        assert!(
            e.contains("w.safetensors") && e.contains("`b.weight`"),
            "{e}"
        );

        // fp16 and bf16: infinity and NaN bit patterns.
        let h = |v: f32| half::f16::from_f32(v).to_le_bytes().to_vec();
        let mut f16 = h(1.0);
        f16.extend(h(f32::INFINITY));
        let e = check_finite(&memory(file(&[("h", Dtype::F16, f16)])))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`h`") && e.contains("1 non-finite"), "{e}");
        check_finite(&memory(file(&[("h", Dtype::F16, h(65504.0))]))).unwrap();
        let bf = half::bf16::from_f32(f32::NAN).to_le_bytes().to_vec();
        assert!(check_finite(&memory(file(&[("b", Dtype::BF16, bf)]))).is_err());
        // f64 beyond f32's range would load as infinity.
        let d = |v: f64| v.to_le_bytes().to_vec();
        assert!(check_finite(&memory(file(&[("d", Dtype::F64, d(1e300))]))).is_err());
        check_finite(&memory(file(&[("d", Dtype::F64, d(-3e38))]))).unwrap();
    }

    #[derive(Module, Debug)]
    struct Many {
        layers: Vec<Linear>,
    }

    #[test]
    fn load_refuses_nan_and_caps_long_problem_lists() {
        let device = Device::flex();
        let make = || Many {
            layers: (0..30)
                .map(|_| LinearConfig::new(2, 2).init(&device))
                .collect(),
        };
        // 30 layers' weights and biases missing: 60 problems, 20 listed.
        let empty = file(&[("unrelated", Dtype::F32, f32s(&[0.0]))]);
        let e = load_safetensors(&mut make(), &memory(empty), &KeyMap::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("... and 41 more"), "{e}");
        assert!(e.lines().count() <= 22, "{e}");

        // Every tensor present, one bias NaN: refused after a load that otherwise fits.
        let mut tensors = Vec::new();
        for i in 0..30 {
            tensors.push((format!("layers.{i}.weight"), f32s(&[0.5; 4]), vec![2, 2]));
            let bias = if i == 7 { [0.0, f32::NAN] } else { [0.0, 0.0] };
            tensors.push((format!("layers.{i}.bias"), f32s(&bias), vec![2]));
        }
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, b, s)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        let bytes = serialize(views, None).unwrap();
        let e = load_safetensors(&mut make(), &memory(bytes), &KeyMap::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`layers.7.bias`") && e.contains("NaN"), "{e}");
    }
}
