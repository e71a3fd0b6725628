//! The FID Inception-v3 network of pytorch-fid 0.3.0 (`InceptionV3(output_blocks=[3])`, i.e.
//! `fid_inception_v3()` cut after the final average pool): 2048-d pool features of images in
//! [0, 1], the features every FID number is computed from.
//!
//! It is torchvision's Inception-v3 with pytorch-fid's patches, which port TensorFlow's graph:
//! the average pools of `Mixed_5b..d`, `Mixed_6b..e` and `Mixed_7b` ignore the zero padding
//! (`count_include_pad=False`), and `Mixed_7c` max-pools its pool branch. Every convolution is a
//! `BasicConv2d`: bias-free conv, eval-mode BatchNorm (eps 0.001, running statistics), ReLU.
//! Inputs are resized to 299x299 (bilinear, `align_corners=False`) and scaled to [-1, 1].
//!
//! Module fields carry the reference's names (`Conv2d_1a_3x3.conv.weight`,
//! `Mixed_5b.branch1x1.bn.running_mean`, ...), so weights load by name from pytorch-fid's
//! `pt_inception-2015-12-05-6726825d.pth` (through decorr-convert's restricted unpickler: no
//! pickle code runs) or from a safetensors file with the same keys.
#![allow(non_snake_case)]

use std::collections::BTreeSet;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::module::{adaptive_avg_pool2d, avg_pool2d, interpolate, max_pool2d};
use burn::tensor::ops::{AvgPoolOptions, InterpolateMode, InterpolateOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};
use decorr_convert::{DType, StateDict};

use crate::EvalError;

/// Side of the square input the network was trained on; inputs are resized to it.
pub const INPUT_SIZE: usize = 299;
/// Length of the pool features (`dims=2048` in pytorch-fid).
pub const FEATURE_DIM: usize = 2048;
/// pytorch-fid's weight file name (its `FID_WEIGHTS_URL`), for messages.
pub const WEIGHTS_FILE: &str = "pt_inception-2015-12-05-6726825d.pth";
/// BatchNorm epsilon of torchvision's `BasicConv2d`.
const BN_EPS: f64 = 0.001;

/// Where weight tensors come from while the network is built: a state dict (loading), or
/// nothing (only the names and shapes are recorded, for [`weight_shapes`]).
struct Loader<'a> {
    source: Option<StateDict>,
    device: &'a Device,
    seen: Vec<(String, Vec<usize>)>,
    problems: Vec<String>,
}

impl Loader<'_> {
    fn param<const D: usize>(&mut self, name: String, shape: [usize; D]) -> Param<Tensor<D>> {
        self.seen.push((name.clone(), shape.to_vec()));
        let Some(sd) = self.source.as_mut() else {
            return Param::from_tensor(Tensor::zeros([1; D], self.device));
        };
        let values = match sd.remove(&name) {
            None => {
                self.problems
                    .push(format!("tensor `{name}` is missing from the file"));
                None
            }
            Some(t) if t.shape != shape => {
                self.problems.push(format!(
                    "tensor `{name}` has shape {:?}, the FID Inception network expects {shape:?}",
                    t.shape
                ));
                None
            }
            Some(t) if !t.dtype.is_float() => {
                self.problems.push(format!(
                    "tensor `{name}` has dtype {:?}, not a float",
                    t.dtype
                ));
                None
            }
            Some(t) => Some(
                t.cast(DType::F32)
                    .data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<f32>>(),
            ),
        };
        // A placeholder keeps building so that every problem is reported at once.
        let tensor = match values {
            Some(v) => Tensor::from_data(TensorData::new(v, shape), self.device),
            None => Tensor::zeros(shape, self.device),
        };
        Param::from_tensor(tensor)
    }
}

/// Eval-mode `nn.BatchNorm2d` with torch's parameter names.
#[derive(Module, Debug)]
pub struct BatchNorm2d {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub running_mean: Param<Tensor<1>>,
    pub running_var: Param<Tensor<1>>,
}

