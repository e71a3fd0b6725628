//! Putting a trained delta's tensors into models: the cross-attention k/v weights into a UNet
//! ([`apply_kv`]) and the two modifier rows as a tensor ([`rows_tensor`]). Both the output
//! folder's reader ([`crate::format`], for sampling) and training ([`crate::train`], resuming
//! from saved state) do this; it lives apart so that neither depends on the other for it.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Tensor, TensorData};
use decorr_unet::UNet2DConditionModel;

use crate::DisenDiffError;

/// `unet` with the k/v weights of `kv` (`[out, in]` by parameter path) in place. Every
/// listed weight must exist with that shape.
pub fn apply_kv(
    unet: UNet2DConditionModel,
    kv: &[(String, [usize; 2], Vec<f32>)],
) -> Result<UNet2DConditionModel, DisenDiffError> {
    let mut mapper = SetKv {
        path: Vec::new(),
        kv: kv.iter().map(|(p, s, v)| (p.clone(), (*s, v))).collect(),
        done: Vec::new(),
        misfit: None,
    };
    let unet = unet.map(&mut mapper);
    if let Some(m) = mapper.misfit {
        return Err(DisenDiffError::Delta(m));
    }
    if let Some((p, _, _)) = kv.iter().find(|(p, _, _)| !mapper.done.contains(p)) {
        return Err(DisenDiffError::Delta(format!(
            "the delta names {p}, which this UNet does not have: the delta is for another \
             architecture; use the base model it was trained on"
        )));
    }
    Ok(unet)
}

struct SetKv<'a> {
    path: Vec<String>,
    kv: HashMap<String, ([usize; 2], &'a Vec<f32>)>,
    done: Vec<String>,
    misfit: Option<String>,
}

impl ModuleMapper for SetKv<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        let Some(&([o, i], v)) = self.kv.get(&path) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        if D != 2 || dims[0] != i || dims[1] != o {
            self.misfit.get_or_insert(format!(
                "the delta's {path} is [{o}, {i}] but the UNet's is {:?} ([out, in]): the delta \
                 does not fit this UNet; use the base model it was trained on",
                [dims[D - 1], dims[0]]
            ));
            return Param::from_mapped_value(id, tensor, mapper);
        }
        self.done.push(path);
        let grad = tensor.is_require_grad();
        let device = tensor.device();
        let dtype = tensor.dtype();
        let t = Tensor::<2>::from_data(TensorData::new(v.clone(), [o, i]), &device)
            .transpose()
            .cast(dtype);
        let mut t: Tensor<D> = t.reshape(tensor.shape());
        if grad {
            t = t.set_require_grad(true);
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

/// The two rows as a `[2, hidden]` tensor.
pub fn rows_tensor(rows: &[Vec<f32>; 2], device: &Device) -> Result<Tensor<2>, DisenDiffError> {
    let hidden = rows[0].len();
    if rows[1].len() != hidden {
        return Err(DisenDiffError::Delta(
            "the two rows differ in length".into(),
        ));
    }
    let data: Vec<f32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_data(
        TensorData::new(data, [2, hidden]),
        device,
    ))
}
