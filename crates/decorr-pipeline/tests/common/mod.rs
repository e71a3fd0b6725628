//! Helpers shared by the pipeline's integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The tiny checkpoint as one diffusers folder, assembled from the committed pieces.
pub fn assemble() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    for (part, from) in [
        ("text_encoder", f.join("clip_tiny_train/text_encoder")),
        ("unet", f.join("unet_tiny_a/unet")),
        ("vae", f.join("vae_tiny/vae")),
        ("scheduler", f.join("pipeline/scheduler")),
    ] {
        let to = tmp.path().join(part);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    tmp
}
