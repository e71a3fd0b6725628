//! Where a model's files come from: a local diffusers folder, a Hugging Face hub repo read
//! through the standard hub cache (`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN`,
//! `HF_ENDPOINT`; [`crate::hub`]),
//! or diffusers-layout files held in memory (a single-file checkpoint converted on loading).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{CoreError, hub, input};

/// The hub repo used when the user names no weights.
pub const DEFAULT_MODEL: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";

/// A Stable Diffusion checkpoint in diffusers layout (`text_encoder/`, `tokenizer/`, `unet/`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder on disk: a pipeline root, or one component folder (with its `config.json`).
    Local(PathBuf),
    /// A hub repo id with a revision (branch, tag or commit).
    Hub { repo: String, revision: String },
    /// Files in diffusers layout held in memory (what `decorr-convert` makes of a single-file
    /// checkpoint).
    Memory(Arc<MemoryModel>),
}

/// A model's files by path relative to the pipeline root (`unet/config.json`,
/// `unet/diffusion_pytorch_model.safetensors`, `tokenizer/vocab.json`, ...), held in memory.
#[derive(Clone, PartialEq, Eq)]
pub struct MemoryModel {
    description: String,
    files: BTreeMap<String, Arc<Vec<u8>>>,
}

impl MemoryModel {
    /// An empty model; `description` names it in messages (say `FILE (converted)`), and each
    /// file is shown as `DESCRIPTION RELATIVE/PATH`.
    pub fn new(description: impl Into<String>) -> Self {
        Self {
            description: description.into(),
            files: BTreeMap::new(),
        }
    }

    /// Add (or replace) the file at `rel` (`/`-separated, relative to the pipeline root).
    pub fn insert(&mut self, rel: impl Into<String>, bytes: Vec<u8>) {
        self.files.insert(rel.into(), Arc::new(bytes));
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    /// Every file as `(relative path, bytes)`, in path order.
    pub fn files(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The file at `rel`, if there is one.
    pub fn file(&self, rel: &str) -> Option<ModelFile> {
        self.files.get(rel).map(|bytes| ModelFile::Memory {
            name: format!("{} {rel}", self.description),
            bytes: bytes.clone(),
        })
    }

    /// Whether any file lies under `dir/`.
    pub fn has_folder(&self, dir: &str) -> bool {
        let prefix = format!("{dir}/");
        self.files.keys().any(|k| k.starts_with(&prefix))
    }

    /// Total size of the files in bytes.
    pub fn size(&self) -> usize {
        self.files.values().map(|v| v.len()).sum()
    }

    fn find(&self, component: &str, candidates: &[&str]) -> Result<ModelFile, CoreError> {
        let mut looked = Vec::new();
        for dir in [component, ""] {
            for c in candidates {
                let rel = if dir.is_empty() {
                    c.to_string()
                } else {
                    format!("{dir}/{c}")
                };
                if let Some(f) = self.file(&rel) {
                    return Ok(f);
                }
                looked.push(rel);
            }
            if component.is_empty() {
                break;
            }
        }
        Err(CoreError::NotFound(format!(
            "no {component} file in {}; looked for:\n  {}",
            self.description,
            looked.join("\n  ")
        )))
    }
}

impl fmt::Debug for MemoryModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryModel")
            .field("description", &self.description)
            .field(
                "files",
                &self
                    .files
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.len()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// One file of a model: on disk, or held in memory by a [`MemoryModel`].
#[derive(Clone, PartialEq, Eq)]
pub enum ModelFile {
    Path(PathBuf),
    /// `name` is what messages show (`FILE (converted) unet/config.json`).
    Memory {
        name: String,
        bytes: Arc<Vec<u8>>,
    },
}

impl ModelFile {
    /// The path on disk, `None` for a file held in memory.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ModelFile::Path(p) => Some(p),
            ModelFile::Memory { .. } => None,
        }
    }

    /// The file's path, or for a file in memory its name, as the `path` of an error.
    pub fn error_path(&self) -> PathBuf {
        match self {
            ModelFile::Path(p) => p.clone(),
            ModelFile::Memory { name, .. } => PathBuf::from(name),
        }
    }

    /// For messages: the path, or the in-memory file's name.
    pub fn display(&self) -> impl fmt::Display + '_ {
        self
    }

