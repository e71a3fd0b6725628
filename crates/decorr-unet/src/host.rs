//! Host-side fast paths for the CPU backend `flex`, whose tensors live in host memory: the
//! UNet's and VAE's 3x3 convolutions and their group norms (+ SiLU) computed directly on the
//! f32 buffers (read in place through burn's `extension` API). flex runs a convolution as a
//! single-threaded NHWC conversion and weight reshuffle, then tiled im2col + GEMM, on every
//! call, and a group norm as about ten element-wise passes. Here a convolution is one parallel
//! copy of the input into zero-padded channels-last rows, the weight split per kernel tap, and,
//! per tile of output rows, nine accumulating GEMMs that read the padded input in place (no
//! im2col), tiles in parallel, bias fused into the store; a group norm (+ SiLU) is one
//! statistics pass and one fused, in-place apply pass. Same arithmetic as torch up to summation
//! order (group-norm statistics in f64).
//!
//! Loading stores each such convolution weight already split per tap ([`store_taps`]: the
//! parameter becomes a permuted view of the split), so the split is read in place and the
//! model holds one copy of its convolution weights, not the weights plus a cached split
//! (SDXL's UNet: 1.26 GB of 3x3 weights beside 10.3 GB in all).
//!
//! This module picks the path for each tensor; the slice-level kernels it calls live in
//! [`crate::kernels`], which [`crate::host_autodiff`] shares.
//!
//! The transformer blocks' work takes the same route: attention as blocked GEMMs with an exact
//! softmax per row ([`attention`]), linear maps in row tiles with the bias fused ([`linear`]),
//! GEGLU's gate ([`geglu`], torch's vectorised erf) and layer norm ([`layer_norm`]) in one pass.
//!
//! Under autodiff on flex the same kernels (3x3 convolutions, attention, linear maps, the norms,
//! GEGLU) go through [`crate::host_autodiff`], which records hand-written backward steps for
//! them. On LibTorch (`tch` feature) group norms, linear maps, GEGLU and attention go to torch's
//! fused kernels instead ([`crate::libtorch`]). Anything else
//! (other backends, other dtypes, other convolution shapes: 1x1, stride 2) takes burn's path;
//! there the norms of half-precision tensors compute in f32. `DECORR_HOST_KERNELS=0` turns the
//! fast paths off, for comparisons.

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNorm, Linear};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_flex::{Flex, FlexTensor};

use crate::host_autodiff;
use crate::kernels::{conv3x3_fits, geglu_rows, strided_weight, taps_in_place};

// The kernels' public entry points, also at the paths they have always had.
pub use crate::kernels::{
    attention_heads, conv3x3, conv3x3_cached, conv3x3_input_grad, enabled, group_norm_in_place,
    layer_norm_in_place, linear_rows,
};

/// An f32 tensor in flex's host memory, outside any autodiff graph.
fn on_host<const D: usize>(t: &Tensor<D>) -> bool {
    t.dtype() == DType::F32 && !t.is_autodiff() && t.device() == Device::flex()
}

/// The flex tensor behind `t` (sharing its buffer) when `t` is [`on_host`], contiguous and
/// starts at its buffer's start, so that `storage()[..numel]` are its elements in order.
fn flex_f32<const D: usize>(t: &Tensor<D>) -> Option<FlexTensor> {
    if !on_host(t) {
        return None;
    }
    let p = t.clone().try_into_primitive::<Flex>().ok()?;
    (p.dtype() == DType::F32 && p.is_contiguous() && p.layout().start_offset() == 0).then_some(p)
}

/// `conv.forward(x)`; 3x3, stride 1, padding 1 convolutions on flex take the host path.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    conv3x3_host(conv, &x, 1)
        .or_else(|| host_autodiff::conv3x3(conv, &x, 1))
        .unwrap_or_else(|| conv.forward(x))
}

/// `conv` applied to `x` resized 2x by nearest neighbour (diffusers' `Upsample2D`), with the
/// resize folded into the convolution's padded copy: the 4x larger resized tensor is never
/// written. `None` where [`conv2d`] would not take the host path.
pub fn conv2d_upsampled(conv: &Conv2d, x: &Tensor<4>) -> Option<Tensor<4>> {
    conv3x3_host(conv, x, 2).or_else(|| host_autodiff::conv3x3(conv, x, 2))
}

