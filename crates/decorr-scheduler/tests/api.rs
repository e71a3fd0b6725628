//! The public API's contracts: building from `_class_name`, per-run options, and the errors for
//! misuse (unknown names, bad files, missing noise, out-of-order multistep, unsupported options).

// Tests read results back freely; clippy.toml keeps the library to decorr_core::readback.
#![allow(clippy::disallowed_methods)]

use burn::tensor::{Device, Tensor};
use decorr_scheduler::*;

fn ones(device: &Device) -> Tensor<4> {
    Tensor::<4>::ones([1, 4, 2, 2], device)
}

#[test]
fn builds_from_class_name() {
    let sd15 = SchedulerConfig::sd15();
    let sched = build(sd15.kind().unwrap(), &sd15, 10).unwrap();
    assert_eq!(sched.kind(), SchedulerKind::Pndm);
    assert_eq!(sched.timesteps().len(), 11);
    for kind in SchedulerKind::ALL {
        let text = format!(
            r#"{{"_class_name": "{}", "beta_schedule": "scaled_linear"}}"#,
            kind.class_name()
        );
        let config = SchedulerConfig::from_json_str(&text).unwrap();
        assert_eq!(config.kind().unwrap(), kind);
        let sched = build(config.kind().unwrap(), &config, 8).unwrap();
        assert_eq!(sched.kind(), kind);
    }
    let err = SchedulerConfig::from_json_str(r#"{"_class_name": "HeunDiscreteScheduler"}"#)
        .unwrap()
        .kind()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HeunDiscreteScheduler") && err.contains("euler-a") && err.contains("lms"),
        "{err}"
    );
    let err = SchedulerConfig::from_json_str("{}")
        .unwrap()
        .kind()
        .unwrap_err()
        .to_string();
    assert!(err.contains("_class_name"), "{err}");
}

#[test]
fn unknown_scheduler_name_lists_valid_ones() {
    let err = "k_heun".parse::<SchedulerKind>().unwrap_err().to_string();
    assert!(
        err.contains("k_heun") && err.contains("ddim, pndm, euler, euler-a, dpmpp-2m, lms"),
        "{err}"
    );
    assert_eq!(
        "k_lms".parse::<SchedulerKind>().unwrap(),
        SchedulerKind::Lms
    );
}

#[test]
fn bad_json_is_a_config_error() {
    let err = SchedulerConfig::from_json_str("{\"num_train_timesteps\": 1000,").unwrap_err();
    assert!(matches!(err, SchedulerError::Config(_)));
    assert!(
        err.to_string()
            .contains("not a valid diffusers scheduler config"),
        "{err}"
    );
}

