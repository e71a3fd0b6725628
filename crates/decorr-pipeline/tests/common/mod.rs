//! Helpers shared by the pipeline's integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use decorr_pipeline::{GenerateParams, Guidance, StableDiffusion};

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

/// The tiny checkpoint, loaded on the test device (`DECORR_BACKEND`, default flex; the folder
/// must outlive it).
pub fn tiny() -> (tempfile::TempDir, StableDiffusion) {
    let dir = assemble();
    let source = decorr_core::ModelSource::Local(dir.path().to_path_buf());
    let sd = StableDiffusion::load(&source, &decorr_core::device_from_env()).unwrap();
    (dir, sd)
}

/// The message of the error `p` must make `sd.generate` return.
pub fn error_of(sd: &StableDiffusion, p: GenerateParams) -> String {
    sd.generate(&p, &[0], &mut |_, _| true)
        .err()
        .expect("an error")
        .to_string()
}

/// A quick run on the tiny checkpoint: "a cat", 2 steps of its own scheduler, 16x16, CFG 7.5.
pub fn quick_params(sd: &StableDiffusion) -> GenerateParams {
    GenerateParams {
        prompt: "a cat".into(),
        negative_prompt: String::new(),
        steps: 2,
        guidance_scale: 7.5,
        width: 16,
        height: 16,
        scheduler: sd.default_scheduler().unwrap(),
        guidance: Guidance::Cfg,
        karras: None,
        eta: 0.0,
        attention_slice: None,
        capture_tokens: vec![],
        text: Default::default(),
    }
}

/// The largest absolute difference between `ours` and the reference tensor `key` (whose shape
/// it must have).
#[allow(clippy::disallowed_methods)] // tests read back freely
pub fn max_diff<const D: usize>(
    ours: burn::tensor::Tensor<D>,
    refs: &decorr_core::weights::HostTensors,
    key: &str,
) -> f32 {
    let (shape, theirs) = &refs[key];
    assert_eq!(&ours.dims().to_vec(), shape, "{key}: shape");
    let ours = ours
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap();
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}
