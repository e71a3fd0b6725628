//! Attend-and-Excite as diffusers' `StableDiffusionAttendAndExcitePipeline` runs it (BASELINES.md
//! section 2). Before the CFG prediction of step `i`, for each image on its own, the latent `z`
//! gets gradient steps that raise the weakest target token's peak cross-attention:
//!
//! - the loss: the cross-attention maps of the conditional pass (no `scale_model_input`) at
//!   `attn_res` are averaged over layers and heads, keys 1..=75 kept (0 and 76 dropped), ×100,
//!   softmaxed per pixel; each target's map (index − 1) is reflect-padded by one and smoothed
//!   with a 3x3 Gaussian (σ 0.5 in torch's `GaussianSmoothing`: `g ∝ exp(−((x−1)/(2σ))²)`), and
//!   `L = max_k max(0, 1 − max(map_k))`;
//! - at a threshold position with `L > 1 − thr`: iterative refinement, up to
//!   `max_refinement_steps` steps `z ← z − α_i ∇L`, then one more forward for the final `L`;
//! - for `i < max_iter_to_alter` with `L ≠ 0`: one step `z ← z − α_i ∇L`,
//!
//! with `α_i = scale_factor · √(linspace(1, 0.5, N)[i])`, `i` counting positions in the
//! scheduler's timesteps (51 of them for SD 1.5's PNDM at 50 steps). The gradient runs through
//! burn's autodiff with `z` as the only leaf (the weights stay plain tensors, constants to the
//! graph), and the UNet pass stops after the last cross-attention at `attn_res`.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use burn::tensor::activation::softmax;
use decorr_unet::{AttentionOptions, Capture, UNet2DConditionModel};
use serde::{Deserialize, Serialize};

use super::cfg::cfg_prediction;
use super::{Conditioning, Embeddings, StepContext, StepPrediction, Strategy};
use crate::PipelineError;

/// Attend-and-Excite's settings; the defaults are the official `config.py`'s and diffusers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExciteParams {
    /// Token positions (BOS = 0) of the objects to excite, each in `1..=75`.
    pub token_indices: Vec<usize>,
    /// Positions `i < max_iter_to_alter` get the one-step update.
    pub max_iter_to_alter: usize,
    /// Position -> threshold: refinement runs there while `L > 1 − threshold`.
    pub thresholds: BTreeMap<usize, f64>,
    pub scale_factor: f64,
    /// `(start, end)` of the step-size schedule's linspace.
    pub scale_range: (f64, f64),
    /// The cross-attention resolution `[height, width]` whose maps make the loss.
    pub attn_res: [usize; 2],
    pub max_refinement_steps: usize,
}

impl Default for ExciteParams {
    fn default() -> Self {
        ExciteParams {
            token_indices: Vec::new(),
            max_iter_to_alter: 25,
            thresholds: BTreeMap::from([(0, 0.05), (10, 0.5), (20, 0.8)]),
            scale_factor: 20.0,
            scale_range: (1.0, 0.5),
            attn_res: [16, 16],
            max_refinement_steps: 20,
        }
    }
}

/// What Attend-and-Excite did to one image at one step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExciteStep {
    pub step: usize,
    pub image: usize,
    /// `L` at the step's first forward.
    pub loss: f64,
    /// Iterative-refinement updates (0: none ran).
    pub refinement_iters: usize,
    /// `L` the final update used (after refinement's last forward; `loss` otherwise).
    pub loss_final: f64,
    /// Whether the one-step update was applied.
    pub updated: bool,
}

/// The 3x3 kernel of torch's `GaussianSmoothing(kernel_size=3, sigma=0.5)` as Attend-and-Excite
/// builds it (f32, normalised).
fn gaussian_kernel() -> [[f32; 3]; 3] {
    let sigma = 0.5f32;
    let g = |x: f32| {
        (-(((x - 1.0) / (2.0 * sigma)).powi(2))).exp()
            / (sigma * (2.0 * std::f32::consts::PI).sqrt())
    };
    let mut k = [[0f32; 3]; 3];
    let mut sum = 0f32;
    for (y, row) in k.iter_mut().enumerate() {
        for (x, v) in row.iter_mut().enumerate() {
            *v = g(y as f32) * g(x as f32);
            sum += *v;
        }
    }
    k.map(|row| row.map(|v| v / sum))
}

