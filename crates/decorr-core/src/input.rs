//! Input files: every file a user hands decorr (prompt lists, JSON such as `--pairs`, model
//! configs, tokenizer files, images, weights) is read through here. Only regular files are read
//! (a symbolic link to one is fine): a FIFO would block the run forever and a device such as
//! `/dev/zero` would fill the memory, so both are refused by name before anything is read. Text
//! and images are capped too ([`TEXT_CAP`], [`IMAGE_CAP`]); weights are not (they are large by
//! nature, and their loaders check each tensor against the bytes there).

use std::io::Read;
use std::path::Path;

use crate::CoreError;

/// The most a text input (prompt file, JSON, config, tokenizer file) may hold. Generous: the
/// largest text decorr reads, a CLIP `tokenizer.json`, is about 3.5 MiB.
pub const TEXT_CAP: u64 = 16 << 20;

/// The most an image file may hold: a 512x512 PNG is well under 1 MiB, an 8K one under 200 MiB.
pub const IMAGE_CAP: u64 = 256 << 20;

/// What a file system entry is, in words, when it is not a regular file.
pub(crate) fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

fn not_regular(path: &Path, meta: &std::fs::Metadata, what: &str) -> CoreError {
    CoreError::NotRegularFile {
        path: path.to_path_buf(),
        kind: kind_of(meta),
        what: what.to_string(),
    }
}

/// A missing path's error, saying when it is a symbolic link whose target is gone.
fn unreadable(path: &Path, source: std::io::Error) -> CoreError {
    let dangling = source.kind() == std::io::ErrorKind::NotFound
        && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if dangling {
        let target = std::fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        return CoreError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("it is a symbolic link to {target}, which does not exist"),
            ),
        };
    }
    CoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Refuses `path` unless it is a regular file, or a symbolic link to one; `what` names the
/// input in the error ("a prompt file", "the --pairs file"). Nothing is opened, so a FIFO
/// cannot block here. For a caller that hands the path to a library that opens it itself.
pub fn check_regular(path: &Path, what: &str) -> Result<(), CoreError> {
    let meta = std::fs::metadata(path).map_err(|e| unreadable(path, e))?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(not_regular(path, &meta, what))
    }
}

/// Whether `path` is there at all (a regular file, a folder, a FIFO, a dangling link...):
/// distinguishes "absent" from "present but not readable as a file" for finders.
pub fn exists_at_all(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Opens `path` for reading, refusing anything but a regular file. The open does not block on
/// a FIFO (`O_NONBLOCK`), and the opened file itself is checked, so a file swapped for a FIFO
/// after a check cannot hang the run either.
pub fn open(path: &Path, what: &str) -> Result<std::fs::File, CoreError> {
    check_regular(path, what)?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path).map_err(|e| unreadable(path, e))?;
    let meta = file.metadata().map_err(|e| unreadable(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta, what));
    }
    Ok(file)
}

