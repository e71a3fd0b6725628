//! Parity with diffusers 0.42: every fixture in `tests/fixtures/scheduler/` (written by
//! `tests/pyref/make_scheduler_fixtures.py`) is rebuilt from its raw config and replayed step by
//! step with the recorded model outputs and noise.
//!
//! Checked: timesteps (integers exactly; fractional ones, which only Karras/exponential sigmas
//! produce through `_sigma_to_t`, within `T_TOL`), `init_noise_sigma` and `sigmas` to float32
//! rounding, `scale_model_input` within 1e-6 and `step` within 1e-5 (max abs error; see
//! [`step_tolerance`] for the one ~4096-scale latent), and the training `alphas_cumprod` (bit for
//! bit except after a zero-SNR rescale).

// Tests read results back freely; clippy.toml keeps the library to decorr_core::readback.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use decorr_scheduler::schedule::NoiseSchedule;
use decorr_scheduler::*;
use serde::Deserialize;

/// Max abs error of a step output.
const STEP_TOL: f32 = 1e-5;
/// The step tolerance for a given input latent: [`STEP_TOL`], or two float32 ulps of the largest
/// input value when that is larger. Only the zero-SNR Euler case needs the latter: its first latent
/// is ~4096-scale (σ_max = 4096), where one ulp is 2.4e-4 and diffusers' own float32 rounding (with
/// `torch.sqrt` one ulp off in σ) already differs by that much.
fn step_tolerance(input: &[f32]) -> f32 {
    let max = input.iter().fold(0f32, |m, v| m.max(v.abs()));
    let ulp = if max > 0.0 {
        2f32.powi(max.log2().floor() as i32 - 23)
    } else {
        0.0
    };
    STEP_TOL.max(2.0 * ulp)
}

/// Max abs error of a scaled model input.
const SCALE_TOL: f32 = 1e-6;
/// Relative error of `sigmas`: float32 rounding, plus `torch.sqrt`'s (this PyTorch build's float32
/// sqrt is up to 0.75 ulp off), which the zero-SNR rescale amplifies to a few 1e-7.
const SIGMA_TOL: f64 = 1e-6;
/// Fractional timesteps from `_sigma_to_t`: NumPy's float32 `log` of the training sigmas is a
/// vectorised approximation (one ulp off the correctly rounded value in ~20% of cases), which
/// moves the interpolated timestep by up to ~1e-4; every other timestep is compared exactly.
const T_TOL: f64 = 2e-4;

#[derive(Deserialize)]
struct Options {
    karras: Option<bool>,
    eta: f64,
}

#[derive(Deserialize)]
struct Step {
    i: usize,
    timestep: f64,
    model_output: Vec<f32>,
    noise: Option<Vec<f32>>,
    scaled: Option<Vec<f32>>,
    prev_sample: Vec<f32>,
}

#[derive(Deserialize)]
struct Extra {
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    sigmas: Option<Vec<f64>>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    kind: String,
    config: serde_json::Value,
    options: Options,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    sigmas: Option<Vec<f64>>,
    shape: Vec<usize>,
    initial_sample: Vec<f32>,
    steps: Vec<Step>,
    extra_timesteps: Vec<Extra>,
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/scheduler")
}

fn load_cases() -> Vec<Case> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("tests/fixtures/scheduler exists (run tests/pyref/make_scheduler_fixtures.py)")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter(|p| p.file_name().unwrap() != "schedules.json")
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 20,
        "expected the scheduler fixtures, found {paths:?}"
    );
    paths
        .iter()
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
        .collect()
}

fn tensor(data: &[f32], shape: &[usize], device: &Device) -> Tensor<4> {
    let shape: [usize; 4] = shape.try_into().unwrap();
    Tensor::<4>::from_data(TensorData::new(data.to_vec(), shape), device)
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
        .fold(0.0, f32::max)
}

fn build_case(case: &Case, n: usize) -> Box<dyn Scheduler> {
    let config = SchedulerConfig::from_json_str(&case.config.to_string()).unwrap();
    let kind: SchedulerKind = case.kind.parse().unwrap();
    let options = BuildOptions {
        karras: case.options.karras,
        eta: case.options.eta,
    };
    build_with(kind, &config, n, &options)
        .unwrap_or_else(|e| panic!("{}: building {kind} with {n} steps: {e}", case.name))
}

