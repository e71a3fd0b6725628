//! Parity of `decorr_pipeline::rng` with `torch.randn` on the CPU (torch 2.15, diffusers 0.42):
//! every fixture in `tests/fixtures/rng/` (written by `tests/pyref/make_rng_fixtures.py`).
//!
//! Tolerance: none. Every value must have the same float32 bits as torch's, long draws are also
//! checked whole through a 64-bit FNV-1a hash of their bits (and their float64 sum, within
//! [`SUM_TOL`] for summation order). Measured max error: 0 for every draw. The AVX2 kernel is
//! pure IEEE arithmetic, so its draws of >= 16 values are exact on any platform. Draws of < 16
//! values (float64 `log1p`/`sin`/`cos`) and the scalar kernel (`logf`/`cosf`/`sinf`) go through
//! the platform libm as torch's do; they are exact with glibc, where the fixtures were made, and
//! elsewhere are held to [`LIBM_TOL`] instead.

// Tests read results back freely; clippy.toml keeps the library to decorr_core::readback.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;

use burn::tensor::{Device, TensorData};
use decorr_pipeline::rng::{NormalKernel, TorchGenerator, randn_batch, randn_tensor_batch};
use serde::Deserialize;

/// Max abs error of a libm-dependent value on a platform other than glibc Linux.
const LIBM_TOL: f32 = 1e-6;
/// Abs difference allowed between our sequential float64 sum and torch's exactly rounded one.
const SUM_TOL: f64 = 1e-8;
/// Whether the libm is the one the fixtures were made with (glibc), so libm paths are exact too.
const SAME_LIBM: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

/// One `torch.randn` result: all values, or head/tail/sum/hash for long ones.
#[derive(Deserialize)]
struct Draw {
    n: usize,
    #[serde(default)]
    values: Option<Vec<String>>,
    #[serde(default)]
    head: Vec<String>,
    #[serde(default)]
    tail: Vec<String>,
    #[serde(default)]
    sum: Option<f64>,
    #[serde(default)]
    fnv1a: Option<u64>,
}

#[derive(Deserialize)]
struct Latent {
    shape: [usize; 4],
    #[serde(flatten)]
    draw: Draw,
}

#[derive(Deserialize)]
struct SizesCase {
    seed: u64,
    draws: Vec<Draw>,
    sd15: Latent,
    sdxl: Latent,
}

#[derive(Deserialize)]
struct SequenceCase {
    seed: u64,
    #[serde(default)]
    draws: Vec<Draw>,
    #[serde(default)]
    reseed_after_3: Option<Draw>,
}

#[derive(Deserialize)]
struct BatchCase {
    seed: u64,
    shape: [usize; 4],
    generator_list: Draw,
    one_generator: Draw,
}

#[derive(Deserialize)]
struct Fixture<C> {
    cpu_capability: String,
    cases: Vec<C>,
}

fn load<C: for<'de> Deserialize<'de>>(name: &str) -> Fixture<C> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/rng")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run tests/pyref/make_rng_fixtures.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn parse(values: &[String]) -> Vec<f32> {
    values
        .iter()
        .map(|s| s.parse::<f32>().unwrap_or_else(|e| panic!("{s}: {e}")))
        .collect()
}

