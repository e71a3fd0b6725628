//! The slice-level CPU kernels behind the flex fast paths: 3x3 convolutions (forward and input
//! gradient, the weight split per tap: read in place from a weight stored so, as loading
//! leaves it, else cached), row-tiled linear maps, blocked multi-head
//! attention with an exact softmax, group and layer norm in place, GEGLU's gate, and the
//! vectorisable `exp`/`erf` they use, all on plain f32 slices; plus the switch
//! (`DECORR_HOST_KERNELS`) and the convolution shape they take.
//!
//! Both [`crate::host`] (plain flex tensors) and [`crate::host_autodiff`] (autodiff tensors on
//! flex, whose backward steps reuse these kernels) call them; they live apart from both so that
//! neither of those modules depends on the other for its math. The design of each kernel (why
//! no im2col, why the scratch and tap caches, the block sizes) is documented where it is
//! defined.

use std::sync::{Mutex, OnceLock};

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::DType;
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Whether the fast paths are on (`DECORR_HOST_KERNELS` unset or not `0`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DECORR_HOST_KERNELS").map_or(true, |v| v != "0"))
}

/// Reusable scratch buffers (padded input, re-laid-out weight), so that each convolution does
/// not map and fault in fresh pages for them. Buffers of more than [`SCRATCH_KEEP`] elements
/// (128 MiB) are not kept.
static SCRATCH: [Mutex<Vec<f32>>; 2] = [const { Mutex::new(Vec::new()) }; 2];
const SCRATCH_KEEP: usize = 1 << 25;

/// Runs `f` on `len` elements of scratch buffer `i` (or a fresh one if it is busy or too large);
/// the contents are whatever the last user left.
fn with_scratch<R>(i: usize, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    if len <= SCRATCH_KEEP
        && let Ok(mut v) = SCRATCH[i].try_lock()
    {
        if v.len() < len {
            *v = vec![0.0; len];
        }
        return f(&mut v[..len]);
    }
    f(&mut vec![0.0; len])
}

/// Whether `conv` is a 3x3, stride 1, padding 1 convolution, the shape the host kernels take.
pub(crate) fn conv3x3_fits(conv: &Conv2d) -> bool {
    enabled()
        && conv.kernel_size == [3, 3]
        && conv.stride == [1, 1]
        && conv.dilation == [1, 1]
        && conv.groups == 1
        && matches!(conv.padding, PaddingConfig2d::Explicit(1, 1, 1, 1))
}

/// [`conv3x3`] with the weight `wf` (`[co, ci, 3, 3]` f32 from its buffer's start: contiguous,
/// or already split per tap by [`taps_layout`]) split per tap: in place when it is stored so,
/// else through the cache.
pub fn conv3x3_cached(
    x: &[f32],
    wf: &FlexTensor,
    bias: Option<&[f32]>,
    [b, ci, h, wd]: [usize; 4],
    co: usize,
    up: usize,
) -> Vec<f32> {
    let (oh, ow) = (h * up, wd * up);
    match weight_taps(wf, co, ci, taps_channels_last(co, oh, ow)) {
        Some((taps, channels_last)) => {
            let mut out = vec![0f32; b * co * oh * ow];
            if !out.is_empty() {
                let padded = b * (oh + 3) * (ow + 2) * ci;
                let view = TapView::forward(&taps, channels_last);
                with_scratch(0, padded, |xp| {
                    conv3x3_in(x, view, bias, [b, ci, oh, ow], co, up, xp, &mut out)
                });
            }
            out
        }
        None => conv3x3(
            x,
            &wf.storage::<f32>()[..co * ci * 9],
            bias,
            [b, ci, h, wd],
            co,
            up,
        ),
    }
}

