//! torch's AdamW (`torch.optim.AdamW`, single-tensor path: decoupled decay, bias-corrected
//! moments) as one fused pass per parameter on the host. burn's AdamW computes the same update
//! through a dozen element-wise tensor ops, each a full pass over memory; on a CPU device those
//! passes were most of a fine-tuning step over ~80M parameters. LibTorch's CPU tensors (`tch`
//! feature) are updated through their data pointers, the parameter into a fresh tensor (the
//! old one may be shared by a kept snapshot). Devices whose tensors do not live in host memory
//! keep burn's optimiser ([`crate::finetune`] picks).

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use rayon::prelude::*;

/// Optimiser state: the step count and each parameter's first and second moments.
pub struct HostAdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    step: i32,
    moments: HashMap<ParamId, (Vec<f32>, Vec<f32>)>,
}

/// Elements per parallel chunk: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 16;

impl HostAdamW {
    pub fn new(beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Self {
        HostAdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// Optimiser steps taken so far.
    pub fn steps(&self) -> i32 {
        self.step
    }

    /// The first and second moments of parameter `id`, if it has taken a step (for saving a
    /// resumable state).
    pub fn moments(&self, id: &ParamId) -> Option<(&[f32], &[f32])> {
        self.moments
            .get(id)
            .map(|(m, v)| (m.as_slice(), v.as_slice()))
    }

    /// Restores a saved state: the step count and the moments of each parameter by id.
    pub fn restore(&mut self, steps: i32, moments: Vec<(ParamId, Vec<f32>, Vec<f32>)>) {
        self.step = steps;
        self.moments = moments.into_iter().map(|(id, m, v)| (id, (m, v))).collect();
    }

    /// Applies one step to every parameter of `module` that has a gradient in `grads`.
    /// Returns `None` (the caller reports a non-finite gradient) if any gradient element is not
    /// finite; the update is computed in the same pass, so the module is then not usable.
    pub fn step<M: Module>(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> Option<M> {
        self.step += 1;
        let mut mapper = StepMapper {
            opt: self,
            grads: &mut grads,
            lr,
            finite: true,
        };
        let module = module.map(&mut mapper);
        mapper.finite.then_some(module)
    }
}

struct StepMapper<'a> {
    opt: &'a mut HostAdamW,
    grads: &'a mut GradientsParams,
    lr: f64,
    finite: bool,
}

impl ModuleMapper for StepMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let inner = tensor.inner();
        #[cfg(feature = "tch")]
        let (inner, grad) = match torch_cpu::update(self, id, inner, grad) {
            Ok(updated) => return self.wrap(id, updated, require_grad, mapper),
            Err(unchanged) => unchanged,
        };
        let device = inner.device();
        // Unique tensors move out of flex without a copy; parameters are f32 (cast on load).
        let mut p = inner.into_data().convert::<f32>();
        let g = grad.into_data().convert::<f32>();
        let g = g.as_slice::<f32>().expect("f32 gradient");
        let ps = p.as_mut_slice::<f32>().expect("f32 parameter");
        self.update(id, None, ps, g);
        self.wrap(id, Tensor::from_data(p, &device), require_grad, mapper)
    }
}

