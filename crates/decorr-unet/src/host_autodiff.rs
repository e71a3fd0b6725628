//! The host kernels ([`crate::kernels`]) under burn's autodiff on flex, for training through the
//! UNet (DisenDiff; Attend-and-Excite's latent gradient): a backend extension
//! ([`HostKernels`]) whose flex arm runs the kernel and whose autodiff arm records a
//! hand-written backward step. Without it, autodiff on flex runs a 3x3 convolution as im2col +
//! GEMM and its input gradient as a transposed convolution, attention as separate matmul, exp,
//! sum and divide passes (each with its own backward), a linear map as a GEMM plus a bias pass,
//! and the norms and GEGLU as a dozen element-wise ops each way.
//!
//! Here: a convolution's input gradient is the same padded-copy-and-nine-GEMMs kernel as its
//! forward, reading the weight's cached split per tap transposed and in reverse tap order;
//! attention's backward recomputes each block of probabilities from q and k (nothing `n x m`
//! is kept between forward and backward) and produces dq, dk, dv with five GEMMs per block; a
//! linear map's input gradient is the same row-tiled GEMM with the weight read transposed; the
//! norms' and GEGLU's backward are one or two passes over their input.
//!
//! Weights (convolution and linear weights and biases, norm scales and shifts) are constants
//! here: the callers keep burn's path when one of them requires a gradient (DisenDiff's trained
//! k/v projections), so only the input's gradient is computed, and a convolution keeps only
//! its weight for the backward, not its input.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNorm, Linear};
use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::kernels::{self, OutPtr};

/// Host kernels as backend operations, so that autodiff can record them.
#[backend_extension(Flex, Autodiff)]
pub trait HostKernels: Backend {
    /// A 3x3, stride 1, padding 1 convolution of `x` `[b, ci, h, w]` enlarged `up` times
    /// (nearest neighbour), `weight` `[co, ci, 3, 3]`, `bias` `[co]`.
    fn conv3x3(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        up: usize,
    ) -> FloatTensor<Self>;

    /// A linear map of `x` `[b, n, k]` with `weight` `[k, o]` (either layout) plus `bias`
    /// `[o]`, or no bias when `bias` is empty (the extension macro does not route optional
    /// tensors).
    fn linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// Layer norm over the last dimension of `x` `[b, n, d]`, no shift when `beta` is empty.
    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;

    /// GEGLU's gate: `[a | g]` `[b, n, 2i]` to `a * gelu(g)` `[b, n, i]`.
    fn geglu(h: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Multi-head attention, `q` `[b, n, heads * d]`, `k`, `v` `[b, m, heads * d]`.
    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;

    /// Group norm of `x` `[b, c, h, w]` (SiLU after when `silu`).
    fn group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self>;
}

/// `t`'s f32 elements in order (copied only when `t` is not already contiguous).
fn values(t: FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

/// A 3x3 convolution weight as [`kernels::conv3x3_cached`] reads it: stored split per tap
/// (`crate::host::store_taps`) as it is, anything else contiguous.
fn conv_weight(w: FlexTensor) -> FlexTensor {
    let shape = w.layout().shape();
    let (co, ci) = (shape[0], shape[1]);
    if kernels::taps_in_place(&w, co, ci).is_some() {
        w
    } else {
        values(w)
    }
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

fn flex(data: Vec<f32>, shape: impl Into<burn::tensor::Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape.into()))
}

impl HostKernels for Flex {
    fn conv3x3(x: FlexTensor, weight: FlexTensor, bias: FlexTensor, up: usize) -> FlexTensor {
        let (x, weight, bias) = (values(x), conv_weight(weight), values(bias));
        let [b, ci, h, w] = dims4(&x);
        let co = weight.layout().shape()[0];
        let out = kernels::conv3x3_cached(
            slice(&x),
            &weight,
            Some(slice(&bias)),
            [b, ci, h, w],
            co,
            up,
        );
        flex(out, [b, co, h * up, w * up])
    }

    fn linear(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let x = values(x);
        let [b, n, k] = dims3(&x);
        let (w, strides) = kernels::strided_weight(&weight, k).expect("a [k, o] f32 weight");
        let o = weight.layout().shape()[1];
        let bias = (bias.layout().num_elements() > 0).then(|| values(bias));
        let out = kernels::linear_rows(
            slice(&x),
            w,
            strides,
            bias.as_ref().map(slice),
            [b * n, k, o],
        );
        flex(out, [b, n, o])
    }

    fn layer_norm(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, eps: f64) -> FlexTensor {
        let [b, n, d] = dims3(&x);
        let mut data = slice(&values(x)).to_vec();
        let gamma = values(gamma);
        let beta = (beta.layout().num_elements() > 0).then(|| values(beta));
        kernels::layer_norm_in_place(&mut data, slice(&gamma), beta.as_ref().map(slice), d, eps);
        flex(data, [b, n, d])
    }

    fn geglu(h: FlexTensor) -> FlexTensor {
        let h = values(h);
        let [b, n, two] = dims3(&h);
        flex(kernels::geglu_rows(slice(&h), two / 2), [b, n, two / 2])
    }