    /// The file's bytes (read from disk, or borrowed from memory). For weights: a file on disk
    /// must be a regular file, of any size.
    pub fn read_bytes(&self) -> Result<Cow<'_, [u8]>, CoreError> {
        match self {
            ModelFile::Path(p) => input::read_bytes(p, "a weights file", None).map(Cow::Owned),
            ModelFile::Memory { bytes, .. } => Ok(Cow::Borrowed(bytes.as_slice())),
        }
    }

    /// The file as UTF-8 text, without a leading byte-order mark (editors on Windows add one;
    /// JSON parsers refuse it). A file on disk must be a regular file of at most
    /// [`input::TEXT_CAP`] bytes.
    pub fn read_to_string(&self) -> Result<String, CoreError> {
        const WHAT: &str = "a checkpoint's config or tokenizer file";
        match self {
            ModelFile::Path(p) => input::read_text(p, WHAT),
            ModelFile::Memory { bytes, .. } => {
                input::text_of(&self.error_path(), bytes.to_vec(), WHAT)
            }
        }
    }
}

impl fmt::Display for ModelFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelFile::Path(p) => p.display().fmt(f),
            ModelFile::Memory { name, .. } => f.write_str(name),
        }
    }
}

impl fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelFile::Path(p) => f.debug_tuple("Path").field(p).finish(),
            ModelFile::Memory { name, bytes } => f
                .debug_struct("Memory")
                .field("name", name)
                .field("len", &bytes.len())
                .finish(),
        }
    }
}

/// What the weight and config readers accept: a path, or a [`ModelFile`].
pub trait AsModelFile {
    fn to_model_file(&self) -> ModelFile;
}

impl AsModelFile for Path {
    fn to_model_file(&self) -> ModelFile {
        ModelFile::Path(self.to_path_buf())
    }
}

impl AsModelFile for PathBuf {
    fn to_model_file(&self) -> ModelFile {
        ModelFile::Path(self.clone())
    }
}

impl AsModelFile for ModelFile {
    fn to_model_file(&self) -> ModelFile {
        self.clone()
    }
}

impl ModelSource {
    pub fn hub(repo: impl Into<String>) -> Self {
        ModelSource::Hub {
            repo: repo.into(),
            revision: "main".into(),
        }
    }

    /// Short human description, for messages and reports.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Local(p) => p.display().to_string(),
            ModelSource::Hub { repo, revision } if revision == "main" => repo.clone(),
            ModelSource::Hub { repo, revision } => format!("{repo}@{revision}"),
            ModelSource::Memory(m) => m.description.clone(),
        }
    }

    /// The first of `candidates` (paths relative to `component/`) that exists, downloading it
    /// from the hub if needed. A local folder that *is* the component folder is accepted too.
    /// Files held in memory have no path: use [`find_file`](Self::find_file) for those.
    pub fn find(&self, component: &str, candidates: &[&str]) -> Result<PathBuf, CoreError> {
        match self {
            ModelSource::Local(root) => find_local(root, component, candidates),
            ModelSource::Hub { repo, revision } => find_hub(repo, revision, component, candidates),
            ModelSource::Memory(m) => {
                let f = m.find(component, candidates)?;
                Err(CoreError::NotFound(format!(
                    "{f} is held in memory and has no path on disk"
                )))
            }
        }
    }

    /// Like [`find`](Self::find) but `None` when no candidate exists (optional files such as a
    /// checkpoint's own tokenizer), whatever the reason.
    pub fn find_optional(&self, component: &str, candidates: &[&str]) -> Option<PathBuf> {
        self.find(component, candidates).ok()
    }

    /// Like [`find_file`](Self::find_file), with `Ok(None)` only where no candidate is there at
    /// all: not on disk, not in memory, not in the hub cache with `HF_HUB_OFFLINE` set, or not
    /// on the hub (HTTP 404). A candidate that is there but unreadable (a FIFO, a link to a
    /// device), or a download that fails for another reason, is an error: an optional file
    /// must not silently be taken for absent.
    pub fn find_file_opt(
        &self,
        component: &str,
        candidates: &[&str],
    ) -> Result<Option<ModelFile>, CoreError> {
        match self {
            ModelSource::Local(root) => {
                Ok(locate_local(root, component, candidates)?.map(ModelFile::Path))
            }
            ModelSource::Hub { repo, revision } => {
                Ok(locate_hub(repo, revision, component, candidates)?.map(ModelFile::Path))
            }
            ModelSource::Memory(m) => Ok(m.find(component, candidates).ok()),
        }
    }

    /// Whether the checkpoint has a `component/` folder at all: on disk, in memory, or in the
    /// hub cache's copy of the revision (a hub repo not cached cannot be listed: `false`).
    /// Tells a partial folder (an error) from none (a documented fallback).
    pub fn has_folder(&self, component: &str) -> bool {
        match self {
            ModelSource::Local(root) => input::exists_at_all(&root.join(component)),
            ModelSource::Hub { repo, revision } => {
                hub::cached_folder(&hub::cache_dir(), repo, revision, component).is_some()
            }
            ModelSource::Memory(m) => m.has_folder(component),
        }
    }

    /// Like [`find`](Self::find), for any source: the file on disk or in memory.
    pub fn find_file(&self, component: &str, candidates: &[&str]) -> Result<ModelFile, CoreError> {
        match self {
            ModelSource::Memory(m) => m.find(component, candidates),
            _ => self.find(component, candidates).map(ModelFile::Path),
        }
    }

    /// Like [`find_file`](Self::find_file) but `None` when no candidate exists.
    pub fn find_file_optional(&self, component: &str, candidates: &[&str]) -> Option<ModelFile> {
        self.find_file(component, candidates).ok()
    }
}

