//! PyTorch's CPU random generator and `torch.randn`, reproduced bit for bit in pure Rust.
//!
//! diffusers draws the initial latents (and the noise of ancestral samplers) with
//! `randn_tensor`, which calls `torch.randn(shape, generator=g, dtype=torch.float32)` on the CPU
//! with `g = torch.Generator("cpu").manual_seed(seed)`. [`TorchGenerator`] replays that, so a
//! `--seed N` here gives the very latents a Python run with seed `N` starts from.
//!
//! What it reproduces (PyTorch's `CPUGeneratorImpl`, `core/DistributionsHelper.h`,
//! `core/TransformationHelper.h`, `native/cpu/DistributionTemplates.h`, `avx_mathfun.h`):
//!
//! - the engine: a standard 32-bit MT19937 seeded with the low 32 bits of the `u64` seed;
//!   `random64` is two draws, the first one in the high half;
//! - float32 uniforms: `(random() & (2^24 - 1)) * 2^-24`; float64 ones: the low 53 bits of
//!   `random64()` times `2^-53`;
//! - `n >= 16` (float32, contiguous): fill `n` uniforms, turn each block of 16 into normals with
//!   Box-Muller (`u1 = 1 - data[j]`, `u2 = data[j + 8]`, `data[j] = r cos θ`,
//!   `data[j + 8] = r sin θ`); when `n % 16 != 0` the last 16 values are refilled with fresh
//!   uniforms and transformed again. Two kernels do the transform ([`NormalKernel`]): the AVX2 one
//!   (`normal_fill_AVX2`: Cephes-style `log256_ps`/`sincos256_ps`, with the fused multiply-adds
//!   GCC contracted them into) and the scalar one (`normal_fill`: libm `logf`/`cosf`/`sinf`);
//! - `n < 16`: one float64 Box-Muller normal per element (`r = sqrt(-2 log1p(-u2))`,
//!   `θ = 2π u1`, returning `r cos θ` and caching `r sin θ` for the next such element, even across
//!   calls; `manual_seed` drops the cache), cast to float32.
//!
//! Consecutive [`TorchGenerator::randn`] calls continue the state exactly like consecutive
//! `torch.randn` calls on one generator, and any shape with `n` elements gives `randn(n)` (the
//! kernels fill the contiguous buffer linearly). Checked bit for bit against torch 2.15 by
//! `tests/rng.rs` (fixtures from `tests/pyref/make_rng_fixtures.py`). The AVX2 kernel is plain
//! IEEE arithmetic (+, ×, fused multiply-add, sqrt), so it is exact on every platform; the scalar
//! kernel and the `n < 16` path call the platform libm (`logf`, `log1p`, `sin`, `cos`, ...) as
//! PyTorch does, so they are exact where both use the same libm (checked with glibc).

use burn::tensor::{Device, Tensor, TensorData};

/// PyTorch's float32 `normal_` kernel for contiguous tensors of at least 16 elements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NormalKernel {
    /// `normal_fill_AVX2`: what x86-64 PyTorch builds run on every CPU with AVX2, AVX-512 ones
    /// included (`normal_stub` has no AVX-512 variant). The default.
    #[default]
    Avx2,
    /// `normal_fill` with libm `logf`/`cosf`/`sinf`: the DEFAULT CPU capability
    /// (`ATEN_CPU_CAPABILITY=default`, or an x86-64 CPU without AVX2).
    Scalar,
}

