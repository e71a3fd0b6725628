//! Decorrelation fine-tuning (METHOD.md, Eq. 2) with checkpoint selection after every epoch
//! (Eqs. 3 to 5). The same code runs on any burn device with autodiff.
//!
//! A step runs every prompt in one batch up to the chosen layer's attention probabilities,
//! averages `A[t, c] - min_{s in S} A[t, s]` over prompts, back-propagates and applies torch's
//! AdamW (decoupled decay `p *= 1 - lr*wd`, bias-corrected moments): fused on the host
//! ([`crate::adamw`]) on flex, burn's (same update) elsewhere. The token table trains only the
//! rows the prompts use (`Tuned`).
//! The loss reads only row `t` of the map, and under causal attention that row depends on tokens
//! `0..=t` alone, so a step runs on the prefix `0..=max t` of the batch ([`causal_prefix`]):
//! the same loss and gradients as the 77-token pass (every later position gets an exact zero
//! gradient there), for a tenth of the work on a short prompt.
//! Parameters off the loss's graph (layers after the chosen one, the chosen layer's values,
//! output projection and MLP) get no gradient and stay bit-identical, as in PyTorch.

use std::str::FromStr;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use decorr_clip::{ClipTextModel, ForwardOptions, Tokenized, head_average};
use serde::{Deserialize, Serialize};

use crate::MethodError;
use crate::adamw::HostAdamW;
use crate::analysis::{argmax_before, attention_map};
use crate::losses::{Focus, l_align, l_corr, l_train, l_val, select_epoch};

/// Which text-encoder parameters are trained (our choice; METHOD.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ParamPreset {
    /// Every parameter (embeddings, norms, attention, MLP).
    #[default]
    All,
    /// q/k/v/out projections of every layer.
    Attn,
    /// q/k projections of every layer.
    Qk,
}

impl FromStr for ParamPreset {
    type Err = MethodError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(ParamPreset::All),
            "attn" => Ok(ParamPreset::Attn),
            "qk" => Ok(ParamPreset::Qk),
            other => Err(MethodError::UnknownPreset(other.to_string())),
        }
    }
}

impl ParamPreset {
    /// Whether the parameter at `path` (module path, e.g. `encoder.layers.3.self_attn.q_proj.weight`)
    /// is trained.
    pub fn trains(self, path: &str) -> bool {
        let proj = |names: &[&str]| {
            names
                .iter()
                .any(|n| path.contains(&format!(".self_attn.{n}.")))
        };
        match self {
            ParamPreset::All => true,
            ParamPreset::Attn => proj(&["q_proj", "k_proj", "v_proj", "out_proj"]),
            ParamPreset::Qk => proj(&["q_proj", "k_proj"]),
        }
    }
}

/// Hyper-parameters; defaults are METHOD.md's.
/// Read back from a run's report with defaults for fields older reports lack.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub layer: usize,
    pub epochs: usize,
    pub steps_per_epoch: usize,
    pub lr: f64,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub tau: f64,
    pub params: ParamPreset,
    /// Seeds the device RNG. The method itself is deterministic (full-batch steps, no dropout);
    /// the seed is recorded so runs are reproducible if randomness is ever added.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            layer: 11,
            epochs: 20,
            steps_per_epoch: 10,
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            tau: 5.0,
            params: ParamPreset::All,
            seed: 0,
        }
    }
}

/// One training prompt with its resolved target token.
#[derive(Debug, Clone)]
pub struct TrainPrompt {
    pub tokenized: Tokenized,
    pub target: usize,
}

/// A prompt's fixed focus and its pre-trained attention map.
#[derive(Debug, Clone, Serialize)]
pub struct PromptState {
    pub prompt: String,
    #[serde(flatten)]
    pub focus: Focus,
    /// `A_pre` over the real tokens.
    #[serde(skip)]
    pub a_pre: Vec<Vec<f32>>,
}

/// The four numbers of one epoch (prompt averages) for the selection.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub l_train: f64,
    pub l_corr: f64,
    pub l_align: f64,
    pub l_val: f64,
}

/// What a training run reports as it goes; the CLI writes files and draws progress from here.
pub trait TrainObserver {
    /// After each optimiser step (1-based, counted over the run) with that step's loss.
    fn on_step(&mut self, _step: usize, _loss: f64) {}
    /// After each epoch. `maps` are the epoch's fine-tuned maps (one per prompt); `best` is the
    /// model when this epoch became the selected one.
    fn on_epoch(
        &mut self,
        _metrics: &EpochMetrics,
        _maps: &[Vec<Vec<f32>>],
        _best: Option<&ClipTextModel>,
    ) -> Result<(), MethodError> {
        Ok(())
    }
    /// Polled between steps; `true` stops the run after the current step (Ctrl-C).
    fn should_stop(&self) -> bool {
        false
    }
}

