//! Reading PyTorch `.ckpt`/`.pt`/`.pth` files with a restricted unpickler: the zip format of
//! `torch.save` since PyTorch 1.6 ([`read_ckpt`]) and the legacy format before it
//! ([`read_legacy`], e.g. pytorch-fid's Inception weights).
//!
//! The unpickler executes nothing: it interprets the pickle opcodes a state dict needs and builds
//! plain values. `GLOBAL`/`STACK_GLOBAL` are accepted only for the handful of callables that
//! rebuild tensors and dicts ([`ALLOWED_GLOBALS`] and the `torch.*Storage` types); any other
//! global (`os.system`, `builtins.eval`, a Lightning callback class...) is refused with an error
//! naming it, so a malicious file is rejected instead of half-read.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use crate::error::ConvertError;
use crate::tensor::{DType, StateDict, Tensor};

/// Callables (besides the `torch.*Storage` types) a state-dict pickle may reference.
pub const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
];

fn storage_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

// Scalars are parsed for completeness; a state dict only needs their presence.
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    /// An integer wider than 64 bits, little-endian two's complement (legacy magic number).
    Long(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage {
        dtype: DType,
        key: String,
    },
    Tensor(TensorRef),
}

#[derive(Debug, Clone)]
struct TensorRef {
    dtype: DType,
    key: String,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

/// Read every tensor of a PyTorch zip checkpoint. A top-level dict with a `state_dict` entry
/// (Lightning checkpoints) yields that entry; otherwise the top-level dict itself must be the
/// state dict. Non-tensor entries are skipped.
pub fn read_ckpt(path: &Path) -> Result<StateDict, ConvertError> {
    let bad = |message: String| ConvertError::BadCheckpoint {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        bad(format!(
            "not a readable PyTorch zip checkpoint ({e}); the file may be truncated"
        ))
    })?;
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .ok_or_else(|| bad("the zip archive has no `<name>/data.pkl`".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)
        .and_then(|mut f| f.read_to_end(&mut pkl).map_err(Into::into))
        .map_err(|e| bad(format!("reading {pkl_name}: {e}")))?;
    let root = Unpickler::new(&pkl).run().map_err(|e| match e {
        UnpickleError::Refused(global) => ConvertError::RefusedGlobal {
            path: path.to_path_buf(),
            global,
        },
        UnpickleError::Bad(m) => bad(format!("{pkl_name}: {m}")),
    })?;
    let tensors = state_dict_tensors(root).map_err(bad)?;
    // Storages are read once and dropped after their last tensor (usually their only one),
    // which then takes the bytes without a copy when it spans the whole storage.
    let mut uses: HashMap<String, usize> = HashMap::new();
    for (_, t) in &tensors {
        *uses.entry(t.key.clone()).or_default() += 1;
    }
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = StateDict::new();
    for (name, t) in tensors {
        if !storages.contains_key(&t.key) {
            let entry = format!("{prefix}data/{}", t.key);
            let mut bytes = Vec::new();
            zip.by_name(&entry)
                .and_then(|mut f| f.read_to_end(&mut bytes).map_err(Into::into))
                .map_err(|e| bad(format!("reading storage {entry}: {e}")))?;
            storages.insert(t.key.clone(), bytes);
        }
        let left = uses.get_mut(&t.key).expect("counted");
        *left -= 1;
        let whole = t.offset == 0
            && is_contiguous(&t)
            && numel(&t.shape).and_then(|n| n.checked_mul(t.dtype.size()))
                == Some(storages[&t.key].len());
        let data = if *left == 0 && whole {
            storages.remove(&t.key).expect("read above")
        } else {
            let d =
                gather(&storages[&t.key], &t).map_err(|m| bad(format!("tensor `{name}`: {m}")))?;
            if *left == 0 {
                storages.remove(&t.key);
            }
            d
        };
        out.insert(
            name,
            Tensor {
                dtype: t.dtype,
                shape: t.shape,
                data,
            },
        );
    }
    Ok(out)
}

/// The `(name, tensor)` entries of an unpickled state dict: the top-level dict, or its
/// `state_dict` entry (Lightning checkpoints). Non-tensor entries are skipped.
fn state_dict_tensors(root: Value) -> Result<Vec<(String, TensorRef)>, String> {
    let Value::Dict(mut items) = root else {
        return Err("the pickle's top-level object is not a dict".into());
    };
    if let Some(pos) = items.iter().position(|(k, v)| {
        matches!(k, Value::Str(s) if s == "state_dict") && matches!(v, Value::Dict(_))
    }) {
        let Value::Dict(inner) = items.swap_remove(pos).1 else {
            unreachable!()
        };
        items = inner;
    }
    Ok(items
        .into_iter()
        .filter_map(|(k, v)| match (k, v) {
            (Value::Str(name), Value::Tensor(t)) => Some((name, t)),
            _ => None,
        })
        .collect())
}

/// `torch.serialization.MAGIC_NUMBER`, the first pickle of a legacy file, little-endian.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// `torch.serialization.PROTOCOL_VERSION` of legacy files.
const LEGACY_PROTOCOL: i64 = 1001;

/// Read every tensor of a PyTorch file in the legacy (pre-1.6, non-zip) format, as
/// `torch.save(..., _use_new_zipfile_serialization=False)` writes it: a pickle of the magic
/// number, one of the protocol version, one of system info, the object pickle (storages as
/// persistent ids `('storage', torch.XStorage, key, location, numel, view_metadata)`), a pickle
/// of the sorted storage keys, then for each key an 8-byte little-endian element count and the
/// raw little-endian storage bytes. The same restricted unpickler as [`read_ckpt`] is used.
pub fn read_legacy(path: &Path) -> Result<StateDict, ConvertError> {
    let bad = |message: String| ConvertError::BadCheckpoint {
        path: path.to_path_buf(),
        message,
    };
    let data = std::fs::read(path).map_err(|source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut pos = 0usize;
    let mut storage_types: HashMap<String, DType> = HashMap::new();
    let mut next = |what: &str| -> Result<Value, ConvertError> {
        let mut u = Unpickler::new(&data[pos..]);
        let v = u.run().map_err(|e| match e {
            UnpickleError::Refused(global) => ConvertError::RefusedGlobal {
                path: path.to_path_buf(),
                global,
            },
            UnpickleError::Bad(m) => bad(format!("legacy format, {what}: {m}")),
        })?;
        pos += u.pos;
        storage_types.extend(u.storages);
        Ok(v)
    };
    match next("magic number")? {
        Value::Long(b) if b == LEGACY_MAGIC => {}
        _ => {
            return Err(bad(
                "starts with a pickle but not with torch's magic number: not a PyTorch file".into(),
            ));
        }
    }
    match next("protocol version")? {
        Value::Int(LEGACY_PROTOCOL) => {}
        other => {
            return Err(bad(format!(
                "legacy protocol version {other:?} is not supported (expected {LEGACY_PROTOCOL})"
            )));
        }
    }
    if let Value::Dict(info) = next("system info")? {
        let big_endian = info.iter().any(|(k, v)| {
            matches!(k, Value::Str(s) if s == "little_endian") && matches!(v, Value::Bool(false))
        });
        if big_endian {
            return Err(bad("written on a big-endian machine: not supported".into()));
        }
    }
    let root = next("object")?;
    let Value::List(keys) = next("storage keys")? else {
        return Err(bad(
            "legacy format: the storage key list is not a list".into()
        ));
    };
    let tensors = state_dict_tensors(root).map_err(bad)?;
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in keys {
        let Value::Str(key) = key else {
            return Err(bad("legacy format: a storage key is not a string".into()));
        };
        let dtype = *storage_types.get(&key).ok_or_else(|| {
            bad(format!(
                "legacy format: storage `{key}` is not referenced by the pickle"
            ))
        })?;
        let numel = data
            .get(pos..pos + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| bad(format!("the file ends before storage `{key}`")))?;
        let start = pos + 8;
        let end = usize::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(dtype.size()))
            .and_then(|n| n.checked_add(start))
            .filter(|&e| e <= data.len())
            .ok_or_else(|| {
                bad(format!(
                    "storage `{key}` claims {numel} elements, beyond the end of the file (truncated?)"
                ))
            })?;
        storages.insert(key, &data[start..end]);
        pos = end;
    }
    let mut out = StateDict::new();
    for (name, t) in tensors {
        let storage = storages.get(&t.key).ok_or_else(|| {
            bad(format!(
                "tensor `{name}`: storage `{}` is not in the file",
                t.key
            ))
        })?;
        let bytes = gather(storage, &t).map_err(|m| bad(format!("tensor `{name}`: {m}")))?;
        out.insert(
            name,
            Tensor {
                dtype: t.dtype,
                shape: t.shape,
                data: bytes,
            },
        );
    }
    Ok(out)
}

fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn is_contiguous(t: &TensorRef) -> bool {
    let mut expect = 1usize;
    for (d, s) in t.shape.iter().zip(&t.strides).rev() {
        if *d != 1 && *s != expect {
            return false;
        }
        expect = expect.saturating_mul(*d);
    }
    true
}

/// The bytes of a (possibly strided) view of a storage, contiguous in row-major order.
fn gather(storage: &[u8], t: &TensorRef) -> Result<Vec<u8>, String> {
    let es = t.dtype.size();
    let n = numel(&t.shape).ok_or("its size overflows")?;
    if n == 0 {
        return Ok(Vec::new());
    }
    // Highest element index touched, to bounds-check once (checked: sizes come from the file).
    let last = t
        .shape
        .iter()
        .zip(&t.strides)
        .try_fold(t.offset, |acc, (d, s)| {
            (d - 1).checked_mul(*s)?.checked_add(acc)
        })
        .ok_or("its view overflows")?;
    if last
        .checked_add(1)
        .and_then(|x| x.checked_mul(es))
        .is_none_or(|end| end > storage.len())
    {
        return Err(format!(
            "its view reaches element {last} of a storage of {} bytes",
            storage.len()
        ));
    }
    if is_contiguous(t) {
        return Ok(storage[t.offset * es..(t.offset + n) * es].to_vec());
    }
    let mut out = Vec::with_capacity(n * es);
    let mut idx = vec![0usize; t.shape.len()];
    for _ in 0..n {
        let e = t.offset
            + idx
                .iter()
                .zip(&t.strides)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        out.extend_from_slice(&storage[e * es..(e + 1) * es]);
        for ax in (0..idx.len()).rev() {
            idx[ax] += 1;
            if idx[ax] < t.shape[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    Ok(out)
}

enum UnpickleError {
    Refused(String),
    Bad(String),
}

impl From<String> for UnpickleError {
    fn from(m: String) -> Self {
        UnpickleError::Bad(m)
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Storage keys and types met in persistent ids (the legacy format needs their types).
    storages: Vec<(String, DType)>,
}

type R<T> = Result<T, UnpickleError>;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            storages: Vec::new(),
        }
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if self
            .pos
            .checked_add(n)
            .is_none_or(|end| end > self.data.len())
        {
            return Err("the pickle ends early".to_string().into());
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> R<String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| UnpickleError::Bad("unterminated text argument".into()))?;
        self.pos += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
    fn string(&mut self, n: usize) -> R<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| UnpickleError::Bad("invalid UTF-8 string".into()))
    }
    fn pop(&mut self) -> R<Value> {
        self.stack
            .pop()
            .ok_or_else(|| UnpickleError::Bad("stack underflow".into()))
    }
    fn top(&mut self) -> R<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| UnpickleError::Bad("stack underflow".into()))
    }
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| UnpickleError::Bad("MARK missing".into()))?;
        if m > self.stack.len() {
            return Err("corrupt MARK".to_string().into());
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_get(&mut self, i: u32) -> R<()> {
        let v = self
            .memo
            .get(&i)
            .cloned()
            .ok_or_else(|| UnpickleError::Bad(format!("memo entry {i} missing")))?;
        self.stack.push(v);
        Ok(())
    }
    fn memo_put(&mut self, i: u32) -> R<()> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| UnpickleError::Bad("stack underflow".into()))?;
        self.memo.insert(i, v);
        Ok(())
    }

    fn global(&mut self, module: String, name: String) -> R<()> {
        let allowed = ALLOWED_GLOBALS
            .iter()
            .any(|(m, n)| *m == module && *n == name)
            || (module == "torch" && storage_dtype(&name).is_some());
        if !allowed {
            return Err(UnpickleError::Refused(format!("{module}.{name}")));
        }
        self.stack.push(Value::Global(module, name));
        Ok(())
    }

    /// Run to STOP; `self.pos` is then the length of the pickle.
    fn run(&mut self) -> R<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.u64()?; // FRAME
                }
                b'.' => return self.pop(), // STOP
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64))
                }
                0x8a => {
                    // LONG1
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        self.stack.push(Value::Long(b.to_vec()));
                        continue;
                    }
                    let mut buf = if b.last().is_some_and(|x| x & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s))
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s))
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s))
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s))
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s))
                }
                b'S' => {
                    // STRING (protocol 0): a quoted repr; escapes are kept as written.
                    let l = self.line()?;
                    let t = l.trim();
                    let inner = t
                        .strip_prefix('\'')
                        .and_then(|x| x.strip_suffix('\''))
                        .or_else(|| t.strip_prefix('"').and_then(|x| x.strip_suffix('"')))
                        .ok_or_else(|| UnpickleError::Bad("malformed STRING".into()))?;
                    self.stack.push(Value::Str(inner.to_string()))
                }
                b'V' => {
                    let l = self.line()?;
                    self.stack.push(Value::Str(l))
                }
                b'I' | b'L' => {
                    let l = self.line()?;
                    let v = match l.trim_end_matches('L') {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        n => Value::Int(
                            n.parse()
                                .map_err(|_| UnpickleError::Bad("malformed INT".into()))?,
                        ),
                    };
                    self.stack.push(v)
                }
                b'p' => {
                    let l = self.line()?;
                    let i = l
                        .parse()
                        .map_err(|_| UnpickleError::Bad("malformed PUT".into()))?;
                    self.memo_put(i)?
                }
                b'g' => {
                    let l = self.line()?;
                    let i = l
                        .parse()
                        .map_err(|_| UnpickleError::Bad("malformed GET".into()))?;
                    self.memo_get(i)?
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b))
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b))
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?
                }
                b'i' => {
                    // INST (protocol 0): name the class if it is not allowed; never instantiate.
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                    return Err("INST objects are not part of a state dict"
                        .to_string()
                        .into());
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(m, n)?,
                        _ => return Err("STACK_GLOBAL without two strings".to_string().into()),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85 => {
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a]))
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b]))
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b, c]))
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return Err("APPEND to a non-list".to_string().into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err("APPENDS to a non-list".to_string().into()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => return Err("SETITEM on a non-dict".to_string().into()),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err("SETITEMS with an odd item count".to_string().into());
                    }
                    let mut it = items.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    match self.top()? {
                        Value::Dict(d) => d.extend(pairs),
                        _ => return Err("SETITEMS on a non-dict".to_string().into()),
                    }
                }
                b'b' => {
                    // BUILD: the state of an OrderedDict (its `_metadata`) or a tensor is not needed.
                    self.pop()?;
                }
                b'Q' => {
                    // BINPERSID: ('storage', torch.XStorage, key, location, numel)
                    let pid = self.pop()?;
                    let v = persistent_load(pid)?;
                    if let Value::Storage { dtype, key } = &v {
                        self.storages.push((key.clone(), *dtype));
                    }
                    self.stack.push(v)
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = reduce(func, args)?;
                    self.stack.push(v)
                }
                other => {
                    return Err(format!(
                        "pickle opcode 0x{other:02x} at byte {} is not supported in a state dict",
                        self.pos - 1
                    )
                    .into());
                }
            }
        }
    }
}

