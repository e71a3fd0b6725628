//! NumPy `.npy` arrays and `.npz` archives, as far as FID statistics need them: the files
//! pytorch-fid writes with `np.savez_compressed(path, mu=mu, sigma=sigma)` (`--save-stats`) and
//! reads with `np.load(path)['mu']`, so statistics files travel both ways between decorr and
//! pytorch-fid.
//!
//! Reading accepts float64 and float32 arrays of either byte order, C or Fortran order, in
//! compressed (`np.savez_compressed`) or stored (`np.savez`) archives. Writing produces what
//! `np.savez_compressed` does: a deflated zip of `<name>.npy` entries, format 1.0, little-endian
//! float64, C order, with the header padded to 64 bytes; the file is written atomically.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use crate::EvalError;
use crate::stats::ActivationStats;

const MAGIC: &[u8] = b"\x93NUMPY";

/// A float array read from or written to `.npy`, values widened to f64, row-major (C) order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl NpyArray {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }
}

/// Value of `'key':` in a `.npy` header dict (a Python literal), as raw text.
fn header_field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header[at + key.len() + 2..].trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else if let Some(q) = rest.chars().next().filter(|c| *c == '\'' || *c == '"') {
        rest[1..].find(q)? + 2
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(rest[..end].trim())
}

/// Parse one `.npy` file. Errors are messages without the file name (the caller adds it).
pub fn parse_npy(bytes: &[u8]) -> Result<NpyArray, String> {
    if bytes.len() < 10 || !bytes.starts_with(MAGIC) {
        return Err("not a .npy array (no \\x93NUMPY magic)".into());
    }
    let major = bytes[6];
    let (header_len, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    let body = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(&bytes[start..body]).map_err(|_| "non-UTF-8 .npy header")?;
    let descr = header_field(header, "descr")
        .ok_or("the .npy header has no 'descr'")?
        .trim_matches(['\'', '"']);
    let fortran = match header_field(header, "fortran_order") {
        Some("True") => true,
        Some("False") => false,
        _ => return Err("the .npy header has no valid 'fortran_order'".into()),
    };
    let shape_text = header_field(header, "shape").ok_or("the .npy header has no 'shape'")?;
    let shape: Vec<usize> = shape_text
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("bad .npy shape {shape_text}"))?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("the .npy shape overflows")?;
    let (size, little) = match descr {
        "<f8" => (8, true),
        ">f8" => (8, false),
        "<f4" => (4, true),
        ">f4" => (4, false),
        other => {
            return Err(format!(
                "array dtype `{other}` is not supported (float64 or float32 expected)"
            ));
        }
    };
    let raw = &bytes[body..];
    if raw.len() != n * size {
        return Err(format!(
            "the .npy data has {} bytes, shape {shape:?} of `{descr}` needs {}",
            raw.len(),
            n * size
        ));
    }
    let mut data: Vec<f64> = match (size, little) {
        (8, true) => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        (8, false) => raw
            .chunks_exact(8)
            .map(|c| f64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        (_, true) => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
            .collect(),
        (_, false) => raw
            .chunks_exact(4)
            .map(|c| f32::from_be_bytes(c.try_into().expect("4 bytes")) as f64)
            .collect(),
    };
    if fortran && shape.len() > 1 {
        data = fortran_to_c(&data, &shape);
    }
    Ok(NpyArray { shape, data })
}

/// Reorder column-major (Fortran) data to row-major.
fn fortran_to_c(data: &[f64], shape: &[usize]) -> Vec<f64> {
    let n = data.len();
    let mut out = vec![0.0; n];
    let mut idx = vec![0usize; shape.len()];
    for v in out.iter_mut() {
        // `idx` walks row-major; its Fortran offset has the first axis fastest.
        let mut off = 0;
        let mut stride = 1;
        for (i, d) in idx.iter().zip(shape) {
            off += i * stride;
            stride *= d;
        }
        *v = data[off];
        for ax in (0..idx.len()).rev() {
            idx[ax] += 1;
            if idx[ax] < shape[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    out
}

/// `.npy` bytes (format 1.0, `<f8`, C order) of `a`, as `np.save` writes them.
pub fn npy_bytes(a: &NpyArray) -> Vec<u8> {
    let shape = match a.shape.as_slice() {
        [d] => format!("({d},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}");
    // numpy pads with spaces so that the data starts at a multiple of 64 bytes, then '\n'.
    let total = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + a.data.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &a.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Every array of an `.npz` file, by name (the entry name without `.npy`).
pub fn read_npz(path: &Path) -> Result<BTreeMap<String, NpyArray>, EvalError> {
    let bad = |message: String| EvalError::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let file = decorr_core::input::open(path, "an .npz file")?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| bad(format!("not an .npz (zip) archive: {e}")))?;
    let mut out = BTreeMap::new();
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| bad(format!("cannot read zip entry {i}: {e}")))?;
        let name = entry.name().to_string();
        let Some(key) = name.strip_suffix(".npy") else {
            continue;
        };
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("cannot read `{name}`: {e}")))?;
        let arr = parse_npy(&bytes).map_err(|m| bad(format!("`{name}`: {m}")))?;
        out.insert(key.to_string(), arr);
    }
    Ok(out)
}

/// Write `arrays` as `np.savez_compressed(path, **arrays)` does, atomically.
pub fn write_npz(path: &Path, arrays: &[(&str, &NpyArray)]) -> Result<(), EvalError> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::FileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(false);
    let fail = |e: String| EvalError::BadFile {
        path: path.to_path_buf(),
        message: format!("cannot build the .npz archive: {e}"),
    };
    for (name, a) in arrays {
        zip.start_file(format!("{name}.npy"), opts)
            .map_err(|e| fail(e.to_string()))?;
        zip.write_all(&npy_bytes(a))
            .map_err(|e| fail(e.to_string()))?;
    }
    let bytes = zip.finish().map_err(|e| fail(e.to_string()))?.into_inner();
    decorr_core::io::write_atomic(path, &bytes)?;
    Ok(())
}