/// A no-op observer.
pub struct Silent;
impl TrainObserver for Silent {}

/// Everything a run produced.
#[derive(Debug)]
pub struct TrainOutcome {
    pub prompts: Vec<PromptState>,
    pub step_losses: Vec<f64>,
    pub epochs: Vec<EpochMetrics>,
    /// 1-based; `None` when the run was stopped before its first epoch ended.
    pub selected_epoch: Option<usize>,
    /// The selected epoch's model (inference copy).
    pub best: Option<ClipTextModel>,
    /// `A_ft` of the selected epoch, per prompt.
    pub best_maps: Vec<Vec<Vec<f32>>>,
    /// The model after the last step (inference copy).
    pub last: ClipTextModel,
    /// Whether the observer stopped the run early.
    pub interrupted: bool,
}

/// Computes `c` on the pre-trained map and checks that there is something to decorrelate.
pub fn prepare(
    model: &ClipTextModel,
    prompts: &[TrainPrompt],
    layer: usize,
    device: &Device,
) -> Result<Vec<PromptState>, MethodError> {
    if prompts.is_empty() {
        return Err(MethodError::NoPrompts);
    }
    let n_layers = model.num_layers();
    if layer >= n_layers {
        return Err(MethodError::LayerOutOfRange {
            layer,
            last: n_layers - 1,
        });
    }
    prompts
        .iter()
        .map(|p| {
            // attention_map also checks the ids against the vocabulary.
            let a_pre = attention_map(model, &p.tokenized, layer, device)?;
            crate::analysis::check_finite_map(&a_pre, layer, &p.tokenized.prompt)?;
            let t = p.target;
            if t < 2 {
                return Err(MethodError::NothingPrecedes(p.tokenized.token_text(t)));
            }
            let c = argmax_before(&a_pre[t], t).expect("t >= 2");
            if p.tokenized.ids[c] == p.tokenized.ids[t] {
                return Err(MethodError::CorrIsTarget {
                    prompt: p.tokenized.prompt.clone(),
                    token: p.tokenized.token_text(t),
                    corr: c,
                    target: t,
                });
            }
            Ok(PromptState {
                prompt: p.tokenized.prompt.clone(),
                focus: Focus {
                    target: t,
                    corr: c,
                    n_real: a_pre.len(),
                },
                a_pre,
            })
        })
        .collect()
}

/// Sets `require_grad` from the preset and the layer cut-off, by module path.
struct Trainable {
    preset: ParamPreset,
    layer: usize,
    path: Vec<String>,
}

impl ModuleMapper for Trainable {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = format!("{}.", self.path.join("."));
        let after_layer = match self.path.as_slice() {
            [e, l, n, ..] if e == "encoder" && l == "layers" => {
                n.parse::<usize>().is_ok_and(|n| n > self.layer)
            }
            [f, ..] => f == "final_layer_norm",
            _ => false,
        };
        param.set_require_grad(!after_layer && self.preset.trains(&path))
    }
}

enum Optim {
    Host(HostAdamW),
    Burn(burn::optim::ModuleOptimizer),
}

/// Sums |g| of every gradient into one scalar, so a single read tells whether all are finite.
struct GradNorm<'a> {
    grads: &'a GradientsParams,
    sums: Vec<Tensor<1>>,
}

impl ModuleVisitor for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.sums.push(g.abs().sum());
        }
    }
}

/// The model under training. When the token embedding trains, only the rows the prompts use can
/// ever get a gradient, so those rows train as a small table of their own (`rows`, ids in
/// [`RowMap::ids`]) and the 49408-row table stays frozen until [`Tuned::merged`] writes them back.
/// This is exact under torch's AdamW with dense gradients: a row whose gradient has always been
/// zero has zero moments, so each step only multiplies it by `1 - lr*wd`.
#[derive(Module, Debug)]
struct Tuned {
    model: ClipTextModel,
    rows: Option<Param<Tensor<2>>>,
}

/// Which token ids the small table holds, and the batch's ids as indices into it.
struct RowMap {
    ids: Vec<usize>,
    local: Tensor<1, Int>,
}

