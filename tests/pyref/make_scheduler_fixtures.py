#!/usr/bin/env python3
"""Write the diffusers reference fixtures for `decorr-scheduler` (tests/fixtures/scheduler/*.json).

Every number here comes from diffusers itself (DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler,
EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, LMSDiscreteScheduler), so the Rust parity tests in
crates/decorr-scheduler/tests/parity.rs compare against the reference, never against decorr's own
earlier output. Run from the repository root (deterministic: re-running rewrites identical files):

    /opt/pyref-venv/bin/python tests/pyref/make_scheduler_fixtures.py

(the venv needs torch, numpy, scipy (LMSDiscreteScheduler's coefficients) and diffusers 0.42; no
network access is used).

Each case builds a scheduler the way `from_pretrained(..., subfolder="scheduler")` does, i.e.
`Class.from_config(<raw json dict>)`: keys missing from the json take the defaults of the class that
reads them (SD 1.5's file has no `timestep_spacing`, so Euler uses `linspace` and DDIM/PNDM use
`leading`). It then runs diffusers' text-to-image loop on a tiny latent:

    latents = randn(shape) * init_noise_sigma
    for i, t in enumerate(timesteps):
        scaled = scale_model_input(latents, t)     # recorded when the scheduler scales
        out = ideal(latents, t, x0) + 0.05 * randn  # a recorded stand-in for the UNet output
        latents = step(out, t, latents).prev_sample # recorded

The stand-in UNet output is what a perfect model would predict for a fixed clean latent `x0` (in
the case's `prediction_type`), plus a little noise so successive outputs are not consistent; this
keeps every latent at realistic magnitudes (a few units, like SD latents), where the Rust side's
1e-5 absolute tolerance is tens of float32 ulps.

LMS steps also record diffusers' `get_lms_coefficient` values (`lms_coeffs`, scipy's `quad`), which
the Rust side computes by exact polynomial integration.

Noise for stochastic steps (DDIM with eta > 0, Euler ancestral) is drawn here and recorded: DDIM
takes it as `variance_noise=`, Euler ancestral gets it through a patched `randn_tensor` (checked to
be called exactly once per step with the sample's shape).

Tensors are stored flat (row-major) with the shortest decimal that round-trips their float32
value; timesteps and sigmas are stored as exact float64 images of diffusers' values. `schedules.json`
holds a subsample of `alphas_cumprod` for each beta schedule.
"""
import json
import os

import numpy as np
import torch

import diffusers
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler)
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "scheduler")
torch.set_num_threads(1)
diffusers.utils.logging.set_verbosity_error()

# /work/shared/reference/sd15/scheduler/scheduler_config.json, byte for byte in content.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

CLASSES = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
    "lms": LMSDiscreteScheduler,
}

# The sigma-based schedulers: they record `sigmas`; all but DPM-Solver keep latents in sigma space
# and scale the model input by 1 / sqrt(sigma^2 + 1).
SIGMA_KINDS = ("euler", "euler-a", "dpmpp-2m", "lms")
SCALING_KINDS = ("euler", "euler-a", "lms")


def sd15(**changes):
    cfg = dict(SD15)
    cfg.update(changes)
    return cfg


def f32_list(t):
    """Shortest decimals that round-trip each float32 (checked through float64, as Rust reads them)."""
    out = []
    for x in t.detach().to(torch.float32).reshape(-1).numpy():
        s = np.format_float_scientific(x, unique=True, trim="-")
        v = float(s)
        assert np.float32(v) == x, (s, x)
        out.append(v)
    return out


def exact_list(values):
    """Timesteps / sigmas: ints stay ints, floats are the exact float64 image of the stored value."""
    arr = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    if np.issubdtype(arr.dtype, np.integer):
        return [int(v) for v in arr]
    return [float(v) for v in arr]


def build(kind, config, n, karras=None):
    kwargs = {} if karras is None else {"use_karras_sigmas": karras}
    s = CLASSES[kind].from_config(config, **kwargs)
    s.set_timesteps(n)
    return s


def ideal_output(kind, s, i, t, sample, x0):
    """What a perfect denoiser predicts for clean latent `x0` from `sample` at step i (float64)."""
    sample = sample.double()
    x0 = x0.double()
    if kind in SIGMA_KINDS:
        sigma = float(s.sigmas[i])
        alpha = 1.0 / (sigma * sigma + 1.0) ** 0.5
        sig_t = sigma * alpha
        # Euler-type latents live in sigma space (x0 + sigma eps); the model sees them scaled.
        x_vp = sample * alpha if kind != "dpmpp-2m" else sample
    else:
        a = float(s.alphas_cumprod[int(t)])
        alpha, sig_t = a ** 0.5, (1.0 - a) ** 0.5
        x_vp = sample
    eps = (x_vp - alpha * x0) / sig_t
    pred = s.config.prediction_type
    if pred == "epsilon":
        return eps.float()
    if pred == "v_prediction":
        return (alpha * eps - sig_t * x0).float()
    return x0.float()


