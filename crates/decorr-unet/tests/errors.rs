//! Bad checkpoints give errors that name the file, the tensor or the key, never a panic.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use decorr_core::ModelSource;
use decorr_unet::{UNetConfig, load_unet, load_vae};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// A copy of the tiny SD 1.x-like UNet with its config edited by `edit`.
fn edited_unet(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let unet = tmp.path().join("unet");
    std::fs::create_dir(&unet).unwrap();
    let src = fixture("unet_tiny_a").join("unet");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(unet.join("config.json"), cfg.to_string()).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    std::fs::copy(src.join(weights), unet.join(weights)).unwrap();
    tmp
}

fn unet_error(dir: &Path) -> String {
    match load_unet(&ModelSource::Local(dir.to_path_buf()), &Device::flex()) {
        Ok(_) => panic!("loading must fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_that_does_not_fit_the_weights_names_tensors() {
    let tmp = edited_unet(|c| c["cross_attention_dim"] = 32.into());
    let err = unet_error(tmp.path());
    assert!(
        err.contains("attn2.to_k.weight")
            && err.contains("shape")
            && err.contains("diffusion_pytorch_model"),
        "{err}"
    );
}

#[test]
fn unsupported_config_key_is_named() {
    let tmp = edited_unet(|c| c["class_embed_type"] = "timestep".into());
    let err = unet_error(tmp.path());
    assert!(err.contains("class_embed_type"), "{err}");
    let tmp = edited_unet(|c| c["attention_head_dim"] = serde_json::json!([2, 4, 4]));
    let err = unet_error(tmp.path());
    assert!(
        err.contains("attention_head_dim") && err.contains("3 entries"),
        "{err}"
    );
}

#[test]
fn missing_folder_and_weights_say_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let err = unet_error(tmp.path());
    assert!(err.contains("unet"), "{err}");
    let tmp = edited_unet(|_| {});
    std::fs::remove_file(tmp.path().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let err = unet_error(tmp.path());
    assert!(err.contains("diffusion_pytorch_model"), "{err}");
}

#[test]
fn corrupt_weights_are_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let vae = tmp.path().join("vae");
    std::fs::create_dir(&vae).unwrap();
    std::fs::copy(
        fixture("vae_tiny").join("vae/config.json"),
        vae.join("config.json"),
    )
    .unwrap();
    std::fs::write(
        vae.join("diffusion_pytorch_model.safetensors"),
        b"not a file",
    )
    .unwrap();
    let err = match load_vae(
        &ModelSource::Local(tmp.path().to_path_buf()),
        &Device::flex(),
    ) {
        Ok(_) => panic!("must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn presets_validate_and_sd2_heads_follow_the_list() {
    UNetConfig::sd15().validate().unwrap();
    let sd2 = UNetConfig::sd2();
    sd2.validate().unwrap();
    assert_eq!(
        (sd2.heads(0), sd2.heads(3)),
        (5, 20),
        "diffusers' attention_head_dim quirk"
    );
    assert!(UNetConfig::preset("sdxl").is_err());
}