impl RowMap {
    /// The rows of the batch's first `seq` positions.
    fn new(prompts: &[TrainPrompt], seq: usize, device: &Device) -> RowMap {
        let all = || prefix_ids(prompts, seq).map(|i| i as usize);
        let mut ids: Vec<usize> = all().collect();
        ids.sort_unstable();
        ids.dedup();
        let local: Vec<i64> = all()
            .map(|i| ids.binary_search(&i).expect("id listed") as i64)
            .collect();
        let n = local.len();
        RowMap {
            ids,
            local: Tensor::from_data(TensorData::new(local, [n]), device),
        }
    }
}

impl Tuned {
    /// Splits the used rows off `model`'s token table when the preset trains it.
    fn new(model: ClipTextModel, rows: Option<&RowMap>) -> Tuned {
        let Some(map) = rows else {
            return Tuned { model, rows: None };
        };
        let mut model = model;
        let table = model.embeddings.token_embedding.weight;
        let ids: Vec<i64> = map.ids.iter().map(|&i| i as i64).collect();
        let n = ids.len();
        let index = Tensor::from_data(TensorData::new(ids, [n]), &table.val().device());
        let small = Param::from_tensor(
            table
                .val()
                .detach()
                .set_require_grad(false)
                .select(0, index),
        )
        .set_require_grad(true);
        model.embeddings.token_embedding.weight = table.set_require_grad(false);
        Tuned {
            model,
            rows: Some(small),
        }
    }

    /// Batch forward to the chosen layer's attention.
    fn forward(
        &self,
        ids: &Tensor<2, Int>,
        rows: Option<&RowMap>,
        opts: &ForwardOptions,
    ) -> decorr_clip::TextEncoderOutput {
        match (&self.rows, rows) {
            (Some(table), Some(map)) => {
                let [b, seq] = ids.dims();
                let hidden = table.dims()[1];
                let embeds = table
                    .val()
                    .select(0, map.local.clone())
                    .reshape([b, seq, hidden]);
                self.model.forward_embeds(embeds, opts)
            }
            _ => self.model.forward_with(ids.clone(), opts),
        }
    }

    /// The plain encoder after `steps` optimiser steps: the trained rows written into the table,
    /// every other row decayed as torch's AdamW would have.
    fn merged(
        &self,
        rows: Option<&RowMap>,
        steps: usize,
        lr: f64,
        weight_decay: f32,
    ) -> ClipTextModel {
        let mut model = self.model.clone();
        let (Some(small), Some(map)) = (&self.rows, rows) else {
            return model;
        };
        let small = small.val();
        let hidden = small.dims()[1];
        let decay = (1.0 - lr * weight_decay as f64).powi(steps as i32);
        model.embeddings.token_embedding.weight =
            model.embeddings.token_embedding.weight.map(|table| {
                let mut table = if decay == 1.0 {
                    table
                } else {
                    table.mul_scalar(decay)
                };
                for (i, &id) in map.ids.iter().enumerate() {
                    table =
                        table.slice_assign([id..id + 1, 0..hidden], small.clone().narrow(0, i, 1));
                }
                table
            });
        model
    }
}

/// How many leading positions a step needs: `0..=t` for the latest target. Positions after a
/// prompt's own target (its later tokens, padding) cannot reach its row `t` through the causal
/// mask; they only fill the batch to one length.
pub fn causal_prefix(prompts: &[TrainPrompt]) -> usize {
    prompts.iter().map(|p| p.target + 1).max().unwrap_or(0)
}

/// Every prompt's first `seq` ids, prompt after prompt: the batch's order.
fn prefix_ids(prompts: &[TrainPrompt], seq: usize) -> impl Iterator<Item = u32> + '_ {
    prompts
        .iter()
        .flat_map(move |p| p.tokenized.ids[..seq].iter().copied())
}

/// The batch's first `seq` ids, `[prompts, seq]`.
fn batch_ids(prompts: &[TrainPrompt], seq: usize, device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = prefix_ids(prompts, seq).map(i64::from).collect();
    Tensor::from_data(TensorData::new(ids, [prompts.len(), seq]), device)
}

/// Fine-tune `model` (loaded on any device; trained on its autodiff form) on `prompts`.
pub fn finetune(
    model: ClipTextModel,
    prompts: &[TrainPrompt],
    config: &TrainConfig,
    device: &Device,
    observer: &mut dyn TrainObserver,
) -> Result<TrainOutcome, MethodError> {
    let plain = device.clone().inner();
    let states = prepare(&model.valid(), prompts, config.layer, &plain)?;
    finetune_prepared(model, prompts, states, config, device, observer)
}