/// The host path of a 3x3 convolution of `x` enlarged `up` times (nearest neighbour).
fn conv3x3_host(conv: &Conv2d, x: &Tensor<4>, up: usize) -> Option<Tensor<4>> {
    if !conv3x3_fits(conv) {
        return None;
    }
    let bias = match &conv.bias {
        Some(b) => Some(flex_f32(&b.val())?),
        None => None,
    };
    let [b, ci, h, wd] = x.dims();
    let co = conv.weight.dims()[0];
    let (xf, wf) = (flex_f32(x)?, conv_weight(conv, ci)?);
    let out = conv3x3_cached(
        &xf.storage::<f32>()[..b * ci * h * wd],
        &wf,
        bias.as_ref().map(|t| &t.storage::<f32>()[..co]),
        [b, ci, h, wd],
        co,
        up,
    );
    Some(Tensor::from_data(
        TensorData::new(out, [b, co, h * up, wd * up]),
        &x.device(),
    ))
}

/// `conv`'s 3x3 weight as the host convolution reads it: a plain f32 host tensor, contiguous
/// or stored split per tap ([`store_taps`]), for `ci` input channels.
fn conv_weight(conv: &Conv2d, ci: usize) -> Option<FlexTensor> {
    let w = conv.weight.val();
    if !on_host(&w) || w.dims()[1] != ci {
        return None;
    }
    let wf = w.try_into_primitive::<Flex>().ok()?;
    let co = wf.layout().shape()[0];
    let plain = wf.is_contiguous() && wf.layout().start_offset() == 0;
    (plain || taps_in_place(&wf, co, ci).is_some()).then_some(wf)
}

/// Stores the weight of `conv`, when it is a 3x3 convolution that the host path runs (f32 on
/// flex), split per kernel tap, seen as the `[co, ci, 3, 3]` it is through a permuted view; the
/// split's layout is the one a convolution to an `hw` output (the size it runs at in the
/// model's usual resolution) accumulates in. The host convolution then reads the split in
/// place instead of keeping a split copy beside the weight in its cache: the model holds one
/// copy of its convolution weights (SDXL's UNet: 1.26 GB of them) and no pass splits them
/// again. Values, shapes and parameter ids are unchanged and burn's own ops read the view
/// through its strides; a weight replaced later (loaded, trained, cast) is contiguous again
/// and takes the cache.
pub fn store_taps(conv: &mut Conv2d, hw: [usize; 2]) {
    if !conv3x3_fits(conv) {
        return;
    }
    let w = conv.weight.val();
    let Some(wf) = flex_f32(&w) else {
        return;
    };
    let [co, ci, _, _] = w.dims();
    let (taps, channels_last) =
        crate::kernels::taps_layout(&wf.storage::<f32>()[..co * ci * 9], co, ci, hw);
    drop((wf, w));
    let stored = Tensor::<4>::from_data(
        TensorData::new(
            taps,
            if channels_last {
                [3, 3, ci, co]
            } else {
                [3, 3, co, ci]
            },
        ),
        &Device::flex(),
    );
    let stored = if channels_last {
        stored.permute([3, 2, 0, 1])
    } else {
        stored.permute([2, 3, 0, 1])
    };
    conv.weight = conv.weight.clone().map(|_| stored);
}

/// `lin.forward(x)` for `x` `[b, n, in]`; on flex, row tiles of the input in parallel, each one
/// GEMM against the weight read in place (either layout) with the bias added while the tile is
/// in cache. flex runs a linear map as one GEMM split by the GEMM crate, then a separate pass
/// for the bias.
pub fn linear(lin: &Linear, x: Tensor<3>) -> Tensor<3> {
    if x.is_autodiff() {
        return host_autodiff::linear(lin, &x).unwrap_or_else(|| lin.forward(x));
    }
    #[cfg(feature = "tch")]
    if let Some(y) = crate::libtorch::linear(lin, &x) {
        return y;
    }
    let w = lin.weight.val();
    let bias = match &lin.bias {
        Some(b) => match flex_f32(&b.val()) {
            Some(t) => Some(t),
            None => return lin.forward(x),
        },
        None => None,
    };
    if !enabled() || !on_host(&w) {
        return lin.forward(x);
    }
    let (Some(xf), Ok(wf)) = (flex_f32(&x), w.clone().try_into_primitive::<Flex>()) else {
        return lin.forward(x);
    };
    let [b, n, k] = x.dims();
    let o = w.dims()[1];
    let Some((weight, strides)) = strided_weight(&wf, k) else {
        return lin.forward(x);
    };
    let device = x.device();
    let out = linear_rows(
        &xf.storage::<f32>()[..b * n * k],
        weight,
        strides,
        bias.as_ref().map(|t| &t.storage::<f32>()[..o]),
        [b * n, k, o],
    );
    Tensor::from_data(TensorData::new(out, [b, n, o]), &device)
}