/// 64-bit FNV-1a of the values' little-endian float32 bytes (as the fixture script computes it).
fn fnv1a(values: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in values.iter().flat_map(|v| v.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Compares `want` with `got[offset..]`: bit for bit when `exact`, else within [`LIBM_TOL`].
fn compare_values(what: &str, got: &[f32], offset: usize, want: &[f32], exact: bool) {
    for (i, (g, w)) in got[offset..].iter().zip(want).enumerate() {
        let ok = if exact {
            g.to_bits() == w.to_bits()
        } else {
            (g - w).abs() <= LIBM_TOL
        };
        assert!(ok, "{what}: value {} is {g:e}, torch has {w:e}", offset + i);
    }
}

/// Checks a draw of ours against torch's. `exact` as in [`compare_values`].
fn check(what: &str, got: &[f32], want: &Draw, exact: bool) {
    assert_eq!(got.len(), want.n, "{what}: length");
    if let Some(values) = &want.values {
        assert_eq!(values.len(), want.n, "{what}: fixture length");
        compare_values(what, got, 0, &parse(values), exact);
        return;
    }
    let (head, tail) = (parse(&want.head), parse(&want.tail));
    assert!(
        !head.is_empty() && !tail.is_empty(),
        "{what}: fixture has no values"
    );
    compare_values(&format!("{what} head"), got, 0, &head, exact);
    compare_values(
        &format!("{what} tail"),
        got,
        got.len() - tail.len(),
        &tail,
        exact,
    );
    let sum: f64 = got.iter().map(|&v| f64::from(v)).sum();
    let want_sum = want.sum.expect("sum");
    let sum_tol = if exact {
        SUM_TOL
    } else {
        f64::from(LIBM_TOL) * got.len() as f64
    };
    assert!(
        (sum - want_sum).abs() <= sum_tol,
        "{what}: sum {sum} vs torch {want_sum}"
    );
    if exact {
        assert_eq!(fnv1a(got), want.fnv1a.expect("fnv1a"), "{what}: bit hash");
    }
}

/// Whether a draw of `n` values by `kernel` is expected bit-exact here.
fn exact(n: usize, kernel: NormalKernel) -> bool {
    SAME_LIBM || (n >= 16 && kernel == NormalKernel::Avx2)
}

fn check_sizes(file: &str, kernel: NormalKernel) {
    let fixture: Fixture<SizesCase> = load(file);
    assert!(!fixture.cases.is_empty());
    for case in &fixture.cases {
        for want in &case.draws {
            let got = TorchGenerator::new(case.seed)
                .with_kernel(kernel)
                .randn(want.n);
            let what = format!("{file} seed {} randn({})", case.seed, want.n);
            check(&what, &got, want, exact(want.n, kernel));
        }
        for (name, latent) in [("sd15", &case.sd15), ("sdxl", &case.sdxl)] {
            let n = latent.shape.iter().product();
            let got = TorchGenerator::new(case.seed).with_kernel(kernel).randn(n);
            let what = format!("{file} seed {} {name} latent {:?}", case.seed, latent.shape);
            check(&what, &got, &latent.draw, exact(n, kernel));
        }
    }
}

/// `randn(n)` from a fresh generator for sizes 1..256 (both sides of the 16-element switch and of
/// the "recompute the last 16" tail) and the SD 1.5 / SDXL latents, for seeds up to 2^64 - 1.
#[test]
fn avx2_kernel_matches_torch_for_every_size_and_seed() {
    let fixture: Fixture<SizesCase> = load("avx2_sizes.json");
    assert_eq!(fixture.cpu_capability, "AVX2");
    check_sizes("avx2_sizes.json", NormalKernel::Avx2);
}

/// The DEFAULT-capability kernel (`ATEN_CPU_CAPABILITY=default`).
#[test]
fn scalar_kernel_matches_torch_default_capability() {
    let fixture: Fixture<SizesCase> = load("scalar_sizes.json");
    assert_eq!(fixture.cpu_capability, "DEFAULT");
    check_sizes("scalar_sizes.json", NormalKernel::Scalar);
}

/// Consecutive `torch.randn` calls on one generator: the engine state and the cached float64
/// Box-Muller value carry over (also across a >= 16 draw, which leaves the cache alone).
#[test]
fn consecutive_draws_continue_like_torch() {
    let fixture: Fixture<SequenceCase> = load("avx2_sequences.json");
    let mut sequences = 0;
    for case in fixture.cases.iter().filter(|c| !c.draws.is_empty()) {
        let mut g = TorchGenerator::new(case.seed);
        let sizes: Vec<usize> = case.draws.iter().map(|d| d.n).collect();
        for (k, want) in case.draws.iter().enumerate() {
            let got = g.randn(want.n);
            let what = format!("seed {} draws {sizes:?}, draw {k}", case.seed);
            check(&what, &got, want, exact(want.n, NormalKernel::Avx2));
        }
        sequences += 1;
    }
    assert!(sequences >= 5, "only {sequences} sequences");
}

/// `manual_seed` drops the cached Box-Muller value: randn(3), re-seed, randn(2).
#[test]
fn manual_seed_drops_cached_normal() {
    let fixture: Fixture<SequenceCase> = load("avx2_sequences.json");
    let mut checked = 0;
    for case in &fixture.cases {
        let Some(want) = &case.reseed_after_3 else {
            continue;
        };
        let mut g = TorchGenerator::new(case.seed);
        g.randn(3);
        g.manual_seed(case.seed);
        let got = g.randn(want.n);
        check(&format!("seed {} reseed", case.seed), &got, want, SAME_LIBM);
        checked += 1;
    }
    assert!(checked > 0);
}

/// diffusers' `randn_tensor((2, 4, 8, 8), generator=[g(seed), g(seed + 1)])` (one generator per
/// image) and `generator=g(seed)` (the batch from one generator), through the tensor helper.
#[test]
fn diffusers_randn_tensor_generator_list_and_single() {
    let fixture: Fixture<BatchCase> = load("diffusers_batch.json");
    assert!(!fixture.cases.is_empty());
    let device = Device::flex();
    for case in &fixture.cases {
        let n: usize = case.shape.iter().product();
        let mut list = [
            TorchGenerator::new(case.seed),
            TorchGenerator::new(case.seed + 1),
        ];
        let listed = randn_tensor_batch(&mut list, case.shape, &device);
        assert_eq!(listed.dims(), case.shape);
        let listed = tensor_values(listed.into_data());
        check(
            &format!("seed {} generator list", case.seed),
            &listed,
            &case.generator_list,
            true,
        );

        let mut one = [TorchGenerator::new(case.seed)];
        let single = randn_batch(&mut one, case.shape);
        assert_eq!(single.len(), n);
        check(
            &format!("seed {} one generator", case.seed),
            &single,
            &case.one_generator,
            true,
        );
        // Each generator of the list drew one image: they are where a fresh one is after that.
        let image = n / case.shape[0];
        assert_eq!(list[0].randn(20), {
            let mut g = TorchGenerator::new(case.seed);
            g.randn(image);
            g.randn(20)
        });
    }
}

/// `randn_tensor` is `randn` of the shape's element count, laid out row-major in that shape.
#[test]
fn randn_tensor_is_randn_in_shape() {
    let device = Device::flex();
    let shape = [1, 4, 8, 8];
    let tensor = TorchGenerator::new(42).randn_tensor(shape, &device);
    assert_eq!(tensor.dims(), shape);
    assert_eq!(
        tensor_values(tensor.into_data()),
        TorchGenerator::new(42).randn(256)
    );
}

/// A list of generators must hold one per image (diffusers pipelines reject other lengths).
#[test]
#[should_panic(expected = "one generator per image")]
fn generator_list_must_match_batch() {
    let mut gens = [TorchGenerator::new(1), TorchGenerator::new(2)];
    randn_batch(&mut gens, [3, 4, 8, 8]);
}

fn tensor_values(data: TensorData) -> Vec<f32> {
    data.try_into_vec_as::<f32>().expect("f32 tensor data")
}