/// [`finetune`] with the foci already computed by [`prepare`] (callers that show or check them
/// before training need not compute `A_pre` twice).
pub fn finetune_prepared(
    model: ClipTextModel,
    prompts: &[TrainPrompt],
    states: Vec<PromptState>,
    config: &TrainConfig,
    device: &Device,
    observer: &mut dyn TrainObserver,
) -> Result<TrainOutcome, MethodError> {
    assert_eq!(prompts.len(), states.len(), "one prompt state per prompt");
    let plain = device.clone().inner();
    device.seed(config.seed);
    let train_device = plain.clone().autodiff();
    let model = model.fork(&train_device).train().map(&mut Trainable {
        preset: config.params,
        layer: config.layer,
        path: Vec::new(),
    });
    let seq = causal_prefix(prompts);
    let row_map = config
        .params
        .trains("embeddings.token_embedding.weight.")
        .then(|| RowMap::new(prompts, seq, &train_device));
    let mut model = Tuned::new(model, row_map.as_ref());
    let merged = |tuned: &Tuned, steps: usize| {
        tuned
            .valid()
            .merged(row_map.as_ref(), steps, config.lr, config.weight_decay)
    };
    // Same update either way; the fused host pass only where tensors live in host memory
    // (flex; LibTorch's CPU device with the `tch` feature).
    let mut optim = if decorr_core::is_cpu(&plain) {
        Optim::Host(HostAdamW::new(
            config.beta1,
            config.beta2,
            config.eps,
            config.weight_decay,
        ))
    } else {
        Optim::Burn(
            AdamWConfig::new()
                .with_beta_1(config.beta1)
                .with_beta_2(config.beta2)
                .with_epsilon(config.eps)
                .with_weight_decay(config.weight_decay)
                .init(),
        )
    };

    let ids = batch_ids(prompts, seq, &train_device);
    let opts = ForwardOptions {
        attention_layers: vec![config.layer],
        stop_at_attention: Some(config.layer),
        ..Default::default()
    };

    let mut out = TrainOutcome {
        prompts: states,
        step_losses: Vec::new(),
        epochs: Vec::new(),
        selected_epoch: None,
        best: None,
        best_maps: Vec::new(),
        last: merged(&model, 0),
        interrupted: false,
    };
    let mut step = 0;
    'epochs: for epoch in 1..=config.epochs {
        for _ in 0..config.steps_per_epoch {
            if observer.should_stop() {
                out.interrupted = true;
                break 'epochs;
            }
            step += 1;
            let probs = model
                .forward(&ids, row_map.as_ref(), &opts)
                .attentions
                .remove(0)
                .1;
            let a = head_average(probs); // [P, seq, seq]
            // min over S is taken at the forward values' argmin; its gradient flows to that
            // entry, as torch's min does (ties have measure zero).
            let rows = target_rows(&a, &out.prompts);
            let mut picks = Vec::new();
            for (p, st) in out.prompts.iter().enumerate() {
                let base = (p * seq + st.focus.target) * seq;
                picks.push((base + st.focus.corr) as i64);
                picks.push((base + st.focus.argmin_s(&rows[p])) as i64);
            }
            let n = picks.len();
            let picked = a
                .reshape([prompts.len() * seq * seq])
                .select(
                    0,
                    Tensor::<1, Int>::from_data(TensorData::new(picks, [n]), &train_device),
                )
                .reshape([prompts.len(), 2]);
            let diff = picked.clone().narrow(1, 0, 1) - picked.narrow(1, 1, 1);
            let loss = diff.mean();
            let loss_value = loss.clone().into_scalar::<f32>() as f64;
            if !loss_value.is_finite() {
                return Err(MethodError::NonFinite { step, what: "loss" });
            }
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let non_finite = MethodError::NonFinite {
                step,
                what: "gradient",
            };
            model = match &mut optim {
                Optim::Host(opt) => opt.step(config.lr, model, grads).ok_or(non_finite)?,
                Optim::Burn(opt) => {
                    let mut norm = GradNorm {
                        grads: &grads,
                        sums: Vec::new(),
                    };
                    model.visit(&mut norm);
                    if !norm.sums.is_empty() {
                        let total = Tensor::cat(norm.sums, 0).sum().into_scalar::<f32>();
                        if !total.is_finite() {
                            return Err(non_finite);
                        }
                    }
                    opt.step(config.lr, model, grads)
                }
            };
            out.step_losses.push(loss_value);
            observer.on_step(step, loss_value);
        }

        let eval = merged(&model, step);
        let maps: Vec<Vec<Vec<f32>>> = prompts
            .iter()
            .map(|p| attention_map(&eval, &p.tokenized, config.layer, &plain))
            .collect::<Result<_, _>>()?;
        let metrics = epoch_metrics(epoch, &maps, &out.prompts, config.tau);
        if !metrics.l_val.is_finite() {
            return Err(MethodError::NonFinite {
                step,
                what: "validation loss",
            });
        }
        out.epochs.push(metrics);
        let l_vals: Vec<f64> = out.epochs.iter().map(|m| m.l_val).collect();
        let is_best = select_epoch(&l_vals) == Some(epoch);
        if is_best {
            out.selected_epoch = Some(epoch);
            out.best_maps = maps.clone();
            out.best = Some(eval.clone());
        }
        observer.on_epoch(&metrics, &maps, is_best.then_some(&eval))?;
        out.last = eval;
    }
    if out.interrupted {
        out.last = merged(&model, step);
    }
    Ok(out)
}