/// The places [`find_local`] looks, in order: `root/component/c`, then `root/c` (a root that is
/// the component folder itself).
fn local_candidates(root: &Path, component: &str, candidates: &[&str]) -> Vec<PathBuf> {
    let dirs = [root.join(component), root.to_path_buf()];
    dirs.iter()
        .flat_map(|d| candidates.iter().map(move |c| d.join(c)))
        .collect()
}

/// The first candidate on disk, `None` when none is there. One that is there but is no regular
/// file (a FIFO, a link to a device, a dangling link) is an error naming it, not "absent".
fn locate_local(
    root: &Path,
    component: &str,
    candidates: &[&str],
) -> Result<Option<PathBuf>, CoreError> {
    for p in local_candidates(root, component, candidates) {
        if input::exists_at_all(&p) {
            input::check_regular(&p, "a checkpoint file")?;
            return Ok(Some(p));
        }
    }
    Ok(None)
}

fn find_local(root: &Path, component: &str, candidates: &[&str]) -> Result<PathBuf, CoreError> {
    if !root.exists() {
        return Err(CoreError::NotFound(format!(
            "weights folder {} does not exist; pass a diffusers-layout folder (with {component}/) \
             to --weights, or a hub repo id to --model",
            root.display()
        )));
    }
    if let Some(p) = locate_local(root, component, candidates)? {
        return Ok(p);
    }
    let looked: Vec<String> = local_candidates(root, component, candidates)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    Err(CoreError::NotFound(format!(
        "no {component} file found; looked for:\n  {}\nPoint --weights at a diffusers folder \
         (e.g. a local copy of {DEFAULT_MODEL}) or convert a single-file checkpoint with \
         `cargo xtask convert-weights`",
        looked.join("\n  ")
    )))
}

/// `candidates` of `component` as repo paths, for messages: `unet/a` (or `unet/b`).
fn repo_files(component: &str, candidates: &[&str]) -> String {
    let names: Vec<String> = candidates
        .iter()
        .map(|c| format!("`{}`", in_repo(component, c)))
        .collect();
    match names.split_first() {
        Some((first, [])) => first.clone(),
        Some((first, rest)) => format!("{first} (or {})", rest.join(", ")),
        None => String::new(),
    }
}

/// A file of `component` as a path in the repo; an empty component names files at the repo's
/// root (a scoring model's repo, say).
fn in_repo(component: &str, c: &str) -> String {
    if component.is_empty() {
        c.to_string()
    } else {
        format!("{component}/{c}")
    }
}

