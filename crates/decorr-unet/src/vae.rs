//! `AutoencoderKL`: the encoder (image to the latent posterior's mean and log-variance), the
//! decoder (latent to image), and the 1x1 `quant_conv`/`post_quant_conv` around them. The
//! scaling factor comes from the config; the pipeline applies it.

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};

use crate::attention::Attention;
use crate::blocks::{Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm};
use crate::config::VaeConfig;
use crate::host;

const EPS: f64 = 1e-6;

/// `DownEncoderBlock2D` (`encoder.down_blocks.N`).
#[derive(Module, Debug)]
pub struct EncoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers: Vec<Downsample2D>,
}

/// `UpDecoderBlock2D` (`decoder.up_blocks.N`).
#[derive(Module, Debug)]
pub struct DecoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsamplers: Vec<Upsample2D>,
}

/// `UNetMidBlock2D` without time embedding: resnet, spatial attention, resnet.
#[derive(Module, Debug)]
pub struct VaeMidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Attention>,
}

impl VaeMidBlock {
    fn new(c: usize, groups: usize, attention: bool, device: &Device) -> Self {
        VaeMidBlock {
            resnets: (0..2)
                .map(|_| ResnetBlock2D::new(c, c, None, groups, EPS, device))
                .collect(),
            attentions: if attention {
                vec![Attention::spatial(c, c, groups, EPS, device)]
            } else {
                Vec::new()
            },
        }
    }

    fn forward(&self, x: Tensor<4>, slice: Option<usize>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, None);
        if let Some(a) = self.attentions.first() {
            x = a.forward_spatial(x, slice);
        }
        self.resnets[1].forward(x, None)
    }
}

#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<EncoderBlock>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: VaeMidBlock,
    pub up_blocks: Vec<DecoderBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

/// The VAE; parameter paths equal diffusers' keys.
#[derive(Module, Debug)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

/// The latent posterior `N(mean, exp(logvar))` of an encoded image.
#[derive(Debug, Clone)]
pub struct Posterior {
    pub mean: Tensor<4>,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor<4>,
}

impl AutoencoderKL {
    pub fn new(config: &VaeConfig, device: &Device) -> Self {
        let ch = &config.block_out_channels;
        let n = ch.len();
        let g = config.norm_num_groups;
        let lat = config.latent_channels;
        let layers = config.layers_per_block;
        let attn = config.mid_block_add_attention;

        let mut down_blocks = Vec::new();
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            down_blocks.push(EncoderBlock {
                resnets: (0..layers)
                    .map(|l| {
                        ResnetBlock2D::new(
                            if l == 0 { cin } else { cout },
                            cout,
                            None,
                            g,
                            EPS,
                            device,
                        )
                    })
                    .collect(),
                downsamplers: if i + 1 < n {
                    vec![Downsample2D::new(cout, 0, device)]
                } else {
                    Vec::new()
                },
            });
            cin = cout;
        }
        let encoder = Encoder {
            conv_in: conv(config.in_channels, ch[0], 3, device),
            down_blocks,
            mid_block: VaeMidBlock::new(ch[n - 1], g, attn, device),
            conv_norm_out: group_norm(g, ch[n - 1], EPS, device),
            conv_out: conv(ch[n - 1], 2 * lat, 3, device),
        };