fn persistent_load(pid: Value) -> R<Value> {
    let Value::Tuple(items) = pid else {
        return Err("persistent id is not a tuple".to_string().into());
    };
    match items.as_slice() {
        [Value::Str(kind), Value::Global(m, n), Value::Str(key), ..] if kind == "storage" => {
            let dtype = (m == "torch")
                .then(|| storage_dtype(n))
                .flatten()
                .ok_or_else(|| UnpickleError::Refused(format!("{m}.{n}")))?;
            Ok(Value::Storage {
                dtype,
                key: key.clone(),
            })
        }
        _ => Err("unsupported persistent id (not a torch storage)"
            .to_string()
            .into()),
    }
}

fn as_usizes(v: &Value, what: &str) -> R<Vec<usize>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i as usize),
                _ => Err(UnpickleError::Bad(format!("{what} holds a non-integer"))),
            })
            .collect(),
        _ => Err(format!("{what} is not a tuple").into()),
    }
}

fn reduce(func: Value, args: Value) -> R<Value> {
    let Value::Global(module, name) = func else {
        return Err("REDUCE of a non-global callable".to_string().into());
    };
    let Value::Tuple(args) = args else {
        return Err("REDUCE arguments are not a tuple".to_string().into());
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => {
            if args.is_empty() {
                Ok(Value::Dict(Vec::new()))
            } else {
                Err("OrderedDict with constructor arguments".to_string().into())
            }
        }
        ("torch._utils", "_rebuild_tensor_v2") => {
            let [storage, offset, size, stride, ..] = args.as_slice() else {
                return Err("_rebuild_tensor_v2 with too few arguments"
                    .to_string()
                    .into());
            };
            let Value::Storage { dtype, key } = storage else {
                return Err("_rebuild_tensor_v2 without a storage".to_string().into());
            };
            let Value::Int(offset) = offset else {
                return Err("_rebuild_tensor_v2 offset is not an integer"
                    .to_string()
                    .into());
            };
            let shape = as_usizes(size, "tensor size")?;
            let strides = as_usizes(stride, "tensor stride")?;
            if shape.len() != strides.len() || *offset < 0 {
                return Err("tensor size/stride mismatch".to_string().into());
            }
            Ok(Value::Tensor(TensorRef {
                dtype: *dtype,
                key: key.clone(),
                offset: *offset as usize,
                shape,
                strides,
            }))
        }
        ("torch._utils", "_rebuild_parameter") => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err("_rebuild_parameter without a tensor".to_string().into()),
        },
        _ => Err(UnpickleError::Refused(format!("{module}.{name}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> R<Value> {
        Unpickler::new(bytes).run()
    }

    #[test]
    fn refuses_os_system_global() {
        // protocol 2: GLOBAL 'posix system', then args and REDUCE.
        let p = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.";
        match run(p) {
            Err(UnpickleError::Refused(g)) => assert_eq!(g, "posix.system"),
            _ => panic!("not refused"),
        }
        let p = b"(S'rm -rf /'\nibuiltins\nexec\n.";
        match run(p) {
            Err(UnpickleError::Refused(g)) => assert_eq!(g, "builtins.exec"),
            _ => panic!("not refused"),
        }
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        match run(p) {
            Err(UnpickleError::Refused(g)) => assert_eq!(g, "builtins.eval"),
            _ => panic!("not refused"),
        }
    }

    #[test]
    fn reads_small_dict() {
        // {'a': 1, 'b': [True, None]} protocol 2
        let p =
            b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(\x88Neu.";
        let Ok(Value::Dict(d)) = run(p) else { panic!() };
        assert_eq!(d.len(), 2);
    }

    /// The same tensors saved by `torch.save` in both formats (tests/pyref/make_fid_fixtures.py).
    #[test]
    fn legacy_format_reads_like_zip_format() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/fid");
        let zip = read_ckpt(&dir.join("partial.pth")).unwrap();
        let legacy = read_legacy(&dir.join("partial_legacy.pth")).unwrap();
        assert_eq!(zip.len(), 12);
        assert_eq!(zip, legacy);
        let w = &legacy["Conv2d_1a_3x3.conv.weight"];
        assert_eq!(
            (w.dtype, w.shape.as_slice()),
            (DType::F32, &[32, 3, 3, 3][..])
        );
        assert_eq!(
            legacy["Conv2d_1a_3x3.bn.num_batches_tracked"].dtype,
            DType::I64
        );
        // Truncated storage data is an error naming the problem, not a panic.
        let bytes = std::fs::read(dir.join("partial_legacy.pth")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let cut = tmp.path().join("cut.pth");
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        let e = read_legacy(&cut).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        // A plain pickle that is not a torch file.
        std::fs::write(&cut, b"\x80\x02K\x01.").unwrap();
        let e = read_legacy(&cut).unwrap_err().to_string();
        assert!(e.contains("magic number"), "{e}");
    }

    #[test]
    fn strided_gather() {
        // 2x3 storage of u8, transposed view 3x2.
        let storage = [0u8, 1, 2, 3, 4, 5];
        let t = TensorRef {
            dtype: DType::U8,
            key: "0".into(),
            offset: 0,
            shape: vec![3, 2],
            strides: vec![1, 3],
        };
        assert_eq!(gather(&storage, &t).unwrap(), vec![0, 3, 1, 4, 2, 5]);
        let t = TensorRef {
            strides: vec![1, 4],
            ..t
        };
        assert!(gather(&storage, &t).is_err());
    }
}