/// Max abs difference of timesteps; asserts exact equality where the reference is integral and
/// not derived from `_sigma_to_t` with fractional output.
fn check_timesteps(name: &str, n: usize, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(
        got.len(),
        want.len(),
        "{name} ({n} steps): timesteps {got:?} vs diffusers {want:?}"
    );
    let all_int = want.iter().all(|t| t.fract() == 0.0);
    if all_int {
        assert_eq!(got, want, "{name} ({n} steps)");
        return 0.0;
    }
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        err <= T_TOL,
        "{name} ({n} steps): timesteps differ by {err}: {got:?} vs {want:?}"
    );
    err
}

fn check_sigmas(name: &str, n: usize, got: Option<&[f32]>, want: Option<&Vec<f64>>) -> f64 {
    match (got, want) {
        (None, None) => 0.0,
        (Some(got), Some(want)) => {
            assert_eq!(got.len(), want.len(), "{name} ({n} steps): sigmas");
            let err = got
                .iter()
                .zip(want)
                .map(|(&a, &b)| ((a as f64 - b) / b.abs().max(1e-3)).abs())
                .fold(0.0, f64::max);
            assert!(
                err <= SIGMA_TOL,
                "{name} ({n} steps): sigmas differ (rel {err}): {got:?} vs {want:?}"
            );
            err
        }
        (got, want) => panic!("{name}: sigmas {got:?} vs {want:?}"),
    }
}

#[test]
fn every_fixture_matches_diffusers() {
    let device = Device::flex();
    let cases = load_cases();
    let (mut worst_step, mut worst_scale, mut worst_t, mut worst_sigma) = (0f32, 0f32, 0f64, 0f64);
    for case in &cases {
        let n = case.num_inference_steps;
        let mut sched = build_case(case, n);
        let t_err = check_timesteps(&case.name, n, sched.timesteps(), &case.timesteps);
        let s_err = check_sigmas(&case.name, n, sched.sigmas(), case.sigmas.as_ref());
        let init = sched.init_noise_sigma();
        assert!(
            (init - case.init_noise_sigma).abs() <= 1e-7 * case.init_noise_sigma.abs(),
            "{}: init_noise_sigma {init} vs {}",
            case.name,
            case.init_noise_sigma
        );
        for extra in &case.extra_timesteps {
            let m = extra.num_inference_steps;
            let other = build_case(case, m);
            let e = check_timesteps(&case.name, m, other.timesteps(), &extra.timesteps);
            worst_t = worst_t.max(e);
            let e = check_sigmas(&case.name, m, other.sigmas(), extra.sigmas.as_ref());
            worst_sigma = worst_sigma.max(e);
            assert!(
                (other.init_noise_sigma() - extra.init_noise_sigma).abs()
                    <= 1e-7 * extra.init_noise_sigma.abs(),
                "{} ({m} steps): init_noise_sigma",
                case.name
            );
        }

        let mut sample = case.initial_sample.clone();
        let (mut case_step, mut case_scale) = (0f32, 0f32);
        for (k, step) in case.steps.iter().enumerate() {
            assert_eq!(step.i, k);
            let t_diff = (step.timestep - sched.model_timestep(k)).abs();
            assert!(t_diff <= T_TOL, "{} step {k}: timestep", case.name);
            let x = tensor(&sample, &case.shape, &device);
            let scaled = values(sched.scale_model_input(x.clone(), k));
            match &step.scaled {
                Some(want) => case_scale = case_scale.max(max_abs_diff(&scaled, want)),
                None => assert_eq!(
                    scaled, sample,
                    "{}: scale_model_input is identity",
                    case.name
                ),
            }
            let out = tensor(&step.model_output, &case.shape, &device);
            let noise = step.noise.as_ref().map(|n| tensor(n, &case.shape, &device));
            assert_eq!(noise.is_some(), sched.needs_noise(), "{}", case.name);
            let prev = sched
                .step(out, k, x, noise)
                .unwrap_or_else(|e| panic!("{} step {k}: {e}", case.name));
            let err = max_abs_diff(&values(prev), &step.prev_sample);
            let tol = step_tolerance(&sample);
            assert!(
                err <= tol,
                "{} step {k} (t = {}): max abs error {err} > {tol}",
                case.name,
                step.timestep
            );
            case_step = case_step.max(err);
            // Feed the reference's output forward so every step sees diffusers' exact inputs.
            sample = step.prev_sample.clone();
        }
        assert!(
            case_scale <= SCALE_TOL,
            "{}: scale_model_input max abs error {case_scale}",
            case.name
        );
        eprintln!(
            "{:<28} {:>2} steps  step err {case_step:.2e}  scale err {case_scale:.2e}  t err {t_err:.1e}  sigma rel err {s_err:.1e}",
            case.name,
            case.steps.len()
        );
        worst_step = worst_step.max(case_step);
        worst_scale = worst_scale.max(case_scale);
        worst_t = worst_t.max(t_err);
        worst_sigma = worst_sigma.max(s_err);
    }
    eprintln!(
        "{} fixtures; worst: step {worst_step:.2e}, scale {worst_scale:.2e}, fractional timestep \
         {worst_t:.1e}, sigma (rel) {worst_sigma:.1e}",
        cases.len()
    );
}

