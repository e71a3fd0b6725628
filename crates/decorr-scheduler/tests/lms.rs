//! `LMSDiscreteScheduler` beyond what `parity.rs` checks for every fixture (timesteps, sigmas,
//! `init_noise_sigma`, scaled inputs, step outputs within 1e-5): timesteps bit for bit where no
//! `_sigma_to_t` is involved, the multistep coefficients against diffusers' `scipy.integrate.quad`
//! values, the keys LMS ignores or reads differently from Euler, and its options and errors.

// Tests read results back freely; clippy.toml keeps the library to decorr_core::readback.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use decorr_scheduler::*;
use serde::Deserialize;

/// Relative error of a coefficient: diffusers evaluates the Lagrange polynomial in float32 (the
/// sigmas are a float32 tensor) before `quad` integrates it; ours is the exact float64 integral.
const COEFF_REL_TOL: f64 = 1e-5;
const STEP_TOL: f32 = 1e-5;

#[derive(Deserialize)]
struct Step {
    model_output: Vec<f32>,
    prev_sample: Vec<f32>,
    lms_coeffs: Vec<f64>,
}

#[derive(Deserialize)]
struct Extra {
    num_inference_steps: usize,
    timesteps: Vec<f64>,
}

#[derive(Deserialize)]
struct Options {
    karras: Option<bool>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: serde_json::Value,
    options: Options,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    shape: Vec<usize>,
    initial_sample: Vec<f32>,
    steps: Vec<Step>,
    extra_timesteps: Vec<Extra>,
}

fn lms_cases() -> Vec<Case> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/scheduler");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("lms_"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 5,
        "expected the LMS fixtures (tests/pyref/make_scheduler_fixtures.py), found {paths:?}"
    );
    paths
        .iter()
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
        .collect()
}

fn lms(case: &Case, n: usize) -> LmsDiscrete {
    let config = SchedulerConfig::from_json_str(&case.config.to_string()).unwrap();
    let mut resolved = config.resolve(SchedulerKind::Lms);
    if let Some(k) = case.options.karras {
        resolved.use_karras_sigmas = k;
    }
    LmsDiscrete::new(&resolved, n).unwrap()
}

fn uses_sigma_to_t(case: &Case) -> bool {
    let c = &case.config;
    case.options.karras == Some(true)
        || c["use_karras_sigmas"] == true
        || c["use_exponential_sigmas"] == true
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

/// diffusers' timesteps are a float32 tensor: ours must be float32 values equal to them. (The
/// fixtures hold their exact decimal images, which serde_json's default parser may read one float64
/// ulp off, so the comparison is on the float32 values.)
fn assert_same_f32(got: &[f64], want: &[f64], what: &str) {
    assert!(
        got.iter().all(|&t| (t as f32) as f64 == t),
        "{what}: not float32 values: {got:?}"
    );
    let got: Vec<f32> = got.iter().map(|&t| t as f32).collect();
    let want: Vec<f32> = want.iter().map(|&t| t as f32).collect();
    assert_eq!(got, want, "{what}");
}

#[test]
fn timesteps_are_exact_without_sigma_to_t() {
    let mut checked = 0;
    for case in lms_cases().iter().filter(|c| !uses_sigma_to_t(c)) {
        let sched = lms(case, case.num_inference_steps);
        assert_same_f32(sched.timesteps(), &case.timesteps, &case.name);
        for extra in &case.extra_timesteps {
            let other = lms(case, extra.num_inference_steps);
            let what = format!("{} ({} steps)", case.name, extra.num_inference_steps);
            assert_same_f32(other.timesteps(), &extra.timesteps, &what);
        }
        checked += 1;
    }
    assert!(checked >= 4, "{checked}");
}

#[test]
fn coefficients_match_scipy_quad() {
    let mut worst = 0f64;
    for case in lms_cases() {
        let sched = lms(&case, case.num_inference_steps);
        assert!(case.steps.len() >= 5, "{}: 5+ steps", case.name);
        for (i, step) in case.steps.iter().enumerate() {
            let ours = sched.lms_coefficients(i);
            assert_eq!(ours.len(), (i + 1).min(4), "{} step {i}", case.name);
            assert_eq!(ours.len(), step.lms_coeffs.len(), "{} step {i}", case.name);
            // Relative to the step's largest coefficient (the later ones can be tiny).
            let scale = step.lms_coeffs.iter().fold(0f64, |m, c| m.max(c.abs()));
            for (a, b) in ours.iter().zip(&step.lms_coeffs) {
                let err = (a - b).abs() / scale;
                assert!(
                    err <= COEFF_REL_TOL,
                    "{} step {i}: coefficients {ours:?} vs quad {:?}",
                    case.name,
                    step.lms_coeffs
                );
                worst = worst.max(err);
            }
        }
    }
    eprintln!("LMS coefficients vs scipy quad: worst relative error {worst:.1e}");
}

/// A file written by Euler with keys LMS does not take: the zero-SNR rescale and
/// `final_sigmas_type` are ignored, and LMS's Karras ramp ignores `sigma_min`/`sigma_max`
/// (while Euler's honours them).
#[test]
fn euler_only_keys_are_ignored() {
    let config = SchedulerConfig::from_json_str(
        r#"{"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": true,
            "sigma_min": 0.1, "sigma_max": 10.0, "rescale_betas_zero_snr": true,
            "final_sigmas_type": "sigma_min"}"#,
    )
    .unwrap();
    let resolved = config.resolve(SchedulerKind::Lms);
    assert!(!resolved.rescale_betas_zero_snr);
    assert_eq!(resolved.final_sigmas_type, FinalSigmasType::Zero);
    let lms = build(SchedulerKind::Lms, &config, 6).unwrap();
    let sigmas = lms.sigmas().unwrap();
    assert!((sigmas[0] - 14.614647).abs() < 1e-5, "{sigmas:?}");
    assert_eq!(*sigmas.last().unwrap(), 0.0);
    let euler = build(SchedulerKind::Euler, &config, 6).unwrap();
    assert!((euler.sigmas().unwrap()[0] - 10.0).abs() < 1e-5);
}

