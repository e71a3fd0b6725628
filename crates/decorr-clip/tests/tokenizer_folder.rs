//! Which vocabulary a checkpoint is tokenized with: its own `tokenizer/` when it has one (a
//! partial or unreadable one is an error naming the file), the embedded CLIP vocabulary only
//! where there is no `tokenizer/` at all.

use std::path::{Path, PathBuf};

use decorr_clip::{ClipTokenizer, load_tokenizer};
use decorr_core::ModelSource;

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/clip")
}

/// A checkpoint folder whose `tokenizer/` holds `files` (name, text).
fn checkpoint(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    for (name, text) in files {
        std::fs::write(tok.join(name), text).unwrap();
    }
    dir
}

/// The embedded vocabulary with `cat</w>` moved to a new id, as a checkpoint with its own
/// vocabulary (added or renumbered tokens) has it.
fn own_vocab() -> String {
    let text = std::fs::read_to_string(assets().join("vocab.json")).unwrap();
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    v.insert("cat</w>".into(), 49408.into());
    serde_json::Value::Object(v).to_string()
}

fn merges() -> String {
    std::fs::read_to_string(assets().join("merges.txt")).unwrap()
}

fn err(dir: &Path) -> String {
    match load_tokenizer(&ModelSource::Local(dir.to_path_buf())) {
        Ok(_) => panic!("loading the tokenizer of {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_complete_folder_is_used_not_the_embedded_vocabulary() {
    let dir = checkpoint(&[("vocab.json", own_vocab()), ("merges.txt", merges())]);
    let tok = load_tokenizer(&ModelSource::Local(dir.path().to_path_buf())).unwrap();
    assert_eq!(tok.encode("a cat").unwrap().ids[2], 49408);
    assert_eq!(
        ClipTokenizer::embedded().encode("a cat").unwrap().ids[2],
        2368
    );
    // The same through a tokenizer folder read directly.
    let tok = ClipTokenizer::from_dir(&dir.path().join("tokenizer")).unwrap();
    assert_eq!(tok.encode("a cat").unwrap().ids[2], 49408);
}

#[test]
fn no_tokenizer_folder_falls_back_to_the_embedded_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let tok = load_tokenizer(&ModelSource::Local(dir.path().to_path_buf())).unwrap();
    assert_eq!(tok.encode("a cat").unwrap().ids[2], 2368);
}

#[test]
fn a_partial_folder_is_an_error_naming_the_missing_file() {
    let dir = checkpoint(&[("merges.txt", merges())]);
    let e = err(dir.path());
    assert!(
        e.contains("holds merges.txt but no vocab.json") && e.contains("tokenizer"),
        "{e}"
    );
    let e = ClipTokenizer::from_dir(&dir.path().join("tokenizer"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no vocab.json"), "{e}");

    let dir = checkpoint(&[("vocab.json", own_vocab())]);
    let e = err(dir.path());
    assert!(e.contains("holds vocab.json but no merges.txt"), "{e}");

    // A folder with neither: not a reason to tokenize with another vocabulary.
    let dir = checkpoint(&[]);
    let e = err(dir.path());
    assert!(
        e.contains("tokenizer/") && e.contains("neither vocab.json + merges.txt"),
        "{e}"
    );
}

#[test]
fn an_unreadable_vocabulary_is_an_error_not_a_fallback() {
    // A folder where the file should be: there, but not a file.
    let dir = checkpoint(&[("merges.txt", merges())]);
    std::fs::create_dir_all(dir.path().join("tokenizer/vocab.json")).unwrap();
    let e = err(dir.path());
    assert!(
        e.contains("vocab.json is a folder, not a regular file"),
        "{e}"
    );
    // A vocabulary that is not JSON names both files.
    let dir = checkpoint(&[("vocab.json", "{".into()), ("merges.txt", merges())]);
    let e = err(dir.path());
    assert!(
        e.contains("vocab.json") && e.contains("not valid JSON"),
        "{e}"
    );
}

/// A FIFO or a link to /dev/zero where a tokenizer file should be is refused at once, by name:
/// no hang, no endless read.
#[cfg(unix)]
#[test]
fn special_files_are_refused_by_name() {
    let dir = checkpoint(&[("merges.txt", merges())]);
    let vocab = dir.path().join("tokenizer/vocab.json");
    mkfifo(&vocab);
    let e = err(dir.path());
    assert!(e.contains("vocab.json is a FIFO"), "{e}");
    let e = ClipTokenizer::from_dir(&dir.path().join("tokenizer"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocab.json is a FIFO"), "{e}");

    let dir = checkpoint(&[]);
    let json = dir.path().join("tokenizer/tokenizer.json");
    std::os::unix::fs::symlink("/dev/zero", &json).unwrap();
    let e = err(dir.path());
    assert!(
        e.contains("tokenizer.json is a character device, not a regular file"),
        "{e}"
    );
    let e = ClipTokenizer::from_tokenizer_json(&json)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

/// `mkfifo PATH` (the coreutils command: no libc dependency for one call).
#[cfg(unix)]
fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo {}", path.display());
}
