//! The two losses of a DisenDiff micro-step (BASELINES.md section 3, "Step"): the masked
//! denoising loss `L_rec`, and the attention-calibration loss `L_attn` over the cross-attention
//! maps of the modifiers (M1, M2) and their class words (C1, C2): mean over layers and heads,
//! min-max normalised, smoothed with Attend-and-Excite's 3x3 Gaussian, squared for the class
//! words, then IoU terms. All tensor ops, so the gradients flow through burn's autodiff.

use burn::tensor::{Int, Tensor, TensorData};

/// The min-max normalisation's epsilon.
pub const NORM_EPS: f64 = 1e-8;
/// The IoU's smoothing constant, added to both sums.
pub const IOU_SMOOTH: f64 = 1.0;

/// Attend-and-Excite's smoothing kernel (diffusers' `GaussianSmoothing(1, 3, 0.5)`): the outer
/// product of `exp(-((x - 1) / (2 * 0.5))^2)`, `x` in 0..3, normalised to sum 1.
pub fn smoothing_kernel() -> [[f32; 3]; 3] {
    let g: Vec<f32> = (0..3)
        .map(|x| (-((x as f32 - 1.0) / (2.0 * 0.5)).powi(2)).exp())
        .collect();
    let mut k = [[0f32; 3]; 3];
    let mut sum = 0f32;
    for (i, row) in k.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = g[i] * g[j];
            sum += *v;
        }
    }
    k.map(|row| row.map(|v| v / sum))
}

/// `L_rec` per sample: `sum_{c,h,w} m (noise - pred)^2 / sum_{h,w} m`, `mask` `[b, h, w]` (one
/// channel, so with `m = 1` this is 4x the MSE). Returns `[b]`.
pub fn rec_per_sample(pred: Tensor<4>, noise: Tensor<4>, mask: Tensor<3>) -> Tensor<1> {
    let [b, _, h, w] = pred.dims();
    let m = mask.unsqueeze_dim::<4>(1);
    let sq = (noise - pred).powi_scalar(2) * m.clone();
    let num = sq.reshape([b as i32, -1]).sum_dim(1).reshape([b]);
    let den = m.reshape([b, h * w]).sum_dim(1).reshape([b]);
    num / den
}

/// The maps of every stage, `[k, 4, r, r]` each (M1, C1, M2, C2 per sample), for tests and plots.
#[derive(Debug, Clone)]
pub struct MapStages {
    pub mean: Tensor<4>,
    pub norm: Tensor<4>,
    pub smooth: Tensor<4>,
    pub fin: Tensor<4>,
}

/// The IoU terms of each sample with modifiers, `[k]` each.
#[derive(Debug, Clone)]
pub struct IouTerms {
    pub c1_m1: Tensor<1>,
    pub c2_m2: Tensor<1>,
    pub c1_c2: Tensor<1>,
    /// `L_b = [1 - IoU(sg C1, M1)] + [1 - IoU(sg C2, M2)] + IoU(C1, C2)`.
    pub l_b: Tensor<1>,
}

/// The mean maps `[k, 4, r, r]`: `probs` are the captured layers' head-averaged probabilities
/// `[b, r*r, keys]` (all at one resolution `r`), `picks` per sample with modifiers its batch row
/// and positions `(p1, p2)`; the four tokens are p1, p1+1, p2, p2+1.
pub fn mean_maps(probs: &[Tensor<3>], picks: &[(usize, usize, usize)], r: usize) -> Tensor<4> {
    let layers = probs.len();
    let stacked = Tensor::stack::<4>(probs.to_vec(), 0).mean_dim(0); // [1, b, n, keys]
    let [_, b, n, keys] = stacked.dims();
    debug_assert_eq!(n, r * r);
    debug_assert!(layers > 0);
    let flat = stacked
        .reshape([b, n, keys])
        .swap_dims(1, 2)
        .reshape([b * keys, n]);
    let index: Vec<i64> = picks
        .iter()
        .flat_map(|&(row, p1, p2)| [p1, p1 + 1, p2, p2 + 1].map(move |p| (row * keys + p) as i64))
        .collect();
    let k = picks.len();
    let index = Tensor::<1, Int>::from_data(TensorData::new(index, [k * 4]), &flat.device());
    flat.select(0, index).reshape([k, 4, r, r])
}

