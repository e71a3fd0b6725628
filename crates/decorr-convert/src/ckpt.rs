//! Reading PyTorch `.ckpt`/`.pt`/`.pth` files with a restricted unpickler: the zip format of
//! `torch.save` since PyTorch 1.6 ([`read_ckpt`]) and the legacy format before it
//! ([`read_legacy`], e.g. pytorch-fid's Inception weights); [`read_ckpt_bytes`] reads either
//! from memory.
//!
//! The unpickler executes nothing: it interprets the pickle opcodes a state dict needs and builds
//! plain values. `GLOBAL`/`STACK_GLOBAL` are accepted only for the handful of callables that
//! rebuild tensors and dicts ([`ALLOWED_GLOBALS`] and the `torch.*Storage` types); any other
//! global (`os.system`, `builtins.eval`, a Lightning callback class...) is refused with an error
//! naming it, so a malicious file is rejected instead of half-read.
//!
//! Nor can a hostile file exhaust memory or the stack:
//! - Lists, tuples and dicts live in an arena and values refer to them by index, as Python
//!   objects refer to each other: a memo `GET` copies a handle, never a container, so re-using
//!   memoised values ("billion laughs") costs nothing, and no value is nested in another, so
//!   nothing recurses (building, cloning or dropping a 100 000-deep structure is flat). Strings
//!   and tensor descriptions are shared (`Rc`). Every opcode creates at most one value, so memory
//!   is linear in the pickle's length; `MARK` nesting is capped at [`MAX_DEPTH`] and tensor rank
//!   at [`MAX_RANK`].
//! - Every length read from the file (strings, byte strings, storage element counts) is checked
//!   against the bytes that are actually there before anything is allocated.
//! - Every tensor's extent in its storage (`(offset + Σ (size - 1) * stride + 1) * element size`,
//!   checked arithmetic) is checked against the storage's real length before its bytes are
//!   copied, and the bytes read from storages plus the bytes materialised for tensors (which can
//!   exceed a storage's size through zero strides or storages shared by many tensors) must stay
//!   within a budget set by the file's own size ([`OUTPUT_FACTOR`] times it plus
//!   [`OUTPUT_FLOOR`]).

use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read, Seek};
use std::path::Path;
use std::rc::Rc;

use crate::error::ConvertError;
use crate::tensor::{DType, StateDict, Tensor};

/// Callables (besides the `torch.*Storage` types) a state-dict pickle may reference.
pub const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
];

/// Deepest `MARK` nesting accepted (a state dict needs fewer than 10 levels).
pub const MAX_DEPTH: usize = 1000;
/// Highest tensor rank accepted.
pub const MAX_RANK: usize = 64;
/// The bytes read from storages plus the bytes of all tensors built may reach this many times
/// the file's size (a plain state dict needs about twice) ...
pub const OUTPUT_FACTOR: u64 = 4;
/// ... plus this much (for small files with broadcast, zero-stride tensors).
pub const OUTPUT_FLOOR: u64 = 64 << 20;

/// What the user can do about a file this reader cannot accept.
const HINT: &str = "this is not a plain PyTorch state dict: the file is corrupt (truncated \
                    download?) or was crafted to exhaust the reader; re-download it from its \
                    source, or use a .safetensors version of the model";

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

/// Index of a list, tuple or dict in the unpickler's arena ([`Obj`]).
type ObjId = usize;
/// The arena slot of the one empty tuple (`EMPTY_TUPLE` allocates nothing, as in Python).
const EMPTY_TUPLE: ObjId = 0;

/// A pickled value. Containers are arena indices and everything else is a scalar or an `Rc`,
/// so a value is small, cloning it is O(1), and dropping it never recurses.
// Scalars are parsed for completeness; a state dict only needs their presence.
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    /// An integer wider than 64 bits, little-endian two's complement (legacy magic number).
    Long(Rc<[u8]>),
    Tuple(ObjId),
    List(ObjId),
    Dict(ObjId),
    Global(Rc<(String, String)>),
    Storage {
        dtype: DType,
        key: Rc<str>,
    },
    Tensor(Rc<TensorRef>),
}