/// The first candidate from the hub cache or a download; `None` when none is there: not cached
/// with `HF_HUB_OFFLINE` set, or HTTP 404 for each. Any other failed download is an error.
fn locate_hub(
    repo: &str,
    revision: &str,
    component: &str,
    candidates: &[&str],
) -> Result<Option<PathBuf>, CoreError> {
    match find_hub(repo, revision, component, candidates) {
        Ok(p) => Ok(Some(p)),
        Err(CoreError::HubUnavailable { reason, .. })
            if hub::offline() || reason.contains(NO_SUCH_FILE) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// What a download's reason says when the hub answered 404 for every candidate.
const NO_SUCH_FILE: &str = "the hub answered HTTP 404 (no such repo, revision or file)";

fn find_hub(
    repo: &str,
    revision: &str,
    component: &str,
    candidates: &[&str],
) -> Result<PathBuf, CoreError> {
    // Both become paths in the cache: checked before anything is looked up or written.
    hub::validate_repo_id(repo)?;
    hub::validate_revision(revision)?;
    let cache = hub::cache_dir();
    for c in candidates {
        if let Some(p) = hub::cached(&cache, repo, revision, &in_repo(component, c)) {
            return Ok(p);
        }
    }
    let includes: Vec<String> = if component.is_empty() {
        vec![]
    } else {
        vec![format!("{component}/*")]
    };
    let includes: Vec<&str> = includes.iter().map(String::as_str).collect();
    let unavailable = |reason: String| CoreError::HubUnavailable {
        repo: repo.to_string(),
        revision: revision.to_string(),
        reason,
        advice: format!(
            "download it once with `{}` (with every other folder the program loads), then pass \
             --weights DIR",
            hub::download_command(repo, revision, &includes)
        ),
    };
    let files = repo_files(component, candidates);
    if hub::offline() {
        return Err(unavailable(format!(
            "HF_HUB_OFFLINE is set and the hub cache at {} has no {files} of {repo}@{revision}",
            cache.display()
        )));
    }
    let api = hub::Hub::from_env();
    let mut reasons = Vec::new();
    for c in candidates {
        match api.get(repo, revision, &in_repo(component, c)) {
            Ok(p) => return Ok(p),
            // A failed download of this name: the next one may be there.
            Err(CoreError::Hub { message, .. }) => reasons.push(message),
            // A refused server answer, or a cache that cannot be written: stop with it.
            Err(e) => return Err(e),
        }
    }
    // The hub's own words for a missing file (hub.rs): "HTTP 404, no such repo ...".
    let reason = match reasons.iter().find(|m| !m.contains("HTTP 404")) {
        Some(m) => format!("cannot download {files} of {repo}@{revision}: {m}"),
        None => format!("{NO_SUCH_FILE} for {files} of {repo}@{revision}"),
    };
    Err(unavailable(reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_component_folder_or_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("text_encoder")).unwrap();
        std::fs::write(dir.path().join("text_encoder/config.json"), "{}").unwrap();
        let root = ModelSource::Local(dir.path().to_path_buf());
        let p = root.find("text_encoder", &["config.json"]).unwrap();
        assert_eq!(p, dir.path().join("text_encoder/config.json"));
        let comp = ModelSource::Local(dir.path().join("text_encoder"));
        assert_eq!(comp.find("text_encoder", &["config.json"]).unwrap(), p);
        let err = root.find("unet", &["config.json"]).unwrap_err().to_string();
        assert!(
            err.contains("unet/config.json") && err.contains("--weights"),
            "{err}"
        );
        let err = ModelSource::Local(dir.path().join("nope"))
            .find("x", &["y"])
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn text_files_lose_a_leading_byte_order_mark() {
        let mut m = MemoryModel::new("x");
        m.insert("unet/config.json", b"\xef\xbb\xbf{\"a\": 1}".to_vec());
        let src = ModelSource::Memory(Arc::new(m));
        let f = src.find_file("unet", &["config.json"]).unwrap();
        assert_eq!(f.read_to_string().unwrap(), "{\"a\": 1}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "\u{feff}{}").unwrap();
        let f = ModelFile::Path(dir.path().join("config.json"));
        assert_eq!(f.read_to_string().unwrap(), "{}");
    }

    #[test]
    fn memory_files_by_component_or_root() {
        let mut m = MemoryModel::new("x.safetensors (converted)");
        m.insert("unet/config.json", b"{}".to_vec());
        m.insert("model_index.json", b"{\"a\": 1}".to_vec());
        let src = ModelSource::Memory(Arc::new(m));
        assert_eq!(src.describe(), "x.safetensors (converted)");
        let f = src
            .find_file("unet", &["missing.json", "config.json"])
            .unwrap();
        assert_eq!(f.to_string(), "x.safetensors (converted) unet/config.json");
        assert_eq!(f.path(), None);
        assert_eq!(&*f.read_bytes().unwrap(), b"{}");
        assert_eq!(f.read_to_string().unwrap(), "{}");
        let root = src.find_file("unet", &["model_index.json"]).unwrap();
        assert_eq!(
            root.to_string(),
            "x.safetensors (converted) model_index.json"
        );
        let err = src
            .find_file("vae", &["config.json"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vae/config.json") && err.contains("x.safetensors (converted)"),
            "{err}"
        );
        assert!(src.find_file_optional("vae", &["config.json"]).is_none());
        // A file in memory has no path to hand out.
        let err = src.find("unet", &["config.json"]).unwrap_err().to_string();
        assert!(err.contains("in memory"), "{err}");
        // Local folders give paths through find_file too.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let local = ModelSource::Local(dir.path().to_path_buf());
        assert_eq!(
            local.find_file("unet", &["config.json"]).unwrap(),
            ModelFile::Path(dir.path().join("config.json"))
        );
    }

    /// A candidate that is there but is no regular file is named as such, never "not found",
    /// and is an error for an optional file too.
    #[cfg(unix)]
    #[test]
    fn special_files_are_not_taken_for_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let unet = dir.path().join("unet");
        std::fs::create_dir_all(&unet).unwrap();
        let c = std::ffi::CString::new(unet.join("config.json").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::fs::create_dir_all(dir.path().join("vae")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("vae/config.json")).unwrap();
        let src = ModelSource::Local(dir.path().to_path_buf());
        for (component, kind) in [("unet", "a FIFO"), ("vae", "a character device")] {
            let err = src
                .find_file(component, &["config.json"])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("{component}/config.json is {kind}"))
                    && err.contains("not a regular file")
                    && !err.contains("no unet file found"),
                "{err}"
            );
            assert!(src.find_file_opt(component, &["config.json"]).is_err());
            // Reading it directly does not block or fill the memory either.
            let f = ModelFile::Path(dir.path().join(component).join("config.json"));
            assert!(f.read_to_string().unwrap_err().to_string().contains(kind));
        }
        assert_eq!(
            src.find_file_opt("text_encoder", &["config.json"]).unwrap(),
            None
        );
        assert!(src.has_folder("unet") && !src.has_folder("tokenizer"));
    }

    /// The offline path reads the hub cache's layout: refs/<rev> holds a commit, snapshots/<commit>/ the files.
    #[test]
    fn hub_cache_offline() {
        let dir = tempfile::tempdir().unwrap();
        let repo_dir = dir.path().join("hub/models--org--tiny");
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
        let snap = repo_dir.join(format!("snapshots/{commit}/text_encoder"));
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        // SAFETY: this is the only test that touches these variables.
        unsafe {
            std::env::set_var("HF_HOME", dir.path());
            std::env::set_var("HF_HUB_OFFLINE", "1");
        }
        let src = ModelSource::hub("org/tiny");
        assert_eq!(
            src.find("text_encoder", &["config.json"]).unwrap(),
            snap.join("config.json")
        );
        let err = src
            .find("unet", &["config.json", "b.json"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HF_HUB_OFFLINE")
                && err.contains("`unet/config.json` (or `unet/b.json`)")
                && err.contains(
                    "huggingface-cli download org/tiny --include \"unet/*\" --local-dir DIR"
                )
                && err.contains("--weights DIR"),
            "{err}"
        );
        // One message, not a chain that repeats itself, and no template braces left over.
        assert!(
            !err.contains('{') && err.matches("org/tiny@main").count() == 1,
            "{err}"
        );
        // Absent from the cache: `None` for an optional file, and a folder not there at all.
        assert_eq!(
            src.find_file_opt("tokenizer", &["vocab.json"]).unwrap(),
            None
        );
        assert!(src.has_folder("text_encoder") && !src.has_folder("tokenizer"));
        // A revision that would climb out of the cache is refused before anything is read.
        let evil = ModelSource::Hub {
            repo: "org/tiny".into(),
            revision: "../../x".into(),
        };
        let err = evil.find("unet", &["config.json"]).unwrap_err().to_string();
        assert!(err.contains("--revision"), "{err}");
    }
}