/// Multi-head `softmax(q k^T / sqrt(d)) v` on flex, heads side by side in the last dimension as
/// the projections leave them: `q` `[b, n, heads * d]`, `k` and `v` `[b, m, heads * d]`; returns
/// `[b, n, heads * d]`, or `None` when the tensors are not plain f32 host tensors (the caller
/// then takes burn's path).
pub fn attention(q: &Tensor<3>, k: &Tensor<3>, v: &Tensor<3>, heads: usize) -> Option<Tensor<3>> {
    if !enabled() {
        return None;
    }
    if q.is_autodiff() {
        return host_autodiff::attention(q, k, v, heads);
    }
    #[cfg(feature = "tch")]
    if let Some(out) = crate::libtorch::attention(q, k, v, heads) {
        return Some(out);
    }
    let (qf, kf, vf) = (flex_f32(q)?, flex_f32(k)?, flex_f32(v)?);
    let [b, n, inner] = q.dims();
    let m = k.dims()[1];
    if k.dims() != [b, m, inner] || v.dims() != [b, m, inner] || heads == 0 || inner % heads != 0 {
        return None;
    }
    let out = attention_heads(
        &qf.storage::<f32>()[..b * n * inner],
        &kf.storage::<f32>()[..b * m * inner],
        &vf.storage::<f32>()[..b * m * inner],
        [b, n, m, inner],
        heads,
    );
    Some(Tensor::from_data(
        TensorData::new(out, [b, n, inner]),
        &q.device(),
    ))
}

/// `norm.forward(x)`, followed by SiLU when `then_silu`; on flex one fused host pass.
pub fn group_norm(norm: &GroupNorm, x: Tensor<4>, then_silu: bool) -> Tensor<4> {
    let gamma = norm.gamma.as_ref().map(|g| g.val());
    let beta = norm.beta.as_ref().map(|b| b.val());
    let fits = enabled()
        && norm.affine
        && on_host(&x)
        && gamma.as_ref().is_some_and(on_host)
        && beta.as_ref().is_some_and(on_host);
    let (Some(gamma), Some(beta), true) = (gamma, beta, fits) else {
        if let Some(y) = host_autodiff::group_norm(norm, &x, then_silu) {
            return y;
        }
        #[cfg(feature = "tch")]
        if let Some(y) = crate::libtorch::group_norm(norm, &x, then_silu) {
            return y;
        }
        // Half precision: statistics in f32 (decorr_core::precision).
        return decorr_core::norm_f32(x, |x| {
            let y = norm.forward(x);
            if then_silu { silu(y) } else { y }
        });
    };
    let device = x.device();
    let [b, c, h, w] = x.dims();
    let mut data = x.into_data();
    let gamma = gamma.into_data();
    let beta = beta.into_data();
    group_norm_in_place(
        data.as_mut_slice::<f32>().expect("f32 input"),
        gamma.as_slice::<f32>().expect("f32 gamma"),
        beta.as_slice::<f32>().expect("f32 beta"),
        [b, c, h * w],
        norm.num_groups,
        norm.epsilon,
        then_silu,
    );
    Tensor::from_data(data, &device)
}

/// `norm.forward(x)` for `x` `[b, n, d]`, `eps` being the one `norm` was built with (burn keeps
/// it private); on flex one statistics pass and one apply pass per row, rows in parallel
/// (burn's is about six element-wise passes over the whole tensor).
pub fn layer_norm(norm: &LayerNorm, x: Tensor<3>, eps: f64) -> Tensor<3> {
    let gamma = norm.gamma.val();
    let beta = norm.beta.as_ref().map(|b| b.val());
    let fits = enabled() && on_host(&x) && on_host(&gamma) && beta.as_ref().is_none_or(on_host);
    if !fits {
        if let Some(y) = host_autodiff::layer_norm(norm, &x, eps) {
            return y;
        }
        return decorr_core::norm_f32(x, |x| norm.forward(x));
    }
    let device = x.device();
    let d = x.dims()[2];
    let mut data = x.into_data();
    let gamma = gamma.into_data();
    let beta = beta.map(|b| b.into_data());
    layer_norm_in_place(
        data.as_mut_slice::<f32>().expect("f32 input"),
        gamma.as_slice::<f32>().expect("f32 gamma"),
        beta.as_ref()
            .map(|b| b.as_slice::<f32>().expect("f32 beta")),
        d,
        eps,
    );
    Tensor::from_data(data, &device)
}