impl Value {
    /// A short description for messages (never the whole value).
    fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("{b}"),
            Value::Int(i) => format!("{i}"),
            Value::Float(f) => format!("{f}"),
            Value::Str(s) if s.len() <= 40 => format!("{s:?}"),
            Value::Str(s) => format!("a string of {} bytes", s.len()),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Long(_) => "a long integer".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(g) => format!("{}.{}", g.0, g.1),
            Value::Storage { .. } => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
        }
    }
}

/// A list or tuple (`Seq`) or a dict, in the arena.
#[derive(Debug)]
enum Obj {
    Seq(Vec<Value>),
    Dict(Vec<(Value, Value)>),
}

#[derive(Debug, Clone)]
struct TensorRef {
    dtype: DType,
    key: Rc<str>,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

/// How many bytes of the file's storages may still be read and of tensors built.
struct Budget {
    left: u64,
    total: u64,
}

impl Budget {
    fn for_file(file_len: u64) -> Self {
        let total = file_len
            .saturating_mul(OUTPUT_FACTOR)
            .saturating_add(OUTPUT_FLOOR);
        Budget { left: total, total }
    }
    fn take(&mut self, bytes: usize, what: &str) -> Result<(), String> {
        match self.left.checked_sub(bytes as u64) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(format!(
                "{what} would bring the bytes read and built to more than {} ({OUTPUT_FACTOR} \
                 times the file's size + {} MiB): its tensors claim far more data than the file \
                 holds",
                self.total,
                OUTPUT_FLOOR >> 20
            )),
        }
    }
}

fn bad(path: &Path, message: impl std::fmt::Display) -> ConvertError {
    ConvertError::BadCheckpoint {
        path: path.to_path_buf(),
        message: format!("{message}; {HINT}"),
    }
}

fn unpickle_error(path: &Path, what: &str, e: UnpickleError) -> ConvertError {
    match e {
        UnpickleError::Refused(global) => ConvertError::RefusedGlobal {
            path: path.to_path_buf(),
            global,
        },
        UnpickleError::Bad(m) => bad(path, format!("{what}: {m}")),
    }
}

/// Read every tensor of a PyTorch zip checkpoint. A top-level dict with a `state_dict` entry
/// (Lightning checkpoints) yields that entry; otherwise the top-level dict itself must be the
/// state dict. Non-tensor entries are skipped.
pub fn read_ckpt(path: &Path) -> Result<StateDict, ConvertError> {
    let io = |source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = decorr_core::input::open(path, "a checkpoint file")?;
    let len = file.metadata().map_err(io)?.len();
    read_zip(std::io::BufReader::new(file), len, path)
}

/// Read every tensor of a PyTorch checkpoint held in memory, in the zip or the legacy format
/// (told apart by the first bytes), as [`read_ckpt`] and [`read_legacy`] do; `path` only names
/// the file in errors.
pub fn read_ckpt_bytes(bytes: &[u8], path: &Path) -> Result<StateDict, ConvertError> {
    if bytes.starts_with(b"PK") {
        read_zip(Cursor::new(bytes), bytes.len() as u64, path)
    } else if bytes.first() == Some(&0x80) {
        read_legacy_bytes(bytes, path)
    } else {
        Err(bad(
            path,
            "neither a PyTorch zip checkpoint nor a legacy PyTorch file (no zip or pickle header)",
        ))
    }
}

