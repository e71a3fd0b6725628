//! Atomic file writes: a file appears whole or not at all (temp file in the same folder, then
//! rename), so an interrupted run never leaves a partial output behind. Temp files are named
//! `.decorr-tmp-PID-*`, so those of a killed run can be recognised and removed
//! ([`remove_stale_temps`]); output folders are held by one run at a time ([`OutputLock`]).

use std::io::Write;
use std::path::Path;

use crate::CoreError;

/// Write `bytes` to `path` atomically, creating missing parent folders.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CoreError> {
    let io = |source| CoreError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = temp_file_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    make_readable(path)
}

/// `text` without a leading UTF-8 byte-order mark: some Windows editors write one, and it is
/// not JSON. Every reader of a text file the user may have edited goes through this.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

const TEMP_PREFIX: &str = ".decorr-tmp-";

/// A temp file in `dir` named after this process (`.decorr-tmp-PID-XXXXXX`), removed on drop.
pub fn temp_file_in(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
        .tempfile_in(dir)
}

/// A temp folder beside `path` (`.decorr-tmp-PID-XXXXXX` in its parent), for building an output
/// that replaces `path` only once it is complete.
pub fn temp_dir_beside(path: &Path) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
        .tempdir_in(parent_dir(path))
}

/// The folder `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Whether process `pid` is alive (on Unix; elsewhere every process is taken as alive).
fn pid_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// The PID in the name of a temp file a decorr run leaves when killed mid-write: ours
/// (`.decorr-tmp-PID-*`) and burn's safetensors saves (`NAME.PID-N.tmp`).
fn temp_owner(name: &str) -> Option<u32> {
    if let Some(rest) = name.strip_prefix(TEMP_PREFIX) {
        return rest.split('-').next()?.parse().ok();
    }
    let stem = name.strip_suffix(".tmp")?;
    let (_, tail) = stem.rsplit_once('.')?;
    let (pid, n) = tail.split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Removes the temp files and folders that decorr runs which no longer exist left in `dir` and
/// its subfolders up to `depth` levels down (killed mid-write): temp names whose PID is not a
/// live process (see `temp_owner`). Returns how many were removed. Errors are ignored.
pub fn remove_stale_temps(dir: &Path, depth: usize) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let Ok(kind) = e.file_type() else { continue };
        let owner = e.file_name().to_str().and_then(temp_owner);
        let Some(pid) = owner else {
            if kind.is_dir() && depth > 0 {
                removed += remove_stale_temps(&e.path(), depth - 1);
            }
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        let p = e.path();
        let ok = if kind.is_dir() {
            std::fs::remove_dir_all(&p).is_ok()
        } else {
            std::fs::remove_file(&p).is_ok()
        };
        if ok {
            log::info!("removed {}, left by an interrupted run", p.display());
            removed += 1;
        }
    }
    removed
}

/// Whether `name` is one of decorr's own scratch files in an output folder: a lock file
/// (`.decorr.lock`, a shard's `.decorr.lock.shard-K-of-N`) or a temp file (see `temp_owner`).
/// What a folder holds besides these are its results.
pub fn is_scratch(name: &str) -> bool {
    name.starts_with(LOCK_FILE) || temp_owner(name).is_some()
}

/// The name of the lock file inside an output folder.
pub const LOCK_FILE: &str = ".decorr.lock";

/// An exclusive, advisory lock on an output folder (`DIR/.decorr.lock`, holding the owner's
/// PID), so that two runs cannot write one folder at once. Released when dropped, or when the
/// process ends however it ends (the OS drops the lock with the file descriptor).
#[derive(Debug)]
pub struct OutputLock {
    _file: std::fs::File,
}

impl OutputLock {
    /// Locks `dir` (created if missing), or says which PID holds it. Stale temp files of dead
    /// runs in `dir` are removed once the lock is held.
    pub fn acquire(dir: &Path) -> Result<OutputLock, CoreError> {
        Self::acquire_named(dir, LOCK_FILE)
    }