/// numpy's `linspace(start, end, n)[i]`.
fn linspace_at(start: f64, end: f64, n: usize, i: usize) -> f64 {
    if n <= 1 {
        return start;
    }
    if i == n - 1 {
        return end;
    }
    let step = (end - start) / (n - 1) as f64;
    i as f64 * step + start
}

pub struct AttendExcite {
    params: ExciteParams,
    /// The conditional embedding `[1, 77, d]` of the gradient passes.
    cond: Tensor<3>,
    /// `[uncond x b; cond x b]` or `cond x b` for the CFG pass.
    context: Conditioning,
    /// The cross-attention modules at `attn_res`, in forward order.
    sites: Vec<String>,
    images: usize,
    scale: f64,
    guided: bool,
    kernel: [[f32; 3]; 3],
    log: Vec<ExciteStep>,
}

impl AttendExcite {
    /// Checks the settings against the UNet and a latent of `latent_hw`, naming what exists.
    pub fn new(
        unet: &UNet2DConditionModel,
        emb: &Embeddings,
        images: usize,
        scale: f64,
        params: &ExciteParams,
        latent_hw: [usize; 2],
    ) -> Result<Self, PipelineError> {
        let sites = check(unet, params, latent_hw, emb.cond.dims()[1])?;
        let (context, guided) = emb.context(images);
        Ok(AttendExcite {
            params: params.clone(),
            cond: emb.cond.clone(),
            context,
            sites,
            images,
            scale,
            guided,
            kernel: gaussian_kernel(),
            log: Vec::new(),
        })
    }

    /// `(L, ∇_z L)` at `z` `[1, c, h, w]`; the gradient is `None` when `L` is 0.
    fn loss_and_grad(&self, ctx: &StepContext, z: &Tensor<4>) -> (f64, Option<Tensor<4>>) {
        let leaf = z.clone().inner().autodiff().require_grad();
        let opts = AttentionOptions {
            slice_size: ctx.opts.slice_size,
            capture_cross: Capture::Prefixes(self.sites.clone()),
            ..Default::default()
        };
        let last = self.sites.last().expect("checked: at least one site");
        let maps =
            ctx.unet
                .cross_attention_until(leaf.clone(), &[ctx.timestep], &self.cond, &opts, last);
        let n = maps.len();
        let [h, w] = [maps[0].height, maps[0].width];
        let mean = maps
            .into_iter()
            .map(|m| m.probs)
            .reduce(|a, b| a + b)
            .expect("at least one map")
            .div_scalar(n as f64); // [1, h*w, keys]
        let keys = mean.dims()[2];
        let text = softmax(mean.narrow(2, 1, keys - 2).mul_scalar(100.0), 2);
        let peaks: Vec<Tensor<1>> = self
            .params
            .token_indices
            .iter()
            .map(|&t| {
                let map = text.clone().narrow(2, t - 1, 1).reshape([1, 1, h, w]);
                smooth(reflect_pad(map), &self.kernel, h, w).max()
            })
            .collect();
        // One read-back per refinement: the thresholds decide on the host, as diffusers' `.item()`.
        let values = decorr_core::readback::to_f32_vec(Tensor::cat(peaks.clone(), 0).inner());
        // Python's max over [max(0, 1 − m_k)]: the first largest; 0 when every peak reaches 1.
        let mut worst: Option<(usize, f32)> = None;
        for (k, &m) in values.iter().enumerate() {
            let l = 1.0 - m;
            if l > 0.0 && worst.is_none_or(|(_, best)| l > best) {
                worst = Some((k, l));
            }
        }
        let Some((k, l)) = worst else {
            return (0.0, None);
        };
        let loss = peaks[k].clone().neg().add_scalar(1.0);
        let grads = loss.backward();
        let grad = leaf.grad(&grads).map(|g| g.inner());
        (l as f64, grad)
    }
}