def run_case(name, kind, config, n, shape, seed, karras=None, eta=0.0, extra_steps=(), max_steps=None):
    s = build(kind, config, n, karras)
    stochastic = kind == "euler-a" or (kind == "ddim" and eta > 0)
    scales = kind in SCALING_KINDS
    g = torch.Generator().manual_seed(seed)
    init_sigma = float(s.init_noise_sigma)
    x0 = 0.7 * torch.randn(shape, generator=g, dtype=torch.float32)
    sample = torch.randn(shape, generator=g, dtype=torch.float32) * s.init_noise_sigma
    case = {
        "name": name,
        "kind": kind,
        "config": config,
        "options": {"karras": karras, "eta": eta},
        "num_inference_steps": n,
        "timesteps": exact_list(s.timesteps),
        "init_noise_sigma": init_sigma,
        "sigmas": exact_list(s.sigmas) if kind in SIGMA_KINDS else None,
        "shape": list(shape),
        "initial_sample": f32_list(sample),
        "steps": [],
    }
    calls = []
    orig_randn = euler_a_module.randn_tensor
    for i, t in enumerate(s.timesteps):
        if max_steps is not None and i >= max_steps:
            break
        scaled = s.scale_model_input(sample, t)
        model_output = ideal_output(kind, s, i, t, sample, x0) + 0.05 * torch.randn(
            shape, generator=g, dtype=torch.float32)
        noise = torch.randn(shape, generator=g, dtype=torch.float32) if stochastic else None
        if kind == "ddim":
            out = s.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
        elif kind == "euler-a":
            def fake_randn(shp, **kw):
                assert tuple(shp) == tuple(shape), shp
                calls.append(i)
                return noise.clone()
            euler_a_module.randn_tensor = fake_randn
            try:
                out = s.step(model_output, t, sample).prev_sample
            finally:
                euler_a_module.randn_tensor = orig_randn
        else:
            if kind == "lms":
                # diffusers' own coefficients for this step (`step` recomputes the same ones).
                order = min(s.step_index + 1, 4)
                lms_coeffs = [float(s.get_lms_coefficient(order, s.step_index, j))
                              for j in range(order)]
            out = s.step(model_output, t, sample).prev_sample
        if not scales:
            assert torch.equal(scaled, sample)
        case["steps"].append({
            "i": i,
            "timestep": float(t),
            "model_output": f32_list(model_output),
            "noise": f32_list(noise) if noise is not None else None,
            "scaled": f32_list(scaled) if scales else None,
            "prev_sample": f32_list(out),
        })
        if kind == "lms":
            case["steps"][-1]["lms_coeffs"] = lms_coeffs
        sample = out
    if kind == "euler-a":
        assert calls == list(range(len(case["steps"]))), calls
    case["extra_timesteps"] = []
    for m in extra_steps:
        s2 = build(kind, config, m, karras)
        case["extra_timesteps"].append({
            "num_inference_steps": m,
            "timesteps": exact_list(s2.timesteps),
            "init_noise_sigma": float(s2.init_noise_sigma),
            "sigmas": exact_list(s2.sigmas) if kind in SIGMA_KINDS else None,
        })
    return case


SHAPE = (1, 4, 3, 3)
SMALL = (1, 2, 2, 2)