/// The maps' stages from the mean maps (see the module header).
pub fn stages(mean: Tensor<4>) -> MapStages {
    let [k, c, r, _] = mean.dims();
    let flat = mean.clone().reshape([k, c, r * r]);
    let lo = flat.clone().min_dim(2);
    let hi = flat.clone().max_dim(2);
    let norm = ((flat - lo.clone()) / (hi - lo).add_scalar(NORM_EPS)).reshape([k, c, r, r]);
    let smooth = smooth(norm.clone());
    // Squared for the class words (channels 1 and 3) only.
    let sq = smooth.clone().powi_scalar(2);
    let class = Tensor::<1>::from_data(TensorData::from([0f32, 1.0, 0.0, 1.0]), &mean.device())
        .reshape([1, 4, 1, 1]);
    let fin = smooth.clone() * (class.clone().neg().add_scalar(1.0)) + sq * class;
    MapStages {
        mean,
        norm,
        smooth,
        fin,
    }
}

/// The 3x3 smoothing of `x` `[k, c, r, r]`, reflect-padded by one (Attend-and-Excite's).
fn smooth(x: Tensor<4>) -> Tensor<4> {
    let [_, _, r, _] = x.dims();
    let pad = |t: Tensor<4>, dim: usize| {
        let n = t.dims()[dim];
        let first = t.clone().narrow(dim, 1, 1);
        let last = t.clone().narrow(dim, n - 2, 1);
        Tensor::cat(vec![first, t, last], dim)
    };
    let padded = pad(pad(x, 2), 3);
    let w = smoothing_kernel();
    let mut out: Option<Tensor<4>> = None;
    for (i, row) in w.iter().enumerate() {
        for (j, &wij) in row.iter().enumerate() {
            let tap = padded
                .clone()
                .narrow(2, i, r)
                .narrow(3, j, r)
                .mul_scalar(wij);
            out = Some(match out {
                Some(o) => o + tap,
                None => tap,
            });
        }
    }
    out.expect("nine taps")
}

/// `IoU(a, b) = (sum ab + 1) / (sum a + sum b - sum ab + 1)` per map, `[k, r, r]` -> `[k]`.
pub fn iou(a: Tensor<3>, b: Tensor<3>) -> Tensor<1> {
    let [k, _, _] = a.dims();
    let sum = |t: Tensor<3>| t.reshape([k as i32, -1]).sum_dim(1).reshape([k]);
    let inter = sum(a.clone() * b.clone());
    (inter.clone().add_scalar(IOU_SMOOTH)) / (sum(a) + sum(b) - inter).add_scalar(IOU_SMOOTH)
}

/// The IoU terms of the final maps `[k, 4, r, r]` (M1, C1, M2, C2).
pub fn iou_terms(fin: Tensor<4>) -> IouTerms {
    let [k, _, r, _] = fin.dims();
    let ch = |c: usize| fin.clone().narrow(1, c, 1).reshape([k, r, r]);
    let (m1, c1, m2, c2) = (ch(0), ch(1), ch(2), ch(3));
    let c1_m1 = iou(c1.clone().detach(), m1);
    let c2_m2 = iou(c2.clone().detach(), m2);
    let c1_c2 = iou(c1, c2);
    let l_b =
        c1_m1.clone().neg().add_scalar(1.0) + c2_m2.clone().neg().add_scalar(1.0) + c1_c2.clone();
    IouTerms {
        c1_m1,
        c2_m2,
        c1_c2,
        l_b,
    }
}