/// 1-pixel reflect padding of `[1, 1, h, w]` (torch's `mode="reflect"`).
fn reflect_pad(x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let rows = Tensor::cat(
        vec![x.clone().narrow(2, 1, 1), x.clone(), x.narrow(2, h - 2, 1)],
        2,
    );
    Tensor::cat(
        vec![
            rows.clone().narrow(3, 1, 1),
            rows.clone(),
            rows.narrow(3, w - 2, 1),
        ],
        3,
    )
}

/// The 3x3 `kernel` over the padded `[1, 1, h + 2, w + 2]` map: `[1, 1, h, w]`.
fn smooth(padded: Tensor<4>, kernel: &[[f32; 3]; 3], h: usize, w: usize) -> Tensor<4> {
    let mut out: Option<Tensor<4>> = None;
    for (dy, row) in kernel.iter().enumerate() {
        for (dx, &k) in row.iter().enumerate() {
            let tap = padded
                .clone()
                .narrow(2, dy, h)
                .narrow(3, dx, w)
                .mul_scalar(k);
            out = Some(match out {
                Some(o) => o + tap,
                None => tap,
            });
        }
    }
    out.expect("nine taps")
}

/// Checks `params` for a UNet, a latent of `latent_hw` and `keys` text tokens (77), naming what
/// is wrong; returns the cross-attention modules whose maps make the loss.
pub fn check(
    unet: &UNet2DConditionModel,
    params: &ExciteParams,
    latent_hw: [usize; 2],
    keys: usize,
) -> Result<Vec<String>, PipelineError> {
    let bad = |m: String| Err(PipelineError::Input(m));
    if unet.add_embedding.is_some() {
        return bad(
            "Attend-and-Excite runs on SD 1.x and 2.x UNets; this is an SDXL UNet (text_time \
             conditions), which it does not support: use --guidance cfg, decorrelated or pag"
                .into(),
        );
    }
    check_indices(&params.token_indices, keys)?;
    if !(params.scale_factor.is_finite() && params.scale_factor >= 0.0) {
        return bad(format!(
            "--excite-scale-factor {}: must be a finite number >= 0 (20 is the default)",
            params.scale_factor
        ));
    }
    if params.attn_res.iter().any(|&v| v < 2) {
        return bad(format!(
            "--excite-attn-res {}: the smoothing reflect-pads each map by one pixel, so the \
             resolution must be at least 2x2 (16 for 512 px SD 1.5)",
            side(params.attn_res[0], params.attn_res[1])
        ));
    }
    if let Some((i, t)) = params.thresholds.iter().find(|(_, t)| !t.is_finite()) {
        return bad(format!(
            "--excite-thresholds {i}:{t}: the threshold must be finite"
        ));
    }
    excite_sites(unet, params, latent_hw)
}

/// The cross-attention modules whose maps make the loss: those at `attn_res`.
fn excite_sites(
    unet: &UNet2DConditionModel,
    params: &ExciteParams,
    latent_hw: [usize; 2],
) -> Result<Vec<String>, PipelineError> {
    let cross: Vec<_> = unet
        .attention_sites(latent_hw)
        .into_iter()
        .filter(|s| s.cross)
        .collect();
    let [h, w] = params.attn_res;
    let sites: Vec<String> = cross
        .iter()
        .filter(|s| (s.height, s.width) == (h, w))
        .map(|s| s.path.clone())
        .collect();
    if sites.is_empty() {
        let mut sizes: Vec<(usize, usize)> = cross.iter().map(|s| (s.height, s.width)).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let sizes: Vec<String> = sizes.iter().map(|&(a, b)| side(a, b)).collect();
        return Err(PipelineError::Input(format!(
            "--excite-attn-res {}: no cross-attention layer works at {h}x{w} for a {}x{} latent; \
             this UNet's cross-attention resolutions at this image size are {} (for 512 px, SD \
             1.5 uses 16)",
            side(h, w),
            latent_hw[0],
            latent_hw[1],
            sizes.join(", ")
        )));
    }
    Ok(sites)
}

