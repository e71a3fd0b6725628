//! Hugging Face hub downloads into the standard hub cache (the layout `huggingface_hub` and
//! hf-hub share: `models--ORG--NAME/{blobs/ETAG, snapshots/COMMIT/FILE -> blob, refs/REV}`).
//!
//! Our own client rather than hf-hub's, because a server (an `HF_ENDPOINT` mirror) names the
//! cache paths: hf-hub joins the `ETag` and `X-Repo-Commit` it is sent into the blob and snapshot
//! paths as given, so `../` in either writes outside the cache. Here every name that becomes a
//! path is checked first: the repo id and revision the user gives, the file names we ask for,
//! and what the server answers (a commit must be 40 hex digits, an ETag 40 or 64), and a 64-digit
//! ETag (an LFS file's SHA-256) is verified against the downloaded bytes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::CoreError;

/// The hub's address (`HF_ENDPOINT` changes it, for a mirror).
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where the hub cache is: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    hf_home().join("hub")
}

fn hf_home() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/huggingface")
}

/// The access token: `HF_TOKEN`, else the file `huggingface-cli login` writes.
fn token() -> Option<String> {
    let from_env = std::env::var("HF_TOKEN").ok();
    let t = from_env
        .or_else(|| crate::input::read_text(&hf_home().join("token"), "the hub token file").ok())?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Whether `HF_HUB_OFFLINE` asks for the cache only.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "False"))
        .unwrap_or(false)
}

fn bad(what: &str, value: &str, rule: &str) -> CoreError {
    CoreError::NotFound(format!("{what} {value:?} is not valid: {rule}"))
}

/// One path segment of a name: letters, digits, `-`, `_`, `.`, and not `.` or `..`.
fn plain_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A repo id as the hub spells them: `NAME` or `ORG/NAME`, each of letters, digits, `-_.`,
/// at most 96 characters, without `--` or `..` (the cache folder joins the parts with `--`).
pub fn validate_repo_id(repo: &str) -> Result<(), CoreError> {
    let rule = "a hub repo id is NAME or ORG/NAME (letters, digits, '-', '_', '.'; \
                no '..' or '--'), e.g. stable-diffusion-v1-5/stable-diffusion-v1-5";
    let parts: Vec<&str> = repo.split('/').collect();
    let ok = (1..=2).contains(&parts.len())
        && parts.iter().all(|p| plain_segment(p) && p.len() <= 96)
        && !repo.contains("--")
        && !repo.contains("..");
    if ok {
        Ok(())
    } else {
        Err(bad("--model", repo, rule))
    }
}

/// A revision: a branch, tag or commit; `/` may separate segments (`refs/pr/1`), each a plain
/// name. It becomes a path under `refs/`, so `..`, `.` and absolute paths are refused.
pub fn validate_revision(revision: &str) -> Result<(), CoreError> {
    let ok = revision.len() <= 256 && revision.split('/').all(plain_segment);
    if ok {
        Ok(())
    } else {
        Err(bad(
            "--revision",
            revision,
            "a branch, tag or commit name (letters, digits, '-', '_', '.', segments separated \
             by '/'; no '..', no leading or trailing '/'), e.g. main",
        ))
    }
}

/// A file inside the repo (`unet/config.json`): relative, plain segments.
fn validate_file(file: &str) -> Result<(), CoreError> {
    if file.len() <= 512 && file.split('/').all(plain_segment) {
        Ok(())
    } else {
        Err(bad("hub file name", file, "relative, plain path segments"))
    }
}