fn read_zip<R: Read + Seek>(
    reader: R,
    file_len: u64,
    path: &Path,
) -> Result<StateDict, ConvertError> {
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| {
        bad(
            path,
            format!("not a readable PyTorch zip checkpoint ({e}); the file may be truncated"),
        )
    })?;
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .ok_or_else(|| bad(path, "the zip archive has no `<name>/data.pkl`"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut budget = Budget::for_file(file_len);
    // Reads are bounded by the archive's real bytes (entries are stored, not compressed).
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)
        .and_then(|mut f| f.read_to_end(&mut pkl).map_err(Into::into))
        .map_err(|e| bad(path, format!("reading {pkl_name}: {e}")))?;
    let root = Unpickler::new(&pkl)
        .run()
        .map_err(|e| unpickle_error(path, &pkl_name, e))?;
    let tensors = state_dict_tensors(&root).map_err(|m| bad(path, m))?;
    drop(root);
    // Storages are read once and dropped after their last tensor (usually their only one),
    // which then takes the bytes without a copy when it spans the whole storage.
    let mut uses: HashMap<Rc<str>, usize> = HashMap::new();
    for (_, t) in &tensors {
        *uses.entry(t.key.clone()).or_default() += 1;
    }
    let mut storages: HashMap<Rc<str>, Vec<u8>> = HashMap::new();
    let mut out = StateDict::new();
    for (name, t) in tensors {
        let tensor_err = |m: String| bad(path, format!("tensor `{name}`: {m}"));
        let left = uses.get_mut(&t.key).expect("counted");
        *left -= 1;
        let last_use = *left == 0;
        let n = numel(&t.shape).ok_or_else(|| tensor_err("its size overflows".into()))?;
        if n == 0 {
            // Nothing to read (and the storage may be absent, as torch allows).
            if last_use {
                storages.remove(&t.key);
            }
            out.insert(name, tensor_of(&t, Vec::new()));
            continue;
        }
        if !storages.contains_key(&t.key) {
            let entry = format!("{prefix}data/{}", t.key);
            let mut f = zip
                .by_name(&entry)
                .map_err(|e| tensor_err(format!("storage {entry}: {e}")))?;
            // Check the declared size first, then count what is really read.
            let declared = usize::try_from(f.size()).unwrap_or(usize::MAX);
            budget
                .take(declared, &format!("storage {entry}"))
                .map_err(tensor_err)?;
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes)
                .map_err(|e| tensor_err(format!("reading storage {entry}: {e}")))?;
            drop(f);
            storages.insert(t.key.clone(), bytes);
        }
        let storage = &storages[&t.key];
        let whole = t.offset == 0
            && is_contiguous(&t)
            && n.checked_mul(t.dtype.size()) == Some(storage.len());
        let data = if last_use && whole {
            budget.take(storage.len(), "it").map_err(tensor_err)?;
            storages.remove(&t.key).expect("read above")
        } else {
            let d = gather(storage, &t, &mut budget).map_err(tensor_err)?;
            if last_use {
                storages.remove(&t.key);
            }
            d
        };
        out.insert(name, tensor_of(&t, data));
    }
    Ok(out)
}

fn tensor_of(t: &TensorRef, data: Vec<u8>) -> Tensor {
    Tensor {
        dtype: t.dtype,
        shape: t.shape.clone(),
        data,
    }
}

/// The `(name, tensor)` entries of an unpickled state dict: the top-level dict, or its
/// `state_dict` entry (Lightning checkpoints). Non-tensor entries are skipped; of repeated
/// names the last wins, as in a Python dict.
fn state_dict_tensors(p: &Unpickled) -> Result<Vec<(String, Rc<TensorRef>)>, String> {
    let Value::Dict(id) = p.root else {
        return Err(format!(
            "the pickle's top-level object is {}, not a dict",
            p.root.describe()
        ));
    };
    let mut items = p.dict(id);
    if let Some((_, Value::Dict(inner))) = items.iter().find(|(k, v)| {
        matches!(k, Value::Str(s) if &**s == "state_dict") && matches!(v, Value::Dict(_))
    }) {
        items = p.dict(*inner);
    }
    let mut tensors = BTreeMap::new();
    for (k, v) in items {
        if let (Value::Str(name), Value::Tensor(t)) = (k, v) {
            tensors.insert(name.to_string(), t.clone());
        }
    }
    Ok(tensors.into_iter().collect())
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
    let data = decorr_core::input::read_bytes(path, "a checkpoint file", None)?;
    read_legacy_bytes(&data, path)
}