/// FID statistics from an `.npz` with `mu` (d) and `sigma` (d x d), as pytorch-fid reads them.
pub fn read_stats(path: &Path) -> Result<ActivationStats, EvalError> {
    let mut arrays = read_npz(path)?;
    let bad = |message: String| EvalError::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let (Some(mu), Some(sigma)) = (arrays.remove("mu"), arrays.remove("sigma")) else {
        let names: Vec<&String> = arrays.keys().collect();
        return Err(bad(format!(
            "FID statistics need arrays `mu` and `sigma` (as pytorch-fid --save-stats writes); \
             the file has {names:?}"
        )));
    };
    let d = match mu.shape.as_slice() {
        [d] => *d,
        s => return Err(bad(format!("`mu` has shape {s:?}, expected (d,)"))),
    };
    if sigma.shape != [d, d] {
        return Err(bad(format!(
            "`sigma` has shape {:?}, expected ({d}, {d}) to match `mu`",
            sigma.shape
        )));
    }
    Ok(ActivationStats {
        mu: mu.data,
        sigma: sigma.data,
    })
}

/// Write FID statistics like `np.savez_compressed(path, mu=mu, sigma=sigma)` (pytorch-fid's
/// `--save-stats`), atomically.
pub fn write_stats(path: &Path, stats: &ActivationStats) -> Result<(), EvalError> {
    let d = stats.dim();
    let mu = NpyArray::new(vec![d], stats.mu.clone());
    let sigma = NpyArray::new(vec![d, d], stats.sigma.clone());
    write_npz(path, &[("mu", &mu), ("sigma", &sigma)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_aligned_and_parses_back() {
        let a = NpyArray::new(vec![2, 3], (0..6).map(|v| v as f64 * 0.5).collect());
        let b = npy_bytes(&a);
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert_eq!(b[10 + hlen - 1], b'\n');
        assert_eq!(parse_npy(&b).unwrap(), a);
    }

    #[test]
    fn fortran_order_is_transposed() {
        // 2x3 [[0,1,2],[3,4,5]] stored column-major: 0,3,1,4,2,5
        let mut b = Vec::new();
        let h = "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }\n";
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&[1, 0]);
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        for v in [0.0f64, 3.0, 1.0, 4.0, 2.0, 5.0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let a = parse_npy(&b).unwrap();
        assert_eq!(a.data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn rejects_integer_arrays_and_truncation() {
        let a = NpyArray::new(vec![3], vec![1.0, 2.0, 3.0]);
        let good = npy_bytes(&a);
        let e = parse_npy(&good[..good.len() - 1]).unwrap_err();
        assert!(e.contains("bytes"), "{e}");
        let mut int = good.clone();
        let at = int.windows(3).position(|w| w == b"<f8").unwrap();
        int[at + 1] = b'i';
        let e = parse_npy(&int).unwrap_err();
        assert!(e.contains("<i8"), "{e}");
    }
}