/// `16` for a square size, `16x24` otherwise.
fn side(h: usize, w: usize) -> String {
    if h == w {
        format!("{h}")
    } else {
        format!("{h}x{w}")
    }
}

/// Token indices must name keys 1..=keys − 2 (0 and the last are dropped from the loss).
fn check_indices(indices: &[usize], keys: usize) -> Result<(), PipelineError> {
    if indices.is_empty() {
        return Err(PipelineError::Input(
            "attend-and-excite needs the objects to excite: --excite WORD,WORD or \
             --excite-indices I,J"
                .into(),
        ));
    }
    let max = keys - 2;
    if let Some(bad) = indices.iter().find(|&&i| i == 0 || i > max) {
        return Err(PipelineError::Input(format!(
            "--excite-indices {bad}: token indices count from the start-of-text token (0) and \
             must be in 1..={max}"
        )));
    }
    Ok(())
}

impl Strategy for AttendExcite {
    fn predict(
        &mut self,
        ctx: &StepContext,
        latents: &mut Tensor<4>,
    ) -> Result<StepPrediction, PipelineError> {
        let i = ctx.index;
        let p = &self.params;
        let threshold = p.thresholds.get(&i).copied();
        // For i >= max_iter_to_alter diffusers' forward is discarded; skipped here.
        if i < p.max_iter_to_alter || threshold.is_some() {
            let alpha =
                p.scale_factor * linspace_at(p.scale_range.0, p.scale_range.1, ctx.total, i).sqrt();
            let mut updated = Vec::with_capacity(self.images);
            for image in 0..self.images {
                let mut z = latents.clone().narrow(0, image, 1);
                let (first, mut grad) = self.loss_and_grad(ctx, &z);
                let mut loss = first;
                let mut iters = 0;
                if let Some(thr) = threshold
                    && loss > 1.0 - thr
                {
                    let target = (1.0 - thr).max(0.0);
                    while loss > target {
                        iters += 1;
                        if iters > 1 {
                            // The first iteration's forward is the step's first, at the same z.
                            (loss, grad) = self.loss_and_grad(ctx, &z);
                        }
                        if let Some(g) = grad.take() {
                            z = z - g.mul_scalar(alpha);
                        }
                        if iters >= p.max_refinement_steps {
                            break;
                        }
                    }
                    (loss, grad) = self.loss_and_grad(ctx, &z);
                }
                let update = i < p.max_iter_to_alter && loss != 0.0;
                if update && let Some(g) = grad {
                    z = z - g.mul_scalar(alpha);
                }
                self.log.push(ExciteStep {
                    step: i,
                    image,
                    loss: first,
                    refinement_iters: iters,
                    loss_final: loss,
                    updated: update,
                });
                updated.push(z);
            }
            *latents = Tensor::cat(updated, 0);
        }
        cfg_prediction(
            ctx,
            latents,
            &self.context,
            self.images,
            self.scale,
            self.guided,
        )
    }

    fn excite_log(&mut self) -> Vec<ExciteStep> {
        std::mem::take(&mut self.log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_is_attend_and_excites() {
        let k = gaussian_kernel();
        let g = [0.21194156f32, 0.57611688, 0.21194156];
        for y in 0..3 {
            for x in 0..3 {
                assert!((k[y][x] - g[y] * g[x]).abs() < 1e-6, "{y} {x}: {}", k[y][x]);
            }
        }
    }

    #[test]
    fn linspace_matches_numpy() {
        // np.linspace(1.0, 0.5, 51)[[0, 10, 50]]
        assert_eq!(linspace_at(1.0, 0.5, 51, 0), 1.0);
        assert!((linspace_at(1.0, 0.5, 51, 10) - 0.9).abs() < 1e-15);
        assert_eq!(linspace_at(1.0, 0.5, 51, 50), 0.5);
        assert_eq!(linspace_at(1.0, 0.5, 1, 0), 1.0);
    }
}
