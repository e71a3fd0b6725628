//! The convolutional pieces shared by the UNet and the VAE (diffusers' `resnet.py`,
//! `downsampling.py`, `upsampling.py`, `embeddings.py`): ResNet blocks with an optional time
//! embedding, stride-2 down-sampling, nearest up-sampling and the sinusoidal timestep features.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::host;

/// A `k x k` convolution with "same" padding, as diffusers builds them.
pub fn conv(cin: usize, cout: usize, k: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [k, k])
        .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
        .init(device)
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, device: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(eps)
        .init(device)
}

/// `ResnetBlock2D` (`resnets.N.*`): two norm-SiLU-conv stages, the projected time embedding
/// added between them, and a 1x1 shortcut when the channel count changes.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    /// `temb_channels` is `None` in the VAE, which has no time embedding.
    pub fn new(
        cin: usize,
        cout: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        device: &Device,
    ) -> Self {
        ResnetBlock2D {
            norm1: group_norm(groups, cin, eps, device),
            conv1: conv(cin, cout, 3, device),
            time_emb_proj: temb_channels.map(|t| LinearConfig::new(t, cout).init(device)),
            norm2: group_norm(groups, cout, eps, device),
            conv2: conv(cout, cout, 3, device),
            conv_shortcut: (cin != cout).then(|| conv(cin, cout, 1, device)),
        }
    }

    /// Stores both 3x3 weights split per tap for a pass at `hw` ([`host::store_taps`]).
    pub fn store_taps(&mut self, hw: [usize; 2]) {
        host::store_taps(&mut self.conv1, hw);
        host::store_taps(&mut self.conv2, hw);
    }

    /// `temb` is the time embedding `[batch, temb_channels]` (before its SiLU).
    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        let mut h = host::conv2d(&self.conv1, host::group_norm(&self.norm1, x.clone(), true));
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(silu(t.clone()));
            h = h + t.unsqueeze_dims::<4>(&[2, 3]);
        }
        let h = host::conv2d(&self.conv2, host::group_norm(&self.norm2, h, true));
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x,
        };
        shortcut + h
    }
}

/// `Downsample2D` (`downsamplers.0.conv`): a stride-2 3x3 convolution. The VAE's has no padding
/// of its own and pads right and bottom by one instead (diffusers' `padding=0` case).
#[derive(Module, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
    asymmetric: bool,
}

impl Downsample2D {
    pub fn new(channels: usize, padding: usize, device: &Device) -> Self {
        Downsample2D {
            conv: Conv2dConfig::new([channels, channels], [3, 3])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(
                    padding, padding, padding, padding,
                ))
                .init(device),
            asymmetric: padding == 0,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = if self.asymmetric {
            x.pad((0, 1, 0, 1), burn::tensor::ops::PadMode::Constant(0.0))
        } else {
            x
        };
        self.conv.forward(x)
    }
}

/// `Upsample2D` (`upsamplers.0.conv`): nearest-neighbour resize, then a 3x3 convolution.
#[derive(Module, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, device: &Device) -> Self {
        Upsample2D {
            conv: conv(channels, channels, 3, device),
        }
    }

    /// Resizes to `size` (the skip connection's, when odd sizes were halved) or doubles.
    pub fn forward(&self, x: Tensor<4>, size: Option<[usize; 2]>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let [oh, ow] = size.unwrap_or([2 * h, 2 * w]);
        if [oh, ow] == [2 * h, 2 * w]
            && let Some(y) = host::conv2d_upsampled(&self.conv, &x)
        {
            return y;
        }
        host::conv2d(&self.conv, nearest(x, oh, ow))
    }
}

/// torch's `F.interpolate(mode="nearest")`: output pixel `i` reads input `floor(i * in / out)`.
pub fn nearest(x: Tensor<4>, oh: usize, ow: usize) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let device = x.device();
    let index = |out: usize, inp: usize| {
        let scale = inp as f32 / out as f32;
        let idx: Vec<i64> = (0..out)
            .map(|i| ((i as f32 * scale).floor() as i64).min(inp as i64 - 1))
            .collect();
        Tensor::<1, Int>::from_data(TensorData::new(idx, [out]), &device)
    };
    if oh == 2 * h && ow == 2 * w {
        // The common case as a broadcast copy, no gathers.
        let [b, c, _, _] = x.dims();
        return x
            .reshape([b, c, h, 1, w, 1])
            .expand([b, c, h, 2, w, 2])
            .reshape([b, c, oh, ow]);
    }
    x.select(2, index(oh, h)).select(3, index(ow, w))
}

/// diffusers' `get_timestep_embedding`: `[batch, dim]` sinusoidal features of `timesteps`
/// (float, f32 arithmetic as torch does it), cos first when `flip_sin_to_cos`.
pub fn timestep_features(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
    device: &Device,
) -> Tensor<2> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = -(10000f64.ln() as f32) * i as f32;
            (exponent / (half as f32 - shift as f32)).exp()
        })
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t as f32 * f).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        let (first, second) = if flip_sin_to_cos {
            (cos, sin)
        } else {
            (sin, cos)
        };
        data.extend(first);
        data.extend(second);
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_data(TensorData::new(data, [timesteps.len(), dim]), device)
}

/// `TimestepEmbedding` (`time_embedding.*`): linear, SiLU, linear.
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(cin: usize, dim: usize, device: &Device) -> Self {
        TimestepEmbedding {
            linear_1: LinearConfig::new(cin, dim).init(device),
            linear_2: LinearConfig::new(dim, dim).init(device),
        }
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }
}
