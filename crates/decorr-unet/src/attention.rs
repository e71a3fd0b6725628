//! Attention as diffusers builds it for Stable Diffusion: the `Attention` module (self- and
//! cross-attention; the VAE's single-head spatial variant with its own group norm), the
//! `BasicTransformerBlock` with GEGLU feed-forward, and `Transformer2DModel` (norm, projection in,
//! blocks, projection out, residual). Probabilities can be returned head-averaged for analysis,
//! and computed in slices over batch x heads to bound memory.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{DType, Device, Tensor};

use crate::blocks::{conv, group_norm};
use crate::{host, host_autodiff};

/// What a forward pass computes besides its output.
#[derive(Debug, Clone, Default)]
pub struct AttentionOptions {
    /// Compute attention in slices of this many (batch x head) rows (diffusers'
    /// `attention_slice`): peak memory falls with the slice, the result is the same. (flex's
    /// host path already works in blocks of query rows and ignores it.)
    pub slice_size: Option<usize>,
    /// Which cross-attention (`attn2`) maps to return.
    pub capture_cross: Capture,
    /// Which self-attention (`attn1`) maps to return (large: `(h*w)^2` per image).
    pub capture_self: Capture,
    /// Self-attention (`attn1`) modules whose attention is replaced by the identity
    /// (`to_out(to_v(h))`: every query attends only to itself), as perturbed-attention guidance
    /// perturbs them, in the batch rows from `perturb_from` on (the rows before keep their
    /// attention, so one call can hold PAG's normal and perturbed predictions).
    pub perturb_self: Capture,
    pub perturb_from: usize,
    /// Stop the forward pass after this cross-attention module (`...attn2`) has run: what a
    /// gradient of its maps needs, without the rest of the UNet.
    pub stop_after: Option<String>,
    /// Detach every cross-attention's key and value at key position 0 (the start token) from
    /// the autodiff graph, as Custom Diffusion's processor does when it trains k/v: the start
    /// token's projections then stay as pre-trained in the gradient. No effect without autodiff.
    pub detach_first_key: bool,
}

/// A choice of attention modules by path prefix (`down_blocks.1`, `mid_block`, `up_blocks.2.attentions.0`).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Capture {
    #[default]
    None,
    All,
    Prefixes(Vec<String>),
}

impl Capture {
    pub fn wants(&self, path: &str) -> bool {
        match self {
            Capture::None => false,
            Capture::All => true,
            Capture::Prefixes(p) => p.iter().any(|p| {
                path.strip_prefix(p.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            }),
        }
    }
}

/// One captured map: head-averaged probabilities `[batch, query = height*width, key]`.
#[derive(Debug, Clone)]
pub struct AttentionMap {
    /// Module path in diffusers naming, e.g. `up_blocks.1.attentions.0.transformer_blocks.0.attn2`.
    pub module: String,
    pub height: usize,
    pub width: usize,
    pub probs: Tensor<3>,
}

/// Where a forward pass collects maps (threaded through the blocks instead of global hooks).
pub struct Recorder<'a> {
    pub opts: &'a AttentionOptions,
    pub cross: Vec<AttentionMap>,
    pub self_attn: Vec<AttentionMap>,
    /// Set once the module of `opts.stop_after` has run.
    pub stopped: bool,
}

impl<'a> Recorder<'a> {
    pub fn new(opts: &'a AttentionOptions) -> Self {
        Recorder {
            opts,
            cross: Vec::new(),
            self_attn: Vec::new(),
            stopped: false,
        }
    }
}

/// diffusers' `Attention` (`attn1`, `attn2`, the VAE's `attentions.0`): `to_q/to_k/to_v`,
/// `to_out.0`; the VAE's also owns a `group_norm` and adds its input back.
#[derive(Module, Debug)]
pub struct Attention {
    pub group_norm: Option<GroupNorm>,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Vec<Linear>,
    heads: usize,
}

