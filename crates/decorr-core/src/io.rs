//! Output files: a file appears whole or not at all (temp file in the same folder, then rename),
//! so an interrupted run never leaves a partial output behind; a path that is a symbolic link is
//! followed to its target and a FIFO or character device is written as a stream, as a shell
//! redirect would, never replaced. Temp files are named `.decorr-tmp-PID-MAKER-*`, where MAKER
//! fingerprints the host, boot and PID namespace, so those of a killed run can be recognised and
//! removed without touching a live run's elsewhere ([`remove_stale_temps`]); output folders are
//! held by one run at a time ([`OutputLock`]); outputs get the permissions the umask allows.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::CoreError;

/// Write `bytes` to `path` atomically, creating missing parent folders. A symbolic link is
/// followed to its target (which is replaced atomically); a FIFO or character device (a pipe,
/// `/dev/null`, a terminal) receives the bytes as a stream; a folder, block device or socket is
/// refused.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CoreError> {
    let path = &resolve_links(path);
    let io = |source| CoreError::Write {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(m) => match special_kind(&m) {
            Special::Stream => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io)?;
                return f.write_all(bytes).and_then(|_| f.flush()).map_err(io);
            }
            Special::Refused(kind) => {
                return Err(CoreError::NotRegularOutput {
                    path: path.to_path_buf(),
                    kind,
                });
            }
        },
        Err(_) => {}
    }
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = temp_file_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    make_readable(path)
}

/// `path` with links followed (see [`resolve_links`]), checked to be a regular file or nothing
/// yet: for outputs written by other means than [`write_atomic`] (streamed to a temp file, then
/// renamed), which a FIFO or device cannot take.
pub fn output_file(path: &Path) -> Result<PathBuf, CoreError> {
    let path = resolve_links(path);
    match std::fs::metadata(&path) {
        Ok(m) if !m.is_file() => Err(CoreError::NotRegularOutput {
            kind: crate::input::kind_of(&m),
            path,
        }),
        _ => Ok(path),
    }
}

/// What a non-regular file at an output path is to a writer.
enum Special {
    /// Written as a stream (FIFO, character device).
    Stream,
    /// Not written (folder, block device, socket), with what it is.
    Refused(&'static str),
}

/// FIFOs and character devices are streams (as a shell redirect writes them); anything else
/// that is not a regular file is refused, named as the input checks name it.
fn special_kind(m: &std::fs::Metadata) -> Special {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = m.file_type();
        if t.is_fifo() || t.is_char_device() {
            return Special::Stream;
        }
    }
    Special::Refused(crate::input::kind_of(m))
}

/// `path` with symbolic links followed: its target, where the link points to something that
/// exists or to a missing file in an existing folder (a dangling link is written through, as a
/// shell redirect does); `path` itself otherwise. Outputs and output folders go through this,
/// so that writing never replaces a link by a file or folder of its own.
pub fn resolve_links(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            return p;
        };
        if !m.file_type().is_symlink() {
            return p;
        }
        if let Ok(real) = std::fs::canonicalize(&p) {
            return real;
        }
        let Ok(target) = std::fs::read_link(&p) else {
            return p;
        };
        p = parent_dir(&p).join(target);
    }
    p
}

/// `text` without a leading UTF-8 byte-order mark: some Windows editors write one, and it is
/// not JSON. Every reader of a text file the user may have edited goes through this.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

const TEMP_PREFIX: &str = ".decorr-tmp-";

/// This process's temp name prefix: `.decorr-tmp-PID-MAKER-`.
fn temp_prefix() -> String {
    temp_prefix_of(std::process::id())
}

/// The temp name prefix of decorr process `pid` on this host, boot and PID namespace (tests
/// make a killed run's leftovers with it).
pub fn temp_prefix_of(pid: u32) -> String {
    format!("{TEMP_PREFIX}{pid}-{}-", maker())
}

/// A temp file in `dir` named after this process (`.decorr-tmp-PID-MAKER-XXXXXX`), removed on
/// drop.
pub fn temp_file_in(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&temp_prefix())
        .tempfile_in(dir)
}

/// A temp folder beside `path` (`.decorr-tmp-PID-MAKER-XXXXXX` in its parent), for building an
/// output that replaces `path` only once it is complete.
pub fn temp_dir_beside(path: &Path) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&temp_prefix())
        .tempdir_in(parent_dir(path))
}

