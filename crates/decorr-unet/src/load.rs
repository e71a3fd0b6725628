//! Loading a checkpoint's `unet/` and `vae/` folders (local diffusers layout or hub repo):
//! `config.json` plus `diffusion_pytorch_model.safetensors` or its `.fp16` variant (cast to f32).

use burn::tensor::Device;
use decorr_core::weights::{KeyMap, load_safetensors, read_json};
use decorr_core::{ModelFile, ModelSource};

use crate::{AutoencoderKL, UNet2DConditionModel, UNetConfig, UNetError, VaeConfig};

/// Weight files tried in order inside `unet/` and `vae/`.
pub const WEIGHT_FILES: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];

/// diffusers' feed-forward list (`ff.net.0.proj`, `ff.net.2`) to our named fields.
const FF: [(&str, &str); 2] = [
    (r"\.ff\.net\.0\.", ".ff.geglu."),
    (r"\.ff\.net\.2\.", ".ff.out."),
];

const UNET_CONV: KeyMap<'static> = KeyMap {
    remap: &[
        FF[0],
        FF[1],
        (r"\.proj_(in|out)\.(weight|bias)$", ".proj_$1.Conv.$2"),
    ],
    ignore: &[],
    file_names: &[],
};

const UNET_LINEAR: KeyMap<'static> = KeyMap {
    remap: &[
        FF[0],
        FF[1],
        (r"\.proj_(in|out)\.(weight|bias)$", ".proj_$1.Linear.$2"),
    ],
    ignore: &[],
    file_names: &[],
};

/// Old VAE files name the mid-block attention `query/key/value/proj_attn`.
const VAE: KeyMap<'static> = KeyMap {
    remap: &[
        (r"\.attentions\.0\.query\.", ".attentions.0.to_q."),
        (r"\.attentions\.0\.key\.", ".attentions.0.to_k."),
        (r"\.attentions\.0\.value\.", ".attentions.0.to_v."),
        (r"\.attentions\.0\.proj_attn\.", ".attentions.0.to_out.0."),
    ],
    ignore: &[],
    file_names: &[],
};

/// A loaded model with its config and the files it came from.
#[derive(Debug)]
pub struct Loaded<M, C> {
    pub config: C,
    pub model: M,
    /// Where the config and the weights were read (on disk, or in memory).
    pub config_path: ModelFile,
    pub weights_path: ModelFile,
}

/// A config error with the file it came from.
fn in_file(e: UNetError, config_path: &ModelFile) -> UNetError {
    match e {
        UNetError::Config(m) => UNetError::Config(format!("{config_path}: {m}")),
        other => other,
    }
}

/// Refuses a config whose parameters (f32) would not fit in the memory available, before
/// the model is allocated.
fn fits_in_memory(
    params: u128,
    what: &str,
    config_path: &ModelFile,
    keys: &str,
) -> Result<(), UNetError> {
    decorr_core::limits::check_memory(
        params * 4,
        &format!("the {what} of {config_path} ({params} parameters, f32)"),
        &format!("check its {keys}"),
    )?;
    Ok(())
}

/// Load `unet/` of `source` onto `device`.
pub fn load_unet(
    source: &ModelSource,
    device: &Device,
) -> Result<Loaded<UNet2DConditionModel, UNetConfig>, UNetError> {
    let config_path = source.find_file("unet", &["config.json"])?;
    let config: UNetConfig = read_json(&config_path, "a diffusers UNet2DConditionModel config")?;
    config.validate().map_err(|e| in_file(e, &config_path))?;
    fits_in_memory(
        config.num_params(),
        "UNet",
        &config_path,
        "block_out_channels, layers_per_block and transformer_layers_per_block",
    )?;
    let weights_path = source.find_file("unet", WEIGHT_FILES)?;
    let mut model = UNet2DConditionModel::new(&config, device);
    let keys = if config.use_linear_projection {
        &UNET_LINEAR
    } else {
        &UNET_CONV
    };
    load_safetensors(&mut model, &weights_path, keys)?;
    // One copy of the convolution weights, split as the host path reads them (flex only).
    model.store_conv_taps([config.sample_size; 2]);
    Ok(Loaded {
        config,
        model,
        config_path,
        weights_path,
    })
}

/// Load `vae/` of `source` onto `device`.
pub fn load_vae(
    source: &ModelSource,
    device: &Device,
) -> Result<Loaded<AutoencoderKL, VaeConfig>, UNetError> {
    let config_path = source.find_file("vae", &["config.json"])?;
    let config: VaeConfig = read_json(&config_path, "a diffusers AutoencoderKL config")?;
    config.validate().map_err(|e| in_file(e, &config_path))?;
    fits_in_memory(
        config.num_params(),
        "VAE",
        &config_path,
        "block_out_channels and layers_per_block",
    )?;
    let weights_path = source.find_file("vae", WEIGHT_FILES)?;
    let mut model = AutoencoderKL::new(&config, device);
    load_safetensors(&mut model, &weights_path, &VAE)?;
    model.store_conv_taps([config.sample_size; 2]);
    Ok(Loaded {
        config,
        model,
        config_path,
        weights_path,
    })
}