impl Attention {
    /// `context_dim` is the key/value input width (the text encoder's for cross-attention).
    pub fn new(
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        bias: bool,
        device: &Device,
    ) -> Self {
        let inner = heads * head_dim;
        let lin = |i, o, b| LinearConfig::new(i, o).with_bias(b).init(device);
        Attention {
            group_norm: None,
            to_q: lin(query_dim, inner, bias),
            to_k: lin(context_dim, inner, bias),
            to_v: lin(context_dim, inner, bias),
            to_out: vec![lin(inner, query_dim, true)],
            heads,
        }
    }

    /// `x` `[batch, n, dim]`; `context` `[batch, m, context_dim]` or `None` for self-attention.
    /// Returns the output and, when `capture`, the head-averaged probabilities `[batch, n, m]`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: Option<&Tensor<3>>,
        slice: Option<usize>,
        capture: bool,
    ) -> (Tensor<3>, Option<Tensor<3>>) {
        self.forward_detached(x, context, slice, capture, false)
    }

    /// [`Self::forward`], with k and v at key position 0 detached when `detach_first_key`
    /// ([`AttentionOptions::detach_first_key`]).
    pub fn forward_detached(
        &self,
        x: Tensor<3>,
        context: Option<&Tensor<3>>,
        slice: Option<usize>,
        capture: bool,
        detach_first_key: bool,
    ) -> (Tensor<3>, Option<Tensor<3>>) {
        let [b, n, _] = x.dims();
        let ctx = context.cloned().unwrap_or_else(|| x.clone());
        let m = ctx.dims()[1];
        let h = self.heads;
        let q = host::linear(&self.to_q, x);
        let mut k = host::linear(&self.to_k, ctx.clone());
        let mut v = host::linear(&self.to_v, ctx);
        if detach_first_key && m > 1 && k.is_autodiff() {
            let first = |t: Tensor<3>| {
                let rest = t.clone().narrow(1, 1, m - 1);
                Tensor::cat(vec![t.narrow(1, 0, 1).detach(), rest], 1)
            };
            (k, v) = (first(k), first(v));
        }
        if !capture && let Some(out) = host::attention(&q, &k, &v, h) {
            return (host::linear(&self.to_out[0], out), None);
        }
        let inner = q.dims()[2];
        let d = inner / h;
        let split = |t: Tensor<3>, len: usize| {
            t.reshape([b, len, h, d])
                .swap_dims(1, 2)
                .reshape([b * h, len, d])
        };
        let (q, k, v) = (split(q, n), split(k, m), split(v, m));

        let rows = b * h;
        let step = slice.unwrap_or(rows).clamp(1, rows);
        let mut outs = Vec::new();
        let mut probs_all = Vec::new();
        for start in (0..rows).step_by(step) {
            let len = step.min(rows - start);
            let (q, k, v) = (
                q.clone().narrow(0, start, len),
                k.clone().narrow(0, start, len),
                v.clone().narrow(0, start, len),
            );
            if capture {
                // The recorded maps are f32 whatever the model's precision (softmax in f32).
                let dtype = q.dtype();
                let scores = q
                    .mul_scalar((d as f64).powf(-0.5))
                    .matmul(k.swap_dims(1, 2));
                let p = softmax(scores.cast(DType::F32), 2);
                outs.push(p.clone().cast(dtype).matmul(v));
                probs_all.push(p);
            } else {
                // The backend's fused kernel (flex: flash attention for long sequences, no
                // `n x m` score matrix); same softmax(q k^T / sqrt(d)) v.
                let four = |t: Tensor<3>| t.unsqueeze_dim::<4>(0);
                let o = burn::tensor::module::attention(
                    four(q),
                    four(k),
                    four(v),
                    None,
                    None,
                    Default::default(),
                );
                outs.push(o.squeeze_dim::<3>(0));
            }
        }
        let out = Tensor::cat(outs, 0)
            .reshape([b, h, n, d])
            .swap_dims(1, 2)
            .reshape([b, n, inner]);
        let probs = capture.then(|| {
            Tensor::cat(probs_all, 0)
                .reshape([b, h, n, m])
                .mean_dim(1)
                .reshape([b, n, m])
        });
        (host::linear(&self.to_out[0], out), probs)
    }

    /// The identity attention of perturbed-attention guidance: `to_out(to_v(x))`, the output
    /// of a softmax that puts all weight on the query's own position.
    pub fn forward_identity(&self, x: Tensor<3>) -> Tensor<3> {
        host::linear(&self.to_out[0], host::linear(&self.to_v, x))
    }

    /// The VAE's spatial self-attention: group norm, one head over all pixels, residual.
    pub fn forward_spatial(&self, x: Tensor<4>, slice: Option<usize>) -> Tensor<4> {
        let [b, c, hh, ww] = x.dims();
        let normed = match &self.group_norm {
            Some(g) => host::group_norm(g, x.clone(), false),
            None => x.clone(),
        };
        let seq = normed.reshape([b, c, hh * ww]).swap_dims(1, 2);
        let (out, _) = self.forward(seq, None, slice, false);
        out.swap_dims(1, 2).reshape([b, c, hh, ww]) + x
    }

    /// The VAE mid-block attention (`group_norm`, biases, heads of `head_dim` channels).
    pub fn spatial(
        channels: usize,
        head_dim: usize,
        groups: usize,
        eps: f64,
        device: &Device,
    ) -> Self {
        let heads = channels / head_dim;
        Attention {
            group_norm: Some(group_norm(groups, channels, eps, device)),
            ..Attention::new(channels, channels, heads, head_dim, true, device)
        }
    }
}

