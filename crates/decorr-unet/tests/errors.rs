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
    UNetConfig::preset("sdxl").unwrap().validate().unwrap();
    let e = UNetConfig::preset("sd3").unwrap_err().to_string();
    assert!(e.contains("sd3") && e.contains("sdxl"), "{e}");
}

fn edited_vae(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let vae = tmp.path().join("vae");
    std::fs::create_dir(&vae).unwrap();
    let src = fixture("vae_tiny").join("vae");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(vae.join("config.json"), cfg.to_string()).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    std::fs::copy(src.join(weights), vae.join(weights)).unwrap();
    tmp
}

fn vae_error(dir: &Path) -> String {
    match load_vae(&ModelSource::Local(dir.to_path_buf()), &Device::flex()) {
        Ok(_) => panic!("loading must fail"),
        Err(e) => e.to_string(),
    }
}

/// Absurd or degenerate numbers in a config are refused by key, range and file, before any
/// allocation (no division by zero, no allocation abort, no flood of missing tensors).
#[test]
fn bad_numbers_in_configs_name_the_key_the_range_and_the_file() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("norm_num_groups", 0.into(), "`norm_num_groups` = 0"),
        (
            "layers_per_block",
            1_000_000_000.into(),
            "`layers_per_block[0]` = 1000000000",
        ),
        ("layers_per_block", 100_000.into(), "allowed 1..=256"),
        ("sample_size", 1_000_000.into(), "`sample_size` = 1000000"),
        ("sample_size", 0.into(), "`sample_size` = 0"),
        ("norm_eps", (-1.0).into(), "`norm_eps` = -1"),
        (
            "attention_head_dim",
            0.into(),
            "`attention_head_dim[0]` = 0",
        ),
        (
            "transformer_layers_per_block",
            1_000_000_000.into(),
            "transformer_layers_per_block[0]",
        ),
        (
            "block_out_channels",
            serde_json::json!([16, 1_000_000]),
            "block_out_channels[1]",
        ),
        ("in_channels", 0.into(), "`in_channels` = 0"),
        ("conv_in_kernel", 1001.into(), "`conv_in_kernel` = 1001"),
    ];
    for (key, value, want) in cases {
        let tmp = edited_unet(|c| c[key] = value.clone());
        let err = unet_error(tmp.path());
        assert!(
            err.contains(want) && err.contains("unet/config.json"),
            "{key} = {value}: {err}"
        );
    }
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("norm_num_groups", 0.into(), "`norm_num_groups` = 0"),
        (
            "layers_per_block",
            1_000_000_000.into(),
            "`layers_per_block` = 1000000000",
        ),
        ("sample_size", 1_000_000.into(), "`sample_size` = 1000000"),
        ("scaling_factor", 0.0.into(), "`scaling_factor` = 0"),
        ("scaling_factor", (-0.5).into(), "`scaling_factor` = -0.5"),
        ("latent_channels", 0.into(), "`latent_channels` = 0"),
    ];
    for (key, value, want) in cases {
        let tmp = edited_vae(|c| c[key] = value.clone());
        let err = vae_error(tmp.path());
        assert!(
            err.contains(want) && err.contains("vae/config.json"),
            "{key} = {value}: {err}"
        );
    }
}

/// A config inside every bound that still implies more parameters than any machine holds is
/// refused with its estimate before allocating.
#[test]
fn configs_too_large_for_memory_are_refused_before_allocating() {
    let tmp = edited_unet(|c| {
        c["block_out_channels"] = serde_json::json!([8192, 8192]);
        c["layers_per_block"] = 256.into();
        c["transformer_layers_per_block"] = 256.into();
    });
    let err = unet_error(tmp.path());
    assert!(
        err.contains("needs about")
            && err.contains("parameters")
            && err.contains("unet/config.json")
            && err.contains("layers_per_block")
            && err.contains("DECORR_MEMORY_LIMIT"),
        "{err}"
    );
    let tmp = edited_vae(|c| {
        c["block_out_channels"] = serde_json::json!([8192, 8192]);
        c["layers_per_block"] = 256.into();
    });
    let err = vae_error(tmp.path());
    assert!(
        err.contains("needs about") && err.contains("vae/config.json"),
        "{err}"
    );
}

/// The estimate is exact: it equals the parameter count of the model built from the config.
#[test]
fn parameter_estimates_match_the_built_models() {
    use burn::module::Module;
    let device = Device::flex();
    for name in ["unet_tiny_a", "unet_tiny_b"] {
        let cfg: UNetConfig = serde_json::from_str(
            &std::fs::read_to_string(fixture(name).join("unet/config.json")).unwrap(),
        )
        .unwrap();
        cfg.validate().unwrap();
        let model = decorr_unet::UNet2DConditionModel::new(&cfg, &device);
        assert_eq!(cfg.num_params(), model.num_params() as u128, "{name}");
    }
    let cfg: decorr_unet::VaeConfig = serde_json::from_str(
        &std::fs::read_to_string(fixture("vae_tiny").join("vae/config.json")).unwrap(),
    )
    .unwrap();
    let model = decorr_unet::AutoencoderKL::new(&cfg, &device);
    assert_eq!(cfg.num_params(), model.num_params() as u128);
    // The published counts of SD 1.5 (not built here: 3.4 GB).
    assert_eq!(UNetConfig::sd15().num_params(), 859_520_964);
    assert_eq!(decorr_unet::VaeConfig::sd15().num_params(), 83_653_863);
    decorr_unet::VaeConfig::sd15().validate().unwrap();
}