/// The gradient of [`conv3x3_cached`]'s input: `dy` `[b, co, h * up, w * up]` convolved with
/// the weight transposed (`ci` outputs from `co` inputs) and flipped in both directions, then,
/// for `up` 2, each 2x2 block summed (the enlargement's gradient). The weight's split per tap
/// is the forward's, read transposed through strides.
pub fn conv3x3_input_grad(
    dy: &[f32],
    wf: &FlexTensor,
    [b, ci, h, wd]: [usize; 4],
    co: usize,
    up: usize,
) -> Vec<f32> {
    let (oh, ow) = (h * up, wd * up);
    assert_eq!(
        dy.len(),
        b * co * oh * ow,
        "conv3x3 backward: gradient size"
    );
    let channels_last = taps_channels_last(co, oh, ow);
    let mut full = vec![0f32; b * ci * oh * ow];
    if full.is_empty() {
        return full;
    }
    let padded = b * (oh + 3) * (ow + 2) * co;
    let run = |taps: &[f32], channels_last: bool, full: &mut [f32]| {
        let view = TapView {
            taps,
            channels_last,
            transposed: true,
        };
        with_scratch(0, padded, |xp| {
            conv3x3_in(dy, view, None, [b, co, oh, ow], ci, 1, xp, full)
        });
    };
    match weight_taps(wf, co, ci, channels_last) {
        Some((taps, channels_last)) => run(&taps, channels_last, &mut full),
        None => {
            let mut taps = vec![0f32; 9 * co * ci];
            taps_of(
                &wf.storage::<f32>()[..co * ci * 9],
                co,
                ci,
                channels_last,
                &mut taps,
            );
            run(&taps, channels_last, &mut full);
        }
    }
    if up == 1 {
        return full;
    }
    let mut dx = vec![0f32; b * ci * h * wd];
    dx.par_chunks_mut(wd).enumerate().for_each(|(r, dst)| {
        let (plane, y) = (r / h, r % h);
        for dy_ in 0..up {
            let src = &full[(plane * oh + y * up + dy_) * ow..][..ow];
            for (x, d) in dst.iter_mut().enumerate() {
                *d += src[x * up..(x + 1) * up].iter().sum::<f32>();
            }
        }
    });
    dx
}

/// Output columns per tile (whole rows of the padded width): enough for an efficient GEMM, few
/// enough that the tile's result stays in cache across the nine accumulating GEMMs.
const TILE_COLS: usize = 512;

/// Raw output pointer shared by the tile jobs, each of which writes its own rows.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer `i` elements on. (A method, so closures capture the whole `Sync` wrapper.)
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// A 3x3 convolution with zero padding 1, stride 1, of `x` `[b, ci, h, w]` enlarged `up` times
/// by nearest neighbour (`up` 1: as it is), with `weight` `[co, ci, 3, 3]` (torch layout) plus
/// `bias`; returns `[b, co, h * up, w * up]`.
///
/// The input is copied once into zero-padded channels-last images of width `w + 2`. Computed in
/// that padded width, the input of kernel tap `(ky, kx)` for a run of output pixels is the run of
/// input pixels `ky * (w + 2) + kx` further on: a `[ci, cols]` matrix read in place (column-major,
/// which the GEMM takes without packing). So each tile of output rows is nine accumulating GEMMs
/// `weight[:, :, ky, kx] [co, ci] x input [ci, cols]`, with no im2col, and the two padding
/// columns of each row are dropped when the tile is stored.
///
/// The GEMM repacks one operand per call: the input tile (a cost of one copy per `co`
/// multiply-adds) when the accumulator is row-major, the weight (one per `cols`) when it is
/// channels-last. Channels-last is taken while `co <= 2 cols` (measured on the VAE, 1% better
/// than `co <= cols`): wide images with few channels (the VAE's 128 channels at 512x512, 5%
/// faster decode than row-major throughout), while many channels on small images (1280 at 8x8,
/// 20% slower UNet at 32x32 when channels-last) stay row-major.
pub fn conv3x3(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    [b, ci, sh, sw]: [usize; 4],
    co: usize,
    up: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), b * ci * sh * sw, "conv3x3: input size");
    assert_eq!(weight.len(), co * ci * 9, "conv3x3: weight size");
    assert!(bias.is_none_or(|b| b.len() == co), "conv3x3: bias size");
    assert!(up >= 1, "conv3x3: enlargement");
    let (h, w) = (sh * up, sw * up);
    let mut out = vec![0f32; b * co * h * w];
    if out.is_empty() {
        return out;
    }
    // Padded rows per image: the top and bottom padding, plus one spare row that the last
    // tile's padding columns read into.
    let padded = b * (h + 3) * (w + 2) * ci;
    with_scratch(0, padded, |xp| {
        with_scratch(1, 9 * co * ci, |wk| {
            let channels_last = taps_channels_last(co, h, w);
            taps_of(weight, co, ci, channels_last, wk);
            let view = TapView::forward(wk, channels_last);
            conv3x3_in(x, view, bias, [b, ci, h, w], co, up, xp, &mut out)
        })
    });
    out
}

/// Whether [`conv3x3_in`] accumulates channels-last for `co` output channels of an `h x w`
/// output (and so wants the weight per tap as `[9][ci][co]` rather than `[9][co][ci]`).
fn taps_channels_last(co: usize, h: usize, w: usize) -> bool {
    let pw = w + 2;
    let rows = (TILE_COLS / pw).clamp(1, h.max(1));
    co <= 2 * rows * pw
}