/// GEGLU projection (`ff.net.0`): `a * gelu(b)` of the two halves.
#[derive(Module, Debug)]
pub struct Geglu {
    pub proj: Linear,
}

/// `FeedForward` (`ff.net.0.proj`, `ff.net.2` in files; `ff.geglu.proj`, `ff.out` here, since
/// the two live in one heterogeneous list there).
#[derive(Module, Debug)]
pub struct FeedForward {
    pub geglu: Geglu,
    pub out: Linear,
}

impl FeedForward {
    fn new(dim: usize, device: &Device) -> Self {
        let inner = dim * 4;
        FeedForward {
            geglu: Geglu {
                proj: LinearConfig::new(dim, inner * 2).init(device),
            },
            out: LinearConfig::new(inner, dim).init(device),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = host::linear(&self.geglu.proj, x);
        if let Some(gated) = host::geglu(&h) {
            return host::linear(&self.out, gated);
        }
        let half = h.dims()[2] / 2;
        let a = h.clone().narrow(2, 0, half);
        let g = h.narrow(2, half, half);
        self.out.forward(a * gelu(g))
    }
}

/// The transformer blocks' layer-norm epsilon (diffusers' default).
const LN_EPS: f64 = 1e-5;

/// `BasicTransformerBlock` (`transformer_blocks.N.*`): self-attention, cross-attention and
/// feed-forward, each pre-normed (LayerNorm eps 1e-5) with a residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(dim: usize, heads: usize, head_dim: usize, context_dim: usize, device: &Device) -> Self {
        let ln = || LayerNormConfig::new(dim).with_epsilon(LN_EPS).init(device);
        BasicTransformerBlock {
            norm1: ln(),
            attn1: Attention::new(dim, dim, heads, head_dim, false, device),
            norm2: ln(),
            attn2: Attention::new(dim, context_dim, heads, head_dim, false, device),
            norm3: ln(),
            ff: FeedForward::new(dim, device),
        }
    }

    fn forward(
        &self,
        x: Tensor<3>,
        context: &Tensor<3>,
        path: &str,
        hw: [usize; 2],
        rec: &mut Recorder,
    ) -> Tensor<3> {
        let slice = rec.opts.slice_size;
        let p1 = format!("{path}.attn1");
        let want1 = rec.opts.capture_self.wants(&p1);
        let h1 = host::layer_norm(&self.norm1, x.clone(), LN_EPS);
        let from = rec.opts.perturb_from.min(h1.dims()[0]);
        let (a, probs) = if rec.opts.perturb_self.wants(&p1) && from == 0 {
            (self.attn1.forward_identity(h1), None)
        } else if rec.opts.perturb_self.wants(&p1) {
            let rows = h1.dims()[0];
            let (a, probs) = self
                .attn1
                .forward(h1.clone().narrow(0, 0, from), None, slice, want1);
            let perturbed = self.attn1.forward_identity(h1.narrow(0, from, rows - from));
            (Tensor::cat(vec![a, perturbed], 0), probs)
        } else {
            self.attn1.forward(h1, None, slice, want1)
        };
        if let Some(probs) = probs {
            rec.self_attn.push(AttentionMap {
                module: p1,
                height: hw[0],
                width: hw[1],
                probs,
            });
        }
        let x = x + a;
        let p2 = format!("{path}.attn2");
        let want2 = rec.opts.capture_cross.wants(&p2);
        let (a, probs) = self.attn2.forward_detached(
            host::layer_norm(&self.norm2, x.clone(), LN_EPS),
            Some(context),
            slice,
            want2,
            rec.opts.detach_first_key,
        );
        if rec.opts.stop_after.as_deref() == Some(p2.as_str()) {
            rec.stopped = true;
        }
        if let Some(probs) = probs {
            rec.cross.push(AttentionMap {
                module: p2,
                height: hw[0],
                width: hw[1],
                probs,
            });
        }
        let x = x + a;
        x.clone() + self.ff.forward(host::layer_norm(&self.norm3, x, LN_EPS))
    }
}