/// The bytes of `path`, a regular file (see [`open`]). With `cap`, a file holding more is
/// refused without reading it all (`cap_note` ends the message: why such a file cannot be
/// `what`). `None` is for weights only.
pub fn read_bytes(path: &Path, what: &str, cap: Option<(u64, &str)>) -> Result<Vec<u8>, CoreError> {
    let file = open(path, what)?;
    let io = |e| unreadable(path, e);
    let len = file.metadata().map_err(io)?.len();
    let Some((cap, note)) = cap else {
        let mut bytes = Vec::with_capacity(len as usize);
        (&file).read_to_end(&mut bytes).map_err(io)?;
        return Ok(bytes);
    };
    let too_large = || {
        CoreError::TooLarge(format!(
            "{} holds more than {}; {what} {note}: check the path",
            path.display(),
            mib(cap)
        ))
    };
    if len > cap {
        return Err(too_large());
    }
    // The length may grow while reading (a log being written): the cap holds regardless.
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(cap + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(bytes)
}

/// `n` bytes as "16 MiB".
fn mib(n: u64) -> String {
    format!("{} MiB", n >> 20)
}

/// The text of `path`, a regular file of at most [`TEXT_CAP`] bytes of UTF-8, without a leading
/// byte-order mark (editors on Windows add one; JSON parsers refuse it). `what` names the input
/// in errors ("a prompt file", "the --pairs file").
pub fn read_text(path: &Path, what: &str) -> Result<String, CoreError> {
    let bytes = read_bytes(path, what, Some((TEXT_CAP, "is text, never that large")))?;
    text_of(path, bytes, what)
}

/// `bytes` read from `path` as UTF-8 text without a leading byte-order mark.
pub fn text_of(path: &Path, bytes: Vec<u8>, what: &str) -> Result<String, CoreError> {
    let mut text = String::from_utf8(bytes).map_err(|e| CoreError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text ({e}); {what} is text: check the path, or save the file as UTF-8"
            ),
        ),
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// The bytes of an image file at `path` (at most [`IMAGE_CAP`]), for the caller to decode.
pub fn read_image_bytes(path: &Path, what: &str) -> Result<Vec<u8>, CoreError> {
    read_bytes(
        path,
        what,
        Some((IMAGE_CAP, "is an image file, never that large")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_and_links_to_them_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("prompts.txt");
        std::fs::write(&p, "\u{feff}a cat\n").unwrap();
        assert_eq!(read_text(&p, "a prompt file").unwrap(), "a cat\n");
        #[cfg(unix)]
        {
            let link = dir.path().join("link.txt");
            std::os::unix::fs::symlink(&p, &link).unwrap();
            assert_eq!(read_text(&link, "a prompt file").unwrap(), "a cat\n");
            let dangling = dir.path().join("dangling.txt");
            std::os::unix::fs::symlink(dir.path().join("gone"), &dangling).unwrap();
            let e = read_text(&dangling, "a prompt file")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("dangling.txt") && e.contains("symbolic link") && e.contains("gone"),
                "{e}"
            );
        }
    }

    #[test]
    fn folders_and_special_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_text(dir.path(), "a prompt file")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is a folder, not a regular file") && e.contains("a prompt file"),
            "{e}"
        );
        #[cfg(unix)]
        {
            // A FIFO: refused at once (reading it would block until a writer came).
            let fifo = dir.path().join("f.png");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let e = read_image_bytes(&fifo, "an image").unwrap_err().to_string();
            assert!(e.contains("f.png") && e.contains("is a FIFO"), "{e}");
            let e = check_regular(&fifo, "an image").unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
            // A link to /dev/zero: a character device, not an endless read.
            let zero = dir.path().join("config.json");
            std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
            let e = read_text(&zero, "a model config").unwrap_err().to_string();
            assert!(
                e.contains("config.json") && e.contains("is a character device"),
                "{e}"
            );
            assert!(exists_at_all(&zero) && !exists_at_all(&dir.path().join("x")));
        }
    }

    #[test]
    fn text_beyond_the_cap_is_refused_weights_are_not_capped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.txt");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(TEXT_CAP + 1).unwrap();
        let e = read_text(&p, "a prompt file").unwrap_err().to_string();
        assert!(
            e.contains("big.txt")
                && e.contains("holds more than 16 MiB")
                && e.contains("a prompt file is text"),
            "{e}"
        );
        // Exactly at the cap is fine.
        f.set_len(TEXT_CAP).unwrap();
        assert_eq!(
            read_bytes(&p, "x", Some((TEXT_CAP, "n"))).unwrap().len() as u64,
            TEXT_CAP
        );
        f.set_len(TEXT_CAP + 5).unwrap();
        assert_eq!(
            read_bytes(&p, "a weights file", None).unwrap().len() as u64,
            TEXT_CAP + 5
        );
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        let e = read_text(&p, "a prompt file").unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
    }
}