/// The folder `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Who may judge whether a PID in a temp name is alive: a fingerprint (16 hex digits) of the
/// host name, the boot and the PID namespace, or `unknown` where they cannot be read (then no
/// temp is ever taken for dead). A run in another container, on another machine sharing the
/// folder, or before a reboot has another fingerprint, so its PIDs are never looked up here.
fn maker() -> &'static str {
    static MAKER: OnceLock<String> = OnceLock::new();
    MAKER.get_or_init(|| {
        #[cfg(target_os = "linux")]
        {
            let read = |p: &str| std::fs::read_to_string(p).ok();
            let ns = std::fs::read_link("/proc/self/ns/pid").ok();
            if let (Some(host), Some(boot), Some(ns)) = (
                read("/proc/sys/kernel/hostname"),
                read("/proc/sys/kernel/random/boot_id"),
                ns,
            ) {
                // FNV-1a: stable across builds and Rust versions, unlike std's hasher.
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for b in host
                    .trim()
                    .bytes()
                    .chain([0])
                    .chain(boot.trim().bytes())
                    .chain([0])
                    .chain(ns.to_string_lossy().bytes())
                {
                    h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
                }
                return format!("{h:016x}");
            }
        }
        "unknown".to_string()
    })
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

/// The PID and maker fingerprint in the name of one of decorr's temp files
/// (`.decorr-tmp-PID-MAKER-*`; older decorr wrote `.decorr-tmp-PID-*`, whose second field is
/// then taken as the maker and never matches).
fn temp_owner(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix(TEMP_PREFIX)?;
    let mut fields = rest.splitn(3, '-');
    let pid = fields.next()?.parse().ok()?;
    Some((pid, fields.next().unwrap_or("")))
}

/// Removes the temp files and folders that decorr runs left in `dir` and its subfolders up to
/// `depth` levels down when killed mid-write, where decorr can know that it made them and that
/// their maker is gone: the name carries this host's, boot's and PID namespace's fingerprint
/// and a PID that is not a live process. Temps of other makers (a run in another container or
/// on another machine sharing the folder, which may still be writing) are left, with a warning
/// naming them; so are files merely named like ours. Returns how many were removed. Errors are
/// ignored.
pub fn remove_stale_temps(dir: &Path, depth: usize) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let Ok(kind) = e.file_type() else { continue };
        let name = e.file_name();
        let Some((pid, who)) = name.to_str().and_then(temp_owner) else {
            if kind.is_dir() && depth > 0 {
                removed += remove_stale_temps(&e.path(), depth - 1);
            }
            continue;
        };
        let p = e.path();
        if who != maker() || maker() == "unknown" {
            log::warn!(
                "left {}: a decorr temp file of a run in another container, on another machine \
                 or before a reboot (or not decorr's), which may still be writing it; remove it \
                 once no decorr run uses this folder",
                p.display()
            );
            continue;
        }
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
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

