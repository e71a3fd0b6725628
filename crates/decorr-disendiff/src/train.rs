//! The DisenDiff training step on any burn device (BASELINES.md section 3, "Step" and
//! "Optimiser"): the text encoder and the UNet under autodiff with everything frozen but the
//! cross-attention key/value weights and the two modifier rows, the two stop-gradients, the
//! losses of [`crate::calibration`], gradient accumulation and torch's AdamW.
//!
//! The modifier rows train as a table of their own (`[2, hidden]`); the pre-trained table stays
//! frozen. Under torch's AdamW over the whole table every other row has a zero gradient, so its
//! moments stay zero and a step only multiplies it by `1 - lr*wd`: the lookup applies that
//! factor (`(1 - lr*wd)^steps`), which is exact up to rounding and saves a dense 49410-row
//! gradient and moment pair per step. Stop-gradient 1 (the embeddings of every other position)
//! follows, since only the small table requires a gradient.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use decorr_clip::{ClipTextModel, ForwardOptions, MAX_LEN};
use decorr_trainer::adamw::HostAdamW;
use decorr_unet::{AttentionOptions, Capture, UNet2DConditionModel};
use serde::{Deserialize, Serialize};

use crate::DisenDiffError;
use crate::apply::{apply_kv, rows_tensor};
use crate::calibration::{IouTerms, MapStages, iou_terms, mean_maps, rec_per_sample, stages};
use crate::tokens::modifier_positions;

/// Hyper-parameters; defaults are BASELINES.md's (the CLI defaults).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DisenDiffConfig {
    /// Optimiser steps.
    pub max_train_steps: usize,
    /// Constant learning rate (BASELINES: 1e-5 x accumulation 4 x 1 GPU x batch 2).
    pub lr: f64,
    /// Images per micro-batch (the loss needs at least 2 in the repository; any >= 1 here).
    pub batch_size: usize,
    /// Micro-batches per optimiser step (each backward is of `loss / grad_accum`).
    pub grad_accum: usize,
    /// Weight of `L_attn`.
    pub attn_weight: f64,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Training images' size in pixels (square).
    pub resolution: usize,
    /// Side of the cross-attention maps `L_attn` reads; `None`: the second-smallest size the
    /// UNet's cross-attentions run at (16 at 512 px: SD 1.5's `input_blocks.7/8`,
    /// `output_blocks.3/4/5`, BASELINES' 16x16 layers; a quarter of the latent side).
    pub map_resolution: Option<usize>,
    /// Seeds the data order, augmentation, timesteps and noise.
    pub seed: u64,
}

impl Default for DisenDiffConfig {
    fn default() -> Self {
        DisenDiffConfig {
            max_train_steps: 250,
            lr: 8e-5,
            batch_size: 2,
            grad_accum: 4,
            attn_weight: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            resolution: 512,
            map_resolution: None,
            seed: 0,
        }
    }
}

/// One micro-batch, ready for the models: every row's 77 ids, `z0` (already scaled by the
/// VAE's factor), the noise, the timesteps and the one-channel loss mask `[b, h, w]`.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    pub ids: Vec<Vec<u32>>,
    pub z0: Tensor<4>,
    pub noise: Tensor<4>,
    pub timesteps: Vec<usize>,
    pub mask: Tensor<3>,
}

/// What is trained: the UNet (only its `attn2.to_k` / `to_v` weights require a gradient) and
/// the two modifier rows.
#[derive(Module, Debug)]
pub struct Delta {
    pub unet: UNet2DConditionModel,
    pub rows: Param<Tensor<2>>,
}

/// A forward pass's results, as graph nodes (tests back-propagate each term on its own).
pub struct Forward {
    pub encoder_hidden_states: Tensor<3>,
    pub noisy_latents: Tensor<4>,
    pub pred: Tensor<4>,
    /// `L_rec` per sample `[b]` and its batch mean.
    pub rec_per_sample: Tensor<1>,
    pub rec: Tensor<1>,
    /// `L_attn` when a caption has the modifiers.
    pub attn: Option<AttnLoss>,
}

/// `L_attn` with what it was computed from.
pub struct AttnLoss {
    pub loss: Tensor<1>,
    /// Per sample with modifiers: its batch row and `(p1, p2)`.
    pub picks: Vec<(usize, usize, usize)>,
    /// The captured layers' head-averaged probabilities `[b, r*r, 77]`.
    pub probs: Vec<Tensor<3>>,
    pub maps: MapStages,
    pub terms: IouTerms,
}