/// Each prompt's target row `A[t, 0..=t]` from the batch's head-averaged attention.
fn target_rows(a: &Tensor<3>, prompts: &[PromptState]) -> Vec<Vec<f32>> {
    let [_, seq, _] = a.dims();
    let data = a
        .to_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data");
    prompts
        .iter()
        .enumerate()
        .map(|(p, st)| {
            let row = (p * seq + st.focus.target) * seq;
            data[row..=row + st.focus.target].to_vec()
        })
        .collect()
}

/// The epoch's four numbers, averaged over prompts.
pub fn epoch_metrics(
    epoch: usize,
    maps: &[Vec<Vec<f32>>],
    prompts: &[PromptState],
    tau: f64,
) -> EpochMetrics {
    let n = prompts.len() as f64;
    let mut m = EpochMetrics {
        epoch,
        l_train: 0.0,
        l_corr: 0.0,
        l_align: 0.0,
        l_val: 0.0,
    };
    for (a, st) in maps.iter().zip(prompts) {
        let (lc, la) = (l_corr(a, &st.focus), l_align(a, &st.a_pre, &st.focus));
        m.l_train += l_train(a, &st.focus) / n;
        m.l_corr += lc / n;
        m.l_align += la / n;
        m.l_val += l_val(lc, la, tau) / n;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use decorr_clip::{ClipTextConfig, ClipTokenizer};

    fn rows(t: &Tensor<2>) -> Vec<Vec<f32>> {
        let [n, h] = t.dims();
        let v = t.to_data().convert::<f32>().try_into_vec::<f32>().unwrap();
        (0..n).map(|i| v[i * h..(i + 1) * h].to_vec()).collect()
    }

    /// The split-off rows go back in place; every other row only decays, by `(1 - lr*wd)^steps`.
    #[test]
    fn merged_table_writes_rows_back_and_decays_the_rest() {
        let device = Device::flex();
        device.seed(1);
        let config = ClipTextConfig {
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            ..ClipTextConfig::sd15()
        };
        let model = ClipTextModel::new(&config, &device);
        let before = rows(&model.embeddings.token_embedding.weight.val());
        let tokenized = ClipTokenizer::embedded().encode("a cat").unwrap();
        let prompts = [TrainPrompt {
            tokenized,
            target: 2,
        }];
        let map = RowMap::new(&prompts, causal_prefix(&prompts), &device);
        assert_eq!(
            map.ids,
            vec![320, 2368, 49406],
            "a, cat, BOS: EOS and padding come after the target"
        );
        let mut tuned = Tuned::new(model, Some(&map));
        let small = tuned.rows.take().unwrap().map(|t| t.add_scalar(1.0));
        tuned.rows = Some(small);
        let (lr, wd, steps) = (0.1, 0.5, 3);
        let merged = tuned.merged(Some(&map), steps, lr, wd);
        let after = rows(&merged.embeddings.token_embedding.weight.val());
        let decay = (1.0f64 - lr * wd as f64).powi(steps as i32) as f32;
        for (id, (b, a)) in before.iter().zip(&after).enumerate() {
            for (x, y) in b.iter().zip(a) {
                let want = if map.ids.contains(&id) {
                    x + 1.0
                } else {
                    x * decay
                };
                assert!((want - y).abs() <= 1e-6, "row {id}: {y} vs {want}");
            }
        }
    }
}