    fn attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, heads: usize) -> FlexTensor {
        let (q, k, v) = (values(q), values(k), values(v));
        let [b, n, inner] = dims3(&q);
        let m = k.layout().shape()[1];
        let out =
            kernels::attention_heads(slice(&q), slice(&k), slice(&v), [b, n, m, inner], heads);
        flex(out, [b, n, inner])
    }

    fn group_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FlexTensor {
        let [b, c, h, w] = dims4(&x);
        let mut data = slice(&values(x)).to_vec();
        let (gamma, beta) = (values(gamma), values(beta));
        kernels::group_norm_in_place(
            &mut data,
            slice(&gamma),
            slice(&beta),
            [b, c, h * w],
            groups,
            eps,
            silu,
        );
        flex(data, [b, c, h, w])
    }
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let s = t.layout().shape();
    [s[0], s[1], s[2], s[3]]
}

fn dims3(t: &FlexTensor) -> [usize; 3] {
    let s = t.layout().shape();
    [s[0], s[1], s[2]]
}

/// The backward step of an operation whose only tracked input is its first: the function
/// from the kept state and the output's gradient (contiguous) to the input's gradient.
struct InputBackward<S>(fn(S, &[f32]) -> FlexTensor);

impl<S> std::fmt::Debug for InputBackward<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InputBackward")
    }
}

impl<S: Clone + Send + std::fmt::Debug + 'static> Backward<Flex, 1> for InputBackward<S> {
    type State = S;

    fn backward(self, ops: Ops<S, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = values(grads.consume::<Flex>(&ops.node));
        if let Some(node) = node {
            grads.register::<Flex>(node.id, (self.0)(ops.state, slice(&grad)));
        }
    }
}

/// `forward(x)` recorded with the backward step `grad`, which gets `keep(x)` (computed only
/// when `x` is tracked) and the output's gradient.
fn record<C: CheckpointStrategy, S: Clone + Send + std::fmt::Debug + 'static>(
    x: FloatTensor<Autodiff<Flex, C>>,
    keep: impl FnOnce(&FlexTensor) -> S,
    forward: impl FnOnce(FlexTensor) -> FlexTensor,
    grad: fn(S, &[f32]) -> FlexTensor,
) -> FloatTensor<Autodiff<Flex, C>> {
    match InputBackward(grad)
        .prepare::<C>([x.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let x = values(x.into_primitive());
            let state = keep(&x);
            prep.finish(state, forward(x))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.into_primitive())),
    }
}

impl<C: CheckpointStrategy> HostKernels for Autodiff<Flex, C> {
    fn conv3x3(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        up: usize,
    ) -> FloatTensor<Self> {
        let (weight, bias) = (conv_weight(weight.into_primitive()), bias.into_primitive());
        let kept = weight.clone();
        record::<C, _>(
            x,
            // Only the weight: the input gradient does not need the input.
            |x| (kept, dims4(x), up),
            |x| Flex::conv3x3(x, weight, bias, up),
            |(weight, dims, up), dy| {
                let co = weight.layout().shape()[0];
                flex(kernels::conv3x3_input_grad(dy, &weight, dims, co, up), dims)
            },
        )
    }

    fn linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (weight, bias) = (weight.into_primitive(), bias.into_primitive());
        let kept = weight.clone();
        record::<C, _>(
            x,
            |x| (kept, dims3(x)),
            |x| Flex::linear(x, weight, bias),
            |(weight, [b, n, k]), dy| {
                let (w, [rs, cs]) =
                    kernels::strided_weight(&weight, k).expect("the forward's weight");
                let o = weight.layout().shape()[1];
                // dx = dy W^T: the weight read as `[o, k]` through swapped strides.
                flex(
                    kernels::linear_rows(dy, w, [cs, rs], None, [b * n, o, k]),
                    [b, n, k],
                )
            },
        )
    }

    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        let (gamma, beta) = (values(gamma.into_primitive()), beta.into_primitive());
        let kept = gamma.clone();
        record::<C, _>(
            x,
            |x| (x.clone(), kept, eps),
            |x| Flex::layer_norm(x, gamma, beta, eps),
            |(x, gamma, eps), dy| {
                let dims = dims3(&x);
                let dx = layer_norm_backward(slice(&x), slice(&gamma), dy, dims[2], eps);
                flex(dx, dims)
            },
        )
    }

    fn geglu(h: FloatTensor<Self>) -> FloatTensor<Self> {
        record::<C, _>(h, FlexTensor::clone, Flex::geglu, |h, dy| {
            let dims = dims3(&h);
            flex(geglu_backward(slice(&h), dy, dims[2] / 2), dims)
        })
    }

    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AttentionBackward;

        impl Backward<Flex, 3> for AttentionBackward {
            /// q, k, v and the number of heads.
            type State = (FlexTensor, FlexTensor, FlexTensor, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [nq, nk, nv] = ops.parents;
                let grad = values(grads.consume::<Flex>(&ops.node));
                let (q, k, v, heads) = ops.state;
                let [b, n, inner] = dims3(&q);
                let m = k.layout().shape()[1];
                let (dq, dk, dv) = attention_backward(
                    slice(&q),
                    slice(&k),
                    slice(&v),
                    slice(&grad),
                    [b, n, m, inner],
                    heads,
                );
                for (node, d, len) in [(nq, dq, n), (nk, dk, m), (nv, dv, m)] {
                    if let Some(node) = node {
                        grads.register::<Flex>(node.id, flex(d, [b, len, inner]));
                    }
                }
            }
        }

        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (
                    values(q.into_primitive()),
                    values(k.into_primitive()),
                    values(v.into_primitive()),
                );
                let out = Flex::attention(q.clone(), k.clone(), v.clone(), heads);
                prep.finish((q, k, v, heads), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::attention(
                q.into_primitive(),
                k.into_primitive(),
                v.into_primitive(),
                heads,
            )),
        }
    }

    fn group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        let (gamma, beta) = (
            values(gamma.into_primitive()),
            values(beta.into_primitive()),
        );
        let kept = (gamma.clone(), beta.clone());
        record::<C, _>(
            x,
            |x| (x.clone(), kept, (groups, eps, silu)),
            |x| Flex::group_norm(x, gamma, beta, groups, eps, silu),
            |(x, (gamma, beta), (groups, eps, silu)), dy| {
                let [b, c, h, w] = dims4(&x);
                let dx = group_norm_backward(
                    slice(&x),
                    slice(&gamma),
                    slice(&beta),
                    dy,
                    [b, c, h * w],
                    groups,
                    eps,
                    silu,
                );
                flex(dx, [b, c, h, w])
            },
        )
    }
}