    /// Like [`acquire`](Self::acquire), with a lock file of another name: runs that may share a
    /// folder by design (the shards of an array job) each lock their own part of it.
    pub fn acquire_named(dir: &Path, name: &str) -> Result<OutputLock, CoreError> {
        use std::io::{Read, Seek};
        let werr = |source| CoreError::Write {
            path: dir.to_path_buf(),
            source,
        };
        if dir.exists() && !dir.is_dir() {
            return Err(CoreError::NotAFolder(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir).map_err(werr)?;
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| CoreError::Write {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(CoreError::Locked {
                    path: dir.to_path_buf(),
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.to_string()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(CoreError::Write { path, source });
            }
        }
        let wr = |source| CoreError::Write {
            path: path.clone(),
            source,
        };
        file.set_len(0).map_err(wr)?;
        file.rewind().map_err(wr)?;
        write!(file, "{}", std::process::id()).map_err(wr)?;
        file.flush().map_err(wr)?;
        remove_stale_temps(dir, 3);
        Ok(OutputLock { _file: file })
    }
}

/// Give an output file ordinary permissions (0644 on Unix): temp files, ours and burn's atomic
/// saves alike, are created private (0600).
pub fn make_readable(path: &Path) -> Result<(), CoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(
            |source| CoreError::Write {
                path: path.to_path_buf(),
                source,
            },
        )?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/out.json");
        write_atomic(&p, b"{}").unwrap();
        write_atomic(&p, b"[1]").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"[1]");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
    }

    #[test]
    fn stale_temps_of_dead_runs_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        // A PID that cannot be alive (above Linux's pid_max) and our own.
        let dead = dir.path().join(".decorr-tmp-4294967-abc123");
        let dead_dir = dir.path().join(".decorr-tmp-4294967-dir");
        let mine = dir
            .path()
            .join(format!(".decorr-tmp-{}-x", std::process::id()));
        let other = dir.path().join(".tmpabc");
        // burn's safetensors scratch file, one folder down.
        let burn_dead = dir
            .path()
            .join("text_encoder/model.safetensors.4294967-0.tmp");
        let burn_live = dir.path().join(format!(
            "text_encoder/model.safetensors.{}-1.tmp",
            std::process::id()
        ));
        let model = dir.path().join("text_encoder/model.safetensors");
        std::fs::write(&dead, "partial").unwrap();
        std::fs::create_dir_all(dead_dir.join("sub")).unwrap();
        std::fs::write(&mine, "writing").unwrap();
        std::fs::write(&other, "not ours").unwrap();
        for p in [&burn_dead, &burn_live, &model] {
            write_atomic(p, b"x").unwrap();
        }
        assert_eq!(remove_stale_temps(dir.path(), 0), 2);
        assert!(burn_dead.exists());
        assert_eq!(remove_stale_temps(dir.path(), 1), 1);
        assert!(!dead.exists() && !dead_dir.exists() && !burn_dead.exists());
        assert!(mine.exists() && other.exists() && burn_live.exists() && model.exists());
        for scratch in [
            ".decorr.lock",
            ".decorr.lock.shard-0-of-2",
            ".decorr-tmp-12-ab",
            "m.safetensors.12-0.tmp",
        ] {
            assert!(is_scratch(scratch), "{scratch}");
        }
        for result in ["report.json", ".tmpabc", "notes.tmp", "seed-000001.png"] {
            assert!(!is_scratch(result), "{result}");
        }
    }

    #[test]
    fn a_locked_folder_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let lock = OutputLock::acquire(&out).unwrap();
        let err = OutputLock::acquire(&out).unwrap_err().to_string();
        assert!(
            err.contains(&format!("PID {}", std::process::id())) && err.contains("in use"),
            "{err}"
        );
        drop(lock);
        OutputLock::acquire(&out).unwrap();
    }

    #[test]
    fn unwritable_target_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "x").unwrap();
        let err = write_atomic(&dir.path().join("file/out.png"), b"x").unwrap_err();
        assert!(err.to_string().contains("file/out.png"), "{err}");
        assert!(err.to_string().starts_with("cannot write"), "{err}");
    }
}
