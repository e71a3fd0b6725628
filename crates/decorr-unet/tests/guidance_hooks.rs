//! What the compared methods ask of the UNet, on the tiny random UNet: perturbed self-attention
//! (PAG) is `to_out(to_v(h))` in the chosen layers only; a pass stopped after a cross-attention
//! module (Attend-and-Excite) records the same maps as the full pass, and under autodiff gives
//! the gradient of those maps with respect to the latent (checked against a finite difference);
//! `attention_sites` names every module with the size its maps have.

use std::path::{Path, PathBuf};

use burn::tensor::{Distribution, Tensor};
use decorr_core::ModelSource;
use decorr_unet::{AttentionOptions, Capture, UNet2DConditionModel, load_unet};

fn unet() -> UNet2DConditionModel {
    let dir: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/unet_tiny_a");
    load_unet(&ModelSource::Local(dir), &decorr_core::device_from_env())
        .unwrap()
        .model
}

fn inputs(b: usize) -> (Tensor<4>, Tensor<3>) {
    let device = decorr_core::device_from_env();
    device.seed(3);
    (
        Tensor::random([b, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device),
        Tensor::random([b, 77, 16], Distribution::Normal(0.0, 1.0), &device),
    )
}

fn max_abs<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

#[test]
fn perturbed_self_attention_is_to_out_of_to_v() {
    let unet = unet();
    let block = &unet.mid_block.as_ref().unwrap().attentions[0].transformer_blocks[0];
    let device = decorr_core::device_from_env();
    let h = Tensor::<3>::random([2, 16, 32], Distribution::Normal(0.0, 1.0), &device);
    let ours = block.attn1.forward_identity(h.clone());
    let want = block.attn1.to_out[0].forward(block.attn1.to_v.forward(h));
    assert!(max_abs(ours, want) < 1e-6);

    // In the UNet: perturbing `mid` changes the output; perturbing nothing does not.
    let (x, ctx) = inputs(1);
    let plain = unet.forward(x.clone(), &[500.0], &ctx);
    let none = unet
        .forward_with(
            x.clone(),
            &[500.0],
            &ctx,
            &AttentionOptions {
                perturb_self: Capture::Prefixes(vec![]),
                ..Default::default()
            },
        )
        .sample;
    assert_eq!(max_abs(plain.clone(), none), 0.0);
    let mid = unet
        .forward_with(
            x,
            &[500.0],
            &ctx,
            &AttentionOptions {
                perturb_self: Capture::Prefixes(vec![
                    "mid_block.attentions.0.transformer_blocks.0.attn1".into(),
                ]),
                ..Default::default()
            },
        )
        .sample;
    assert!(max_abs(plain.clone(), mid.clone()) > 1e-4);

    // Perturbed from row 1 on: row 0 is the plain pass, row 1 the perturbed one (PAG's
    // [uncond, cond, perturbed] in one call).
    let (x, ctx) = inputs(1);
    let two = unet
        .forward_with(
            Tensor::cat(vec![x.clone(), x], 0),
            &[500.0, 500.0],
            &Tensor::cat(vec![ctx.clone(), ctx], 0),
            &AttentionOptions {
                perturb_self: Capture::Prefixes(vec![
                    "mid_block.attentions.0.transformer_blocks.0.attn1".into(),
                ]),
                perturb_from: 1,
                ..Default::default()
            },
        )
        .sample;
    let (d_plain, d_mid) = (
        max_abs(two.clone().narrow(0, 0, 1), plain),
        max_abs(two.narrow(0, 1, 1), mid),
    );
    // flex gives the same bits; torch's kernels block a batch of two differently from one
    // (1.7e-6 measured on LibTorch's CPU device), hence 1e-5 on outputs of magnitude ~1.
    assert!(
        d_plain < 1e-5 && d_mid < 1e-5,
        "batch of two against one at a time: plain {d_plain:.1e}, perturbed {d_mid:.1e}"
    );
}

#[test]
fn sites_and_a_stopped_pass_match_the_full_pass() {
    let unet = unet();
    let sites = unet.attention_sites([8, 8]);
    let cross: Vec<_> = sites.iter().filter(|s| s.cross).collect();
    let (x, ctx) = inputs(2);
    let full = unet.forward_with(
        x.clone(),
        &[10.0, 900.0],
        &ctx,
        &AttentionOptions {
            capture_cross: Capture::All,
            ..Default::default()
        },
    );
    assert_eq!(cross.len(), full.cross_attention.len());
    for (s, m) in cross.iter().zip(&full.cross_attention) {
        assert_eq!((&s.path, s.height, s.width), (&m.module, m.height, m.width));
    }
    assert_eq!(
        sites.iter().filter(|s| !s.cross).count(),
        cross.len(),
        "one attn1 per attn2"
    );
    // Stop after the first 8x8 module: the maps recorded so far are the full pass's.
    let first = &cross[0].path;
    let part = unet.cross_attention_until(
        x,
        &[10.0, 900.0],
        &ctx,
        &AttentionOptions {
            capture_cross: Capture::All,
            ..Default::default()
        },
        first,
    );
    assert_eq!(part.len(), 1);
    assert_eq!(
        max_abs(part[0].probs.clone(), full.cross_attention[0].probs.clone()),
        0.0
    );
}

#[test]
fn gradient_of_maps_wrt_latent_matches_finite_difference() {
    let unet = unet();
    let (x, ctx) = inputs(1);
    let ctx = ctx.narrow(0, 0, 1);
    let last = unet
        .attention_sites([8, 8])
        .into_iter()
        .rfind(|s| s.cross && s.height == 8)
        .unwrap()
        .path;
    let opts = AttentionOptions {
        capture_cross: Capture::All,
        ..Default::default()
    };
    // A scalar of the maps: the attention of query 5 to key 3, summed over the modules.
    let f = |z: Tensor<4>| -> Tensor<1> {
        unet.cross_attention_until(z, &[400.0], &ctx, &opts, &last)
            .into_iter()
            .map(|m| m.probs.narrow(1, 5, 1).narrow(2, 3, 1).reshape([1]))
            .reduce(|a, b| a + b)
            .unwrap()
    };
    let leaf = x.clone().autodiff().require_grad();
    let grads = f(leaf.clone()).backward();
    let g = leaf.grad(&grads).unwrap().inner();
    // Central difference along g's direction: (f(x + e u) − f(x − e u)) / 2e ≈ |g|.
    let norm = g.clone().powf_scalar(2.0).sum().sqrt().into_scalar::<f32>();
    assert!(norm > 0.0);
    let u = g.div_scalar(norm as f64);
    let e = 1e-2;
    let fd = (f(x.clone() + u.clone().mul_scalar(e)) - f(x - u.mul_scalar(e)))
        .div_scalar(2.0 * e)
        .into_scalar::<f32>();
    assert!(
        (fd - norm).abs() <= 0.02 * norm,
        "directional derivative {fd} vs gradient norm {norm}"
    );
}