CASES = [
    # --- DDIM --------------------------------------------------------------------------------
    dict(name="ddim_sd15", kind="ddim", config=sd15(), n=4, shape=SHAPE, seed=1,
         extra_steps=(1, 2, 10, 50)),
    dict(name="ddim_trailing", kind="ddim", config=sd15(timestep_spacing="trailing"), n=4,
         shape=SHAPE, seed=2, extra_steps=(7, 10, 61)),
    dict(name="ddim_linspace", kind="ddim", config=sd15(timestep_spacing="linspace"), n=4,
         shape=SHAPE, seed=3, extra_steps=(10, 25)),
    # v-prediction, steps_offset 0, eta > 0 with recorded noise, final alpha = 1.
    dict(name="ddim_vpred_eta", kind="ddim",
         config=sd15(prediction_type="v_prediction", steps_offset=0, set_alpha_to_one=True), n=4,
         shape=SHAPE, seed=4, eta=0.7, extra_steps=(10,)),
    # An empty file: every key takes DDIM's own defaults (linear betas, clip_sample, alpha one).
    dict(name="ddim_defaults", kind="ddim", config={"_class_name": "DDIMScheduler"}, n=5,
         shape=SHAPE, seed=5, extra_steps=(10,)),
    dict(name="ddim_cosine", kind="ddim", config=sd15(beta_schedule="squaredcos_cap_v2"), n=4,
         shape=SHAPE, seed=6),
    dict(name="ddim_sample_pred", kind="ddim", config=sd15(prediction_type="sample"), n=4,
         shape=SMALL, seed=8),
    # Zero terminal SNR recipe: rescaled betas, trailing, v-prediction.
    dict(name="ddim_zero_snr", kind="ddim",
         config=sd15(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                     prediction_type="v_prediction"), n=4, shape=SHAPE, seed=7),
    # --- PNDM --------------------------------------------------------------------------------
    dict(name="pndm_sd15", kind="pndm", config=sd15(), n=6, shape=SHAPE, seed=11,
         extra_steps=(1, 2, 4, 10, 50)),
    dict(name="pndm_vpred_trailing", kind="pndm",
         config=sd15(prediction_type="v_prediction", timestep_spacing="trailing"), n=5,
         shape=SHAPE, seed=12, extra_steps=(10,)),
    dict(name="pndm_linspace_offset0", kind="pndm",
         config=sd15(timestep_spacing="linspace", steps_offset=0), n=5, shape=SMALL, seed=13,
         extra_steps=(10,)),
    # Runge-Kutta warm-up (skip_prk_steps false, PNDM's own default): 12 PRK calls, then PLMS.
    dict(name="pndm_prk", kind="pndm", config=sd15(skip_prk_steps=False), n=5, shape=SMALL, seed=14,
         extra_steps=(10,)),
    # --- Euler -------------------------------------------------------------------------------
    dict(name="euler_sd15", kind="euler", config=sd15(), n=4, shape=SHAPE, seed=21,
         extra_steps=(1, 2, 10, 50)),
    dict(name="euler_leading", kind="euler", config=sd15(timestep_spacing="leading"), n=4,
         shape=SHAPE, seed=22, extra_steps=(10, 50)),
    dict(name="euler_trailing", kind="euler", config=sd15(timestep_spacing="trailing"), n=4,
         shape=SHAPE, seed=23, extra_steps=(10, 61)),
    dict(name="euler_karras", kind="euler", config=sd15(), n=5, shape=SHAPE, seed=24, karras=True,
         extra_steps=(10, 30)),
    dict(name="euler_karras_leading", kind="euler",
         config=sd15(use_karras_sigmas=True, timestep_spacing="leading"), n=4, shape=SMALL,
         seed=25, extra_steps=(25,)),
    dict(name="euler_vpred_sigma_min", kind="euler",
         config=sd15(prediction_type="v_prediction", final_sigmas_type="sigma_min"), n=4,
         shape=SHAPE, seed=26),
    dict(name="euler_sample_pred", kind="euler", config=sd15(prediction_type="sample"), n=4,
         shape=SMALL, seed=28),
    dict(name="euler_zero_snr", kind="euler",
         config=sd15(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                     prediction_type="v_prediction"), n=4, shape=SMALL, seed=27),
    # --- Euler ancestral ---------------------------------------------------------------------
    dict(name="euler_a_sd15", kind="euler-a", config=sd15(), n=4, shape=SHAPE, seed=31,
         extra_steps=(1, 2, 10, 50)),
    dict(name="euler_a_vpred_leading", kind="euler-a",
         config=sd15(prediction_type="v_prediction", timestep_spacing="leading"), n=4, shape=SHAPE,
         seed=32, extra_steps=(10,)),
    dict(name="euler_a_trailing_offset0", kind="euler-a",
         config=sd15(timestep_spacing="trailing", steps_offset=0), n=5, shape=SMALL, seed=33),
    # --- DPM-Solver++ 2M ---------------------------------------------------------------------
    dict(name="dpm_sd15", kind="dpmpp-2m", config=sd15(), n=5, shape=SHAPE, seed=41,
         extra_steps=(1, 2, 10, 20, 50)),
    dict(name="dpm_karras", kind="dpmpp-2m", config=sd15(), n=6, shape=SHAPE, seed=42, karras=True,
         extra_steps=(10, 20, 50)),
    dict(name="dpm_vpred_trailing", kind="dpmpp-2m",
         config=sd15(prediction_type="v_prediction", timestep_spacing="trailing"), n=5,
         shape=SHAPE, seed=43, extra_steps=(10,)),
    dict(name="dpm_leading_sigma_min", kind="dpmpp-2m",
         config=sd15(timestep_spacing="leading", final_sigmas_type="sigma_min",
                     lower_order_final=False), n=5, shape=SMALL, seed=44, extra_steps=(10,)),
    # 16 steps: past lower_order_final's 15-step threshold, so the last step stays second order.
    dict(name="dpm_16_steps", kind="dpmpp-2m", config=sd15(), n=16, shape=(1, 1, 2, 2), seed=45),
    dict(name="dpm_sample_pred_exponential", kind="dpmpp-2m",
         config=sd15(prediction_type="sample", use_exponential_sigmas=True), n=6, shape=SMALL,
         seed=47, extra_steps=(20,)),
    # A file written by Euler (with its sigma bounds) read by DPM-Solver: diffusers registers the
    # extra keys on the config and `_convert_to_karras` uses them.
    dict(name="dpm_karras_sigma_bounds", kind="dpmpp-2m",
         config=sd15(_class_name="EulerDiscreteScheduler", use_karras_sigmas=True, sigma_min=0.1,
                     sigma_max=10.0), n=5, shape=(1, 1, 2, 2), seed=48),
    dict(name="dpm_order3_heun", kind="dpmpp-2m",
         config=sd15(solver_order=3, solver_type="heun"), n=8, shape=(1, 1, 2, 2), seed=46),
    # --- LMS (k-LMS) -------------------------------------------------------------------------
    # `step(..., order=4)` (the default every pipeline uses): orders 1, 2, 3, 4, 4, ... so 6+
    # steps reach the full fourth-order history. Coefficients come from scipy's `quad`.
    dict(name="lms_sd15", kind="lms", config=sd15(), n=7, shape=SHAPE, seed=51,
         extra_steps=(1, 2, 10, 50)),
    dict(name="lms_leading", kind="lms", config=sd15(timestep_spacing="leading"), n=6, shape=SHAPE,
         seed=52, extra_steps=(10, 50)),
    dict(name="lms_trailing_offset0", kind="lms",
         config=sd15(timestep_spacing="trailing", steps_offset=0), n=6, shape=SHAPE, seed=53,
         extra_steps=(10, 61)),
    dict(name="lms_karras", kind="lms", config=sd15(), n=7, shape=SHAPE, seed=54, karras=True,
         extra_steps=(10, 30)),
    dict(name="lms_vpred_leading", kind="lms",
         config=sd15(prediction_type="v_prediction", timestep_spacing="leading"), n=6, shape=SHAPE,
         seed=55, extra_steps=(10,)),
    dict(name="lms_sample_pred", kind="lms", config=sd15(prediction_type="sample"), n=6,
         shape=SMALL, seed=56),
    # A file written by Euler with sigma bounds and keys LMS does not take (zero SNR, final sigma
    # type): LMS ignores those, its Karras ramp ignores the bounds, exponential sigmas use them.
    dict(name="lms_karras_file_bounds", kind="lms",
         config=sd15(_class_name="EulerDiscreteScheduler", use_karras_sigmas=True, sigma_min=0.1,
                     sigma_max=10.0, rescale_betas_zero_snr=True, final_sigmas_type="sigma_min"),
         n=6, shape=SMALL, seed=57),
    dict(name="lms_exponential_bounds", kind="lms",
         config=sd15(use_exponential_sigmas=True, sigma_min=0.1, sigma_max=10.0), n=6,
         shape=SMALL, seed=58, extra_steps=(20,)),
]