fn is_hex(s: &str, lens: &[usize]) -> bool {
    lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A repo's folder in the cache.
fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The cached file for `repo@revision`, if the cache has it. A revision that is a commit is
/// looked up directly; a branch or tag through `refs/REV`, whose content must be a commit hash
/// (anything else is ignored, so a tampered ref cannot point outside the cache).
pub fn cached(cache: &Path, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let p = cached_path(cache, repo, revision, file)?;
    p.is_file().then_some(p)
}

/// Where `file` of `repo@revision` lies in the cache's snapshot, whether or not it is there;
/// `None` where a name is not valid or the revision's ref is missing or not a commit.
fn cached_path(cache: &Path, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    validate_repo_id(repo).ok()?;
    validate_revision(revision).ok()?;
    validate_file(file).ok()?;
    let dir = repo_dir(cache, repo);
    let commit = if is_hex(revision, &[40]) {
        revision.to_string()
    } else {
        let c =
            crate::input::read_text(&dir.join("refs").join(revision), "a hub cache ref").ok()?;
        let c = c.trim().to_string();
        if !is_hex(&c, &[40]) {
            log::warn!(
                "ignoring {}: not a commit hash",
                dir.join("refs").join(revision).display()
            );
            return None;
        }
        c
    };
    Some(dir.join("snapshots").join(commit).join(file))
}

/// The cached folder `dir` of `repo@revision` (`tokenizer`, say), if the cache holds one:
/// whether a checkpoint has that folder at all, where nothing can be listed online.
pub fn cached_folder(cache: &Path, repo: &str, revision: &str, dir: &str) -> Option<PathBuf> {
    validate_file(dir).ok()?;
    // The folder's path is the path of a file named like it, as `cached` resolves it.
    let probe = cached_path(cache, repo, revision, dir)?;
    probe.is_dir().then_some(probe)
}

/// The `huggingface-cli` command that downloads `includes` (repo paths or globs, `unet/*`; none:
/// the whole repo) of `repo@revision` into a folder `DIR` to pass to `--weights`.
pub fn download_command(repo: &str, revision: &str, includes: &[&str]) -> String {
    let mut cmd = format!("huggingface-cli download {repo}");
    if revision != "main" {
        cmd.push_str(&format!(" --revision {revision}"));
    }
    if !includes.is_empty() {
        cmd.push_str(" --include");
        for i in includes {
            cmd.push_str(&format!(" \"{i}\""));
        }
    }
    cmd.push_str(" --local-dir DIR");
    cmd
}

/// What the hub says about a file before it is downloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Metadata {
    commit: String,
    etag: String,
    /// Where to GET the bytes (the resolve URL, or the CDN address it redirects to).
    location: String,
}

fn hub_err(repo: &str, revision: &str, file: &str, message: String) -> CoreError {
    CoreError::Hub {
        repo: format!("{repo}@{revision}"),
        file: file.to_string(),
        message,
    }
}

/// A client of one hub endpoint.
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    cache: PathBuf,
    agent: ureq::Agent,
}

impl Hub {
    /// From the environment: `HF_ENDPOINT`, `HF_TOKEN` (or the login file), the cache dir.
    pub fn from_env() -> Self {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Self::new(&endpoint, token(), cache_dir())
    }

    pub fn new(endpoint: &str, token: Option<String>, cache: PathBuf) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_recv_body(None)
            .user_agent(concat!("decorr/", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            cache,
            agent: ureq::Agent::new_with_config(config),
        }
    }

    pub fn cache(&self) -> &Path {
        &self.cache
    }

    fn resolve_url(&self, repo: &str, revision: &str, file: &str) -> String {
        // A revision with '/' (refs/pr/1) is one path segment of the URL.
        let rev = revision.replace('/', "%2F");
        format!("{}/{repo}/resolve/{rev}/{file}", self.endpoint)
    }

    /// The cached file, or a download of it into the cache.
    pub fn get(&self, repo: &str, revision: &str, file: &str) -> Result<PathBuf, CoreError> {
        validate_repo_id(repo)?;
        validate_revision(revision)?;
        validate_file(file)?;
        if let Some(p) = cached(&self.cache, repo, revision, file) {
            return Ok(p);
        }
        self.download(repo, revision, file)
    }