/// `weight` `[co, ci, 3, 3]` (torch layout) split per kernel tap into `wk`: `[9][ci][co]`
/// (column-major `co x ci` matrices) when `channels_last`, else `[9][co][ci]`.
fn taps_of(weight: &[f32], co: usize, ci: usize, channels_last: bool, wk: &mut [f32]) {
    let (inner, outer) = if channels_last { (co, ci) } else { (ci, co) };
    wk.par_chunks_mut(inner).enumerate().for_each(|(row, dst)| {
        let (tap, j) = (row / outer, row % outer);
        for (i, d) in dst.iter_mut().enumerate() {
            let (o, c) = if channels_last { (i, j) } else { (j, i) };
            *d = weight[(o * ci + c) * 9 + tap];
        }
    });
}

/// A convolution weight split per tap, kept with (a handle on) the weight it came from, so
/// that its buffer, and with it the cache key, stays that weight's for as long as the entry
/// lives.
struct Taps {
    _weight: FlexTensor,
    taps: std::sync::Arc<Vec<f32>>,
}

/// Split weights by (buffer address, length, layout), for weights not stored split per tap
/// ([`taps_in_place`]; loaded models store theirs, so this holds none of theirs): models built
/// with random weights, weights replaced after loading. A forward pass would otherwise split
/// every convolution weight again: about a third of a batch-1 UNet pass at 32x32 latents.
/// Each entry keeps its weight alive, so that the address stays that weight's.
static TAPS: Mutex<Vec<(TapsKey, Taps)>> = Mutex::new(Vec::new());
/// (weight buffer address, elements, channels-last layout).
type TapsKey = (usize, usize, bool);
/// Elements kept at most (3 GiB of f32): SD 1.5's UNet has about 540 M 3x3-convolution
/// weights (2.2 GB) and its VAE about 70 M; weights beyond the cap are split per call.
const TAPS_KEEP: usize = 3 << 28;

/// The split of the weight `wf`, from the cache or made and cached; `None` when the cache is
/// full.
fn cached_taps(
    wf: &FlexTensor,
    co: usize,
    ci: usize,
    channels_last: bool,
) -> Option<std::sync::Arc<Vec<f32>>> {
    let data = &wf.storage::<f32>()[..co * ci * 9];
    let key = (data.as_ptr() as usize, data.len(), channels_last);
    let mut cache = TAPS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, t)) = cache.iter().find(|(k, _)| *k == key) {
        return Some(t.taps.clone());
    }
    let held: usize = cache.iter().map(|(_, t)| t.taps.len()).sum();
    if held + data.len() > TAPS_KEEP {
        return None;
    }
    let mut taps = vec![0f32; data.len()];
    taps_of(data, co, ci, channels_last, &mut taps);
    let taps = std::sync::Arc::new(taps);
    cache.push((
        key,
        Taps {
            _weight: wf.clone(),
            taps: taps.clone(),
        },
    ));
    Some(taps)
}

/// A weight's split per tap: borrowed from a weight stored split ([`taps_layout`]) or shared
/// with the cache.
enum SplitTaps<'a> {
    InPlace(&'a [f32]),
    Cached(std::sync::Arc<Vec<f32>>),
}

impl std::ops::Deref for SplitTaps<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            SplitTaps::InPlace(t) => t,
            SplitTaps::Cached(t) => t,
        }
    }
}

/// The split of `wf` `[co, ci, 3, 3]` and its layout (channels-last or not): read in place
/// when `wf` is stored split per tap, else the cache's (made in the layout `channels_last`);
/// `None` when the cache is full.
fn weight_taps(
    wf: &FlexTensor,
    co: usize,
    ci: usize,
    channels_last: bool,
) -> Option<(SplitTaps<'_>, bool)> {
    if let Some((taps, layout)) = taps_in_place(wf, co, ci) {
        return Some((SplitTaps::InPlace(taps), layout));
    }
    cached_taps(wf, co, ci, channels_last).map(|t| (SplitTaps::Cached(t), channels_last))
}

/// The strides of a `[co, ci, 3, 3]` view of a weight stored split per tap, `[9][co][ci]`
/// (`[9][ci][co]` when `channels_last`).
pub(crate) fn taps_strides(co: usize, ci: usize, channels_last: bool) -> [isize; 4] {
    let tap = (co * ci) as isize;
    if channels_last {
        [1, co as isize, 3 * tap, tap]
    } else {
        [ci as isize, 1, 3 * tap, tap]
    }
}

