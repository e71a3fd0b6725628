//! Bad numbers stop generation with an error that names the stage or the flag, never an exit 0
//! with a one-colour image: a guidance scale out of range, a model output that turns NaN (a weight
//! set to NaN in memory here; files with such weights are refused at load), sizes whose
//! activations cannot fit, a config default that is not a usable size.

use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor};
use decorr_core::ModelSource;
use decorr_pipeline::{GenerateParams, PipelineError, StableDiffusion};

mod common;
use common::{assemble, quick_params as params};

fn load(dir: &Path) -> StableDiffusion {
    StableDiffusion::load(&ModelSource::Local(dir.to_path_buf()), &Device::flex()).unwrap()
}

fn generate_err(sd: &StableDiffusion, p: &GenerateParams) -> PipelineError {
    match sd.generate(p, &[0], &mut |_, _| true) {
        Ok(_) => panic!("generation must fail"),
        Err(e) => e,
    }
}

fn nan(len: usize) -> Param<Tensor<1>> {
    Param::from_tensor(Tensor::full([len], f32::NAN, &Device::flex()))
}

#[test]
fn guidance_scale_must_be_finite_and_bounded() {
    let dir = assemble();
    let sd = load(dir.path());
    for g in [1e39, f64::INFINITY, f64::NAN, 1001.0, -1.0] {
        let e = generate_err(
            &sd,
            &GenerateParams {
                guidance_scale: g,
                ..params(&sd)
            },
        )
        .to_string();
        assert!(
            e.contains("--guidance-scale") && e.contains("[0, 1000]"),
            "{g}: {e}"
        );
    }
}

#[test]
fn non_finite_unet_output_stops_before_decoding() {
    let dir = assemble();
    let mut sd = load(dir.path());
    sd.unet.conv_out.bias = Some(nan(4));
    let e = generate_err(&sd, &params(&sd));
    assert!(matches!(e, PipelineError::NonFinite(_)), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("latents after the last of")
            && e.contains("denoising steps")
            && e.contains("--guidance-scale 7.5")
            && e.contains("UNet weights"),
        "{e}"
    );
}

#[test]
fn non_finite_vae_output_is_named() {
    let dir = assemble();
    let mut sd = load(dir.path());
    sd.vae.decoder.conv_out.bias = Some(nan(3));
    let e = generate_err(&sd, &params(&sd)).to_string();
    assert!(
        e.contains("VAE decoder's output") && e.contains("scaling_factor"),
        "{e}"
    );
}

#[test]
fn non_finite_text_encoder_output_is_named_once_per_prompt() {
    let dir = assemble();
    let mut sd = load(dir.path());
    let width = sd.text_config.hidden_size;
    sd.text_encoder.final_layer_norm.gamma = nan(width);
    let e = generate_err(&sd, &params(&sd)).to_string();
    assert!(
        e.contains("text encoder's hidden states for \"a cat\""),
        "{e}"
    );
}

#[test]
fn sizes_beyond_memory_are_refused_naming_the_flags() {
    let dir = assemble();
    let sd = load(dir.path());
    let p = GenerateParams {
        width: 8192,
        height: 8192,
        ..params(&sd)
    };
    // Many terabytes for 4096 images of 8192x8192 at once, whatever this machine has.
    let e = sd.check_memory(&p, 4096).unwrap_err().to_string();
    assert!(
        e.contains("--width 8192 --height 8192")
            && e.contains("--batch-size 4096")
            && e.contains("needs about")
            && e.contains("TiB"),
        "{e}"
    );
    sd.check_memory(&params(&sd), 1).unwrap();
    // Larger than any accepted side: named with the bound.
    let e = generate_err(
        &sd,
        &GenerateParams {
            width: 100_000,
            ..params(&sd)
        },
    )
    .to_string();
    assert!(
        e.contains("--width 100000") && e.contains("at most 8192"),
        "{e}"
    );
    // The estimate grows with the area and the batch.
    let small = sd.activation_bytes(&params(&sd), 1);
    assert!(sd.activation_bytes(&p, 1) > 1000 * small);
    assert!(sd.activation_bytes(&p, 2) > sd.activation_bytes(&p, 1));
}

#[test]
fn default_size_from_the_config_names_the_config_key() {
    let dir = assemble();
    let mut sd = load(dir.path());
    assert_eq!(sd.default_side().unwrap(), 16);
    // The tiny VAE halves: sample_size 3 gives 6 px, not a multiple of 8.
    sd.unet_config.sample_size = 3;
    let e = sd.default_side().unwrap_err().to_string();
    assert!(
        e.contains("`sample_size` = 3") && !e.contains("--width 6"),
        "{e}"
    );
}