impl BatchNorm2d {
    fn load(l: &mut Loader<'_>, prefix: &str, channels: usize) -> Self {
        Self {
            weight: l.param(format!("{prefix}.weight"), [channels]),
            bias: l.param(format!("{prefix}.bias"), [channels]),
            running_mean: l.param(format!("{prefix}.running_mean"), [channels]),
            running_var: l.param(format!("{prefix}.running_var"), [channels]),
        }
    }

    /// `x * alpha + beta` with alpha = weight / sqrt(var + eps), beta = bias - mean * alpha:
    /// the form torch's CPU kernel evaluates in eval mode.
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let c = self.weight.dims()[0];
        let alpha = self.weight.val() / (self.running_var.val() + BN_EPS).sqrt();
        let beta = self.bias.val() - self.running_mean.val() * alpha.clone();
        x * alpha.reshape([1, c, 1, 1]) + beta.reshape([1, c, 1, 1])
    }
}

/// torchvision's `BasicConv2d`: bias-free conv, BatchNorm, ReLU.
#[derive(Module, Debug)]
pub struct BasicConv2d {
    pub conv: Conv2d,
    pub bn: BatchNorm2d,
}

impl BasicConv2d {
    /// `kernel`, `stride` and `padding` as `(height, width)`.
    fn load(
        l: &mut Loader<'_>,
        prefix: &str,
        cin: usize,
        cout: usize,
        kernel: (usize, usize),
        stride: usize,
        padding: (usize, usize),
    ) -> Self {
        let (kh, kw) = kernel;
        let (ph, pw) = padding;
        let conv = Conv2d {
            weight: l.param(format!("{prefix}.conv.weight"), [cout, cin, kh, kw]),
            bias: None,
            stride: [stride, stride],
            kernel_size: [kh, kw],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Explicit(ph, pw, ph, pw),
        };
        Self {
            conv,
            bn: BatchNorm2d::load(l, &format!("{prefix}.bn"), cout),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        burn::tensor::activation::relu(self.bn.forward(self.conv.forward(x)))
    }
}

/// Square-kernel shorthand for [`BasicConv2d::load`].
fn conv(l: &mut Loader<'_>, p: &str, name: &str, cin: usize, cout: usize, k: usize) -> BasicConv2d {
    BasicConv2d::load(
        l,
        &format!("{p}.{name}"),
        cin,
        cout,
        (k, k),
        1,
        (k / 2, k / 2),
    )
}

/// 3x3, stride 1, padding 1 average pool that ignores the padding (TensorFlow's pool, the
/// `count_include_pad=False` patch of pytorch-fid).
fn avg_pool_tf(x: Tensor<4>) -> Tensor<4> {
    avg_pool2d(
        x,
        AvgPoolOptions::new([3, 3])
            .with_stride([1, 1])
            .with_padding([1, 1])
            .with_count_include_pad(false),
    )
}

/// 3x3 stride-2 max pool without padding (`nn.MaxPool2d(3, 2)`, `F.max_pool2d(x, 3, 2)`).
fn max_pool_s2(x: Tensor<4>) -> Tensor<4> {
    max_pool2d(x, MaxPoolOptions::new([3, 3]).with_stride([2, 2]))
}

/// `FIDInceptionA` (Mixed_5b/c/d).
#[derive(Module, Debug)]
pub struct InceptionA {
    pub branch1x1: BasicConv2d,
    pub branch5x5_1: BasicConv2d,
    pub branch5x5_2: BasicConv2d,
    pub branch3x3dbl_1: BasicConv2d,
    pub branch3x3dbl_2: BasicConv2d,
    pub branch3x3dbl_3: BasicConv2d,
    pub branch_pool: BasicConv2d,
}

impl InceptionA {
    fn load(l: &mut Loader<'_>, p: &str, cin: usize, pool_features: usize) -> Self {
        Self {
            branch1x1: conv(l, p, "branch1x1", cin, 64, 1),
            branch5x5_1: conv(l, p, "branch5x5_1", cin, 48, 1),
            branch5x5_2: conv(l, p, "branch5x5_2", 48, 64, 5),
            branch3x3dbl_1: conv(l, p, "branch3x3dbl_1", cin, 64, 1),
            branch3x3dbl_2: conv(l, p, "branch3x3dbl_2", 64, 96, 3),
            branch3x3dbl_3: conv(l, p, "branch3x3dbl_3", 96, 96, 3),
            branch_pool: conv(l, p, "branch_pool", cin, pool_features, 1),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b5 = self
            .branch5x5_2
            .forward(self.branch5x5_1.forward(x.clone()));
        let b3 = self.branch3x3dbl_3.forward(
            self.branch3x3dbl_2
                .forward(self.branch3x3dbl_1.forward(x.clone())),
        );
        let bp = self.branch_pool.forward(avg_pool_tf(x));
        Tensor::cat(vec![b1, b5, b3, bp], 1)
    }
}

/// torchvision's `InceptionB` (Mixed_6a), unpatched.
#[derive(Module, Debug)]
pub struct InceptionB {
    pub branch3x3: BasicConv2d,
    pub branch3x3dbl_1: BasicConv2d,
    pub branch3x3dbl_2: BasicConv2d,
    pub branch3x3dbl_3: BasicConv2d,
}

impl InceptionB {
    fn load(l: &mut Loader<'_>, p: &str, cin: usize) -> Self {
        Self {
            branch3x3: BasicConv2d::load(l, &format!("{p}.branch3x3"), cin, 384, (3, 3), 2, (0, 0)),
            branch3x3dbl_1: conv(l, p, "branch3x3dbl_1", cin, 64, 1),
            branch3x3dbl_2: conv(l, p, "branch3x3dbl_2", 64, 96, 3),
            branch3x3dbl_3: BasicConv2d::load(
                l,
                &format!("{p}.branch3x3dbl_3"),
                96,
                96,
                (3, 3),
                2,
                (0, 0),
            ),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b3 = self.branch3x3.forward(x.clone());
        let bd = self.branch3x3dbl_3.forward(
            self.branch3x3dbl_2
                .forward(self.branch3x3dbl_1.forward(x.clone())),
        );
        let bp = max_pool_s2(x);
        Tensor::cat(vec![b3, bd, bp], 1)
    }
}

/// `FIDInceptionC` (Mixed_6b..e): factorised 7x7 convolutions.
#[derive(Module, Debug)]
pub struct InceptionC {
    pub branch1x1: BasicConv2d,
    pub branch7x7_1: BasicConv2d,
    pub branch7x7_2: BasicConv2d,
    pub branch7x7_3: BasicConv2d,
    pub branch7x7dbl_1: BasicConv2d,
    pub branch7x7dbl_2: BasicConv2d,
    pub branch7x7dbl_3: BasicConv2d,
    pub branch7x7dbl_4: BasicConv2d,
    pub branch7x7dbl_5: BasicConv2d,
    pub branch_pool: BasicConv2d,
}

impl InceptionC {
    fn load(l: &mut Loader<'_>, p: &str, cin: usize, c7: usize) -> Self {
        let row = |l: &mut Loader<'_>, n: &str, a, b| {
            BasicConv2d::load(l, &format!("{p}.{n}"), a, b, (1, 7), 1, (0, 3))
        };
        let col = |l: &mut Loader<'_>, n: &str, a, b| {
            BasicConv2d::load(l, &format!("{p}.{n}"), a, b, (7, 1), 1, (3, 0))
        };
        Self {
            branch1x1: conv(l, p, "branch1x1", cin, 192, 1),
            branch7x7_1: conv(l, p, "branch7x7_1", cin, c7, 1),
            branch7x7_2: row(l, "branch7x7_2", c7, c7),
            branch7x7_3: col(l, "branch7x7_3", c7, 192),
            branch7x7dbl_1: conv(l, p, "branch7x7dbl_1", cin, c7, 1),
            branch7x7dbl_2: col(l, "branch7x7dbl_2", c7, c7),
            branch7x7dbl_3: row(l, "branch7x7dbl_3", c7, c7),
            branch7x7dbl_4: col(l, "branch7x7dbl_4", c7, c7),
            branch7x7dbl_5: row(l, "branch7x7dbl_5", c7, 192),
            branch_pool: conv(l, p, "branch_pool", cin, 192, 1),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let mut b7 = self.branch7x7_1.forward(x.clone());
        b7 = self.branch7x7_2.forward(b7);
        b7 = self.branch7x7_3.forward(b7);
        let mut bd = self.branch7x7dbl_1.forward(x.clone());
        bd = self.branch7x7dbl_2.forward(bd);
        bd = self.branch7x7dbl_3.forward(bd);
        bd = self.branch7x7dbl_4.forward(bd);
        bd = self.branch7x7dbl_5.forward(bd);
        let bp = self.branch_pool.forward(avg_pool_tf(x));
        Tensor::cat(vec![b1, b7, bd, bp], 1)
    }
}

/// torchvision's `InceptionD` (Mixed_7a), unpatched.
#[derive(Module, Debug)]
pub struct InceptionD {
    pub branch3x3_1: BasicConv2d,
    pub branch3x3_2: BasicConv2d,
    pub branch7x7x3_1: BasicConv2d,
    pub branch7x7x3_2: BasicConv2d,
    pub branch7x7x3_3: BasicConv2d,
    pub branch7x7x3_4: BasicConv2d,
}

impl InceptionD {
    fn load(l: &mut Loader<'_>, p: &str, cin: usize) -> Self {
        let n = |s: &str| format!("{p}.{s}");
        Self {
            branch3x3_1: conv(l, p, "branch3x3_1", cin, 192, 1),
            branch3x3_2: BasicConv2d::load(l, &n("branch3x3_2"), 192, 320, (3, 3), 2, (0, 0)),
            branch7x7x3_1: conv(l, p, "branch7x7x3_1", cin, 192, 1),
            branch7x7x3_2: BasicConv2d::load(l, &n("branch7x7x3_2"), 192, 192, (1, 7), 1, (0, 3)),
            branch7x7x3_3: BasicConv2d::load(l, &n("branch7x7x3_3"), 192, 192, (7, 1), 1, (3, 0)),
            branch7x7x3_4: BasicConv2d::load(l, &n("branch7x7x3_4"), 192, 192, (3, 3), 2, (0, 0)),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b3 = self
            .branch3x3_2
            .forward(self.branch3x3_1.forward(x.clone()));
        let mut b7 = self.branch7x7x3_1.forward(x.clone());
        b7 = self.branch7x7x3_2.forward(b7);
        b7 = self.branch7x7x3_3.forward(b7);
        b7 = self.branch7x7x3_4.forward(b7);
        let bp = max_pool_s2(x);
        Tensor::cat(vec![b3, b7, bp], 1)
    }
}

/// `FIDInceptionE_1` (Mixed_7b, TF average pool) and `FIDInceptionE_2` (Mixed_7c, max pool).
#[derive(Module, Debug)]
pub struct InceptionE {
    pub branch1x1: BasicConv2d,
    pub branch3x3_1: BasicConv2d,
    pub branch3x3_2a: BasicConv2d,
    pub branch3x3_2b: BasicConv2d,
    pub branch3x3dbl_1: BasicConv2d,
    pub branch3x3dbl_2: BasicConv2d,
    pub branch3x3dbl_3a: BasicConv2d,
    pub branch3x3dbl_3b: BasicConv2d,
    pub branch_pool: BasicConv2d,
    /// `FIDInceptionE_2`: 3x3 stride-1 max pool (padding 1) before `branch_pool`.
    pub max_pool: bool,
}

impl InceptionE {
    fn load(l: &mut Loader<'_>, p: &str, cin: usize, max_pool: bool) -> Self {
        let n = |s: &str| format!("{p}.{s}");
        Self {
            branch1x1: conv(l, p, "branch1x1", cin, 320, 1),
            branch3x3_1: conv(l, p, "branch3x3_1", cin, 384, 1),
            branch3x3_2a: BasicConv2d::load(l, &n("branch3x3_2a"), 384, 384, (1, 3), 1, (0, 1)),
            branch3x3_2b: BasicConv2d::load(l, &n("branch3x3_2b"), 384, 384, (3, 1), 1, (1, 0)),
            branch3x3dbl_1: conv(l, p, "branch3x3dbl_1", cin, 448, 1),
            branch3x3dbl_2: conv(l, p, "branch3x3dbl_2", 448, 384, 3),
            branch3x3dbl_3a: BasicConv2d::load(
                l,
                &n("branch3x3dbl_3a"),
                384,
                384,
                (1, 3),
                1,
                (0, 1),
            ),
            branch3x3dbl_3b: BasicConv2d::load(
                l,
                &n("branch3x3dbl_3b"),
                384,
                384,
                (3, 1),
                1,
                (1, 0),
            ),
            branch_pool: conv(l, p, "branch_pool", cin, 192, 1),
            max_pool,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b3 = self.branch3x3_1.forward(x.clone());
        let b3 = Tensor::cat(
            vec![
                self.branch3x3_2a.forward(b3.clone()),
                self.branch3x3_2b.forward(b3),
            ],
            1,
        );
        let bd = self
            .branch3x3dbl_2
            .forward(self.branch3x3dbl_1.forward(x.clone()));
        let bd = Tensor::cat(
            vec![
                self.branch3x3dbl_3a.forward(bd.clone()),
                self.branch3x3dbl_3b.forward(bd),
            ],
            1,
        );
        let pooled = if self.max_pool {
            max_pool2d(
                x,
                MaxPoolOptions::new([3, 3])
                    .with_stride([1, 1])
                    .with_padding([1, 1]),
            )
        } else {
            avg_pool_tf(x)
        };
        let bp = self.branch_pool.forward(pooled);
        Tensor::cat(vec![b1, b3, bd, bp], 1)
    }
}

/// pytorch-fid's `InceptionV3([3])`: blocks 0-3 of the FID Inception network.
#[derive(Module, Debug)]
pub struct FidInception {
    pub Conv2d_1a_3x3: BasicConv2d,
    pub Conv2d_2a_3x3: BasicConv2d,
    pub Conv2d_2b_3x3: BasicConv2d,
    pub Conv2d_3b_1x1: BasicConv2d,
    pub Conv2d_4a_3x3: BasicConv2d,
    pub Mixed_5b: InceptionA,
    pub Mixed_5c: InceptionA,
    pub Mixed_5d: InceptionA,
    pub Mixed_6a: InceptionB,
    pub Mixed_6b: InceptionC,
    pub Mixed_6c: InceptionC,
    pub Mixed_6d: InceptionC,
    pub Mixed_6e: InceptionC,
    pub Mixed_7a: InceptionD,
    pub Mixed_7b: InceptionE,
    pub Mixed_7c: InceptionE,
}

impl FidInception {
    /// Built in torch's `state_dict` order, so [`weight_shapes`] lists tensors in that order.
    fn build(l: &mut Loader<'_>) -> Self {
        let b = BasicConv2d::load;
        Self {
            Conv2d_1a_3x3: b(l, "Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)),
            Conv2d_2a_3x3: b(l, "Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
            Conv2d_2b_3x3: b(l, "Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
            Conv2d_3b_1x1: b(l, "Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
            Conv2d_4a_3x3: b(l, "Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0)),
            Mixed_5b: InceptionA::load(l, "Mixed_5b", 192, 32),
            Mixed_5c: InceptionA::load(l, "Mixed_5c", 256, 64),
            Mixed_5d: InceptionA::load(l, "Mixed_5d", 288, 64),
            Mixed_6a: InceptionB::load(l, "Mixed_6a", 288),
            Mixed_6b: InceptionC::load(l, "Mixed_6b", 768, 128),
            Mixed_6c: InceptionC::load(l, "Mixed_6c", 768, 160),
            Mixed_6d: InceptionC::load(l, "Mixed_6d", 768, 160),
            Mixed_6e: InceptionC::load(l, "Mixed_6e", 768, 192),
            Mixed_7a: InceptionD::load(l, "Mixed_7a", 768),
            Mixed_7b: InceptionE::load(l, "Mixed_7b", 1280, false),
            Mixed_7c: InceptionE::load(l, "Mixed_7c", 2048, true),
        }
    }

    /// Build the network from a state dict with pytorch-fid's key names. `fc.*`, `AuxLogits.*`
    /// and `*.num_batches_tracked` are ignored; any missing, mis-shaped or unknown tensor is an
    /// error listing them all. `origin` names the source in messages.
    pub fn from_state_dict(
        mut sd: StateDict,
        origin: &Path,
        device: &Device,
    ) -> Result<Self, EvalError> {
        let mut problems = Vec::new();
        // torchvision's ImageNet Inception has the same tensor names but a 1000-class head;
        // its features give FID values that are not comparable to anyone's.
        if let Some(fc) = sd.get("fc.weight")
            && fc.shape.first() == Some(&1000)
        {
            problems.push(
                "  `fc.weight` has 1000 classes: this is torchvision's ImageNet Inception-v3, not \
                 the FID Inception (1008 classes, pytorch-fid's pt_inception-2015-12-05-6726825d.pth)"
                    .to_string(),
            );
        }
        sd.retain(|k, _| {
            !(k.starts_with("fc.")
                || k.starts_with("AuxLogits.")
                || k.ends_with("num_batches_tracked"))
        });
        let mut l = Loader {
            source: Some(sd),
            device,
            seen: Vec::new(),
            problems: Vec::new(),
        };
        let model = Self::build(&mut l);
        problems.extend(l.problems.into_iter().map(|p| format!("  {p}")));
        let unused: BTreeSet<String> = l
            .source
            .map(|s| s.into_keys().collect())
            .unwrap_or_default();
        for k in unused {
            problems.push(format!(
                "  tensor `{k}` in the file is not part of the FID Inception network (wrong file?)"
            ));
        }
        if problems.is_empty() {
            return Ok(model);
        }
        let n = problems.len();
        if n > 20 {
            problems.truncate(20);
            problems.push(format!("  ... and {} more", n - 20));
        }
        Err(EvalError::BadFile {
            path: origin.to_path_buf(),
            message: format!(
                "does not hold pytorch-fid's Inception weights ({WEIGHTS_FILE} or a safetensors \
                 file with its keys):\n{}",
                problems.join("\n")
            ),
        })
    }

    /// pytorch-fid's `InceptionV3([3])(images)[0]` flattened: `images` is `[N, 3, H, W]` with
    /// values in [0, 1] (as `ToTensor` gives); returns the `[N, 2048]` pool features.
    ///
    /// # Panics
    /// If `images` does not have 3 channels (a caller bug, not user input: the folder reader
    /// converts every image to RGB).
    pub fn features(&self, images: Tensor<4>) -> Tensor<2> {
        let [n, c, h, w] = images.dims();
        assert_eq!(c, 3, "FidInception::features takes RGB images [N, 3, H, W]");
        let mut x = images;
        if (h, w) != (INPUT_SIZE, INPUT_SIZE) {
            // At 299x299 the resize is the identity (source = destination coordinates).
            x = interpolate(
                x,
                InterpolateOptions::new(InterpolateMode::Bilinear)
                    .with_align_corners(false)
                    .with_output_size([INPUT_SIZE, INPUT_SIZE]),
            );
        }
        x = x * 2.0 - 1.0;
        // Block 0
        x = self.Conv2d_1a_3x3.forward(x);
        x = self.Conv2d_2a_3x3.forward(x);
        x = self.Conv2d_2b_3x3.forward(x);
        x = max_pool_s2(x);
        // Block 1
        x = self.Conv2d_3b_1x1.forward(x);
        x = self.Conv2d_4a_3x3.forward(x);
        x = max_pool_s2(x);
        // Block 2
        x = self.Mixed_5b.forward(x);
        x = self.Mixed_5c.forward(x);
        x = self.Mixed_5d.forward(x);
        x = self.Mixed_6a.forward(x);
        x = self.Mixed_6b.forward(x);
        x = self.Mixed_6c.forward(x);
        x = self.Mixed_6d.forward(x);
        x = self.Mixed_6e.forward(x);
        // Block 3
        x = self.Mixed_7a.forward(x);
        x = self.Mixed_7b.forward(x);
        x = self.Mixed_7c.forward(x);
        adaptive_avg_pool2d(x, [1, 1]).reshape([n, FEATURE_DIM])
    }
}

/// Names and shapes of the network's weight tensors in pytorch-fid's `state_dict` order
/// (without `fc.*` and `num_batches_tracked`).
pub fn weight_shapes() -> Vec<(String, Vec<usize>)> {
    let device = Device::default();
    let mut l = Loader {
        source: None,
        device: &device,
        seen: Vec::new(),
        problems: Vec::new(),
    };
    let _ = FidInception::build(&mut l);
    l.seen
}

/// Load the FID Inception network from pytorch-fid's weight file
/// (`pt_inception-2015-12-05-6726825d.pth`, read by a restricted unpickler that executes
/// nothing) or a safetensors file with the same keys; the format is recognised by content.
pub fn load_inception(path: &Path, device: &Device) -> Result<FidInception, EvalError> {
    if !path.is_file() {
        return Err(EvalError::Input(format!(
            "Inception weights {} do not exist; download pytorch-fid's {WEIGHTS_FILE} \
             (https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE})",
            path.display()
        )));
    }
    // pytorch-fid's file predates torch 1.6 (the package supports torch >= 1.0.1), so it is in
    // the legacy pickle format; read_state_dict tells the formats apart by their first bytes.
    let sd = decorr_convert::read_state_dict(path)?;
    FidInception::from_state_dict(sd, path, device)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic stand-in weights for tensor number `k` of [`weight_shapes`]: the fixture
/// script's `synthetic_weight`, bit-identical to its numpy version. The real weights cannot be
/// committed (24M parameters), so parity tests build the network from this formula on both sides.
pub fn synthetic_weight(k: usize, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let seed = ((k as u64) + 1) << 32;
    (0..n as u64)
        .map(|i| {
            let u = (splitmix64(seed.wrapping_add(i)) >> 11) as f64 * 2f64.powi(-52) - 1.0;
            let v = if name.ends_with("conv.weight") {
                let fan_in: usize = shape[1..].iter().product();
                (6.0 / fan_in as f64).sqrt() * u
            } else if name.ends_with("bn.weight") {
                1.0 + 0.1 * u
            } else if name.ends_with("bn.bias") || name.ends_with("bn.running_mean") {
                0.1 * u
            } else if name.ends_with("bn.running_var") {
                1.0 + 0.5 * u.abs()
            } else {
                0.0 // not a tensor of the FID network
            };
            v as f32
        })
        .collect()
}