        let mut up_blocks = Vec::new();
        let mut prev = ch[n - 1];
        for j in 0..n {
            let cout = ch[n - 1 - j];
            up_blocks.push(DecoderBlock {
                resnets: (0..layers + 1)
                    .map(|l| {
                        ResnetBlock2D::new(
                            if l == 0 { prev } else { cout },
                            cout,
                            None,
                            g,
                            EPS,
                            device,
                        )
                    })
                    .collect(),
                upsamplers: if j + 1 < n {
                    vec![Upsample2D::new(cout, device)]
                } else {
                    Vec::new()
                },
            });
            prev = cout;
        }
        let decoder = Decoder {
            conv_in: conv(lat, ch[n - 1], 3, device),
            mid_block: VaeMidBlock::new(ch[n - 1], g, attn, device),
            up_blocks,
            conv_norm_out: group_norm(g, ch[0], EPS, device),
            conv_out: conv(ch[0], config.out_channels, 3, device),
        };
        AutoencoderKL {
            encoder,
            decoder,
            quant_conv: config
                .use_quant_conv
                .then(|| conv(2 * lat, 2 * lat, 1, device)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| conv(lat, lat, 1, device)),
        }
    }

    /// Stores every 3x3 convolution weight that the flex host path runs split per kernel tap
    /// ([`host::store_taps`]), in the layout of a pass at `image_hw` (the config's
    /// `sample_size`), so that no pass keeps a second, split copy of them; `load_vae` calls it.
    /// No effect on other backends.
    pub fn store_conv_taps(&mut self, image_hw: [usize; 2]) {
        let n = self.encoder.down_blocks.len().max(1);
        let mut sizes = vec![image_hw];
        for _ in 1..n {
            let [h, w] = *sizes.last().expect("one level");
            sizes.push([h.div_ceil(2), w.div_ceil(2)]);
        }
        let e = &mut self.encoder;
        host::store_taps(&mut e.conv_in, sizes[0]);
        for (i, block) in e.down_blocks.iter_mut().enumerate() {
            block
                .resnets
                .iter_mut()
                .for_each(|r| r.store_taps(sizes[i]));
        }
        e.mid_block
            .resnets
            .iter_mut()
            .for_each(|r| r.store_taps(sizes[n - 1]));
        host::store_taps(&mut e.conv_out, sizes[n - 1]);
        let d = &mut self.decoder;
        host::store_taps(&mut d.conv_in, sizes[n - 1]);
        d.mid_block
            .resnets
            .iter_mut()
            .for_each(|r| r.store_taps(sizes[n - 1]));
        for (j, block) in d.up_blocks.iter_mut().enumerate() {
            let i = n.saturating_sub(1 + j);
            block
                .resnets
                .iter_mut()
                .for_each(|r| r.store_taps(sizes[i]));
            for up in &mut block.upsamplers {
                host::store_taps(&mut up.conv, sizes[i.saturating_sub(1)]);
            }
        }
        host::store_taps(&mut d.conv_out, sizes[0]);
    }

    /// Image `[batch, 3, H, W]` in [-1, 1] to the latent posterior (unscaled).
    pub fn encode(&self, image: Tensor<4>, slice: Option<usize>) -> Posterior {
        let e = &self.encoder;
        let mut x = host::conv2d(&e.conv_in, image);
        for block in &e.down_blocks {
            for r in &block.resnets {
                x = r.forward(x, None);
            }
            for d in &block.downsamplers {
                x = d.forward(x);
            }
        }
        x = e.mid_block.forward(x, slice);
        x = host::conv2d(&e.conv_out, host::group_norm(&e.conv_norm_out, x, true));
        if let Some(q) = &self.quant_conv {
            x = q.forward(x);
        }
        let c = x.dims()[1] / 2;
        Posterior {
            mean: x.clone().narrow(1, 0, c),
            logvar: x.narrow(1, c, c).clamp(-30.0, 20.0),
        }
    }

    /// Latent `[batch, latent_channels, h, w]` (unscaled) to the image, about [-1, 1].
    pub fn decode(&self, latent: Tensor<4>, slice: Option<usize>) -> Tensor<4> {
        let d = &self.decoder;
        let mut x = match &self.post_quant_conv {
            Some(p) => p.forward(latent),
            None => latent,
        };
        x = host::conv2d(&d.conv_in, x);
        x = d.mid_block.forward(x, slice);
        for block in &d.up_blocks {
            for r in &block.resnets {
                x = r.forward(x, None);
            }
            for u in &block.upsamplers {
                x = u.forward(x, None);
            }
        }
        host::conv2d(&d.conv_out, host::group_norm(&d.conv_norm_out, x, true))
    }
}