/// A micro-step's loss values.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct MicroLosses {
    pub rec: f64,
    /// `None` when no caption of the micro-batch has the modifiers.
    pub attn: Option<f64>,
    pub total: f64,
}

/// The trained values: each trained `attn2.to_k` / `to_v` weight by diffusers' parameter path
/// (`...attn2.to_k.weight`) as `[out, in]` row-major, and the two modifier rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Trained {
    pub kv: Vec<(String, [usize; 2], Vec<f32>)>,
    pub rows: [Vec<f32>; 2],
}

/// AdamW's first and second moments of each trained tensor, by parameter path.
pub type Moments = Vec<(String, Vec<f32>, Vec<f32>)>;

/// The run in progress: models, optimiser state and accumulated gradients.
pub struct Trainer {
    /// `None` only while the optimiser owns it (so its tensors are unique and update in place).
    delta: Option<Delta>,
    text: ClipTextModel,
    vocab: usize,
    modifier_ids: [u32; 2],
    alphas_cumprod: Vec<f32>,
    map_layers: Vec<String>,
    map_res: usize,
    config: DisenDiffConfig,
    optim: HostAdamW,
    accum: GradientsAccumulator<Delta>,
    micro_in_step: usize,
    steps_done: usize,
    device: Device,
}

impl Trainer {
    /// Sets up training of `unet` and `text` (loaded on any device, f32) with the modifiers'
    /// initial `rows` `[2, hidden]`; `latent_hw` is the training latents' size, which fixes the
    /// layers whose maps `L_attn` reads.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        unet: UNet2DConditionModel,
        text: ClipTextModel,
        rows: Tensor<2>,
        modifier_ids: [u32; 2],
        alphas_cumprod: Vec<f32>,
        latent_hw: [usize; 2],
        config: &DisenDiffConfig,
        device: &Device,
    ) -> Result<Trainer, DisenDiffError> {
        let train_device = device.clone().inner().autodiff();
        // Default: the second-smallest cross-attention size (SD 1.5: 16 of 8/16/32/64 at 512 px,
        // the 16x16 layers BASELINES names; the tiny models: 8 of 4/8).
        let mut sizes: Vec<usize> = unet
            .attention_sites(latent_hw)
            .into_iter()
            .filter(|s| s.cross && s.height == s.width)
            .map(|s| s.height)
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        let map_res = config
            .map_resolution
            .unwrap_or_else(|| sizes.get(1).or(sizes.first()).copied().unwrap_or(0));
        let map_layers: Vec<String> = unet
            .attention_sites(latent_hw)
            .into_iter()
            .filter(|s| s.cross && s.height == map_res && s.width == map_res)
            .map(|s| s.path)
            .collect();
        if map_layers.is_empty() {
            let sizes: Vec<String> = unet
                .attention_sites(latent_hw)
                .into_iter()
                .filter(|s| s.cross)
                .map(|s| format!("{}x{}", s.height, s.width))
                .collect();
            return Err(DisenDiffError::Config(format!(
                "no cross-attention runs at {map_res}x{map_res} for {}x{} latents (they run at {}); \
                 pick another --map-resolution or --resolution",
                latent_hw[0],
                latent_hw[1],
                sizes.join(", ")
            )));
        }
        if map_res < 2 {
            return Err(DisenDiffError::Config(
                "the attention maps must be at least 2x2 for the smoothing's reflect padding"
                    .into(),
            ));
        }
        let vocab = text.vocab_size();
        let mut kv = TrainKv { path: Vec::new() };
        // `train()` moves a loaded (validation-state) module onto the autodiff device with the
        // gradient settings mapped before it.
        let unet = unet.fork(&train_device).map(&mut kv);
        let text = text.fork(&train_device).no_grad().train();
        let rows = rows.cast(burn::tensor::DType::F32).into_data();
        let rows =
            Param::from_tensor(Tensor::<2>::from_data(rows, &train_device)).set_require_grad(true);
        Ok(Trainer {
            delta: Some(Delta { unet, rows }.train()),
            text,
            vocab,
            modifier_ids,
            alphas_cumprod,
            map_layers,
            map_res,
            config: config.clone(),
            optim: HostAdamW::new(config.beta1, config.beta2, config.eps, config.weight_decay),
            accum: GradientsAccumulator::new(),
            micro_in_step: 0,
            steps_done: 0,
            device: train_device,
        })
    }

    /// Optimiser steps taken.
    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    /// The cross-attention modules whose maps `L_attn` reads, and their side.
    pub fn map_layers(&self) -> (&[String], usize) {
        (&self.map_layers, self.map_res)
    }

    /// The ids the modifiers have.
    pub fn modifier_ids(&self) -> [u32; 2] {
        self.modifier_ids
    }

    /// The factor every pre-trained row has been multiplied by so far (`(1 - lr*wd)^steps`).
    fn table_decay(&self) -> f64 {
        (1.0 - self.config.lr * self.config.weight_decay as f64).powi(self.steps_done as i32)
    }

    /// The text encoder's output for `ids` (each 77 long) with the current modifier rows.
    pub fn encode(&self, ids: &[Vec<u32>]) -> Result<Tensor<3>, DisenDiffError> {
        let b = ids.len();
        let vocab = self.vocab as u32;
        let mut base = Vec::with_capacity(b * MAX_LEN);
        let mut local = Vec::with_capacity(b * MAX_LEN);
        let mut is_new = Vec::with_capacity(b * MAX_LEN);
        for row in ids {
            if row.len() != MAX_LEN {
                return Err(DisenDiffError::Config(format!(
                    "a caption has {} ids, expected {MAX_LEN}",
                    row.len()
                )));
            }
            for &id in row {
                let m = self.modifier_ids.iter().position(|&x| x == id);
                if m.is_none() && id >= vocab {
                    return Err(DisenDiffError::Config(format!(
                        "token id {id} is outside the text encoder's vocabulary of {vocab}"
                    )));
                }
                base.push(if m.is_some() { 0 } else { id as i64 });
                local.push(m.unwrap_or(0) as i64);
                is_new.push(m.is_some());
            }
        }
        let dev = &self.device;
        let hidden = self.delta().rows.val().dims()[1];
        let base = Tensor::<2, Int>::from_data(TensorData::new(base, [b, MAX_LEN]), dev);
        let base = self
            .text
            .embeddings
            .token_embedding
            .forward(base)
            .mul_scalar(self.table_decay());
        let local = Tensor::<1, Int>::from_data(TensorData::new(local, [b * MAX_LEN]), dev);
        let new = self
            .delta()
            .rows
            .val()
            .select(0, local)
            .reshape([b, MAX_LEN, hidden]);
        let mask = Tensor::<3, Bool>::from_data(TensorData::new(is_new, [b, MAX_LEN, 1]), dev)
            .expand([b, MAX_LEN, hidden]);
        let tokens = base.mask_where(mask, new);
        Ok(self
            .text
            .forward_embeds(tokens, &ForwardOptions::default())
            .last_hidden_state
            .expect("a full pass"))
    }

    /// `add_noise` as diffusers' DDPM scheduler does it (f32 `alphas_cumprod`).
    pub fn add_noise(
        &self,
        z0: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[usize],
    ) -> Result<Tensor<4>, DisenDiffError> {
        let b = timesteps.len();
        let mut a = Vec::with_capacity(b);
        let mut s = Vec::with_capacity(b);
        for &t in timesteps {
            let acp = *self.alphas_cumprod.get(t).ok_or_else(|| {
                DisenDiffError::Config(format!(
                    "timestep {t} is outside the schedule's {} steps",
                    self.alphas_cumprod.len()
                ))
            })?;
            a.push(acp.sqrt());
            s.push((1.0 - acp).sqrt());
        }
        let col =
            |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [b, 1, 1, 1]), &self.device);
        Ok(z0 * col(a) + noise * col(s))
    }

    /// The forward pass of a micro-batch with both losses, as graph nodes.
    pub fn forward(&self, batch: &MicroBatch) -> Result<Forward, DisenDiffError> {
        let b = batch.ids.len();
        if b == 0 || batch.timesteps.len() != b {
            return Err(DisenDiffError::Config(
                "a micro-batch needs one timestep per caption and at least one caption".into(),
            ));
        }
        let dev = &self.device;
        let ehs = self.encode(&batch.ids)?;
        let z0 = batch.z0.clone().fork(dev);
        let noise = batch.noise.clone().fork(dev);
        let x_t = self.add_noise(z0, noise.clone(), &batch.timesteps)?;
        let opts = AttentionOptions {
            capture_cross: Capture::Prefixes(self.map_layers.clone()),
            detach_first_key: true,
            ..Default::default()
        };
        let t: Vec<f64> = batch.timesteps.iter().map(|&t| t as f64).collect();
        let out = self.delta().unet.forward_with(x_t.clone(), &t, &ehs, &opts);
        let pred = out.sample;
        let per = rec_per_sample(pred.clone(), noise, batch.mask.clone().fork(dev));
        let rec = per.clone().mean();
        let mut picks = Vec::new();
        for (row, ids) in batch.ids.iter().enumerate() {
            if let Some((p1, p2)) = modifier_positions(ids, self.modifier_ids)? {
                picks.push((row, p1, p2));
            }
        }
        let attn = (!picks.is_empty()).then(|| {
            let probs: Vec<Tensor<3>> = out.cross_attention.into_iter().map(|m| m.probs).collect();
            let maps = stages(mean_maps(&probs, &picks, self.map_res));
            let terms = iou_terms(maps.fin.clone());
            AttnLoss {
                loss: terms.l_b.clone().mean(),
                picks,
                probs,
                maps,
                terms,
            }
        });
        Ok(Forward {
            encoder_hidden_states: ehs,
            noisy_latents: x_t,
            pred,
            rec_per_sample: per,
            rec,
            attn,
        })
    }

    /// Gradients of `loss` for the trained parameters.
    pub fn gradients(&self, loss: Tensor<1>) -> GradientsParams {
        GradientsParams::from_grads(loss.backward(), self.delta())
    }

    /// The gradients of `loss` by parameter path, as diffusers lays the tensors out
    /// (`...attn2.to_k.weight` `[out, in]`; `rows` `[2, hidden]`), for checks and reports.
    pub fn named_gradients(&self, loss: Tensor<1>) -> Vec<(String, Vec<f32>)> {
        let grads = self.gradients(loss);
        self.param_ids()
            .into_iter()
            .filter_map(|(path, id)| {
                let g = grads.get::<2>(id)?;
                let g = if path == "rows" { g } else { g.transpose() };
                Some((path, decorr_core::readback::to_f32_vec(g)))
            })
            .collect()
    }

    /// One micro-step: forward, backward of `(L_rec + w L_attn) / grad_accum`, accumulate; the
    /// optimiser steps after every `grad_accum` micro-steps. Returns the losses and whether an
    /// optimiser step was taken.
    pub fn micro_step(
        &mut self,
        batch: &MicroBatch,
    ) -> Result<(MicroLosses, bool), DisenDiffError> {
        let f = self.forward(batch)?;
        let rec = f.rec.clone().into_scalar::<f32>() as f64;
        let (total, attn) = match &f.attn {
            Some(a) => (
                f.rec.clone() + a.loss.clone().mul_scalar(self.config.attn_weight),
                Some(a.loss.clone().into_scalar::<f32>() as f64),
            ),
            None => (f.rec.clone(), None),
        };
        let total_v = total.clone().into_scalar::<f32>() as f64;
        if !total_v.is_finite() {
            return Err(DisenDiffError::NonFinite {
                step: self.steps_done + 1,
                what: "loss",
            });
        }
        let grads = self.gradients(total.div_scalar(self.config.grad_accum as f64));
        let delta = self.delta.as_ref().expect("delta present");
        self.accum.accumulate(delta, grads);
        self.micro_in_step += 1;
        let stepped = self.micro_in_step == self.config.grad_accum;
        if stepped {
            self.optimizer_step()?;
        }
        Ok((
            MicroLosses {
                rec,
                attn,
                total: total_v,
            },
            stepped,
        ))
    }

    /// The AdamW step on the accumulated gradients.
    fn optimizer_step(&mut self) -> Result<(), DisenDiffError> {
        let grads = self.accum.grads();
        self.micro_in_step = 0;
        let delta = self.delta.take().expect("delta present");
        self.delta = Some(self.optim.step(self.config.lr, delta, grads).ok_or(
            DisenDiffError::NonFinite {
                step: self.steps_done + 1,
                what: "gradient",
            },
        )?);
        self.steps_done += 1;
        Ok(())
    }

    /// The trained values now.
    pub fn trained(&self) -> Trained {
        let kv = self
            .kv_params()
            .into_iter()
            .map(|(path, _, w)| {
                // burn keeps Linear weights as [in, out]; diffusers as [out, in].
                let [i, o] = w.dims();
                (
                    path,
                    [o, i],
                    decorr_core::readback::to_f32_vec(w.transpose()),
                )
            })
            .collect();
        let rows = self.delta().rows.val();
        let hidden = rows.dims()[1];
        let data = decorr_core::readback::to_f32_vec(rows);
        Trained {
            kv,
            rows: [data[..hidden].to_vec(), data[hidden..].to_vec()],
        }
    }

    /// The optimiser state by parameter path (`rows` for the modifier rows): step count and
    /// each trained tensor's moments, for a resumable save.
    pub fn optimizer_state(&self) -> (usize, Moments) {
        let mut out = Vec::new();
        for (path, id) in self.param_ids() {
            if let Some((m, v)) = self.optim.moments(&id) {
                out.push((path, m.to_vec(), v.to_vec()));
            }
        }
        (self.steps_done, out)
    }

    /// Restores a saved run: the trained values, the step count and the optimiser moments.
    pub fn restore(
        &mut self,
        trained: &Trained,
        steps: usize,
        moments: Moments,
    ) -> Result<(), DisenDiffError> {
        let ids: HashMap<String, ParamId> = self.param_ids().into_iter().collect();
        let mut restored = Vec::new();
        for (path, m, v) in moments {
            let id = ids.get(&path).ok_or_else(|| {
                DisenDiffError::State(format!(
                    "the saved optimiser state names {path}, which this UNet does not train"
                ))
            })?;
            restored.push((*id, m, v));
        }
        let delta = self.delta.take().expect("delta present");
        let unet = apply_kv(delta.unet, &trained.kv)?;
        let rows = rows_tensor(&trained.rows, &self.device)?;
        self.delta = Some(Delta {
            unet,
            rows: Param::initialized(delta.rows.id, rows.set_require_grad(true)),
        });
        self.optim.restore(steps as i32, restored);
        self.steps_done = steps;
        self.micro_in_step = 0;
        self.accum = GradientsAccumulator::new();
        Ok(())
    }

    fn delta(&self) -> &Delta {
        self.delta.as_ref().expect("delta present")
    }

    fn kv_params(&self) -> Vec<(String, ParamId, Tensor<2>)> {
        let mut v = KvParams {
            path: Vec::new(),
            out: Vec::new(),
        };
        self.delta().unet.visit(&mut v);
        v.out
    }

    /// The trained tensors' ids by path (`rows` for the modifier rows).
    fn param_ids(&self) -> Vec<(String, ParamId)> {
        let mut ids: Vec<(String, ParamId)> = self
            .kv_params()
            .into_iter()
            .map(|(path, id, _)| (path, id))
            .collect();
        ids.push(("rows".to_string(), self.delta().rows.id));
        ids
    }
}

