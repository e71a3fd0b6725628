//! Where a model's files come from: a local diffusers folder, or a Hugging Face hub repo read
//! through `hf-hub`'s standard cache (`HF_HOME`, `HF_HUB_OFFLINE`, `HF_TOKEN`, `HF_ENDPOINT`).

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::CoreError;

/// The hub repo used when the user names no weights.
pub const DEFAULT_MODEL: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";

/// A Stable Diffusion checkpoint in diffusers layout (`text_encoder/`, `tokenizer/`, `unet/`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder on disk: a pipeline root, or one component folder (with its `config.json`).
    Local(PathBuf),
    /// A hub repo id with a revision (branch, tag or commit).
    Hub { repo: String, revision: String },
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
        }
    }

    /// The first of `candidates` (paths relative to `component/`) that exists, downloading it
    /// from the hub if needed. A local folder that *is* the component folder is accepted too.
    pub fn find(&self, component: &str, candidates: &[&str]) -> Result<PathBuf, CoreError> {
        match self {
            ModelSource::Local(root) => find_local(root, component, candidates),
            ModelSource::Hub { repo, revision } => find_hub(repo, revision, component, candidates),
        }
    }

    /// Like [`find`](Self::find) but `None` when no candidate exists (optional files such as a
    /// checkpoint's own tokenizer).
    pub fn find_optional(&self, component: &str, candidates: &[&str]) -> Option<PathBuf> {
        self.find(component, candidates).ok()
    }
}

fn find_local(root: &Path, component: &str, candidates: &[&str]) -> Result<PathBuf, CoreError> {
    if !root.exists() {
        return Err(CoreError::NotFound(format!(
            "weights folder {} does not exist; pass a diffusers-layout folder (with {component}/) \
             to --weights, or a hub repo id to --model",
            root.display()
        )));
    }
    let dirs = [root.join(component), root.to_path_buf()];
    let mut looked = Vec::new();
    for dir in &dirs {
        for c in candidates {
            let p = dir.join(c);
            if p.is_file() {
                return Ok(p);
            }
            looked.push(p.display().to_string());
        }
    }
    Err(CoreError::NotFound(format!(
        "no {component} file found; looked for:\n  {}\nPoint --weights at a diffusers folder \
         (e.g. a local copy of {DEFAULT_MODEL}) or convert a single-file checkpoint with \
         `cargo xtask convert-weights`",
        looked.join("\n  ")
    )))
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "False"))
        .unwrap_or(false)
}

fn find_hub(
    repo: &str,
    revision: &str,
    component: &str,
    candidates: &[&str],
) -> Result<PathBuf, CoreError> {
    let cache = Cache::from_env();
    let hub_repo = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
    let cached = cache.repo(hub_repo.clone());
    // An empty component names files at the repo's root (a scoring model's repo, say).
    let in_repo = |c: &str| {
        if component.is_empty() {
            c.to_string()
        } else {
            format!("{component}/{c}")
        }
    };
    for c in candidates {
        if let Some(p) = cached.get(&in_repo(c)) {
            return Ok(p);
        }
    }
    let how = format!(
        "download it once with `huggingface-cli download {repo} --include '{component}/*'` \
         (or `git clone https://huggingface.co/{repo}`) and pass the folder to --weights"
    );
    if hub_offline() {
        return Err(CoreError::NotFound(format!(
            "HF_HUB_OFFLINE is set and {repo}@{revision} has no {component}/{{{}}} in the hub \
             cache at {}; {how}",
            candidates.join(","),
            cache.path().display()
        )));
    }
    let token = std::env::var("HF_TOKEN").ok().or_else(|| cache.token());
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_token(token)
        .build()
        .map_err(|e| CoreError::Hub {
            repo: repo.into(),
            file: component.into(),
            message: e.to_string(),
        })?;
    let api_repo = api.repo(hub_repo);
    let mut last = String::new();
    for c in candidates {
        let file = in_repo(c);
        match api_repo.get(&file) {
            Ok(p) => return Ok(p),
            Err(e) => last = format!("{file}: {e}"),
        }
    }
    Err(CoreError::Hub {
        repo: format!("{repo}@{revision}"),
        file: format!("{component}/{{{}}}", candidates.join(",")),
        message: format!("{last}; if this machine has no network, {how}"),
    })
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

    /// The offline path reads hf-hub's cache layout: refs/<rev> holds a commit, snapshots/<commit>/ the files.
    #[test]
    fn hub_cache_offline() {
        let dir = tempfile::tempdir().unwrap();
        let repo_dir = dir.path().join("hub/models--org--tiny");
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::write(repo_dir.join("refs/main"), "abc123").unwrap();
        let snap = repo_dir.join("snapshots/abc123/text_encoder");
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
        let err = src.find("unet", &["config.json"]).unwrap_err().to_string();
        assert!(
            err.contains("HF_HUB_OFFLINE") && err.contains("huggingface-cli download"),
            "{err}"
        );
    }
}