/// GEGLU's gate on flex: `h` `[b, n, 2i]` becomes `a * gelu(g)` `[b, n, i]` for the halves `a`,
/// `g` of the last dimension, in one pass (burn's path copies both halves out, then runs gelu
/// and the product as separate passes). `None` when `h` is not a plain f32 host tensor.
pub fn geglu(h: &Tensor<3>) -> Option<Tensor<3>> {
    if !enabled() {
        return None;
    }
    if h.is_autodiff() {
        return host_autodiff::geglu(h);
    }
    #[cfg(feature = "tch")]
    if let Some(out) = crate::libtorch::geglu(h) {
        return Some(out);
    }
    let hf = flex_f32(h)?;
    let [b, n, two] = h.dims();
    if two % 2 != 0 {
        return None;
    }
    let half = two / 2;
    let out = geglu_rows(&hf.storage::<f32>()[..b * n * two], half);
    Some(Tensor::from_data(
        TensorData::new(out, [b, n, half]),
        &h.device(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{max_diff, values};
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::{GroupNormConfig, PaddingConfig2d};

    #[test]
    fn layer_norm_matches_burn() {
        let device = Device::flex();
        for (bias, d) in [(true, 7), (false, 40)] {
            let mut norm = burn::nn::LayerNormConfig::new(d)
                .with_epsilon(1e-5)
                .with_bias(bias)
                .init(&device);
            norm.gamma = burn::module::Param::from_tensor(values([d], 1, 1.0, &device));
            if bias {
                norm.beta = Some(burn::module::Param::from_tensor(values(
                    [d],
                    2,
                    0.0,
                    &device,
                )));
            }
            let x = values([2, 5, d], 3, 2.0, &device);
            let diff = max_diff(layer_norm(&norm, x.clone(), 1e-5), norm.forward(x));
            assert!(diff < 1e-5, "bias {bias} d {d}: {diff}");
        }
    }

    #[test]
    fn linear_and_geglu_match_burn() {
        let device = Device::flex();
        for (b, n, k, o, bias) in [
            (2, 37, 5, 8, true),
            (1, 1100, 16, 3, false),
            (1, 2, 3, 6, true),
        ] {
            let lin = burn::nn::LinearConfig::new(k, o)
                .with_bias(bias)
                .init(&device);
            let x = values([b, n, k], 8, 0.0, &device);
            let d = max_diff(linear(&lin, x.clone()), lin.forward(x.clone()));
            assert!(d < 1e-5, "linear {b}x{n}x{k}->{o}: {d}");
            // A weight stored transposed (burn's column layout) is read through its strides.
            let col = burn::nn::LinearConfig::new(k, o)
                .with_bias(bias)
                .with_layout(burn::nn::LinearLayout::Col)
                .init(&device);
            let d = max_diff(linear(&col, x.clone()), col.forward(x));
            assert!(d < 1e-5, "column-layout linear {b}x{n}x{k}->{o}: {d}");
            let h = values([b, n, 2 * o], 9, 0.0, &device);
            let theirs = h.clone().narrow(2, 0, o)
                * burn::tensor::activation::gelu(h.clone().narrow(2, o, o));
            let d = max_diff(geglu(&h).expect("host tensor"), theirs);
            assert!(d < 1e-5, "geglu {b}x{n}x{o}: {d}");
        }
    }

    #[test]
    fn conv_matches_burn() {
        let device = Device::flex();
        for (b, ci, co, h, w, bias) in [
            (2, 5, 7, 9, 11, true),
            (1, 4, 3, 1, 1, false),
            (3, 16, 8, 40, 3, true),
            (1, 2, 2, 2, 600, true),
            // More output channels than tile columns: a row-major accumulator.
            (1, 3, 40, 2, 2, true),
        ] {
            let conv = Conv2dConfig::new([ci, co], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(bias)
                .init(&device);
            let x = values([b, ci, h, w], 4, 0.0, &device);
            assert!(on_host(&x) && on_host(&conv.weight.val()));
            let ours = conv2d(&conv, x.clone());
            let theirs = conv.forward(x.clone());
            let d = max_diff(ours, theirs);
            assert!(d < 1e-5, "{b}x{ci}->{co} {h}x{w}: {d}");
            let ours = conv2d_upsampled(&conv, &x).expect("host tensors");
            let theirs = conv.forward(crate::blocks::nearest(x, 2 * h, 2 * w));
            let d = max_diff(ours, theirs);
            assert!(d < 1e-5, "{b}x{ci}->{co} {h}x{w} enlarged: {d}");
        }
    }

    /// A weight stored split per tap (either layout) gives the same convolution on the host
    /// path and in burn's own op, and reads back as the weight it was.
    #[test]
    fn stored_taps_match_burn() {
        let device = Device::flex();
        let mut layouts = Vec::new();
        // (batch, in, out, h, w): few output channels on a wide image (a channels-last
        // split) and many on a small one (row-major); the last stored for another size.
        for (b, ci, co, h, w, hint) in [
            (2, 5, 7, 9, 11, [9, 11]),
            (1, 6, 40, 2, 2, [2, 2]),
            (1, 6, 40, 2, 3, [64, 64]),
        ] {
            let conv = Conv2dConfig::new([ci, co], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(&device);
            let mut stored = conv.clone();
            store_taps(&mut stored, hint);
            let wf = stored
                .weight
                .val()
                .try_into_primitive::<Flex>()
                .ok()
                .unwrap();
            let (_, channels_last) = taps_in_place(&wf, co, ci).expect("stored split per tap");
            layouts.push(channels_last);
            assert_eq!(stored.weight.id, conv.weight.id);
            assert_eq!(
                stored.weight.val().into_data(),
                conv.weight.val().into_data()
            );
            let x = values([b, ci, h, w], 4, 0.0, &device);
            let d = max_diff(conv2d(&stored, x.clone()), conv.forward(x.clone()));
            assert!(d < 1e-5, "{b}x{ci}->{co} {h}x{w}: {d}");
            let ours = conv2d_upsampled(&stored, &x).expect("host tensors");
            let theirs = conv.forward(crate::blocks::nearest(x.clone(), 2 * h, 2 * w));
            let d = max_diff(ours, theirs);
            assert!(d < 1e-5, "{b}x{ci}->{co} {h}x{w} enlarged: {d}");
            let d = max_diff(stored.forward(x.clone()), conv.forward(x));
            assert!(d < 1e-5, "burn's op on the stored view: {d}");
        }
        assert_eq!(layouts, [true, false, true]);
    }

    #[test]
    fn attention_matches_burn() {
        let device = Device::flex();
        // Cross-attention with a block of all rows; self-attention whose key count forces
        // blocks of 16 query rows with a remainder; one head of many channels (the VAE's).
        for (b, n, m, heads, d) in [(2, 37, 5, 3, 4), (1, 40, 5000, 2, 3), (1, 9, 9, 1, 64)] {
            let inner = heads * d;
            let q = values([b, n, inner], 5, 0.0, &device);
            let k = values([b, m, inner], 6, 0.0, &device);
            let v = values([b, m, inner], 7, 1.0, &device);
            let ours = attention(&q, &k, &v, heads).expect("host tensors");
            let split = |t: Tensor<3>, len: usize| {
                t.reshape([b, len, heads, d])
                    .swap_dims(1, 2)
                    .reshape([b * heads, len, d])
            };
            let scores = split(q, n)
                .mul_scalar((d as f64).powf(-0.5))
                .matmul(split(k, m).swap_dims(1, 2));
            let theirs = burn::tensor::activation::softmax(scores, 2)
                .matmul(split(v, m))
                .reshape([b, heads, n, d])
                .swap_dims(1, 2)
                .reshape([b, n, inner]);
            let diff = max_diff(ours, theirs);
            assert!(diff < 1e-5, "{b}x{n}x{m} heads {heads} d {d}: {diff}");
        }
    }

    #[test]
    fn group_norm_matches_burn() {
        let device = Device::flex();
        for (b, c, g, h, w, eps) in [(2, 32, 8, 5, 7, 1e-5), (1, 6, 3, 2, 3, 1e-6)] {
            let mut norm = GroupNormConfig::new(g, c).with_epsilon(eps).init(&device);
            norm.gamma = Some(burn::module::Param::from_tensor(values(
                [c],
                1,
                0.0,
                &device,
            )));
            norm.beta = Some(burn::module::Param::from_tensor(values(
                [c],
                2,
                0.0,
                &device,
            )));
            let x = values([b, c, h, w], 3, 3.0, &device);
            assert!(on_host(&x));
            for then_silu in [false, true] {
                let ours = group_norm(&norm, x.clone(), then_silu);
                let theirs = norm.forward(x.clone());
                let theirs = if then_silu { silu(theirs) } else { theirs };
                let d = max_diff(ours, theirs);
                assert!(d < 1e-5, "{b}x{c}/{g} {h}x{w} silu {then_silu}: {d}");
            }
        }
    }
}