/// When the f32 weight `wf` `[co, ci, 3, 3]` is a view of its taps stored one after another
/// from its buffer's start (as [`taps_layout`] leaves it), those taps and whether they are
/// channels-last; `None` for any other layout.
pub(crate) fn taps_in_place(wf: &FlexTensor, co: usize, ci: usize) -> Option<(&[f32], bool)> {
    let layout = wf.layout();
    if wf.dtype() != DType::F32
        || layout.start_offset() != 0
        || layout.shape().as_slice() != [co, ci, 3, 3]
    {
        return None;
    }
    let channels_last = [false, true]
        .into_iter()
        .find(|&cl| layout.strides() == taps_strides(co, ci, cl))?;
    Some((wf.storage::<f32>().get(..9 * co * ci)?, channels_last))
}

/// `weight` `[co, ci, 3, 3]` (torch layout) stored split per tap in the layout a convolution
/// to an `h x w` output accumulates in (`[9][ci][co]` when channels-last, else `[9][co][ci]`;
/// another size still reads it, at most a few percent slower): what [`taps_in_place`] reads
/// through the strides [`taps_strides`] gives. Returns the taps and their layout.
pub fn taps_layout(weight: &[f32], co: usize, ci: usize, [h, w]: [usize; 2]) -> (Vec<f32>, bool) {
    assert_eq!(weight.len(), co * ci * 9, "taps_layout: weight size");
    let channels_last = taps_channels_last(co, h, w);
    let mut taps = vec![0f32; weight.len()];
    taps_of(weight, co, ci, channels_last, &mut taps);
    (taps, channels_last)
}

/// A convolution weight split per tap ([`taps_of`]), as [`conv3x3_in`] reads it.
#[derive(Clone, Copy)]
struct TapView<'a> {
    taps: &'a [f32],
    /// The split's layout: `[9][ci][co]` rather than `[9][co][ci]` of its forward convolution.
    channels_last: bool,
    /// Read as the input gradient's weight: the forward's transposed (its inputs are the
    /// outputs here) and its taps in reverse order (the kernel flipped).
    transposed: bool,
}

impl<'a> TapView<'a> {
    fn forward(taps: &'a [f32], channels_last: bool) -> Self {
        TapView {
            taps,
            channels_last,
            transposed: false,
        }
    }

    /// Tap `tap`'s weight as an `outputs x inputs` matrix: its start, and its (column, row)
    /// strides for `outputs`, `inputs` channels of this convolution.
    fn tap(&self, tap: usize, outputs: usize, inputs: usize) -> (*const f32, [usize; 2]) {
        let t = if self.transposed { 8 - tap } else { tap };
        let at = self.taps[t * outputs * inputs..].as_ptr();
        // Transposing swaps the layouts: a `[ci][co]` split read as `[co'][ci']`.
        let strides = if self.channels_last != self.transposed {
            [outputs, 1]
        } else {
            [1, inputs]
        };
        (at, strides)
    }
}