/// Whether `t` is an f32 autodiff tensor on flex (the tensors [`HostKernels`] takes).
fn traced_on_flex<const D: usize>(t: &Tensor<D>) -> bool {
    kernels::enabled()
        && t.is_autodiff()
        && t.dtype() == DType::F32
        && t.device().inner() == Device::flex()
}

/// Whether the parameter value `t` can be a constant of [`HostKernels`]: f32 on flex, no
/// gradient asked, and contiguous from its buffer's start (so that a convolution weight's
/// split per tap is cached under a stable buffer).
fn constant<const D: usize>(t: &Tensor<D>) -> bool {
    constant_where(t, |p| p.is_contiguous() && p.layout().start_offset() == 0)
}

/// Whether `t` is an f32 flex parameter value without a gradient whose flex tensor passes `ok`.
fn constant_where<const D: usize>(t: &Tensor<D>, ok: impl FnOnce(&FlexTensor) -> bool) -> bool {
    !t.is_require_grad()
        && t.dtype() == DType::F32
        && t.clone()
            .inner()
            .try_into_primitive::<Flex>()
            .is_ok_and(|p| ok(&p))
}

/// [`crate::host::linear`] of an autodiff tensor; `None` where the host kernels do not apply.
pub fn linear(lin: &Linear, x: &Tensor<3>) -> Option<Tensor<3>> {
    linear_of(x, lin.weight.val(), lin.bias.as_ref().map(|b| b.val()))
}

/// A 1x1 convolution (`proj_in`/`proj_out` of SD 1.x) of an autodiff tensor whose pixels are
/// a sequence, `seq` `[b, h * w, ci]`: the linear map with the weight `[co, ci, 1, 1]` read as
/// `[ci, co]`. `None` where the host kernels do not apply.
pub fn conv1x1_seq(conv: &Conv2d, seq: &Tensor<3>) -> Option<Tensor<3>> {
    let [co, ci, kh, kw] = conv.weight.dims();
    let plain = [kh, kw] == [1, 1]
        && conv.stride == [1, 1]
        && conv.dilation == [1, 1]
        && conv.groups == 1
        && matches!(
            conv.padding,
            PaddingConfig2d::Explicit(0, 0, 0, 0) | PaddingConfig2d::Valid
        );
    if !plain || seq.dims()[2] != ci {
        return None;
    }
    let weight = conv.weight.val().reshape([co, ci]).swap_dims(0, 1);
    linear_of(seq, weight, conv.bias.as_ref().map(|b| b.val()))
}