SCHEDULES = [
    ("sd15_scaled_linear", sd15()),
    ("linear_default", {}),
    ("squaredcos_cap_v2", {"beta_schedule": "squaredcos_cap_v2"}),
    ("sd15_zero_snr", sd15(rescale_betas_zero_snr=True)),
]


def schedules():
    idx = sorted(set(list(range(0, 1000, 7)) + list(range(990, 1000))))
    rows = []
    for name, cfg in SCHEDULES:
        s = DDIMScheduler.from_config(cfg)
        rows.append({"name": name, "config": cfg, "indices": idx,
                     "alphas_cumprod": [float(s.alphas_cumprod[i]) for i in idx]})
    return {"diffusers": diffusers.__version__, "torch": torch.__version__, "schedules": rows}


def main():
    os.makedirs(OUT, exist_ok=True)
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": np.__version__}
    for spec in CASES:
        spec = dict(spec)
        case = run_case(**spec)
        case["meta"] = meta
        path = os.path.join(OUT, case["name"] + ".json")
        with open(path, "w") as f:
            json.dump(case, f, separators=(",", ":"))
            f.write("\n")
        print(f"{path}: {os.path.getsize(path)} bytes")
    path = os.path.join(OUT, "schedules.json")
    with open(path, "w") as f:
        json.dump(schedules(), f, separators=(",", ":"))
        f.write("\n")
    print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