    /// HEAD of the resolve URL, following only relative redirects (a renamed repo); an absolute
    /// one (the CDN) is where the bytes are.
    fn metadata(&self, repo: &str, revision: &str, file: &str) -> Result<Metadata, CoreError> {
        let err = |m: String| hub_err(repo, revision, file, m);
        let refused = |message: String| CoreError::HubRefused {
            repo: format!("{repo}@{revision}"),
            file: file.to_string(),
            message,
        };
        let mut url = self.resolve_url(repo, revision, file);
        for _ in 0..5 {
            let mut req = self.agent.head(&url);
            if let Some(t) = &self.token {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            let resp = req.call().map_err(|e| err(format!("{url}: {e}")))?;
            let status = resp.status().as_u16();
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(|s| s.trim().to_string())
            };
            let location = header("location");
            if (300..400).contains(&status) {
                let Some(loc) = location.clone() else {
                    return Err(err(format!("{url}: HTTP {status} without a Location")));
                };
                if loc.starts_with('/') && header("x-repo-commit").is_none() {
                    url = format!("{}{loc}", self.endpoint);
                    continue;
                }
            } else if status == 401 || status == 403 {
                return Err(err(format!(
                    "{url}: HTTP {status}; the repo is gated or private: accept its licence on \
                     the hub and set HF_TOKEN (or run `huggingface-cli login`)"
                )));
            } else if status == 404 {
                return Err(err(format!(
                    "{url}: HTTP 404, no such repo, revision or file"
                )));
            } else if !(200..300).contains(&status) {
                return Err(err(format!("{url}: HTTP {status}")));
            }
            let commit = header("x-repo-commit").ok_or_else(|| {
                err(format!(
                    "{url}: the server sent no X-Repo-Commit header; is {} a Hugging Face hub \
                     endpoint (HF_ENDPOINT)?",
                    self.endpoint
                ))
            })?;
            let etag = header("x-linked-etag")
                .or_else(|| header("etag"))
                .ok_or_else(|| err(format!("{url}: the server sent no ETag header")))?;
            let etag = etag.trim_start_matches("W/").replace('"', "");
            // Both become folder and file names in the cache: only plain hashes are accepted.
            if !is_hex(&commit, &[40]) {
                return Err(refused(format!(
                    "the server at {} answered the commit {commit:?}, which is not a 40-digit \
                     hex hash; refusing to use it as a cache path (is HF_ENDPOINT a trustworthy \
                     hub mirror?)",
                    self.endpoint
                )));
            }
            if !is_hex(&etag, &[40, 64]) {
                return Err(refused(format!(
                    "the server at {} answered the ETag {etag:?}, which is not a plain hash; \
                     refusing to use it as a cache path (is HF_ENDPOINT a trustworthy hub \
                     mirror?)",
                    self.endpoint
                )));
            }
            let location = match location {
                Some(loc) if (300..400).contains(&status) => {
                    if loc.starts_with('/') {
                        format!("{}{loc}", self.endpoint)
                    } else {
                        loc
                    }
                }
                _ => url.clone(),
            };
            return Ok(Metadata {
                commit: commit.to_ascii_lowercase(),
                etag: etag.to_ascii_lowercase(),
                location,
            });
        }
        Err(err(format!("{url}: too many redirects")))
    }

