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

/// Checks that `out` is new, or a `command` output whose settings file `out/file` (the settings
/// that decide its results) equals `wanted`; nothing is written. Returns whether `out` already
/// holds a run. A folder with files but no settings file is not that command's output; other
/// settings are refused, naming each difference (`steps: 2 there, 3 now`).
pub fn check_settings(
    out: &Path,
    file: &str,
    wanted: &serde_json::Value,
    command: &str,
) -> Result<bool> {
    let Some(names) = contents(out)? else {
        return Ok(false);
    };
    let path = out.join(file);
    if !path.exists() {
        return match names.first() {
            None => Ok(false),
            Some(name) => bail!(
                "{} holds {name} but no {file}, so it is not a decorr {command} output (or one \
                 made by an older decorr); choose another --out",
                out.display()
            ),
        };
    }
    let text = decorr_core::input::read_text(&path, "a settings file")?;
    let had: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a decorr {command} settings file", path.display()))?;
    if &had != wanted {
        let differs: Vec<String> = wanted
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| had.get(k.as_str()) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k}: {} there, {v} now",
                    had.get(k.as_str()).unwrap_or(&serde_json::Value::Null)
                )
            })
            .collect();
        bail!(
            "{} holds a decorr {command} run made with other settings ({}); nothing was changed. \
             Re-run with the same settings to continue it, or choose another --out",
            out.display(),
            differs.join("; ")
        );
    }
    Ok(true)
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

/// Runs `run`, which writes the folder `out`; when it fails and `out` did not exist before, the
/// folder goes again if the run left nothing in it ([`remove_if_empty`]).
pub fn removed_if_failed_fresh<T, E>(
    out: &Path,
    run: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    let fresh = !out.exists();
    let result = run();
    if result.is_err() && fresh {
        remove_if_empty(out);
    }
    result
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