/// [`conv3x3`] with scratch space for the padded input `xp` and the weight per tap `wk`;
/// `h`, `w` are the output's (the enlarged input's) size.
#[allow(clippy::too_many_arguments)]
fn conv3x3_in(
    x: &[f32],
    wk: TapView,
    bias: Option<&[f32]>,
    [b, ci, h, w]: [usize; 4],
    co: usize,
    up: usize,
    xp: &mut [f32],
    out: &mut [f32],
) {
    assert!(wk.taps.len() >= 9 * co * ci, "conv3x3: weight size");
    let pw = w + 2;
    let prows = h + 3;
    // Channels-last, zero-padded: `[b][h + 3][w + 2][ci]`, the image at rows 1..=h, cols 1..=w.
    xp.par_chunks_mut(pw * ci).enumerate().for_each(|(r, dst)| {
        let (n, y) = (r / prows, r % prows);
        if y == 0 || y > h {
            dst.fill(0.0);
            return;
        }
        dst[..ci].fill(0.0);
        dst[(pw - 1) * ci..].fill(0.0);
        let (sh, sw) = (h / up, w / up);
        for c in 0..ci {
            let at = ((n * ci + c) * sh + (y - 1) / up) * sw;
            let src = &x[at..at + sw];
            if up == 1 {
                for (xx, &v) in src.iter().enumerate() {
                    dst[(xx + 1) * ci + c] = v;
                }
            } else {
                for xx in 0..w {
                    dst[(xx + 1) * ci + c] = src[xx / up];
                }
            }
        }
    });
    let rows = (TILE_COLS / pw).clamp(1, h);
    // An input gradient reading a row-major split transposed gets it column-major, which the
    // GEMM packs slowly as a row-major accumulator's left operand; a channels-last accumulator
    // turns the product around (measured on SD 1.5's shapes: 8x8, 2560 from 1280 channels,
    // 0.046 s against 0.033 s; the forward takes 0.027 s).
    let channels_last = (wk.transposed && !wk.channels_last) || taps_channels_last(co, h, w);
    let xp = &*xp;
    // Strides (column, row) of the accumulator.
    let acc_s = if channels_last {
        [co, 1]
    } else {
        [1, rows * pw]
    };

    let tiles = h.div_ceil(rows);
    let jobs = b * tiles;
    // With fewer tiles than threads, let the GEMMs use the threads instead.
    let parallelism = if jobs < rayon::current_num_threads() {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..jobs).into_par_iter().for_each_init(
        || vec![0f32; co * rows * pw],
        |acc, job| {
            let (n, t) = (job / tiles, job % tiles);
            let y0 = t * rows;
            let nr = rows.min(h - y0);
            let cols = nr * pw;
            let image = &xp[n * prows * pw * ci..(n + 1) * prows * pw * ci];
            for tap in 0..9 {
                let first = (y0 + tap / 3) * pw + tap % 3;
                let input = &image[first * ci..];
                assert!(input.len() >= cols * ci);
                let (weight, w_s) = wk.tap(tap, co, ci);
                // SAFETY: `acc` holds `co x cols` and the tap's weight `co x ci`, with the
                // strides above; `input` `cols` pixels of `ci` channels (checked above),
                // column-major.
                unsafe {
                    gemm::gemm(
                        co,
                        cols,
                        ci,
                        acc.as_mut_ptr(),
                        acc_s[0] as isize,
                        acc_s[1] as isize,
                        tap > 0,
                        weight,
                        w_s[0] as isize,
                        w_s[1] as isize,
                        input.as_ptr(),
                        ci as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                }
            }
            for o in 0..co {
                let bo = bias.map_or(0.0, |b| b[o]);
                for r in 0..nr {
                    let at = ((n * co + o) * h + y0 + r) * w;
                    // SAFETY: `at..at + w` lies in `out`, and only this job writes rows
                    // `y0..y0 + nr` of image `n`.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(at), w) };
                    let src = |x: usize| (r * pw + x) * acc_s[0] + o * acc_s[1];
                    for (x, d) in dst.iter_mut().enumerate() {
                        *d = acc[src(x)] + bo;
                    }
                }
            }
        },
    );
}

/// A linear map's f32 weight `wf` (`[k, o]`, burn's layout) as the span of its buffer it covers
/// and its (row, column) strides: it may be a transposed view (burn's column layout), read
/// through its strides. `None` when its first dimension is not `k`, or its strides are negative.
pub(crate) fn strided_weight(wf: &FlexTensor, k: usize) -> Option<(&[f32], [usize; 2])> {
    let shape = wf.layout().shape();
    let strides = wf.layout().strides();
    if shape.len() != 2 || shape[0] != k || wf.dtype() != DType::F32 {
        return None;
    }
    let o = shape[1];
    let (rs, cs) = (
        usize::try_from(strides[0]).ok()?,
        usize::try_from(strides[1]).ok()?,
    );
    let start = wf.layout().start_offset();
    let span = if k * o == 0 {
        0
    } else {
        (k - 1) * rs + (o - 1) * cs + 1
    };
    Some((wf.storage::<f32>().get(start..start + span)?, [rs, cs]))
}

/// Input rows per [`linear_rows`] job.
const LINEAR_ROWS: usize = 512;

/// `x` `[rows, k]` times `weight` `[k, o]` (element `(i, j)` at `i * strides[0] + j *
/// strides[1]`), plus `bias`; returns `[rows, o]`.
pub fn linear_rows(
    x: &[f32],
    weight: &[f32],
    [rs, cs]: [usize; 2],
    bias: Option<&[f32]>,
    [rows, k, o]: [usize; 3],
) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "linear: input size");
    assert!(
        k * o == 0 || weight.len() > (k - 1) * rs + (o - 1) * cs,
        "linear: weight size"
    );
    assert!(bias.is_none_or(|b| b.len() == o), "linear: bias size");
    let mut out = vec![0f32; rows * o];
    if out.is_empty() {
        return out;
    }
    let jobs = rows.div_ceil(LINEAR_ROWS);
    let tile = rows.div_ceil(jobs);
    // With fewer tiles than threads, let the GEMM use the threads instead.
    let parallelism = if jobs < rayon::current_num_threads() {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    out.par_chunks_mut(tile * o)
        .enumerate()
        .for_each(|(j, dst)| {
            let nr = dst.len() / o;
            let src = &x[j * tile * k..(j * tile + nr) * k];
            // SAFETY: `dst` is `nr x o` row-major, `src` `nr x k` row-major and the weight
            // `k x o` with the strides checked above.
            unsafe {
                gemm::gemm(
                    nr,
                    o,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    o as isize,
                    false,
                    src.as_ptr(),
                    1,
                    k as isize,
                    weight.as_ptr(),
                    cs as isize,
                    rs as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
            if let Some(bias) = bias {
                for row in dst.chunks_exact_mut(o) {
                    row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
                }
            }
        });
    out
}

/// Scores held per attention job (4 MiB of f32, 256 query rows against 4096 keys). The score
/// GEMM's inner dimension is only the head size (40 in SD's first level), so it is efficient
/// only with many rows per call; measured at 64x64, 16 rows took 1.3x as long as 256 (one
/// self-attention, 320 channels in 8 heads), and 512 gained nothing over 256.
const ATTENTION_SCORES: usize = 1 << 20;

/// `host::attention` on slices. Each job is one head of one image and a block of query rows: one
/// GEMM for its scores against all keys (the scale folded in), an exact softmax over each
/// whole row (no online rescaling, since the row fits), one GEMM with the values written
/// straight into the head's columns of the output, and the rows divided by their sums. The
/// heads are read in place through strides: no split or merge copies.
pub fn attention_heads(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    [b, n, m, inner]: [usize; 4],
    heads: usize,
) -> Vec<f32> {
    assert!(
        heads > 0 && inner % heads == 0,
        "attention: heads divide width"
    );
    assert_eq!(q.len(), b * n * inner, "attention: query size");
    assert_eq!(k.len(), b * m * inner, "attention: key size");
    assert_eq!(v.len(), b * m * inner, "attention: value size");
    let mut out = vec![0f32; b * n * inner];
    if out.is_empty() || m == 0 {
        return out;
    }
    // The keys transposed, `[b][inner][m]`: each head's `K^T` with the keys contiguous, the
    // layout the score GEMM reads without packing (otherwise repacked by every job).
    with_scratch(0, b * inner * m, |kt| {
        kt.par_chunks_mut(m).enumerate().for_each(|(r, dst)| {
            let (img, c) = (r / inner, r % inner);
            for (j, e) in dst.iter_mut().enumerate() {
                *e = k[(img * m + j) * inner + c];
            }
        });
        attention_blocks(q, kt, v, [b, n, m, inner], heads, &mut out);
    });
    out
}

/// Query rows per attention block for `m` keys ([`ATTENTION_SCORES`]).
pub(crate) fn attention_rows(m: usize) -> usize {
    (ATTENTION_SCORES / m).clamp(16, 512)
}

/// [`attention_heads`] with the keys transposed (`kt` `[b][inner][m]`), into `out`.
fn attention_blocks(
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    [b, n, m, inner]: [usize; 4],
    heads: usize,
    out: &mut [f32],
) {
    let d = inner / heads;
    let scale = (d as f32).powf(-0.5);
    let rows = attention_rows(m).min(n);
    let blocks = n.div_ceil(rows);
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..b * heads * blocks).into_par_iter().for_each_init(
        || (vec![0f32; rows * m], vec![0f32; rows]),
        |(scores, inv), job| {
            let (bh, blk) = (job / blocks, job % blocks);
            let (img, h) = (bh / heads, bh % heads);
            let r0 = blk * rows;
            let nr = rows.min(n - r0);
            let qs = &q[(img * n + r0) * inner + h * d..];
            let ks = &kt[(img * inner + h * d) * m..];
            let vs = &v[img * m * inner + h * d..];
            let s = &mut scores[..nr * m];
            // SAFETY: the query block is `nr x d` with row stride `inner` inside `qs`, `K^T`
            // `d x m` row-major inside `ks`, the values `m x d` with row stride `inner` inside
            // `vs`; `s` is `nr x m` row-major.
            unsafe {
                gemm::gemm(
                    nr,
                    m,
                    d,
                    s.as_mut_ptr(),
                    1,
                    m as isize,
                    false,
                    qs.as_ptr(),
                    1,
                    inner as isize,
                    ks.as_ptr(),
                    1,
                    m as isize,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (row, i) in s.chunks_exact_mut(m).zip(inv.iter_mut()) {
                *i = 1.0 / softmax_numerators(row);
            }
            let o = out_ptr.at((img * n + r0) * inner + h * d);
            // SAFETY: rows `r0..r0 + nr`, columns `h * d..(h + 1) * d` of image `img` are
            // this job's alone; `s` is `nr x m` and the values `m x d` as above.
            unsafe {
                gemm::gemm(
                    nr,
                    d,
                    m,
                    o,
                    1,
                    inner as isize,
                    false,
                    s.as_ptr(),
                    1,
                    m as isize,
                    vs.as_ptr(),
                    1,
                    inner as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
                for (r, &i) in inv[..nr].iter().enumerate() {
                    let row = std::slice::from_raw_parts_mut(o.add(r * inner), d);
                    row.iter_mut().for_each(|e| *e *= i);
                }
            }
        },
    );
}

/// Replaces the scores `row` by `exp(s - max)` and returns their sum.
pub(crate) fn softmax_numerators(row: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { softmax_numerators_avx2(row) };
    }
    softmax_numerators_portable(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_numerators_avx2(row: &mut [f32]) -> f32 {
    softmax_numerators_portable(row)
}

/// Eight running maxima and sums, so the loops vectorise.
#[inline(always)]
fn softmax_numerators_portable(row: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
    let mut sums = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for (s, x) in sums.iter_mut().zip(c) {
            *x = exp(*x - max);
            *s += *x;
        }
    }
    let mut sum = 0.0;
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        sum += *x;
    }
    sum + sums.iter().sum::<f32>()
}

/// Group norm of `x` `[b, c, hw]` in place (torch's: biased variance, `eps` inside the square
/// root, then `x * (rstd * gamma) + (beta - mean * rstd * gamma)`), SiLU after when asked.
pub fn group_norm_in_place(
    x: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    [b, c, hw]: [usize; 3],
    groups: usize,
    eps: f64,
    then_silu: bool,
) {
    assert_eq!(x.len(), b * c * hw, "group_norm: input size");
    assert!(gamma.len() == c && beta.len() == c && c % groups == 0);
    let cg = c / groups;
    let len = cg * hw;
    if len == 0 {
        return;
    }
    x.par_chunks_mut(len).enumerate().for_each(|(i, group)| {
        let (mean, rstd) = group_stats(group, eps);
        let c0 = (i % groups) * cg;
        for (j, chan) in group.chunks_exact_mut(hw).enumerate() {
            let scale = (rstd * gamma[c0 + j] as f64) as f32;
            let shift = (beta[c0 + j] as f64 - mean * rstd * gamma[c0 + j] as f64) as f32;
            affine_silu(chan, scale, shift, then_silu);
        }
    });
}

/// A group's mean and `1 / sqrt(var + eps)` (biased variance), in two f64 passes: the mean,
/// then the mean squared deviation.
pub(crate) fn group_stats(group: &[f32], eps: f64) -> (f64, f64) {
    let len = group.len() as f64;
    let mean = group.iter().map(|&v| v as f64).sum::<f64>() / len;
    let var = group
        .iter()
        .map(|&v| {
            let d = v as f64 - mean;
            d * d
        })
        .sum::<f64>()
        / len;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `v = v * scale + shift`, then `v = v / (1 + exp(-v))` when `then_silu`.
fn affine_silu(v: &mut [f32], scale: f32, shift: f32, then_silu: bool) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { affine_silu_avx2(v, scale, shift, then_silu) };
    }
    affine_silu_portable(v, scale, shift, then_silu);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn affine_silu_avx2(v: &mut [f32], scale: f32, shift: f32, then_silu: bool) {
    affine_silu_portable(v, scale, shift, then_silu);
}

#[inline(always)]
fn affine_silu_portable(v: &mut [f32], scale: f32, shift: f32, then_silu: bool) {
    if then_silu {
        for e in v.iter_mut() {
            let y = *e * scale + shift;
            *e = y / (1.0 + exp(-y));
        }
    } else {
        for e in v.iter_mut() {
            *e = *e * scale + shift;
        }
    }
}

/// Layer norm over rows of `d` elements of `x`, in place (torch's: biased variance, `eps` inside
/// the square root; statistics in f64).
pub fn layer_norm_in_place(x: &mut [f32], gamma: &[f32], beta: Option<&[f32]>, d: usize, eps: f64) {
    assert!(d > 0 && x.len().is_multiple_of(d), "layer_norm: rows of d");
    assert!(gamma.len() == d && beta.is_none_or(|b| b.len() == d));
    x.par_chunks_mut(d).for_each(|row| {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = row
            .iter()
            .map(|&v| {
                let e = v as f64 - mean;
                e * e
            })
            .sum::<f64>()
            / d as f64;
        let rstd = (1.0 / (var + eps).sqrt()) as f32;
        let mean = mean as f32;
        match beta {
            Some(beta) => {
                for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                    *v = (*v - mean) * rstd * g + b;
                }
            }
            None => {
                for (v, g) in row.iter_mut().zip(gamma) {
                    *v = (*v - mean) * rstd * g;
                }
            }
        }
    });
}

/// GEGLU's gate (`host::geglu`) on rows `[a | g]` of `2 * half` elements.
pub(crate) fn geglu_rows(h: &[f32], half: usize) -> Vec<f32> {
    let mut out = vec![0f32; h.len() / 2];
    if half > 0 {
        out.par_chunks_mut(half)
            .zip(h.par_chunks(2 * half))
            .for_each(|(dst, row)| gated_gelu(dst, &row[..half], &row[half..]));
    }
    out
}

/// `dst = a * gelu(g)`.
fn gated_gelu(dst: &mut [f32], a: &[f32], g: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { gated_gelu_avx2(dst, a, g) };
    }
    gated_gelu_portable(dst, a, g);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gated_gelu_avx2(dst: &mut [f32], a: &[f32], g: &[f32]) {
    gated_gelu_portable(dst, a, g);
}

#[inline(always)]
fn gated_gelu_portable(dst: &mut [f32], a: &[f32], g: &[f32]) {
    for ((d, &a), &g) in dst.iter_mut().zip(a).zip(g) {
        *d = a * (0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2)));
    }
}