impl StepMapper<'_> {
    /// One AdamW step of parameter `id` with gradient `g`: its values are read from `from`, or
    /// from `ps` itself when `from` is `None`, and written to `ps`. Moments are created at zero
    /// on the first step. Records whether every gradient element was finite.
    fn update(&mut self, id: ParamId, from: Option<&[f32]>, ps: &mut [f32], g: &[f32]) {
        let n = ps.len();
        let o = &mut *self.opt;
        // Scalars as torch forms them (python floats), cast once to the tensor's f32.
        let decay = (1.0 - self.lr * o.weight_decay as f64) as f32;
        let (b1, b2) = (o.beta1 as f64, o.beta2 as f64);
        let one_minus_b1 = (1.0 - b1) as f32;
        let one_minus_b2 = (1.0 - b2) as f32;
        let step_size = (self.lr / (1.0 - b1.powi(o.step))) as f32;
        let bc2_sqrt = ((1.0 - b2.powi(o.step)).sqrt()) as f32;
        let (beta2, eps) = (o.beta2, o.eps);
        let (m, v) = o
            .moments
            .entry(id)
            .or_insert_with(|| (vec![0.0; n], vec![0.0; n]));
        let kernel =
            |p0: Option<&[f32]>, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
                let mut finite = true;
                for i in 0..p.len() {
                    let gi = g[i];
                    finite &= gi.is_finite();
                    let pi = p0.map_or(p[i], |p0| p0[i]) * decay;
                    m[i] += (gi - m[i]) * one_minus_b1; // lerp
                    v[i] = v[i] * beta2 + gi * gi * one_minus_b2;
                    let denom = v[i].sqrt() / bc2_sqrt + eps;
                    p[i] = pi - step_size * (m[i] / denom);
                }
                finite
            };
        let chunks = ps
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK));
        let finite = match from {
            // Reading the old values while writing the new ones saves the copy's extra pass.
            Some(from) => chunks
                .zip(from.par_chunks(CHUNK))
                .map(|((((p, g), m), v), p0)| kernel(Some(p0), p, g, m, v))
                .reduce(|| true, |a, b| a && b),
            None => chunks
                .map(|(((p, g), m), v)| kernel(None, p, g, m, v))
                .reduce(|| true, |a, b| a && b),
        };
        self.finite &= finite;
    }

    /// The updated inner tensor as parameter `id` again, trainable if it was.
    fn wrap<const D: usize>(
        &self,
        id: ParamId,
        updated: Tensor<D>,
        require_grad: bool,
        mapper: burn::module::ParamMapper<Tensor<D>>,
    ) -> Param<Tensor<D>> {
        let mut updated = Tensor::<D>::from_inner(updated);
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// The update on LibTorch's CPU tensors, in host memory like flex's but behind torch's data
/// pointers: the gradient and the old parameter read in place, the new parameter written into
/// a fresh tensor in the same pass, as a kept snapshot may share the old one. Strided tensors take the
/// `into_data` path.
#[cfg(feature = "tch")]
mod torch_cpu {
    // burn-tch is deprecated upstream in favour of cubecl; decorr uses it on purpose.
    #![allow(deprecated)]

    use burn::backend::LibTorch;
    use burn::backend::libtorch::TchTensor;
    use burn::module::ParamId;
    use burn::tensor::Tensor;

    /// The contiguous f32 CPU torch tensor behind `t`, if `t` is one.
    fn cpu_f32<const D: usize>(t: &Tensor<D>) -> Option<tch::Tensor> {
        let p = t.clone().try_into_primitive::<LibTorch>().ok()?.tensor;
        (p.device() == tch::Device::Cpu && p.kind() == tch::Kind::Float && p.is_contiguous())
            .then_some(p)
    }

    /// The updated parameter, or both tensors back untouched when they are not LibTorch CPU
    /// f32 tensors.
    // The tensors are handed back untouched (by value, once per parameter and step) when they
    // are not LibTorch CPU tensors; boxing them would buy nothing.
    #[allow(clippy::result_large_err)]
    pub(super) fn update<const D: usize>(
        mapper: &mut super::StepMapper<'_>,
        id: ParamId,
        param: Tensor<D>,
        grad: Tensor<D>,
    ) -> Result<Tensor<D>, (Tensor<D>, Tensor<D>)> {
        let (Some(p), Some(g)) = (cpu_f32(&param), cpu_f32(&grad)) else {
            return Err((param, grad));
        };
        let n = p.numel();
        if g.numel() != n {
            return Err((param, grad));
        }
        let out = p.empty_like();
        // SAFETY: all three are contiguous f32 CPU tensors of n elements, alive for the call;
        // `out` is a fresh tensor no one else holds, `p` and `g` are only read.
        let (ps, p0, gs) = unsafe {
            (
                std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n),
                std::slice::from_raw_parts(p.data_ptr() as *const f32, n),
                std::slice::from_raw_parts(g.data_ptr() as *const f32, n),
            )
        };
        mapper.update(id, Some(p0), ps, gs);
        Ok(Tensor::from_primitive::<LibTorch>(TchTensor::new(out)))
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::adamw::HostAdamW;
        use burn::optim::GradientsParams;
        use burn::tensor::Device;

        /// LibTorch CPU tensors are updated through their pointers into a new tensor (the
        /// input, which a snapshot may share, keeps its values); flex tensors are handed back.
        #[test]
        fn libtorch_cpu_tensors_take_the_pointer_path() {
            let device = Device::libtorch();
            let p = Tensor::<1>::from_floats([1.0, -2.0, 3.0], &device);
            let g = Tensor::<1>::from_floats([0.5, 0.5, -0.5], &device);
            let mut opt = HostAdamW::new(0.9, 0.999, 1e-8, 0.0);
            opt.step = 1;
            let mut grads = GradientsParams::new();
            let mut mapper = super::super::StepMapper {
                opt: &mut opt,
                grads: &mut grads,
                lr: 0.1,
                finite: true,
            };
            let out = update(&mut mapper, ParamId::new(), p.clone(), g).expect("pointer path");
            // First step: m/sqrt(v) = sign(g), so each value moves by lr against its gradient.
            let v = out.into_data().to_vec::<f32>().unwrap();
            let want = [0.9, -2.1, 3.1];
            assert!(
                v.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5),
                "{v:?}"
            );
            assert_eq!(p.into_data().to_vec::<f32>().unwrap(), [1.0, -2.0, 3.0]);
            let flex = Tensor::<1>::from_floats([1.0], &Device::flex());
            assert!(update(&mut mapper, ParamId::new(), flex.clone(), flex).is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::AdamWConfig;
    use burn::tensor::Device;
    use burn::tensor::TensorData;

    fn loss(l: &Linear, i: usize, device: &Device) -> Tensor<1> {
        let x = Tensor::<2>::ones([3, 5], device).mul_scalar(0.3 + i as f32 * 0.1);
        l.forward(x).powf_scalar(2.0).sum()
    }

    /// Same trajectory as burn's AdamW (itself checked against torch by the parity tests) with
    /// a large lr and decay so every term of the update matters. The two round differently
    /// (burn divides by `sqrt(v_hat) + eps`, torch by `sqrt(v)/sqrt(bc2) + eps`), hence 1e-5.
    #[test]
    fn matches_burn_adamw_over_steps() {
        // The test device (`DECORR_BACKEND`): LibTorch's CPU tensors take the pointer path.
        let device = decorr_core::device_from_env().autodiff();
        device.seed(3);
        let start = LinearConfig::new(5, 4).init(&device);
        let (lr, wd) = (0.05, 0.3);
        let mut burn_opt = AdamWConfig::new().with_weight_decay(wd).init();
        let mut ours = HostAdamW::new(0.9, 0.999, 1e-8, wd);
        let initial = start
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        let (mut a, mut b) = (start.clone(), start);
        for i in 0..6 {
            let ga = GradientsParams::from_grads(loss(&a, i, &device).backward(), &a);
            a = burn_opt.step(lr, a, ga);
            let gb = GradientsParams::from_grads(loss(&b, i, &device).backward(), &b);
            b = ours.step(lr, b, gb).expect("finite");
        }
        let da = a
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        let db = b
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        let worst = da
            .iter()
            .zip(&db)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        let moved = db.iter().zip(&initial).all(|(x, y)| x != y);
        assert!(moved && worst <= 1e-5, "weights differ by {worst}");
        assert!(b.weight.val().is_require_grad(), "stays trainable");
    }

    #[test]
    fn non_finite_gradient_is_reported() {
        let device = decorr_core::device_from_env().autodiff();
        let l = LinearConfig::new(2, 2).init(&device);
        let x = Tensor::<2>::from_data(TensorData::from([[f32::NAN, 1.0]]), &device);
        let g = GradientsParams::from_grads(l.forward(x).sum().backward(), &l);
        assert!(
            HostAdamW::new(0.9, 0.999, 1e-8, 0.0)
                .step(1e-3, l, g)
                .is_none()
        );
    }
}