/// Whether a parameter path (module path + name) is a cross-attention key/value weight.
pub fn is_kv(path: &str) -> bool {
    path.ends_with(".attn2.to_k.weight") || path.ends_with(".attn2.to_v.weight")
}

/// Makes exactly the `attn2.to_k` / `to_v` weights require a gradient.
struct TrainKv {
    path: Vec<String>,
}

impl ModuleMapper for TrainKv {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        param.set_require_grad(is_kv(&path))
    }
}

/// The trained k/v weights with their paths and ids (shared buffers, no copies).
struct KvParams {
    path: Vec<String>,
    out: Vec<(String, ParamId, Tensor<2>)>,
}

impl ModuleVisitor for KvParams {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.join(".");
        if D == 2 && is_kv(&path) {
            let w = param.val();
            let dims = w.dims();
            self.out
                .push((path, param.id, w.reshape([dims[0], dims[1]])));
        }
    }
}

/// The training noise schedule's `alphas_cumprod` (float32) of a checkpoint's scheduler config,
/// as diffusers' `DDPMScheduler.from_config(...).add_noise` uses it.
pub fn training_alphas_cumprod(
    config: &decorr_scheduler::SchedulerConfig,
) -> Result<Vec<f32>, DisenDiffError> {
    let resolved = config.resolve(decorr_scheduler::SchedulerKind::Ddim);
    let betas = decorr_scheduler::schedule::betas(&resolved)
        .map_err(|e| DisenDiffError::Config(format!("the scheduler config: {e}")))?;
    Ok(decorr_scheduler::schedule::alphas_cumprod(&betas))
}

/// `z0 = scaling * (mean + std * eps)`: a sample of the VAE posterior with explicit noise
/// (BASELINES.md "Step": a sample, not the mean).
pub fn posterior_sample(
    posterior: &decorr_unet::Posterior,
    eps: Tensor<4>,
    scaling: f64,
) -> Tensor<4> {
    let std = posterior.logvar.clone().mul_scalar(0.5).exp();
    (posterior.mean.clone() + std * eps).mul_scalar(scaling)
}