#[test]
fn ancestral_steps_need_noise() {
    let device = Device::flex();
    let sd15 = SchedulerConfig::sd15();
    let mut sched = build(SchedulerKind::EulerAncestral, &sd15, 4).unwrap();
    assert!(sched.needs_noise());
    let err = sched
        .step(ones(&device), 0, ones(&device), None)
        .unwrap_err();
    assert!(
        matches!(err, SchedulerError::NoiseRequired { i: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("Some(noise)"));
    let wrong = Tensor::<4>::ones([1, 4, 3, 3], &device);
    let err = sched
        .step(ones(&device), 0, ones(&device), Some(wrong))
        .unwrap_err();
    assert!(
        matches!(err, SchedulerError::ShapeMismatch { what: "noise", .. }),
        "{err}"
    );
    assert!(
        sched
            .step(ones(&device), 0, ones(&device), Some(ones(&device)))
            .is_ok()
    );

    // DDIM needs noise only with eta > 0.
    let ddim = build(SchedulerKind::Ddim, &sd15, 4).unwrap();
    assert!(!ddim.needs_noise());
    let options = BuildOptions {
        eta: 1.0,
        ..Default::default()
    };
    let mut ddim = build_with(SchedulerKind::Ddim, &sd15, 4, &options).unwrap();
    assert!(ddim.needs_noise());
    assert!(matches!(
        ddim.step(ones(&device), 0, ones(&device), None),
        Err(SchedulerError::NoiseRequired { .. })
    ));
}

#[test]
fn options_are_checked_against_the_scheduler() {
    let sd15 = SchedulerConfig::sd15();
    let karras = BuildOptions {
        karras: Some(true),
        ..Default::default()
    };
    for kind in [
        SchedulerKind::Euler,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::Lms,
    ] {
        let plain = build(kind, &sd15, 10).unwrap();
        let k = build_with(kind, &sd15, 10, &karras).unwrap();
        assert_ne!(
            plain.sigmas(),
            k.sigmas(),
            "{kind}: Karras changes the sigmas"
        );
    }
    for kind in [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::EulerAncestral,
    ] {
        let err = build_with(kind, &sd15, 10, &karras).err().unwrap();
        assert!(err.to_string().contains("Karras"), "{err}");
        // Turning Karras off is always fine.
        let off = BuildOptions {
            karras: Some(false),
            ..Default::default()
        };
        assert!(build_with(kind, &sd15, 10, &off).is_ok());
    }
    let eta = BuildOptions {
        eta: 0.5,
        ..Default::default()
    };
    let err = build_with(SchedulerKind::Euler, &sd15, 10, &eta)
        .err()
        .unwrap();
    assert!(err.to_string().contains("only ddim takes eta"), "{err}");
    let bad = BuildOptions {
        eta: -1.0,
        ..Default::default()
    };
    assert!(build_with(SchedulerKind::Ddim, &sd15, 10, &bad).is_err());
    assert!(build(SchedulerKind::Ddim, &sd15, 0).is_err());
    assert!(build(SchedulerKind::Euler, &sd15, 1001).is_err());
}

#[test]
fn unsupported_config_options_are_errors() {
    let cases = [
        (
            SchedulerKind::Ddim,
            r#"{"thresholding": true}"#,
            "thresholding",
        ),
        (
            SchedulerKind::DpmSolverMultistep,
            r#"{"algorithm_type": "sde-dpmsolver++"}"#,
            "sde-dpmsolver++",
        ),
        (
            SchedulerKind::DpmSolverMultistep,
            r#"{"variance_type": "learned_range"}"#,
            "learned_range",
        ),
        (
            SchedulerKind::DpmSolverMultistep,
            r#"{"solver_order": 4}"#,
            "solver_order 4",
        ),
        (
            SchedulerKind::Euler,
            r#"{"interpolation_type": "log_linear"}"#,
            "log_linear",
        ),
        (
            SchedulerKind::Euler,
            r#"{"use_beta_sigmas": true}"#,
            "beta sigmas",
        ),
        (
            SchedulerKind::Lms,
            r#"{"use_beta_sigmas": true}"#,
            "beta sigmas",
        ),
        (
            SchedulerKind::Pndm,
            r#"{"prediction_type": "sample"}"#,
            "sample",
        ),
        (
            SchedulerKind::EulerAncestral,
            r#"{"prediction_type": "sample"}"#,
            "sample",
        ),
    ];
    for (kind, text, needle) in cases {
        let config = SchedulerConfig::from_json_str(text).unwrap();
        let err = build(kind, &config, 10).err().unwrap().to_string();
        assert!(
            err.contains(needle) && err.contains(kind.name()),
            "{kind} {text}: {err}"
        );
    }
    // Keys a class does not take are ignored, as diffusers ignores them.
    let config =
        SchedulerConfig::from_json_str(r#"{"thresholding": true, "solver_order": 9}"#).unwrap();
    assert!(build(SchedulerKind::Euler, &config, 10).is_ok());
    // diffusers' own `-Infinity` default reads fine.
    let config = SchedulerConfig::from_json_str(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity}"#,
    )
    .unwrap();
    assert_eq!(
        build(config.kind().unwrap(), &config, 20)
            .unwrap()
            .timesteps()
            .len(),
        20
    );
}

#[test]
fn multistep_schedulers_step_in_order_and_restart_at_zero() {
    let device = Device::flex();
    let sd15 = SchedulerConfig::sd15();
    for kind in [
        SchedulerKind::Pndm,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::Lms,
    ] {
        let mut sched = build(kind, &sd15, 5).unwrap();
        let run = |sched: &mut Box<dyn Scheduler>| {
            let mut x = ones(&device);
            for i in 0..sched.timesteps().len() {
                let eps = x.clone().mul_scalar(0.3).add_scalar(0.1);
                x = sched.step(eps, i, x, None).unwrap();
            }
            x.into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap()
        };
        let first = run(&mut sched);
        assert_eq!(
            run(&mut sched),
            first,
            "{kind}: step 0 restarts the history"
        );
        sched.step(ones(&device), 0, ones(&device), None).unwrap();
        let err = sched
            .step(ones(&device), 2, ones(&device), None)
            .unwrap_err();
        assert!(
            matches!(
                err,
                SchedulerError::OutOfOrder {
                    expected: 1,
                    got: 2,
                    ..
                }
            ),
            "{kind}: {err}"
        );
        let len = sched.timesteps().len();
        assert!(matches!(
            sched.step(ones(&device), len, ones(&device), None),
            Err(SchedulerError::StepOutOfRange { .. })
        ));
    }
}

#[test]
fn model_output_must_match_the_sample() {
    let device = Device::flex();
    let mut sched = build(SchedulerKind::Euler, &SchedulerConfig::sd15(), 4).unwrap();
    let err = sched
        .step(
            Tensor::<4>::ones([1, 3, 2, 2], &device),
            0,
            ones(&device),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            SchedulerError::ShapeMismatch {
                what: "model_output",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn schedulers_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let sched = build(SchedulerKind::Euler, &SchedulerConfig::sd15(), 4).unwrap();
    assert_send(&sched);
}

#[test]
fn tiny_step_counts_run_to_the_end() {
    let device = Device::flex();
    let sd15 = SchedulerConfig::sd15();
    for kind in SchedulerKind::ALL {
        for n in [1, 2, 3] {
            let mut sched = build(kind, &sd15, n).unwrap();
            let mut x = ones(&device).mul_scalar(sched.init_noise_sigma());
            for i in 0..sched.timesteps().len() {
                let input = sched.scale_model_input(x.clone(), i);
                let noise = sched.needs_noise().then(|| ones(&device));
                x = sched.step(input.mul_scalar(0.5), i, x, noise).unwrap();
            }
            let v = x
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{kind} with {n} steps: {v:?}"
            );
        }
    }
}