/// Order 1 is Euler's step; `with_order` restarts the history.
#[test]
fn first_order_lms_is_euler() {
    let device = Device::flex();
    let case = lms_cases()
        .into_iter()
        .find(|c| c.name == "lms_sd15")
        .unwrap();
    let config = SchedulerConfig::from_json_str(&case.config.to_string()).unwrap();
    let n = case.num_inference_steps;
    let mut lms1 = LmsDiscrete::new(&config.resolve(SchedulerKind::Lms), n)
        .unwrap()
        .with_order(1)
        .unwrap();
    assert_eq!(lms1.order(), 1);
    let mut euler = build(SchedulerKind::Euler, &config, n).unwrap();
    assert_eq!(lms1.sigmas(), euler.sigmas());
    let mut sample = case.initial_sample.clone();
    for (i, step) in case.steps.iter().enumerate() {
        let x = tensor(&sample, &case.shape, &device);
        let out = tensor(&step.model_output, &case.shape, &device);
        let a = values(lms1.step(out.clone(), i, x.clone(), None).unwrap());
        let b = values(euler.step(out, i, x, None).unwrap());
        assert_eq!(a, b, "step {i}");
        sample = step.prev_sample.clone();
    }
    assert!(
        LmsDiscrete::new(&config.resolve(SchedulerKind::Lms), n)
            .unwrap()
            .with_order(0)
            .is_err()
    );
}

/// Running the whole fixture loop on our own outputs (not the reference's) stays within tolerance:
/// the history does not drift.
#[test]
fn free_running_loop_stays_within_tolerance() {
    let device = Device::flex();
    for case in lms_cases() {
        let config = SchedulerConfig::from_json_str(&case.config.to_string()).unwrap();
        let options = BuildOptions {
            karras: case.options.karras,
            ..Default::default()
        };
        let mut sched = build_with(
            SchedulerKind::Lms,
            &config,
            case.num_inference_steps,
            &options,
        )
        .unwrap();
        let mut x = tensor(&case.initial_sample, &case.shape, &device);
        let mut worst = 0f32;
        for (i, step) in case.steps.iter().enumerate() {
            let out = tensor(&step.model_output, &case.shape, &device);
            x = sched.step(out, i, x, None).unwrap();
            let got = values(x.clone());
            let err = got
                .iter()
                .zip(&step.prev_sample)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            worst = worst.max(err);
        }
        eprintln!("{:<24} free-running max abs error {worst:.2e}", case.name);
        assert!(worst <= STEP_TOL, "{}: {worst}", case.name);
    }
}

#[test]
fn conflicting_sigma_ramps_are_refused() {
    let config = SchedulerConfig::from_json_str(
        r#"{"use_karras_sigmas": true, "use_exponential_sigmas": true}"#,
    )
    .unwrap();
    let err = build(SchedulerKind::Lms, &config, 10)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("only one of"), "{err}");
    let config = SchedulerConfig::from_json_str(r#"{"use_beta_sigmas": true}"#).unwrap();
    let err = build(SchedulerKind::Lms, &config, 10)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("lms") && err.contains("beta sigmas"), "{err}");
}

#[test]
fn sd15_defaults() {
    let sd15 = SchedulerConfig::sd15();
    let sched = build(SchedulerKind::Lms, &sd15, 4).unwrap();
    assert_eq!(sched.kind(), SchedulerKind::Lms);
    // No `timestep_spacing` in the file: LMS's own default, linspace (like Euler).
    assert_eq!(sched.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
    assert!(!sched.needs_noise());
    assert_eq!(sched.sigmas().unwrap().len(), 5);
    assert_eq!(
        serde_json::to_string(&SchedulerKind::Lms).unwrap(),
        "\"lms\""
    );
}