/// Whether `name` is burn's scratch file of an interrupted safetensors save
/// (`NAME.PID-N.tmp`), which it leaves beside the file it was writing.
pub fn is_burn_scratch(name: &str) -> bool {
    (|| {
        let stem = name.strip_suffix(".tmp")?;
        let (_, tail) = stem.rsplit_once('.')?;
        let (pid, n) = tail.split_once('-')?;
        pid.parse::<u32>().ok()?;
        n.parse::<u64>().ok()
    })()
    .is_some()
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

/// Give an output file or folder the permissions a plain `create` would under the process's
/// umask (0644 and 0755 under the usual 022, 0600 and 0700 under 077): temp files and
/// folders, ours and burn's atomic saves alike, are created private.
pub fn make_readable(path: &Path) -> Result<(), CoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let err = |source| CoreError::Write {
            path: path.to_path_buf(),
            source,
        };
        let full = if std::fs::metadata(path).map_err(err)?.is_dir() {
            0o777
        } else {
            0o666
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(full & !umask()))
            .map_err(err)?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The process's umask, read once: from `/proc/self/status` where Linux reports it, else by
/// setting and restoring it (before any output is written, so no file is created meanwhile).
#[cfg(unix)]
fn umask() -> u32 {
    static UMASK: OnceLock<u32> = OnceLock::new();
    *UMASK.get_or_init(|| {
        let proc = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            });
        proc.unwrap_or_else(|| {
            // SAFETY: umask only swaps the process's mask; the old one is put back at once.
            unsafe {
                let old = libc::umask(0o022);
                libc::umask(old);
                old as u32
            }
        })
    })
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
            assert_eq!(mode & 0o777, 0o666 & !umask());
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
    }

    #[test]
    fn stale_temps_of_dead_runs_are_removed_live_ones_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let me = maker();
        // A PID that cannot be alive (above Linux's pid_max) and our own.
        let dead = dir.path().join(format!(".decorr-tmp-4294967-{me}-abc123"));
        let dead_dir = dir.path().join(format!("sub/.decorr-tmp-4294967-{me}-dir"));
        let mine = dir
            .path()
            .join(format!(".decorr-tmp-{}-{me}-x", std::process::id()));
        // Not provably ours or not provably dead: another container's or machine's run (its
        // PID means nothing here), an older decorr's name, a user's files named alike, burn's
        // scratch file.
        let kept = [
            ".decorr-tmp-4294967-0123456789abcdef-x".to_string(),
            ".decorr-tmp-4294967-abc123".to_string(),
            ".decorr-tmp-4000000-mine".to_string(),
            ".tmpabc".to_string(),
            "backup.4294967-1.tmp".to_string(),
            "sub/model.safetensors.4294967-0.tmp".to_string(),
        ];
        std::fs::create_dir_all(dead_dir.join("sub")).unwrap();
        std::fs::write(&dead, "partial").unwrap();
        std::fs::write(&mine, "writing").unwrap();
        for k in &kept {
            std::fs::write(dir.path().join(k), "not provably ours").unwrap();
        }
        if me == "unknown" {
            // No fingerprint (not Linux): nothing is ever taken for dead.
            assert_eq!(remove_stale_temps(dir.path(), 1), 0);
            return;
        }
        assert_eq!(remove_stale_temps(dir.path(), 0), 1);
        assert!(!dead.exists() && dead_dir.exists());
        assert_eq!(remove_stale_temps(dir.path(), 1), 1);
        assert!(!dead_dir.exists() && mine.exists());
        for k in &kept {
            assert!(dir.path().join(k).exists(), "{k} was removed");
        }
        for scratch in [
            ".decorr.lock",
            ".decorr.lock.shard-0-of-2",
            ".decorr-tmp-12-ab",
        ] {
            assert!(is_scratch(scratch), "{scratch}");
        }
        for result in [
            "report.json",
            ".tmpabc",
            "notes.tmp",
            "seed-000001.png",
            "m.12-0.tmp",
        ] {
            assert!(!is_scratch(result), "{result}");
        }
        assert!(is_burn_scratch("model.safetensors.12-0.tmp"));
        assert!(!is_burn_scratch("notes.tmp"));
    }

    /// A temp file made in another PID namespace (a container sharing the folder) carries
    /// another fingerprint, so the live run's PID is never looked up here. Needs `unshare`
    /// and the right to make namespaces (root); skipped, and said so, without them.
    #[cfg(target_os = "linux")]
    #[test]
    fn another_namespace_has_another_fingerprint() {
        let o = std::process::Command::new("unshare")
            .args(["-p", "-f", "--mount-proc", "readlink", "/proc/self/ns/pid"])
            .output();
        match o {
            Ok(o) if o.status.success() => {
                let theirs = String::from_utf8_lossy(&o.stdout).trim().to_string();
                let ours = std::fs::read_link("/proc/self/ns/pid").unwrap();
                assert_ne!(theirs, ours.to_string_lossy(), "same PID namespace");
            }
            _ => eprintln!("skipped: unshare -p is not permitted here"),
        }
    }

    #[test]
    fn links_are_followed_and_streams_written_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.json");
        std::fs::write(&target, "old").unwrap();
        #[cfg(unix)]
        {
            let link = dir.path().join("link.json");
            std::os::unix::fs::symlink("target.json", &link).unwrap();
            write_atomic(&link, b"new").unwrap();
            assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
            assert_eq!(std::fs::read(&target).unwrap(), b"new");
            // A dangling link is written through to the file it names.
            let dangling = dir.path().join("dangling.json");
            std::os::unix::fs::symlink("made.json", &dangling).unwrap();
            write_atomic(&dangling, b"made").unwrap();
            assert_eq!(
                std::fs::read(dir.path().join("made.json")).unwrap(),
                b"made"
            );
            assert!(std::fs::symlink_metadata(&dangling).unwrap().is_symlink());
            // A character device is a stream: /dev/null takes it and stays a device.
            write_atomic(Path::new("/dev/null"), b"x").unwrap();
            use std::os::unix::fs::FileTypeExt;
            assert!(
                std::fs::metadata("/dev/null")
                    .unwrap()
                    .file_type()
                    .is_char_device()
            );
            // A FIFO gets the bytes through a reader; it stays a FIFO.
            let fifo = dir.path().join("fifo");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let reader = {
                let fifo = fifo.clone();
                std::thread::spawn(move || std::fs::read(fifo).unwrap())
            };
            write_atomic(&fifo, b"streamed").unwrap();
            assert_eq!(reader.join().unwrap(), b"streamed");
            assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        }
        let err = write_atomic(dir.path(), b"x").unwrap_err().to_string();
        assert!(
            err.contains("a folder") && err.contains("Choose a file path"),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn outputs_follow_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        write_atomic(&p, b"{}").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask());
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
