//! Casting a loaded model to the precision it runs in ([`cast_module`]), and the norms that stay
//! in f32 under half precision ([`norm_f32`]), as torch computes `layer_norm`/`group_norm` of
//! half tensors with f32 statistics: a half-precision variance of activations in the hundreds
//! overflows (65504 is f16's largest value).

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Tensor};

use crate::Precision;

/// Casts every float parameter of `module` to `precision`, except those of layer and group
/// norms, which stay f32 for [`norm_f32`]. Loading keeps f32 (the files' dtype is converted),
/// so this is one pass over the weights after loading.
pub fn cast_module<M: Module>(module: M, precision: Precision) -> M {
    if precision == Precision::F32 {
        return module;
    }
    let mut mapper = CastMapper {
        dtype: precision.dtype(),
        stack: Vec::new(),
    };
    module.map(&mut mapper)
}

struct CastMapper {
    dtype: DType,
    /// Container types entered, innermost last.
    stack: Vec<String>,
}

impl CastMapper {
    fn in_norm(&self) -> bool {
        self.stack
            .iter()
            .any(|c| c == "Struct:LayerNorm" || c == "Struct:GroupNorm")
    }
}

impl ModuleMapper for CastMapper {
    fn enter_module(&mut self, _name: &str, container_type: &str) {
        self.stack.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.in_norm() {
            return param;
        }
        let dtype = self.dtype;
        param.map(|t| t.cast(dtype))
    }
}

/// `norm(x)` computed in f32 when `x` is in half precision (the norm's own parameters are f32,
/// see [`cast_module`]), the result cast back to `x`'s dtype; `x` in f32 goes straight through.
pub fn norm_f32<const D: usize>(
    x: Tensor<D>,
    norm: impl FnOnce(Tensor<D>) -> Tensor<D>,
) -> Tensor<D> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        norm(x)
    } else {
        norm(x.cast(DType::F32)).cast(dtype)
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
    use burn::tensor::Device;

    use super::*;

    #[derive(Module, Debug)]
    struct Tiny {
        lin: Linear,
        norm: LayerNorm,
    }

    #[test]
    fn casts_all_but_norms_and_norms_stay_finite() {
        let device = Device::flex();
        let m = Tiny {
            lin: LinearConfig::new(4, 4).init(&device),
            norm: LayerNormConfig::new(4).init(&device),
        };
        let m = cast_module(m, Precision::F16);
        assert_eq!(m.lin.weight.val().dtype(), DType::F16);
        assert_eq!(m.lin.bias.as_ref().unwrap().val().dtype(), DType::F16);
        assert_eq!(m.norm.gamma.val().dtype(), DType::F32);
        // Activations of 1000: (x - mean)^2 ~ 1e6 overflows f16, not the f32 statistics.
        let x =
            Tensor::<2>::from_floats([[1000.0, -1000.0, 500.0, -500.0]], &device).cast(DType::F16);
        let y = norm_f32(x, |x| m.norm.forward(x));
        assert_eq!(y.dtype(), DType::F16);
        let v = y.cast(DType::F32).into_data().try_to_vec::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
        assert!((v[0] - 1.2649).abs() < 1e-2, "{v:?}");
    }
}
