//! Fast paths for burn's LibTorch backend (`tch` feature): the operations that burn-tch
//! decomposes into chains of element-wise kernels, handed to torch's own fused kernels as
//! diffusers calls them. burn-tch has no group norm or SiLU op (burn's `GroupNorm` is about ten
//! passes), runs a linear map as a matmul and a separate bias add (torch: one `addmm`), GEGLU as
//! two copies, a gelu and a product, and attention only after splitting heads into contiguous
//! copies (torch's SDPA reads the heads through strides). Here each is one torch call, on
//! tensors outside autodiff (inference); under autodiff burn's path records its own backward.
//!
//! Half precision: torch's kernels accumulate half inputs in f32 (as diffusers' fp16 runs
//! rely on), so a norm's f32 parameters are cast to the input's dtype instead of the input to
//! f32. `DECORR_HOST_KERNELS=0` turns these paths off too.

// burn-tch is deprecated upstream in favour of cubecl; decorr uses it on purpose (PyTorch's kernels).
#![allow(deprecated)]

use burn::backend::LibTorch;
use burn::backend::libtorch::TchTensor;
use burn::nn::{GroupNorm, Linear};
use burn::tensor::Tensor;

/// The torch tensor behind `t` when it is a LibTorch tensor outside autodiff (a shallow
/// handle: no copy).
fn torch<const D: usize>(t: &Tensor<D>) -> Option<tch::Tensor> {
    if !crate::kernels::enabled() || t.is_autodiff() {
        return None;
    }
    t.clone()
        .try_into_primitive::<LibTorch>()
        .ok()
        .map(|p| p.tensor)
}

fn wrap<const D: usize>(t: tch::Tensor) -> Tensor<D> {
    Tensor::from_primitive::<LibTorch>(TchTensor::new(t))
}

/// `norm(x)` (then SiLU when `then_silu`) as torch's `group_norm` (+ `silu_` in place).
pub fn group_norm(norm: &GroupNorm, x: &Tensor<4>, then_silu: bool) -> Option<Tensor<4>> {
    let xt = torch(x)?;
    let kind = xt.kind();
    let param = |p: Option<&burn::module::Param<Tensor<1>>>| -> Option<Option<tch::Tensor>> {
        match p {
            Some(p) => Some(Some(torch(&p.val())?.to_kind(kind))),
            None => Some(None),
        }
    };
    let (gamma, beta) = (param(norm.gamma.as_ref())?, param(norm.beta.as_ref())?);
    let mut y = xt.group_norm(
        norm.num_groups as i64,
        gamma.as_ref(),
        beta.as_ref(),
        norm.epsilon,
        true,
    );
    if then_silu {
        let _ = y.silu_();
    }
    Some(wrap(y))
}

/// `lin.forward(x)` as torch's `linear` (one GEMM with the bias fused). burn keeps the weight
/// `[in, out]`; its transpose is the `[out, in]` view torch's `linear` takes (no copy).
pub fn linear(lin: &Linear, x: &Tensor<3>) -> Option<Tensor<3>> {
    let xt = torch(x)?;
    let w = torch(&lin.weight.val())?;
    let b = match &lin.bias {
        Some(b) => Some(torch(&b.val())?),
        None => None,
    };
    Some(wrap(xt.linear(&w.tr(), b.as_ref())))
}

/// GEGLU's gate `a * gelu(g)` of the halves of `h` `[b, n, 2i]`, read as views (diffusers'
/// `hidden_states.chunk(2, dim=-1)`).
pub fn geglu(h: &Tensor<3>) -> Option<Tensor<3>> {
    let ht = torch(h)?;
    if ht.size().last().is_none_or(|s| s % 2 != 0) {
        return None;
    }
    let halves = ht.chunk(2, -1);
    Some(wrap(&halves[0] * halves[1].gelu("none")))
}

/// Multi-head `softmax(q k^T / sqrt(d)) v` for `q` `[b, n, heads * d]`, `k`, `v`
/// `[b, m, heads * d]` as one SDPA call on strided head views (flash or memory-efficient
/// attention on CUDA); returns `[b, n, heads * d]`.
pub fn attention(q: &Tensor<3>, k: &Tensor<3>, v: &Tensor<3>, heads: usize) -> Option<Tensor<3>> {
    let (qt, kt, vt) = (torch(q)?, torch(k)?, torch(v)?);
    let [b, n, inner] = q.dims();
    let m = k.dims()[1];
    if heads == 0 || inner % heads != 0 || k.dims() != [b, m, inner] || v.dims() != [b, m, inner] {
        return None;
    }
    let d = (inner / heads) as i64;
    let split = |t: &tch::Tensor, len: usize| {
        t.reshape([b as i64, len as i64, heads as i64, d])
            .transpose(1, 2)
    };
    let o = tch::Tensor::scaled_dot_product_attention(
        &split(&qt, n),
        &split(&kt, m),
        &split(&vt, m),
        None::<tch::Tensor>,
        0.0,
        false,
        None,
        false,
    );
    Some(wrap(o.transpose(1, 2).reshape([
        b as i64,
        n as i64,
        inner as i64,
    ])))
}