/// `x` `[b, n, k]` times `weight` `[k, o]` plus `bias` through [`HostKernels::linear`].
fn linear_of(x: &Tensor<3>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Option<Tensor<3>> {
    if !traced_on_flex(x) {
        return None;
    }
    let k = x.dims()[2];
    if !constant_where(&weight, |w| kernels::strided_weight(w, k).is_some())
        || !bias.as_ref().is_none_or(constant)
    {
        return None;
    }
    let bias = bias.unwrap_or_else(|| Tensor::empty([0], &Device::flex()));
    Some(Tensor::from_dispatch(<Dispatch as HostKernels>::linear(
        x.clone().into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    )))
}

/// [`crate::host::conv2d`] (`up` 1) or [`crate::host::conv2d_upsampled`] (`up` 2) of an
/// autodiff tensor; `None` where the host kernels do not apply.
pub fn conv3x3(conv: &Conv2d, x: &Tensor<4>, up: usize) -> Option<Tensor<4>> {
    if !traced_on_flex(x) || !kernels::conv3x3_fits(conv) {
        return None;
    }
    let (weight, bias) = (conv.weight.val(), conv.bias.as_ref()?.val());
    let [co, ci, _, _] = weight.dims();
    let split_or_plain = |p: &FlexTensor| {
        (p.is_contiguous() && p.layout().start_offset() == 0)
            || kernels::taps_in_place(p, co, ci).is_some()
    };
    if !constant_where(&weight, split_or_plain) || !constant(&bias) || x.dims()[1] != ci {
        return None;
    }
    Some(Tensor::from_dispatch(<Dispatch as HostKernels>::conv3x3(
        x.clone().into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        up,
    )))
}

/// [`crate::host::layer_norm`] of an autodiff tensor; `None` where the host kernels do not apply.
pub fn layer_norm(norm: &LayerNorm, x: &Tensor<3>, eps: f64) -> Option<Tensor<3>> {
    let gamma = norm.gamma.val();
    let beta = norm.beta.as_ref().map(|b| b.val());
    if !traced_on_flex(x) || !constant(&gamma) || !beta.as_ref().is_none_or(constant) {
        return None;
    }
    let beta = beta.unwrap_or_else(|| Tensor::empty([0], &Device::flex()));
    Some(Tensor::from_dispatch(
        <Dispatch as HostKernels>::layer_norm(
            x.clone().into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            eps,
        ),
    ))
}

/// [`crate::host::geglu`] of an autodiff tensor; `None` where the host kernels do not apply.
pub fn geglu(h: &Tensor<3>) -> Option<Tensor<3>> {
    (traced_on_flex(h) && h.dims()[2].is_multiple_of(2))
        .then(|| Tensor::from_dispatch(<Dispatch as HostKernels>::geglu(h.clone().into_dispatch())))
}

/// [`crate::host::attention`] of autodiff tensors; `None` where the host kernels do not apply.
pub fn attention(q: &Tensor<3>, k: &Tensor<3>, v: &Tensor<3>, heads: usize) -> Option<Tensor<3>> {
    let [b, n, inner] = q.dims();
    let m = k.dims()[1];
    let fits = [q, k, v].iter().all(|t| traced_on_flex(t))
        && k.dims() == [b, m, inner]
        && v.dims() == [b, m, inner]
        && heads > 0
        && inner % heads == 0
        && n > 0
        && m > 0;
    fits.then(|| {
        Tensor::from_dispatch(<Dispatch as HostKernels>::attention(
            q.clone().into_dispatch(),
            k.clone().into_dispatch(),
            v.clone().into_dispatch(),
            heads,
        ))
    })
}

/// [`crate::host::group_norm`] of an autodiff tensor; `None` where the host kernels do not apply.
pub fn group_norm(norm: &GroupNorm, x: &Tensor<4>, then_silu: bool) -> Option<Tensor<4>> {
    if !traced_on_flex(x) || !norm.affine {
        return None;
    }
    let (gamma, beta) = (norm.gamma.as_ref()?.val(), norm.beta.as_ref()?.val());
    if !constant(&gamma) || !constant(&beta) {
        return None;
    }
    Some(Tensor::from_dispatch(
        <Dispatch as HostKernels>::group_norm(
            x.clone().into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            norm.num_groups,
            norm.epsilon,
            then_silu,
        ),
    ))
}

/// The gradients of [`kernels::attention_heads`] with respect to `q`, `k` and `v`, given the
/// output's gradient `dout` (`[b, n, heads * d]`). One job per head of an image; for each
/// block of query rows it recomputes the probabilities `P` (scores GEMM and exact softmax, as
/// the forward), then `dV += P^T dO`, `dP = dO V^T`, `dS = P (dP - rowsum(P dP)) / sqrt(d)`,
/// `dQ = dS K` and `dK += dS^T Q`, reading and writing the heads in place through strides.
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    [b, n, m, inner]: [usize; 4],
    heads: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(heads > 0 && inner % heads == 0, "attention backward: heads");
    assert_eq!(q.len(), b * n * inner, "attention backward: query size");
    assert_eq!(
        dout.len(),
        b * n * inner,
        "attention backward: gradient size"
    );
    assert_eq!(k.len(), b * m * inner, "attention backward: key size");
    assert_eq!(v.len(), b * m * inner, "attention backward: value size");
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; b * n * inner],
        vec![0f32; b * m * inner],
        vec![0f32; b * m * inner],
    );
    if n == 0 || m == 0 || inner == 0 {
        return (dq, dk, dv);
    }
    let d = inner / heads;
    let scale = (d as f32).powf(-0.5);
    let rows = kernels::attention_rows(m).min(n);
    let jobs = b * heads;
    let par = if jobs < rayon::current_num_threads() {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let (dq_p, dk_p, dv_p) = (
        OutPtr(dq.as_mut_ptr()),
        OutPtr(dk.as_mut_ptr()),
        OutPtr(dv.as_mut_ptr()),
    );
    let (inner_s, m_s) = (inner as isize, m as isize);
    (0..jobs).into_par_iter().for_each_init(
        || (vec![0f32; rows * m], vec![0f32; rows * m]),
        |(p, dp), job| {
            let (img, h) = (job / heads, job % heads);
            let (qh, doh) = (
                &q[img * n * inner + h * d..],
                &dout[img * n * inner + h * d..],
            );
            let (kh, vh) = (&k[img * m * inner + h * d..], &v[img * m * inner + h * d..]);
            let dkh = dk_p.at(img * m * inner + h * d);
            let dvh = dv_p.at(img * m * inner + h * d);
            for r0 in (0..n).step_by(rows) {
                let nr = rows.min(n - r0);
                let (p, dp) = (&mut p[..nr * m], &mut dp[..nr * m]);
                let (qb, dob) = (&qh[r0 * inner..], &doh[r0 * inner..]);
                let dqb = dq_p.at((img * n + r0) * inner + h * d);
                // SAFETY (all GEMMs below): the head's rows of q, dO (`nr x d` blocks), k, v
                // (`m x d`) are read with row stride `inner` inside their slices; `p`, `dp`
                // are `nr x m` row-major; this job alone writes head `h` of image `img` in
                // dq, dk and dv (column block `h * d..`, row stride `inner`).
                unsafe {
                    // P = softmax(scale Q K^T).
                    gemm::gemm(
                        nr,
                        m,
                        d,
                        p.as_mut_ptr(),
                        1,
                        m_s,
                        false,
                        qb.as_ptr(),
                        1,
                        inner_s,
                        kh.as_ptr(),
                        inner_s,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        par,
                    );
                }
                for row in p.chunks_exact_mut(m) {
                    let inv = 1.0 / kernels::softmax_numerators(row);
                    row.iter_mut().for_each(|e| *e *= inv);
                }
                unsafe {
                    // dV += P^T dO.
                    gemm::gemm(
                        m,
                        d,
                        nr,
                        dvh,
                        1,
                        inner_s,
                        r0 > 0,
                        p.as_ptr(),
                        m_s,
                        1,
                        dob.as_ptr(),
                        1,
                        inner_s,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                    // dP = dO V^T.
                    gemm::gemm(
                        nr,
                        m,
                        d,
                        dp.as_mut_ptr(),
                        1,
                        m_s,
                        false,
                        dob.as_ptr(),
                        1,
                        inner_s,
                        vh.as_ptr(),
                        inner_s,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                }
                for (prow, dprow) in p.chunks_exact(m).zip(dp.chunks_exact_mut(m)) {
                    let dot: f32 = prow.iter().zip(dprow.iter()).map(|(a, b)| a * b).sum();
                    for (g, &pv) in dprow.iter_mut().zip(prow) {
                        *g = pv * (*g - dot) * scale;
                    }
                }
                unsafe {
                    // dQ = dS K.
                    gemm::gemm(
                        nr,
                        d,
                        m,
                        dqb,
                        1,
                        inner_s,
                        false,
                        dp.as_ptr(),
                        1,
                        m_s,
                        kh.as_ptr(),
                        1,
                        inner_s,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                    // dK += dS^T Q.
                    gemm::gemm(
                        m,
                        d,
                        nr,
                        dkh,
                        1,
                        inner_s,
                        r0 > 0,
                        dp.as_ptr(),
                        m_s,
                        1,
                        qb.as_ptr(),
                        1,
                        inner_s,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                }
            }
        },
    );
    (dq, dk, dv)
}

/// The gradient of [`kernels::layer_norm_in_place`] with respect to its input (rows of `d`),
/// given the output's gradient `dy`: per row, with `x^ = (x - mean) rstd` and `g = dy gamma`,
/// `dx = rstd (g - mean(g) - x^ mean(g x^))`. Statistics in f64, as the forward.
pub fn layer_norm_backward(x: &[f32], gamma: &[f32], dy: &[f32], d: usize, eps: f64) -> Vec<f32> {
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "layer_norm backward: rows of d"
    );
    assert!(
        gamma.len() == d && dy.len() == x.len(),
        "layer_norm backward: sizes"
    );
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
        .for_each(|(dst, (row, g))| {
            let (mean, rstd) = kernels::group_stats(row, eps);
            let (mean, r) = (mean as f32, rstd as f32);
            let (mut sg, mut sgx) = (0f32, 0f32);
            for (((o, &xv), &gv), &gm) in dst.iter_mut().zip(row).zip(g).zip(gamma) {
                *o = gv * gm;
                sg += *o;
                sgx += *o * (xv - mean) * r;
            }
            let (a, bb) = (sg / d as f32, sgx / d as f32);
            for (o, &xv) in dst.iter_mut().zip(row) {
                *o = r * (*o - a - (xv - mean) * r * bb);
            }
        });
    dx
}

/// The gradient of [`kernels::geglu_rows`] with respect to its rows `[a | g]`, given the output's
/// gradient `dy`: `da = dy gelu(g)`, `dg = dy a gelu'(g)` with
/// `gelu'(g) = Phi(g) + g phi(g)` (the same erf as the forward).
pub fn geglu_backward(h: &[f32], dy: &[f32], half: usize) -> Vec<f32> {
    assert_eq!(h.len(), 2 * dy.len(), "geglu backward: sizes");
    let mut dh = vec![0f32; h.len()];
    if half == 0 {
        return dh;
    }
    dh.par_chunks_mut(2 * half)
        .zip(h.par_chunks(2 * half).zip(dy.par_chunks(half)))
        .for_each(|(dst, (row, d))| geglu_grad_row(dst, row, d));
    dh
}

/// One row of [`geglu_backward`].
fn geglu_grad_row(dst: &mut [f32], row: &[f32], d: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { geglu_grad_row_avx2(dst, row, d) };
    }
    geglu_grad_row_portable(dst, row, d);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn geglu_grad_row_avx2(dst: &mut [f32], row: &[f32], d: &[f32]) {
    geglu_grad_row_portable(dst, row, d);
}

#[inline(always)]
fn geglu_grad_row_portable(dst: &mut [f32], row: &[f32], d: &[f32]) {
    let inv_sqrt_2pi = 0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2;
    let half = d.len();
    let (a, g) = row.split_at(half);
    let (da, dg) = dst.split_at_mut(half);
    for i in 0..half {
        let (av, gv) = (a[i], g[i]);
        let cdf = 0.5 * (1.0 + kernels::erf(gv * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = inv_sqrt_2pi * kernels::exp(-0.5 * gv * gv);
        da[i] = d[i] * gv * cdf;
        dg[i] = d[i] * av * (cdf + gv * pdf);
    }
}

/// The gradient of [`kernels::group_norm_in_place`] with respect to its input `x` `[b, c, hw]`,
/// given the output's gradient `dz`: per group, with `x^ = (x - mean) rstd` and `g` the
/// gradient at `x^` (through SiLU when `silu`, times the scale),
/// `dx = rstd (g - mean(g) - x^ mean(g x^))`. Statistics in f64, as the forward.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dz: &[f32],
    [b, c, hw]: [usize; 3],
    groups: usize,
    eps: f64,
    silu: bool,
) -> Vec<f32> {
    assert_eq!(x.len(), b * c * hw, "group_norm backward: input size");
    assert_eq!(dz.len(), x.len(), "group_norm backward: gradient size");
    assert!(gamma.len() == c && beta.len() == c && groups > 0 && c % groups == 0);
    let mut dx = vec![0f32; x.len()];
    let cg = c / groups;
    let len = cg * hw;
    if len == 0 {
        return dx;
    }
    dx.par_chunks_mut(len).enumerate().for_each(|(i, dst)| {
        let (xs, dzs) = (&x[i * len..(i + 1) * len], &dz[i * len..(i + 1) * len]);
        let (mean, rstd) = kernels::group_stats(xs, eps);
        let c0 = (i % groups) * cg;
        let mean32 = mean as f32;
        let (mut sg, mut sgx) = (0f64, 0f64);
        for j in 0..cg {
            let gm = gamma[c0 + j];
            let scale = (rstd * gm as f64) as f32;
            let shift = (beta[c0 + j] as f64 - mean * rstd * gm as f64) as f32;
            let at = j * hw..(j + 1) * hw;
            let (xc, dzc, dc) = (&xs[at.clone()], &dzs[at.clone()], &mut dst[at]);
            let (mut s1, mut s2) = (0f32, 0f32);
            for ((d, &xv), &g) in dc.iter_mut().zip(xc).zip(dzc) {
                let dy = if silu {
                    let y = xv * scale + shift;
                    let s = 1.0 / (1.0 + kernels::exp(-y));
                    g * (s * (1.0 + y * (1.0 - s)))
                } else {
                    g
                };
                *d = dy * gm;
                s1 += *d;
                s2 += *d * (xv - mean32);
            }
            sg += s1 as f64;
            sgx += s2 as f64;
        }
        let a = sg / len as f64;
        let bb = rstd * sgx / len as f64;
        let (r, a, bb) = (rstd as f32, a as f32, bb as f32);
        for (d, &xv) in dst.iter_mut().zip(xs) {
            let xhat = (xv - mean32) * r;
            *d = r * (*d - a - xhat * bb);
        }
    });
    dx
}

#[cfg(test)]
mod tests {
    //! Each kernel's output and input gradients against burn's own ops under autodiff (whose
    //! gradients the DisenDiff parity tests check against PyTorch), for the loss
    //! `sum(f(inputs) * r)` with fixed `r`.
    use super::*;
    use crate::kernels::tests::{max_diff, values};
    use burn::module::{Module, Param};
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::{GroupNormConfig, PaddingConfig2d};
    use burn::tensor::activation::{silu, softmax};

    fn device() -> Device {
        Device::flex().autodiff()
    }

    /// `f`'s output and the gradients of `sum(f(xs) * r)` at each of `xs`.
    fn run<const D: usize, const E: usize, const N: usize>(
        xs: [Tensor<D>; N],
        r: &Tensor<E>,
        f: impl Fn([Tensor<D>; N]) -> Tensor<E>,
    ) -> (Tensor<E>, [Tensor<D>; N]) {
        let xs = xs.map(|x| x.require_grad());
        let y = f(xs.clone());
        let grads = (y.clone() * r.clone()).sum().backward();
        (y.inner(), xs.map(|x| x.grad(&grads).expect("a gradient")))
    }

    #[test]
    fn conv_gradient_matches_burn() {
        let device = device();
        // (batch, in, out, h, w): a channels-last split read transposed into a row-major
        // accumulator, and the other way round.
        for (b, ci, co, h, w) in [(2, 5, 7, 9, 11), (1, 3, 40, 2, 2), (1, 40, 3, 2, 2)] {
            let conv = Conv2dConfig::new([ci, co], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(&device)
                .no_grad();
            let x = values([b, ci, h, w], 4, 0.0, &device);
            for up in [1, 2] {
                let r = values([b, co, h * up, w * up], 5, 0.0, &device);
                let (y, [dx]) = run([x.clone()], &r, |[x]| {
                    conv3x3(&conv, &x, up).expect("the host kernel applies")
                });
                let (ry, [rdx]) = run([x.clone()], &r, |[x]| {
                    conv.forward(crate::blocks::nearest(x, h * up, w * up))
                });
                let (dy, dg) = (max_diff(y, ry), max_diff(dx, rdx));
                assert!(
                    dy < 1e-5 && dg < 1e-4,
                    "{b}x{ci}->{co} {h}x{w} up {up}: {dy} {dg}"
                );
            }
        }
    }

    /// A weight stored split per tap on flex (as loading leaves it), then moved to autodiff as
    /// training does, keeps the host kernel and its gradient.
    #[test]
    fn stored_taps_gradient_matches_burn() {
        let device = device();
        for (ci, co, hint) in [(5, 7, [9, 11]), (6, 40, [2, 2])] {
            let mut conv = Conv2dConfig::new([ci, co], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(&Device::flex());
            let plain = conv.clone().fork(&device).no_grad();
            crate::host::store_taps(&mut conv, hint);
            let conv = conv.fork(&device).no_grad();
            let w = conv
                .weight
                .val()
                .inner()
                .try_into_primitive::<Flex>()
                .ok()
                .unwrap();
            assert!(kernels::taps_in_place(&w, co, ci).is_some(), "still split");
            let x = values([2, ci, 9, 11], 4, 0.0, &device);
            let r = values([2, co, 9, 11], 5, 0.0, &device);
            let (y, [dx]) = run([x.clone()], &r, |[x]| {
                conv3x3(&conv, &x, 1).expect("the host kernel applies")
            });
            let (ry, [rdx]) = run([x], &r, |[x]| plain.forward(x));
            let (dy, dg) = (max_diff(y, ry), max_diff(dx, rdx));
            assert!(dy < 1e-4 && dg < 1e-4, "{ci}->{co}: {dy} {dg}");
        }
    }

    #[test]
    fn conv1x1_gradient_matches_burn() {
        let device = device();
        let (b, ci, co, h, w) = (2, 6, 5, 3, 4);
        let conv = Conv2dConfig::new([ci, co], [1, 1]).init(&device).no_grad();
        let x = values([b, ci, h, w], 1, 0.0, &device);
        let r = values([b, h * w, co], 2, 0.0, &device);
        let to_seq = |t: Tensor<4>, c| t.reshape([b, c, h * w]).swap_dims(1, 2);
        let (y, [dx]) = run([x.clone()], &r, |[x]| {
            conv1x1_seq(&conv, &to_seq(x, ci)).expect("the host kernel applies")
        });
        let (ry, [rdx]) = run([x], &r, |[x]| to_seq(conv.forward(x), co));
        let (dy, dg) = (max_diff(y, ry), max_diff(dx, rdx));
        assert!(dy < 1e-5 && dg < 1e-4, "{dy} {dg}");
    }

    #[test]
    fn layer_norm_and_geglu_gradients_match_burn() {
        let device = device();
        for (bias, d) in [(true, 7), (false, 40)] {
            let mut norm = burn::nn::LayerNormConfig::new(d)
                .with_epsilon(1e-5)
                .with_bias(bias)
                .init(&device);
            norm.gamma = Param::from_tensor(values([d], 1, 1.0, &device));
            if bias {
                norm.beta = Some(Param::from_tensor(values([d], 2, 0.0, &device)));
            }
            let norm = norm.no_grad();
            let x = values([2, 5, d], 3, 2.0, &device);
            let r = values([2, 5, d], 4, 0.0, &device);
            let (y, [dx]) = run([x.clone()], &r, |[x]| {
                layer_norm(&norm, &x, 1e-5).expect("the host kernel applies")
            });
            let (ry, [rdx]) = run([x], &r, |[x]| norm.forward(x));
            let (dy, dg) = (max_diff(y, ry), max_diff(dx, rdx));
            assert!(
                dy < 1e-5 && dg < 1e-4,
                "layer norm, bias {bias} d {d}: {dy} {dg}"
            );
        }
        let h = values([2, 7, 12], 5, 0.0, &device);
        let r = values([2, 7, 6], 6, 0.0, &device);
        let (y, [dh]) = run([h.clone()], &r, |[h]| {
            geglu(&h).expect("the host kernel applies")
        });
        let (ry, [rdh]) = run([h], &r, |[h]| {
            h.clone().narrow(2, 0, 6) * burn::tensor::activation::gelu(h.narrow(2, 6, 6))
        });
        let (dy, dg) = (max_diff(y, ry), max_diff(dh, rdh));
        assert!(dy < 1e-5 && dg < 1e-4, "geglu: {dy} {dg}");
    }

    #[test]
    fn linear_gradient_matches_burn() {
        let device = device();
        for (b, n, k, o, bias, layout) in [
            (2, 37, 5, 8, true, burn::nn::LinearLayout::Row),
            (1, 1100, 16, 3, false, burn::nn::LinearLayout::Row),
            (2, 9, 6, 4, true, burn::nn::LinearLayout::Col),
        ] {
            let lin = burn::nn::LinearConfig::new(k, o)
                .with_bias(bias)
                .with_layout(layout)
                .init(&device)
                .no_grad();
            let x = values([b, n, k], 1, 0.0, &device);
            let r = values([b, n, o], 2, 0.0, &device);
            let (y, [dx]) = run([x.clone()], &r, |[x]| {
                linear(&lin, &x).expect("the host kernel applies")
            });
            let (ry, [rdx]) = run([x], &r, |[x]| lin.forward(x));
            let (dy, dg) = (max_diff(y, ry), max_diff(dx, rdx));
            assert!(dy < 1e-5 && dg < 1e-4, "{b}x{n}x{k}->{o}: {dy} {dg}");
        }
    }

    /// burn's multi-head attention, as the UNet computes it without the host kernels.
    fn burn_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
        let [b, n, inner] = q.dims();
        let m = k.dims()[1];
        let d = inner / heads;
        let split = |t: Tensor<3>, len: usize| t.reshape([b, len, heads, d]).swap_dims(1, 2);
        let s = split(q, n)
            .matmul(split(k, m).swap_dims(2, 3))
            .mul_scalar((d as f64).powf(-0.5));
        softmax(s, 3)
            .matmul(split(v, m))
            .swap_dims(1, 2)
            .reshape([b, n, inner])
    }

    #[test]
    fn attention_gradients_match_burn() {
        let device = device();
        // (batch, queries, keys, width, heads); 600 queries against 3 keys are two blocks of
        // rows, whose dk and dv accumulate.
        for (b, n, m, inner, heads) in [(2, 7, 5, 12, 3), (1, 600, 3, 4, 2), (2, 9, 9, 8, 1)] {
            let q = values([b, n, inner], 1, 0.0, &device);
            let k = values([b, m, inner], 2, 0.0, &device);
            let v = values([b, m, inner], 3, 0.0, &device);
            let r = values([b, n, inner], 4, 0.0, &device);
            let (y, g) = run([q.clone(), k.clone(), v.clone()], &r, |[q, k, v]| {
                attention(&q, &k, &v, heads).expect("the host kernel applies")
            });
            let (ry, rg) = run([q, k, v], &r, |[q, k, v]| burn_attention(q, k, v, heads));
            let dy = max_diff(y, ry);
            assert!(dy < 1e-5, "{b}x{n}x{m}x{inner}/{heads}: output {dy}");
            for (name, (g, rg)) in ["q", "k", "v"].iter().zip(g.into_iter().zip(rg)) {
                let d = max_diff(g, rg);
                assert!(d < 1e-4, "{b}x{n}x{m}x{inner}/{heads}: d{name} {d}");
            }
        }
    }

    #[test]
    fn group_norm_gradient_matches_burn() {
        let device = device();
        for (b, c, h, w, groups) in [(2, 6, 3, 4, 3), (1, 8, 5, 5, 8), (1, 4, 1, 1, 1)] {
            let mut norm = GroupNormConfig::new(groups, c).init(&device);
            norm.gamma = Some(Param::from_tensor(values([c], 6, 1.0, &device)));
            norm.beta = Some(Param::from_tensor(values([c], 7, 0.0, &device)));
            let norm = norm.no_grad();
            // A mean well away from zero, as after a residual sum.
            let x = values([b, c, h, w], 8, 3.0, &device);
            let r = values([b, c, h, w], 9, 0.0, &device);
            for then_silu in [false, true] {
                let (y, [dx]) = run([x.clone()], &r, |[x]| {
                    group_norm(&norm, &x, then_silu).expect("the host kernel applies")
                });
                let (ry, [rdx]) = run([x.clone()], &r, |[x]| {
                    let y = norm.forward(x);
                    if then_silu { silu(y) } else { y }
                });
                let (dy, dg) = (max_diff(y, ry), max_diff(dx, rdx));
                assert!(
                    dy < 1e-5 && dg < 1e-4,
                    "{b}x{c}x{h}x{w}/{groups} silu {then_silu}: {dy} {dg}"
                );
            }
        }
    }

    #[test]
    fn weights_that_require_a_gradient_keep_burns_path() {
        let device = device();
        let conv = Conv2dConfig::new([2, 2], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let x = values([1, 2, 4, 4], 1, 0.0, &device);
        assert!(conv.weight.val().is_require_grad());
        assert!(conv3x3(&conv, &x, 1).is_none());
        assert!(conv3x3(&conv.no_grad(), &x, 1).is_some());
        // Tensors outside autodiff take the inference kernels instead.
        let plain = values([1, 2, 4, 4], 1, 0.0, &Device::flex());
        assert!(
            attention(
                &plain.clone().reshape([1, 16, 2]),
                &plain.clone().reshape([1, 16, 2]),
                &plain.reshape([1, 16, 2]),
                1
            )
            .is_none()
        );
    }
}