/// `torch.Generator("cpu")`: an MT19937 engine plus the cached second Box-Muller value of the
/// float64 normal sampler.
#[derive(Clone)]
pub struct TorchGenerator {
    seed: u64,
    engine: Mt19937,
    next_double_normal: Option<f64>,
    kernel: NormalKernel,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("seed", &self.seed)
            .field("kernel", &self.kernel)
            .field("next_double_normal", &self.next_double_normal)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`, with the AVX2 kernel.
    pub fn new(seed: u64) -> Self {
        TorchGenerator {
            seed,
            engine: Mt19937::new(seed),
            next_double_normal: None,
            kernel: NormalKernel::default(),
        }
    }

    /// Uses `kernel` for float32 draws of at least 16 elements.
    pub fn with_kernel(mut self, kernel: NormalKernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The kernel used for float32 draws of at least 16 elements.
    pub fn kernel(&self) -> NormalKernel {
        self.kernel
    }

    /// `manual_seed(seed)`: restarts the engine and drops the cached normal value.
    pub fn manual_seed(&mut self, seed: u64) -> &mut Self {
        self.seed = seed;
        self.engine = Mt19937::new(seed);
        self.next_double_normal = None;
        self
    }

    /// `initial_seed()`: the last seed given (all 64 bits, though only the low 32 reach MT19937).
    pub fn initial_seed(&self) -> u64 {
        self.seed
    }

    /// `CPUGeneratorImpl::random`: the next 32-bit engine output.
    pub fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// `CPUGeneratorImpl::random64`: two engine outputs, the first in the high half.
    pub fn random64(&mut self) -> u64 {
        let hi = u64::from(self.random());
        let lo = u64::from(self.random());
        (hi << 32) | lo
    }

    /// `torch.randn(shape, generator=self, dtype=torch.float32)` for any shape of `n` elements,
    /// flat in row-major order.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            // `normal_kernel`'s serial path: `at::normal_distribution<double>`, cast to float.
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let fill: fn(&mut [f32]) = match self.kernel {
            NormalKernel::Avx2 => normal_fill_16_avx2,
            NormalKernel::Scalar => normal_fill_16_scalar,
        };
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            fill(block);
        }
        if !n.is_multiple_of(16) {
            let last = &mut data[n - 16..];
            for v in last.iter_mut() {
                *v = self.uniform_f32();
            }
            fill(last);
        }
        data
    }

    /// [`randn`](Self::randn) of `shape` as a tensor on `device`.
    pub fn randn_tensor(&mut self, shape: [usize; 4], device: &Device) -> Tensor<4> {
        let values = self.randn(shape.iter().product());
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    /// `at::uniform_real_distribution<float>(0, 1)`.
    fn uniform_f32(&mut self) -> f32 {
        (self.random() & 0xFF_FFFF) as f32 * (1.0 / 16_777_216.0)
    }

    /// `at::uniform_real_distribution<double>(0, 1)`.
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `at::normal_distribution<double>(0, 1)`: Box-Muller, caching the sine half.
    fn normal_f64(&mut self) -> f64 {
        // `+ 0.0` is `* std + mean` with std 1, mean 0: it turns a -0.0 into +0.0, as torch does.
        if let Some(cached) = self.next_double_normal.take() {
            return cached + 0.0;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = std::f64::consts::TAU * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos() + 0.0
    }
}

/// diffusers' `randn_tensor(shape, generator=generators)`, flat: with one generator, the whole
/// batch from it; with several (one per image, as diffusers pipelines require), each image
/// `shape[1..]` from its own generator, concatenated along the batch.
///
/// # Panics
/// If `generators` is empty, or holds more than one generator but not exactly `shape[0]`.
pub fn randn_batch(generators: &mut [TorchGenerator], shape: [usize; 4]) -> Vec<f32> {
    match generators {
        [] => panic!("randn_batch needs at least one generator"),
        [g] => g.randn(shape.iter().product()),
        _ => {
            assert_eq!(
                generators.len(),
                shape[0],
                "one generator per image: {} generators for a batch of {}",
                generators.len(),
                shape[0]
            );
            let per_image = shape[1..].iter().product();
            generators
                .iter_mut()
                .flat_map(|g| g.randn(per_image))
                .collect()
        }
    }
}

/// [`randn_batch`] as a tensor on `device`.
///
/// # Panics
/// As [`randn_batch`].
pub fn randn_tensor_batch(
    generators: &mut [TorchGenerator],
    shape: [usize; 4],
    device: &Device,
) -> Tensor<4> {
    let values = randn_batch(generators, shape);
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// `normal_fill_16`: the scalar Box-Muller transform of 16 uniforms, in float32 with libm.
fn normal_fill_16_scalar(data: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        // `2.0f * c10::pi<double> * u2` is a double product, then stored as float.
        let theta = (std::f64::consts::TAU * f64::from(u2)) as f32;
        // `+ 0.0`: `* std + mean` with std 1, mean 0 (exact, fused or not, except -0.0 -> +0.0).
        data[j] = radius * theta.cos() + 0.0;
        data[j + 8] = radius * theta.sin() + 0.0;
    }
}

/// `normal_fill_16_AVX2`, one lane at a time (the lanes are independent).
fn normal_fill_16_avx2(data: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * log_ps(u1)).sqrt();
        // `_mm256_set1_ps(2.0f * c10::pi<double>)`: 2π rounded to float, i.e. TAU.
        let theta = std::f32::consts::TAU * u2;
        let (sin, cos) = sincos_ps(theta);
        // `_mm256_fmadd_ps(n, std, mean)` with std 1, mean 0.
        data[j] = radius * cos + 0.0;
        data[j + 8] = radius * sin + 0.0;
    }
}

/// One lane of `log256_ps` (avx_mathfun.h, after Cephes `logf`) for the `u1` in `[2^-24, 1]`
/// that Box-Muller feeds it (its NaN for `x <= 0` and denormal clamp never trigger there).
///
/// PyTorch's wheels are built by GCC, whose default `-ffp-contract=fast` fuses each intrinsic
/// multiply into the add that consumes it; the fused multiply-adds below are where it did so
/// (established from torch's output: every other choice mismatches some values).
fn log_ps(x: f32) -> f32 {
    // Cephes coefficients, as float (each is the float nearest the C source's literal).
    const P: [f32; 9] = [
        0.070_376_836,
        -0.115_146_1,
        0.116_769_984,
        -0.124_201_41,
        0.142_493_23,
        -0.166_680_57,
        0.200_007_14,
        -0.249_999_94,
        0.333_333_3,
    ];
    const Q1: f32 = -2.121_944_4e-4;
    const Q2: f32 = 0.693_359_4;

    let bits = x.to_bits();
    let exponent = (bits >> 23) as i32 - 0x7f;
    // Mantissa in [0.5, 1).
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = exponent as f32 + 1.0;
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    let tmp = if small { m } else { 0.0 };
    m -= 1.0;
    e -= if small { 1.0 } else { 0.0 };
    m += tmp;

    let z = m * m;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(m, p);
    }
    y *= m;
    y = y.mul_add(z, e * Q1);
    y -= z * 0.5; // exact product: fused or not is the same
    let r = m + y;
    e.mul_add(Q2, r) // e * Q2 is exact too
}

/// One lane of `sincos256_ps` (avx_mathfun.h, after Cephes `sinf`/`cosf`): `(sin x, cos x)`,
/// with GCC's fused multiply-adds (see [`log_ps`]).
fn sincos_ps(x: f32) -> (f32, f32) {
    const FOPI: f32 = 1.273_239_5; // 4 / π
    const DP1: f32 = -0.785_156_25;
    const DP2: f32 = -2.418_756_5e-4;
    const DP3: f32 = -3.774_895e-8;
    const SINCOF: [f32; 3] = [-1.951_529_6e-4, 8.332_161e-3, -0.166_666_55];
    const COSCOF: [f32; 3] = [2.443_315_7e-5, -1.388_731_6e-3, 4.166_664_6e-2];

    let mut sign_sin = x.to_bits() & 0x8000_0000;
    let mut x = x.abs();
    // `_mm256_cvttps_epi32`: truncation (in range here: |x| <= 2π).
    let mut j = (x * FOPI) as i32;
    j = (j + 1) & !1;
    let y = j as f32;
    sign_sin ^= ((j & 4) as u32) << 29;
    let sine_poly_first = (j & 2) == 0;
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;

    // Extended-precision range reduction x - y π/4.
    x = y.mul_add(DP1, x);
    x = y.mul_add(DP2, x);
    x = y.mul_add(DP3, x);

    let z = x * x;
    // cos polynomial on [-π/4, π/4].
    let mut yc = COSCOF[0].mul_add(z, COSCOF[1]);
    yc = yc.mul_add(z, COSCOF[2]);
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;
    // sin polynomial on [-π/4, π/4].
    let mut ys = SINCOF[0].mul_add(z, SINCOF[1]);
    ys = ys.mul_add(z, SINCOF[2]);
    ys *= z;
    ys = ys.mul_add(x, x);

    // The masked select as the intrinsics do it (adds and subtracts of +0.0 included).
    let (ysin1, ysin2) = if sine_poly_first {
        (0.0, ys)
    } else {
        (yc, 0.0)
    };
    let sin = ysin1 + ysin2;
    let cos = (yc - ysin1) + (ys - ysin2);
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

/// `at::mt19937`: the standard 32-bit Mersenne Twister.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; MT_N],
    next: usize,
}

const MT_N: usize = 624;
const MT_M: usize = 397;

impl Mt19937 {
    /// `init_with_uint32`: torch keeps only `seed & 0xffffffff`.
    fn new(seed: u64) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed as u32;
        for i in 1..MT_N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, next: MT_N }
    }

    fn twist(&mut self) {
        for i in 0..MT_N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % MT_N] & 0x7fff_ffff);
            let mag = if y & 1 == 0 { 0 } else { 0x9908_b0df };
            self.state[i] = self.state[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first outputs of `std::mt19937` seeded with 5489 (its default seed).
    #[test]
    fn mt19937_matches_the_standard_engine() {
        let mut mt = Mt19937::new(5489);
        let first: Vec<u32> = (0..3).map(|_| mt.next_u32()).collect();
        assert_eq!(first, [3_499_211_612, 581_869_302, 3_890_346_734]);
        // The 10000th output of a default-constructed std::mt19937 (C++11 [rand.predef]).
        let mut mt = Mt19937::new(5489);
        let last = (0..10_000).map(|_| mt.next_u32()).last();
        assert_eq!(last, Some(4_123_659_995));
    }

    #[test]
    fn seed_keeps_only_its_low_32_bits() {
        let mut a = TorchGenerator::new(5);
        let mut b = TorchGenerator::new((1 << 32) + 5);
        assert_eq!(a.randn(40), b.randn(40));
        assert_eq!(b.initial_seed(), (1 << 32) + 5);
    }

    #[test]
    fn empty_draw_consumes_nothing() {
        let mut a = TorchGenerator::new(3);
        assert!(a.randn(0).is_empty());
        assert_eq!(a.randn(5), TorchGenerator::new(3).randn(5));
    }
}