fn read_legacy_bytes(data: &[u8], path: &Path) -> Result<StateDict, ConvertError> {
    let mut pos = 0usize;
    let mut storage_types: HashMap<Rc<str>, DType> = HashMap::new();
    let mut next = |what: &str| -> Result<Unpickled, ConvertError> {
        let p = Unpickler::new(&data[pos..])
            .run()
            .map_err(|e| unpickle_error(path, &format!("legacy format, {what}"), e))?;
        pos += p.len;
        storage_types.extend(p.storages.iter().cloned());
        Ok(p)
    };
    match next("magic number")?.root {
        Value::Long(b) if *b == LEGACY_MAGIC => {}
        _ => {
            return Err(bad(
                path,
                "starts with a pickle but not with torch's magic number: not a PyTorch file",
            ));
        }
    }
    match next("protocol version")?.root {
        Value::Int(LEGACY_PROTOCOL) => {}
        other => {
            return Err(bad(
                path,
                format!(
                    "legacy protocol version {} is not supported (expected {LEGACY_PROTOCOL})",
                    other.describe()
                ),
            ));
        }
    }
    let info = next("system info")?;
    if let Value::Dict(id) = info.root {
        let big_endian = info.dict(id).iter().any(|(k, v)| {
            matches!(k, Value::Str(s) if &**s == "little_endian") && matches!(v, Value::Bool(false))
        });
        if big_endian {
            return Err(bad(path, "written on a big-endian machine: not supported"));
        }
    }
    let root = next("object")?;
    let keys = next("storage keys")?;
    let Value::List(keys_id) = keys.root else {
        return Err(bad(
            path,
            "legacy format: the storage key list is not a list",
        ));
    };
    let tensors = state_dict_tensors(&root).map_err(|m| bad(path, m))?;
    drop(root);
    let mut storages: HashMap<Rc<str>, &[u8]> = HashMap::new();
    for key in keys.seq(keys_id) {
        let Value::Str(key) = key else {
            return Err(bad(path, "legacy format: a storage key is not a string"));
        };
        let dtype = *storage_types.get(key).ok_or_else(|| {
            bad(
                path,
                format!("legacy format: storage `{key}` is not referenced by the pickle"),
            )
        })?;
        let numel = data
            .get(pos..pos.saturating_add(8))
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| {
                bad(
                    path,
                    format!("the file ends before storage `{key}` (truncated?)"),
                )
            })?;
        let start = pos + 8;
        let end = usize::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(dtype.size()))
            .and_then(|n| n.checked_add(start))
            .filter(|&e| e <= data.len())
            .ok_or_else(|| {
                bad(
                    path,
                    format!(
                        "storage `{key}` claims {numel} elements, beyond the end of the file \
                         (truncated?)"
                    ),
                )
            })?;
        storages.insert(key.clone(), &data[start..end]);
        pos = end;
    }
    let mut budget = Budget::for_file(data.len() as u64);
    let mut out = StateDict::new();
    for (name, t) in tensors {
        let tensor_err = |m: String| bad(path, format!("tensor `{name}`: {m}"));
        if numel(&t.shape) == Some(0) {
            out.insert(name, tensor_of(&t, Vec::new()));
            continue;
        }
        let storage = storages
            .get(&t.key)
            .ok_or_else(|| tensor_err(format!("storage `{}` is not in the file", t.key)))?;
        let bytes = gather(storage, &t, &mut budget).map_err(tensor_err)?;
        out.insert(name, tensor_of(&t, bytes));
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

/// The bytes of a (possibly strided) view of a storage, contiguous in row-major order. The
/// view's extent is checked against the storage, and its size against `budget`, before
/// anything is allocated.
fn gather(storage: &[u8], t: &TensorRef, budget: &mut Budget) -> Result<Vec<u8>, String> {
    let es = t.dtype.size();
    let n = numel(&t.shape).ok_or("its size overflows")?;
    if n == 0 {
        return Ok(Vec::new());
    }
    // One past the highest element touched: offset + Σ (size - 1) * stride + 1 (checked: sizes
    // come from the file), in bytes.
    let end = t
        .shape
        .iter()
        .zip(&t.strides)
        .try_fold(t.offset, |acc, (d, s)| {
            (d - 1).checked_mul(*s)?.checked_add(acc)
        })
        .and_then(|last| last.checked_add(1)?.checked_mul(es));
    match end {
        Some(end) if end <= storage.len() => {}
        _ => {
            return Err(format!(
                "its view (offset {}, size {:?}, stride {:?}) reaches beyond its storage of {} \
                 bytes",
                t.offset,
                t.shape,
                t.strides,
                storage.len()
            ));
        }
    }
    let bytes = n.checked_mul(es).ok_or("its size overflows")?;
    budget.take(bytes, "it")?;
    if is_contiguous(t) {
        return Ok(storage[t.offset * es..t.offset * es + bytes].to_vec());
    }
    // Row by row over the last axis that is not 1, with the row offsets kept incrementally.
    let dims: Vec<(usize, usize)> = t
        .shape
        .iter()
        .zip(&t.strides)
        .filter(|(d, _)| **d != 1)
        .map(|(d, s)| (*d, *s))
        .collect();
    let (&(row_len, row_stride), outer) = dims.split_last().expect("n > 1 here");
    let mut out = Vec::with_capacity(bytes);
    let mut idx = vec![0usize; outer.len()];
    let mut base = t.offset;
    for _ in 0..n / row_len {
        if row_stride == 1 {
            out.extend_from_slice(&storage[base * es..(base + row_len) * es]);
        } else {
            for i in 0..row_len {
                let e = (base + i * row_stride) * es;
                out.extend_from_slice(&storage[e..e + es]);
            }
        }
        for ax in (0..outer.len()).rev() {
            idx[ax] += 1;
            base += outer[ax].1;
            if idx[ax] < outer[ax].0 {
                break;
            }
            base -= outer[ax].0 * outer[ax].1;
            idx[ax] = 0;
        }
    }
    Ok(out)
}

#[derive(Debug)]
enum UnpickleError {
    Refused(String),
    Bad(String),
}

impl From<String> for UnpickleError {
    fn from(m: String) -> Self {
        UnpickleError::Bad(m)
    }
}

impl From<&str> for UnpickleError {
    fn from(m: &str) -> Self {
        UnpickleError::Bad(m.to_string())
    }
}

/// The result of one pickle: its value and the arena its containers live in.
struct Unpickled {
    root: Value,
    objs: Vec<Obj>,
    /// The pickle's length in bytes (up to and including STOP).
    len: usize,
    /// Storage keys and types met in persistent ids (the legacy format needs their types).
    storages: Vec<(Rc<str>, DType)>,
}

impl Unpickled {
    fn seq(&self, id: ObjId) -> &[Value] {
        match &self.objs[id] {
            Obj::Seq(v) => v,
            Obj::Dict(_) => &[],
        }
    }
    fn dict(&self, id: ObjId) -> &[(Value, Value)] {
        match &self.objs[id] {
            Obj::Dict(d) => d,
            Obj::Seq(_) => &[],
        }
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objs: Vec<Obj>,
    storages: Vec<(Rc<str>, DType)>,
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
            objs: vec![Obj::Seq(Vec::new())], // EMPTY_TUPLE
            storages: Vec::new(),
        }
    }

    /// `n` bytes of the pickle; `n` comes from the file, so it is checked against what is left
    /// before anything is allocated.
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if self
            .pos
            .checked_add(n)
            .is_none_or(|end| end > self.data.len())
        {
            return Err(format!(
                "the pickle ends early (an argument of {n} bytes at byte {}, {} bytes left)",
                self.pos,
                self.data.len() - self.pos
            )
            .into());
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
    /// A length argument (u32/u64 in the file), as usize; `take` bounds it by the data.
    fn len64(&mut self) -> R<usize> {
        Ok(usize::try_from(self.u64()?).unwrap_or(usize::MAX))
    }
    fn line(&mut self) -> R<String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated text argument")?;
        self.pos += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
    fn string(&mut self, n: usize) -> R<Rc<str>> {
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(Rc::from)
            .map_err(|_| "invalid UTF-8 string".into())
    }
    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }
    fn new_obj(&mut self, o: Obj) -> ObjId {
        self.objs.push(o);
        self.objs.len() - 1
    }
    fn pop(&mut self) -> R<Value> {
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }
    fn top(&self) -> R<&Value> {
        self.stack.last().ok_or_else(|| "stack underflow".into())
    }
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let m = self.marks.pop().ok_or("MARK missing")?;
        if m > self.stack.len() {
            return Err("corrupt MARK".into());
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_get(&mut self, i: u32) -> R<()> {
        let v = self
            .memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("memo entry {i} missing"))?;
        self.push(v);
        Ok(())
    }
    fn memo_put(&mut self, i: u32) -> R<()> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }
    /// The list on top of the stack, for APPEND(S).
    fn top_list(&mut self) -> R<&mut Vec<Value>> {
        match *self.top()? {
            Value::List(id) => match &mut self.objs[id] {
                Obj::Seq(v) => Ok(v),
                Obj::Dict(_) => unreachable!("a List value names a sequence"),
            },
            _ => Err("APPEND to a non-list".into()),
        }
    }
    /// The dict on top of the stack, for SETITEM(S).
    fn top_dict(&mut self) -> R<&mut Vec<(Value, Value)>> {
        match *self.top()? {
            Value::Dict(id) => match &mut self.objs[id] {
                Obj::Dict(d) => Ok(d),
                Obj::Seq(_) => unreachable!("a Dict value names a dict"),
            },
            _ => Err("SETITEM on a non-dict".into()),
        }
    }
    fn tuple(&mut self, items: Vec<Value>) -> Value {
        if items.is_empty() {
            Value::Tuple(EMPTY_TUPLE)
        } else {
            Value::Tuple(self.new_obj(Obj::Seq(items)))
        }
    }
    fn seq(&self, v: &Value) -> Option<&[Value]> {
        match *v {
            Value::Tuple(id) | Value::List(id) => match &self.objs[id] {
                Obj::Seq(items) => Some(items),
                Obj::Dict(_) => None,
            },
            _ => None,
        }
    }

    fn global(&mut self, module: String, name: String) -> R<()> {
        let allowed = ALLOWED_GLOBALS
            .iter()
            .any(|(m, n)| *m == module && *n == name)
            || (module == "torch" && storage_dtype(&name).is_some());
        if !allowed {
            return Err(UnpickleError::Refused(format!("{module}.{name}")));
        }
        self.push(Value::Global(Rc::new((module, name))));
        Ok(())
    }

    /// Run to STOP.
    fn run(mut self) -> R<Unpickled> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.u64()?; // FRAME
                }
                b'.' => {
                    // STOP
                    let root = self.pop()?;
                    return Ok(Unpickled {
                        root,
                        objs: self.objs,
                        len: self.pos,
                        storages: self.storages,
                    });
                }
                b'}' => {
                    let id = self.new_obj(Obj::Dict(Vec::new()));
                    self.push(Value::Dict(id))
                }
                b']' => {
                    let id = self.new_obj(Obj::Seq(Vec::new()));
                    self.push(Value::List(id))
                }
                b')' => self.push(Value::Tuple(EMPTY_TUPLE)),
                b'(' => {
                    if self.marks.len() >= MAX_DEPTH {
                        return Err(format!(
                            "the pickle nests deeper than {MAX_DEPTH} levels (byte {})",
                            self.pos - 1
                        )
                        .into());
                    }
                    self.marks.push(self.stack.len())
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.push(Value::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))
                }
                0x8a => {
                    // LONG1
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        self.push(Value::Long(Rc::from(b)));
                        continue;
                    }
                    let mut buf = if b.last().is_some_and(|x| x & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(buf)))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Value::Float(v))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(Value::Str(s))
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(Value::Str(s))
                }
                0x8d => {
                    let n = self.len64()?;
                    let s = self.string(n)?;
                    self.push(Value::Str(s))
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?);
                    self.push(Value::Str(Rc::from(s)))
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?);
                    self.push(Value::Str(Rc::from(s)))
                }
                b'S' => {
                    // STRING (protocol 0): a quoted repr; escapes are kept as written.
                    let l = self.line()?;
                    let t = l.trim();
                    let inner = t
                        .strip_prefix('\'')
                        .and_then(|x| x.strip_suffix('\''))
                        .or_else(|| t.strip_prefix('"').and_then(|x| x.strip_suffix('"')))
                        .ok_or("malformed STRING")?;
                    self.push(Value::Str(Rc::from(inner)))
                }
                b'V' => {
                    let l = self.line()?;
                    self.push(Value::Str(Rc::from(l)))
                }
                b'I' | b'L' => {
                    let l = self.line()?;
                    let v = match l.trim_end_matches('L') {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        n => Value::Int(n.parse().map_err(|_| "malformed INT")?),
                    };
                    self.push(v)
                }
                b'p' => {
                    let l = self.line()?;
                    let i = l.parse().map_err(|_| "malformed PUT")?;
                    self.memo_put(i)?
                }
                b'g' => {
                    let l = self.line()?;
                    let i = l.parse().map_err(|_| "malformed GET")?;
                    self.memo_get(i)?
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    self.push(Value::Bytes(Rc::from(b)))
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.push(Value::Bytes(Rc::from(b)))
                }
                0x8e => {
                    // BINBYTES8
                    let n = self.len64()?;
                    let b = self.take(n)?;
                    self.push(Value::Bytes(Rc::from(b)))
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
                    let i = u32::try_from(self.memo.len()).map_err(|_| "memo overflow")?;
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
                    return Err("INST objects are not part of a state dict".into());
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.global(m.to_string(), n.to_string())?
                        }
                        _ => return Err("STACK_GLOBAL without two strings".into()),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.tuple(items);
                    self.push(v)
                }
                0x85 => {
                    let a = self.pop()?;
                    let v = self.tuple(vec![a]);
                    self.push(v)
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    let v = self.tuple(vec![a, b]);
                    self.push(v)
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    let v = self.tuple(vec![a, b, c]);
                    self.push(v)
                }
                b'a' => {
                    let v = self.pop()?;
                    self.top_list()?.push(v);
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.top_list()?.extend(items);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.top_dict()?.push((k, v));
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err("SETITEMS with an odd item count".into());
                    }
                    let d = self.top_dict()?;
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'b' => {
                    // BUILD: the state of an OrderedDict (its `_metadata`) or a tensor is not needed.
                    self.pop()?;
                }
                b'Q' => {
                    // BINPERSID: ('storage', torch.XStorage, key, location, numel)
                    let pid = self.pop()?;
                    let v = self.persistent_load(&pid)?;
                    if let Value::Storage { dtype, key } = &v {
                        self.storages.push((key.clone(), *dtype));
                    }
                    self.push(v)
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(&func, &args)?;
                    self.push(v)
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

    fn persistent_load(&self, pid: &Value) -> R<Value> {
        let Value::Tuple(_) = pid else {
            return Err("persistent id is not a tuple".into());
        };
        match self.seq(pid).unwrap_or(&[]) {
            [Value::Str(kind), Value::Global(g), Value::Str(key), ..] if &**kind == "storage" => {
                let (m, n) = &**g;
                let dtype = (m == "torch")
                    .then(|| storage_dtype(n))
                    .flatten()
                    .ok_or_else(|| UnpickleError::Refused(format!("{m}.{n}")))?;
                Ok(Value::Storage {
                    dtype,
                    key: key.clone(),
                })
            }
            _ => Err("unsupported persistent id (not a torch storage)".into()),
        }
    }

    fn usizes(&self, v: &Value, what: &str) -> R<Vec<usize>> {
        let items = self
            .seq(v)
            .ok_or_else(|| format!("{what} is not a tuple"))?;
        if items.len() > MAX_RANK {
            return Err(format!(
                "{what} has {} dimensions (at most {MAX_RANK} are accepted)",
                items.len()
            )
            .into());
        }
        items
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i as usize),
                _ => Err(format!("{what} holds {}, not a size", x.describe()).into()),
            })
            .collect()
    }

    fn reduce(&mut self, func: &Value, args: &Value) -> R<Value> {
        let Value::Global(g) = func else {
            return Err("REDUCE of a non-global callable".into());
        };
        let Value::Tuple(_) = args else {
            return Err("REDUCE arguments are not a tuple".into());
        };
        if g.0 == "collections" && g.1 == "OrderedDict" {
            return if self.seq(args).is_some_and(|a| a.is_empty()) {
                Ok(Value::Dict(self.new_obj(Obj::Dict(Vec::new()))))
            } else {
                Err("OrderedDict with constructor arguments".into())
            };
        }
        let args = self.seq(args).unwrap_or(&[]);
        match (g.0.as_str(), g.1.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2") => {
                let [storage, offset, size, stride, ..] = args else {
                    return Err("_rebuild_tensor_v2 with too few arguments".into());
                };
                let Value::Storage { dtype, key } = storage else {
                    return Err("_rebuild_tensor_v2 without a storage".into());
                };
                let Value::Int(offset) = *offset else {
                    return Err("_rebuild_tensor_v2 offset is not an integer".into());
                };
                let shape = self.usizes(size, "tensor size")?;
                let strides = self.usizes(stride, "tensor stride")?;
                if shape.len() != strides.len() || offset < 0 {
                    return Err("tensor size/stride mismatch".into());
                }
                Ok(Value::Tensor(Rc::new(TensorRef {
                    dtype: *dtype,
                    key: key.clone(),
                    offset: offset as usize,
                    shape,
                    strides,
                })))
            }
            ("torch._utils", "_rebuild_parameter") => match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err("_rebuild_parameter without a tensor".into()),
            },
            (m, n) => Err(UnpickleError::Refused(format!("{m}.{n}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> R<Unpickled> {
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
        let u = run(p).unwrap();
        let Value::Dict(id) = u.root else { panic!() };
        let d = u.dict(id);
        assert_eq!(d.len(), 2);
        let Value::List(l) = d[1].1 else { panic!() };
        assert_eq!(u.seq(l).len(), 2);
    }

    /// A memoised list filled after its PUT is seen filled through GET, as in Python (the memo
    /// holds the object, not a copy).
    #[test]
    fn memo_shares_objects() {
        // l = []; PUT 0; APPEND 1; top = (GET 0,) -> ([1],)
        let p = b"]q\x00K\x01ah\x00\x85.";
        let u = run(p).unwrap();
        let Value::Tuple(t) = u.root else { panic!() };
        let Value::List(l) = u.seq(t)[0] else {
            panic!()
        };
        assert!(matches!(u.seq(l), [Value::Int(1)]));
        // A list appended to itself is no problem either (nothing walks it).
        let p = b"]q\x00h\x00a.";
        assert!(run(p).is_ok());
    }

    #[test]
    fn depth_and_rank_are_bounded() {
        let mut p = vec![b'('; MAX_DEPTH + 1];
        p.push(b'.');
        let Err(UnpickleError::Bad(m)) = run(&p) else {
            panic!()
        };
        assert!(m.contains("deeper than 1000"), "{m}");
        // 100 000 nested lists are flat in memory and dropped without recursion.
        let mut p = vec![b']'; 100_000];
        p.extend(std::iter::repeat_n(b'a', 99_999));
        p.push(b'.');
        drop(run(&p).unwrap());
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
        // From memory, both formats.
        for f in ["partial.pth", "partial_legacy.pth"] {
            let bytes = std::fs::read(dir.join(f)).unwrap();
            assert_eq!(read_ckpt_bytes(&bytes, Path::new(f)).unwrap(), zip);
        }
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

    fn tref(shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> TensorRef {
        TensorRef {
            dtype: DType::U8,
            key: Rc::from("0"),
            offset,
            shape,
            strides,
        }
    }

    #[test]
    fn strided_gather() {
        let mut budget = Budget::for_file(0);
        // 2x3 storage of u8, transposed view 3x2.
        let storage = [0u8, 1, 2, 3, 4, 5];
        let t = tref(vec![3, 2], vec![1, 3], 0);
        assert_eq!(
            gather(&storage, &t, &mut budget).unwrap(),
            vec![0, 3, 1, 4, 2, 5]
        );
        assert!(gather(&storage, &tref(vec![3, 2], vec![1, 4], 0), &mut budget).is_err());
        // Size-1 axes, an offset, a broadcast (stride 0) axis and a contiguous inner row.
        let t = tref(vec![2, 1, 2, 2], vec![0, 7, 3, 1], 1);
        assert_eq!(
            gather(&storage, &t, &mut budget).unwrap(),
            vec![1, 2, 4, 5, 1, 2, 4, 5]
        );
        let t = tref(vec![3], vec![2], 0);
        assert_eq!(gather(&storage, &t, &mut budget).unwrap(), vec![0, 2, 4]);
        // A zero-stride view of 2^60 elements fits its storage but not the budget: refused
        // before allocating.
        let t = tref(vec![1 << 60], vec![0], 0);
        let e = gather(&storage, &t, &mut budget).unwrap_err();
        assert!(e.contains("far more data than the file"), "{e}");
        // size * stride overflowing usize is an error, not a wrap.
        let t = tref(vec![1 << 40, 1 << 40], vec![1 << 40, 1], 0);
        assert!(gather(&storage, &t, &mut budget).is_err());
    }
}