#[derive(Deserialize)]
struct Schedule {
    name: String,
    config: serde_json::Value,
    indices: Vec<usize>,
    alphas_cumprod: Vec<f64>,
}

#[derive(Deserialize)]
struct Schedules {
    schedules: Vec<Schedule>,
}

/// The training schedules: bit for bit where diffusers uses only exactly rounded float32 operations
/// (linspace, square, cumprod); the zero-SNR rescale goes through `torch.sqrt`, which this PyTorch
/// build computes with up to 0.75 ulp of error (MKL), so it is compared to 1e-5 relative.
#[test]
fn alphas_cumprod_match_torch() {
    let text = std::fs::read_to_string(fixture_dir().join("schedules.json")).unwrap();
    let schedules: Schedules = serde_json::from_str(&text).unwrap();
    assert!(schedules.schedules.len() >= 4);
    for s in &schedules.schedules {
        let config = SchedulerConfig::from_json_str(&s.config.to_string()).unwrap();
        let resolved = config.resolve(SchedulerKind::Ddim);
        let ours = NoiseSchedule::new(&resolved, false).unwrap();
        for (&i, &want) in s.indices.iter().zip(&s.alphas_cumprod) {
            // `want` is a float32 value written as float64; compare as float32 because
            // serde_json's default float parsing may be one float64 ulp off on long decimals.
            let (got, want) = (ours.alphas_cumprod[i], want as f32);
            if resolved.rescale_betas_zero_snr {
                // The rescale subtracts √ᾱ_T from every √ᾱ_t, so the relative error grows
                // toward the end of the schedule (where ᾱ → 0).
                let tol = 1e-5 * want.abs() + 1e-12;
                assert!(
                    (got - want).abs() <= tol,
                    "{}: alphas_cumprod[{i}] {got} vs {want}",
                    s.name
                );
            } else {
                assert_eq!(got, want, "{}: alphas_cumprod[{i}]", s.name);
            }
        }
    }
}

/// The trap of the brief: SD 1.5's file has no `timestep_spacing`, so each class uses its own
/// default; writing `leading` explicitly changes Euler's timesteps.
#[test]
fn missing_timestep_spacing_takes_the_reading_class_default() {
    let sd15 = SchedulerConfig::sd15();
    let euler = build(SchedulerKind::Euler, &sd15, 4).unwrap();
    assert_eq!(euler.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
    let ddim = build(SchedulerKind::Ddim, &sd15, 4).unwrap();
    assert_eq!(ddim.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
    let mut leading = sd15.clone();
    leading.timestep_spacing = Some(TimestepSpacing::Leading);
    let euler = build(SchedulerKind::Euler, &leading, 4).unwrap();
    assert_eq!(euler.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
    // …and the same numbers are what diffusers recorded.
    let cases = load_cases();
    let find = |name: &str| cases.iter().find(|c| c.name == name).unwrap();
    assert_eq!(find("euler_sd15").timesteps, vec![999.0, 666.0, 333.0, 0.0]);
    assert_eq!(
        find("euler_leading").timesteps,
        vec![751.0, 501.0, 251.0, 1.0]
    );
    assert_eq!(find("ddim_sd15").timesteps, vec![751.0, 501.0, 251.0, 1.0]);

    // SD 1.5 with DDIM at 50 steps: 981, 961, ..., 1; PNDM: 51 entries, 961 twice.
    let ddim = build(SchedulerKind::Ddim, &sd15, 50).unwrap();
    let want: Vec<f64> = (0..50).rev().map(|k| (k * 20 + 1) as f64).collect();
    assert_eq!(ddim.timesteps(), want.as_slice());
    let pndm = build(sd15.kind().unwrap(), &sd15, 50).unwrap();
    assert_eq!(pndm.timesteps().len(), 51);
    assert_eq!(&pndm.timesteps()[..4], &[981.0, 961.0, 961.0, 941.0]);
    assert_eq!(pndm.timesteps()[50], 1.0);
}