/// `proj_in`/`proj_out`: 1x1 convolutions (SD 1.x) or linear maps (`use_linear_projection`,
/// SD 2.x). In files `proj_in.weight`; here `proj_in.Conv.weight` / `proj_in.Linear.weight`
/// (burn names enum variants), remapped on load.
#[derive(Module, Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` (`attentions.N.*`): group norm (eps 1e-6), projection in, transformer
/// blocks over the pixels as a sequence, projection out, residual.
#[derive(Module, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

/// The shape of one `Transformer2DModel`.
pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub context_dim: usize,
    pub layers: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(s: &TransformerSpec, device: &Device) -> Self {
        let head_dim = s.channels / s.heads;
        let proj = || {
            if s.linear_projection {
                Projection::Linear(LinearConfig::new(s.channels, s.channels).init(device))
            } else {
                Projection::Conv(conv(s.channels, s.channels, 1, device))
            }
        };
        Transformer2DModel {
            norm: group_norm(s.groups, s.channels, 1e-6, device),
            proj_in: proj(),
            transformer_blocks: (0..s.layers)
                .map(|_| {
                    BasicTransformerBlock::new(s.channels, s.heads, head_dim, s.context_dim, device)
                })
                .collect(),
            proj_out: proj(),
        }
    }

    pub fn forward(
        &self,
        x: Tensor<4>,
        context: &Tensor<3>,
        path: &str,
        rec: &mut Recorder,
    ) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = host::group_norm(&self.norm, x, false);
        let to_seq = |t: Tensor<4>| t.reshape([b, c, h * w]).swap_dims(1, 2);
        let mut seq = match &self.proj_in {
            Projection::Conv(p) => host_autodiff::conv1x1_seq(p, &to_seq(x.clone()))
                .unwrap_or_else(|| to_seq(p.forward(x))),
            Projection::Linear(p) => host::linear(p, to_seq(x)),
        };
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            let p = format!("{path}.transformer_blocks.{i}");
            seq = block.forward(seq, context, &p, [h, w], rec);
            if rec.stopped {
                break;
            }
        }
        let from_seq = |t: Tensor<3>| t.swap_dims(1, 2).reshape([b, c, h, w]);
        let out = match &self.proj_out {
            Projection::Conv(p) => match host_autodiff::conv1x1_seq(p, &seq) {
                Some(y) => from_seq(y),
                None => p.forward(from_seq(seq)),
            },
            Projection::Linear(p) => from_seq(host::linear(p, seq)),
        };
        out + residual
    }
}