    fn download(&self, repo: &str, revision: &str, file: &str) -> Result<PathBuf, CoreError> {
        let err = |m: String| hub_err(repo, revision, file, m);
        let meta = self.metadata(repo, revision, file)?;
        let dir = repo_dir(&self.cache, repo);
        let blobs = dir.join("blobs");
        let blob = blobs.join(&meta.etag);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CoreError::Write { path, source }
        };
        if !blob.is_file() {
            std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
            crate::io::remove_stale_temps(&blobs, 0);
            eprintln!(
                "downloading {file} from {} ({repo}@{revision})",
                self.endpoint
            );
            let mut tmp = crate::io::temp_file_in(&blobs).map_err(io(&blobs))?;
            self.fetch(&meta, tmp.as_file_mut())
                .map_err(|m| err(format!("{}: {m}", meta.location)))?;
            tmp.as_file().sync_all().map_err(io(&blob))?;
            if meta.etag.len() == 64 {
                // An LFS file's ETag is its SHA-256: check the bytes are what the hub promised.
                let got = sha256_file(tmp.path()).map_err(io(tmp.path()))?;
                if got != meta.etag {
                    return Err(err(format!(
                        "the downloaded bytes have SHA-256 {got}, not the {} the server \
                         announced; the download was corrupted, try again",
                        meta.etag
                    )));
                }
            }
            tmp.persist(&blob).map_err(|e| CoreError::Write {
                path: blob.clone(),
                source: e.error,
            })?;
        }
        let snapshot = dir.join("snapshots").join(&meta.commit);
        let pointer = snapshot.join(file);
        if let Some(parent) = pointer.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        if !pointer.is_file() {
            let _ = std::fs::remove_file(&pointer);
            link_or_copy(&blob, &pointer, file).map_err(io(&pointer))?;
        }
        if revision != meta.commit {
            crate::io::write_atomic(&dir.join("refs").join(revision), meta.commit.as_bytes())?;
        }
        Ok(pointer)
    }

    fn fetch(&self, meta: &Metadata, out: &mut std::fs::File) -> Result<(), String> {
        let mut url = meta.location.clone();
        for _ in 0..10 {
            let mut req = self.agent.get(&url);
            // The token goes to the hub only, never to a CDN on another host.
            if let Some(t) = &self.token
                && url.starts_with(&self.endpoint)
            {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            let mut resp = req.call().map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            if (300..400).contains(&status) {
                let loc = resp
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| format!("HTTP {status} without a Location"))?;
                url = if loc.starts_with('/') {
                    let origin_end = url
                        .find("://")
                        .and_then(|i| url[i + 3..].find('/').map(|j| i + 3 + j))
                        .unwrap_or(url.len());
                    format!("{}{loc}", &url[..origin_end])
                } else {
                    loc.to_string()
                };
                continue;
            }
            if !(200..300).contains(&status) {
                return Err(format!("HTTP {status}"));
            }
            let expected = resp
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
            let n = copy(&mut reader, out).map_err(|e| e.to_string())?;
            if let Some(e) = expected
                && e != n
            {
                return Err(format!(
                    "the download ended after {n} of {e} bytes; try again"
                ));
            }
            return Ok(());
        }
        Err("too many redirects".into())
    }
}

fn copy(r: &mut impl Read, w: &mut impl Write) -> std::io::Result<u64> {
    std::io::copy(r, w)
}

fn sha256_file(p: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `snapshots/COMMIT/FILE` -> `../../blobs/ETAG` (one more `../` per folder in FILE), as the
/// hub cache links them; a copy where symlinks are not available.
fn link_or_copy(blob: &Path, pointer: &Path, file: &str) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let depth = file.matches('/').count();
        let mut rel = PathBuf::new();
        for _ in 0..depth + 2 {
            rel.push("..");
        }
        rel.push("blobs");
        rel.push(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(rel, pointer)
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        std::fs::copy(blob, pointer).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_become_paths_are_checked() {
        for ok in [
            "org/name",
            "name",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "a.b/c_d",
        ] {
            validate_repo_id(ok).unwrap();
        }
        for no in [
            "", "../x", "a/../b", "a/b/c", "/a", "a/", "a--b/c", "a/.", "a b", "a\\b",
        ] {
            let e = validate_repo_id(no).unwrap_err().to_string();
            assert!(e.contains("--model"), "{no}: {e}");
        }
        for ok in [
            "main",
            "v1.0",
            "refs/pr/1",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            validate_revision(ok).unwrap();
        }
        for no in [
            "", "../../x", "a/../b", "/etc", "main/", "a//b", ".", "x\0y", "a b",
        ] {
            let e = validate_revision(no).unwrap_err().to_string();
            assert!(e.contains("--revision"), "{no}: {e}");
        }
    }

    #[test]
    fn a_tampered_ref_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo_dir(dir.path(), "org/tiny");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/config.json"), "{}").unwrap();
        std::fs::write(repo.join("refs/main"), "../../../outside").unwrap();
        assert_eq!(cached(dir.path(), "org/tiny", "main", "config.json"), None);
    }
}
