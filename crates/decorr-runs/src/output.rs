//! Output folders: who may write one (locks, per shard for array jobs), and whether an existing
//! one holds results or only decorr's scratch files (locks, temp files).

use std::path::Path;

use crate::bail;
use crate::error::{Context, Result};
use decorr_core::io::{LOCK_FILE, OutputLock, is_scratch};

/// The names in `out` other than decorr's scratch files, or `None` when `out` does not exist.
/// A file where the folder should be is refused.
pub fn contents(out: &Path) -> Result<Option<Vec<String>>> {
    if !out.exists() {
        return Ok(None);
    }
    if !out.is_dir() {
        bail!(
            "--out {} is a file, not a folder; choose another --out",
            out.display()
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(out)
        .with_context(|| format!("reading {}", out.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !is_scratch(n))
        .collect();
    names.sort();
    Ok(Some(names))
}

/// Removes `out` if it holds nothing but scratch files: what a run that failed before writing
/// anything leaves in a folder it created, so that the next run does not find a stray folder.
pub fn remove_if_empty(out: &Path) {
    if let Ok(Some(names)) = contents(out)
        && names.is_empty()
    {
        let _ = std::fs::remove_dir_all(out);
    }
}

/// The output locks of a run that writes `out` (`generate`, `eval run`): the folder's own lock, a shard's lock (never held by
/// another shard), or for `--merge` the folder's and every shard's that exists.
pub fn lock_output(
    out: &Path,
    shard: Option<crate::shard::Shard>,
    merge: bool,
) -> Result<Vec<OutputLock>> {
    if let Some(s) = shard {
        return Ok(vec![OutputLock::acquire_named(
            out,
            &format!("{}.{}", LOCK_FILE, s.tag()),
        )?]);
    }
    if merge && !out.is_dir() {
        bail!("{} does not exist; run the shards first", out.display());
    }
    let mut locks = vec![OutputLock::acquire(out)?];
    if merge {
        let prefix = format!("{}.", LOCK_FILE);
        for e in std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                let lock = OutputLock::acquire_named(out, &name).with_context(|| {
                    format!("a shard ({name}) is still running; merge once every shard is done")
                })?;
                locks.push(lock);
            }
        }
    }
    Ok(locks)
}