/// `erf(x)` as PyTorch's vectorised CPU kernels compute it for f32 (Abramowitz and Stegun
/// 7.1.26: `1 - t p(t) e^(-x^2)` with `t = 1 / (1 + 0.3275911 |x|)`, sign restored; within
/// 1.5e-7 of the true value, 3e-7 in f32), so gelu agrees with torch's rather than with an exact erf.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let t = 1.0 / (0.327_591_1 * x.abs() + 1.0);
    let p = 1.061_405_4_f32;
    let p = p * t - 1.453_152_1;
    let p = p * t + 1.421_413_8;
    let p = p * t - 0.284_496_74;
    let p = p * t + 0.254_829_6;
    (1.0 - p * t * exp(-(x * x))).copysign(x)
}

/// `e^x` in f32 without branches or calls, so loops over it vectorise (Cephes' `expf`:
/// `2^n e^r` with `|r| <= ln2 / 2`, a degree-6 polynomial; within 2 ulp of the true value).
/// Saturates to 0 below -87.3 and to `f32::MAX`-ish above 88.3, where SiLU no longer cares.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    // `t`'s low mantissa bits hold the integer `n` (all `t` share one binade): reading them as
    // bits, rather than `n as i32` (a saturating conversion), keeps the loop vectorised.
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    e * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use burn::tensor::{Device, Tensor, TensorData};

    pub(crate) fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        let a = a.into_data().convert::<f32>();
        let b = b.into_data().convert::<f32>();
        let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn exp_is_close() {
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let (ours, std) = (exp(x), x.exp());
            assert!(((ours - std) / std).abs() < 4e-7, "{x}: {ours} vs {std}");
        }
        assert_eq!(exp(-1000.0) * 1e30, exp(-87.3) * 1e30);
    }

    #[test]
    fn erf_is_close() {
        for i in -600..=600 {
            let x = i as f32 / 100.0;
            let exact = libm::erf(x as f64);
            assert!(
                (erf(x) as f64 - exact).abs() < 3e-7,
                "{x}: {} vs {exact}",
                erf(x)
            );
        }
    }

    /// Deterministic, well-spread test values (tests run in parallel on one global RNG).
    pub(crate) fn values<const D: usize>(
        shape: [usize; D],
        seed: u32,
        mean: f32,
        device: &Device,
    ) -> Tensor<D> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| mean + ((i as f32 * 0.618_034 + seed as f32 * 0.414_213).fract() - 0.5) * 4.0)
            .collect();
        Tensor::from_data(TensorData::new(v, shape), device)
    }
}
