#!/usr/bin/env python3
"""Write the guidance-method reference fixtures (diffusers' StableDiffusionPAGPipeline and
StableDiffusionAttendAndExcitePipeline on the tiny committed models) that decorr's Rust parity tests
compare against. Run from the repo root:

    /opt/pyref-venv/bin/python tests/pyref/make_guidance_fixtures.py    # -> tests/fixtures/guidance/

Deterministic and re-runnable (both output files are rewritten each time; CPU, float32, one thread).
The pipelines are diffusers' own, unmodified: everything recorded comes from hooks and wrappers
(`callback_on_step_end`, a `scheduler.step` wrapper, instance-level wrappers of the AaE pipeline's
`_compute_loss` / `_update_latent` / `_perform_iterative_refinement_step` and of the PAG pipeline's
`_get_pag_scale` / `_apply_perturbed_attention_guidance`, and a module-level `randn_tensor` wrapper).

Inputs, reused and never modified:
  tests/fixtures/clip_tiny_train/text_encoder   CLIPTextModel (width 16), loaded eager, fp32
  tests/fixtures/unet_tiny_a/unet               UNet2DConditionModel: CrossAttnDownBlock2D at 8x8,
                                                DownBlock2D, a cross-attention mid block at 4x4,
                                                UpBlock2D, CrossAttnUpBlock2D at 8x8 (2 attentions);
                                                4 heads everywhere
  tests/fixtures/vae_tiny/vae                   AutoencoderKL (vae_scale_factor 2: 16x16 px -> 8x8 latents)
  tests/fixtures/pipeline/scheduler/scheduler_config.json   SD 1.5's PNDM config (skip_prk_steps:
                                                PLMS); DDIM is DDIMScheduler.from_config of it
  assets/clip/{vocab.json,merges.txt} + tests/fixtures/pipeline/tokenizer/*   CLIPTokenizer (max 77)

Writes under tests/fixtures/guidance/:
  cases.json             per case: settings, timesteps, token ids/indices, per-step PAG scale, and
                         for Attend-and-Excite the per-step / per-image record (loss at the step's
                         first grad forward, refinement iterations and their losses, loss after the
                         refinement's final forward, whether the final update was applied, step size).
  reference.safetensors  float32, per case:
    {case}.init_latents   [B,4,8,8]     the pipeline's randn draw (before * init_noise_sigma, which is
                                        1.0 for DDIM and PNDM), one torch.Generator("cpu") per image
    {case}.latents        [T,B,4,8,8]   the latents after every scheduler step (T = len(timesteps))
    {case}.aae_latents    [T,B,4,8,8]   AaE only: z after the step's AaE updates, i.e. the sample
                                        the CFG UNet call and scheduler.step get (equal to the step's
                                        input latent when nothing was updated)
    {case}.image          [B,16,16,3]   output_type="np" (not quantised), in [0, 1]
    {case}.prompt_embeds  [1,77,16]     the prompt's embedding (the cond half the UNet saw)
    {case}.guided_noise_pred0 [B,4,8,8] PAG only: the noise prediction after CFG+PAG at step 0
    {case}.unet_out0      [kB,4,8,8]    PAG only: the raw batched UNet output at step 0, chunks
                                        [uncond, cond, perturbed] (CFG) or [cond, perturbed]

Cases (prompt "rusty tracks with an old train", empty negative prompt, 16x16 px):
  pag_cfg             DDIM 4, w 7.5, pag 3.0 on "mid": eps_u + w(eps_c - eps_u) + s(eps_c - eps_p)
  pag_nocfg           DDIM 4, w 1.0 (no CFG): eps_c + s(eps_c - eps_p), UNet batch [cond, perturbed]
  pag_adaptive        DDIM 4, w 7.5, pag 3.0, adaptive 0.005: s_t = max(0, s - a(1000 - t)) reaches
                      the clamp at 0 at t = 251 and t = 1
  pag_layers          PNDM 4 (5 timesteps), w 7.5, pag 2.0 on two layers given by name patterns
                      ("down_blocks.0", "up_blocks.1.attentions.1"); pag_modules lists what matched
  aae_ddim            DDIM 6, max_iter_to_alter 4, thresholds {0: 0.05, 3: 0.005}: the refinement
                      loop runs at step 0 (to the 20-iteration cap) and not at step 3; steps 4 and 5
                      have no update (max_iter_to_alter)
  aae_pndm            PNDM 6 (7 timesteps, PLMS repeats t=665 at positions 1 and 2), max_iter_to_alter 3, thresholds
                      {1: 0.05, 4: 0.02}: refinement at the repeated-timestep position 1 and at position
                      4 >= max_iter_to_alter (refinement updates applied, no final update)
  aae_diffusers_test  diffusers' own test setting: DDIM 4, max_iter_to_alter 2, thresholds {0: 0.7}
  aae_batch           as aae_ddim with two images (seeds 4 and 5, a list of generators): every grad
                      forward, loss and update is per image (batch 1)

On these tiny random-weight models the cross-attention is nearly uniform: the smoothed maxima are
~0.015 (1/75 = 0.0133), so the AaE loss stays ~0.985 and a step of 20*grad moves it by ~1e-5. A
refinement loop therefore either does not run or runs to its 20-iteration cap; thresholds are chosen
so every loss compared with 1 - threshold is at least 1e-3 away from it (checked below).

Checks (the script fails otherwise): every case rerun (the np-image run against the latent run) gives
identical latents and records; the recorded initial latents equal randn_tensor from fresh generators;
the image equals postprocess(vae.decode(latents / scaling_factor)); the PAG pipeline with pag_scale 0
equals StableDiffusionPipeline (with and without CFG); PAG's guided prediction at step 0 equals the
formula on the recorded UNet output; AaE's recomputation of the per-token maxima from the attention
store (GaussianSmoothing 3x3, sigma 0.5, reflect pad) equals the pipeline's; some AaE step refines and
some threshold step does not; some update is skipped by max_iter_to_alter; no threshold comparison
is within 1e-3; the token and argmax-pixel margins are reported.
"""
import json, os, shutil, tempfile

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import diffusers, transformers
from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionAttendAndExcitePipeline,
                       StableDiffusionPAGPipeline, StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.models.attention_processor import (PAGCFGIdentitySelfAttnProcessor2_0,
                                                  PAGIdentitySelfAttnProcessor2_0)
from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite import (
    pipeline_stable_diffusion_attend_and_excite as aae_mod)
from diffusers.pipelines.pag import pipeline_pag_sd as pag_mod
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion as sd_mod
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

torch.set_num_threads(1)
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "guidance")
REL = dict(text_encoder="tests/fixtures/clip_tiny_train/text_encoder",
           unet="tests/fixtures/unet_tiny_a/unet",
           vae="tests/fixtures/vae_tiny/vae",
           scheduler="tests/fixtures/pipeline/scheduler/scheduler_config.json",
           tokenizer_dir="tests/fixtures/pipeline/tokenizer",
           vocab="assets/clip/vocab.json", merges="assets/clip/merges.txt")
PROMPT = "rusty tracks with an old train"
NEGATIVE = ""
WORDS = ("tracks", "train")          # the AaE target words; their positions are looked up below
H = W = 16
MAX_REFINEMENT_STEPS = 20            # diffusers: _perform_iterative_refinement_step's default, never passed
THRESHOLD_MARGIN = 1e-3

PAG_CASES = [
    dict(name="pag_cfg", scheduler="ddim", steps=4, guidance=7.5, pag_scale=3.0, pag_adaptive_scale=0.0,
         pag_layers=["mid"], seeds=[0]),
    dict(name="pag_nocfg", scheduler="ddim", steps=4, guidance=1.0, pag_scale=3.0, pag_adaptive_scale=0.0,
         pag_layers=["mid"], seeds=[1]),
    dict(name="pag_adaptive", scheduler="ddim", steps=4, guidance=7.5, pag_scale=3.0, pag_adaptive_scale=0.005,
         pag_layers=["mid"], seeds=[2]),
    dict(name="pag_layers", scheduler="pndm", steps=4, guidance=7.5, pag_scale=2.0, pag_adaptive_scale=0.0,
         pag_layers=["down_blocks.0", "up_blocks.1.attentions.1"], seeds=[3]),
]
AAE_CASES = [
    dict(name="aae_ddim", scheduler="ddim", steps=6, guidance=7.5, max_iter_to_alter=4,
         thresholds={0: 0.05, 3: 0.005}, scale_factor=20.0, seeds=[0]),
    dict(name="aae_pndm", scheduler="pndm", steps=6, guidance=7.5, max_iter_to_alter=3,
         thresholds={1: 0.05, 4: 0.02}, scale_factor=20.0, seeds=[1]),
    dict(name="aae_diffusers_test", scheduler="ddim", steps=4, guidance=7.5, max_iter_to_alter=2,
         thresholds={0: 0.7}, scale_factor=20.0, seeds=[2]),
    dict(name="aae_batch", scheduler="ddim", steps=6, guidance=7.5, max_iter_to_alter=4,
         thresholds={0: 0.05, 3: 0.005}, scale_factor=20.0, seeds=[4, 5]),
]
ATTN_RES = (8, 8)
SCHEDULERS = {"ddim": DDIMScheduler, "pndm": PNDMScheduler}


def make_scheduler(name):
    # A fresh scheduler per run: no PNDM ets / counter carries over.
    return SCHEDULERS[name].from_config(json.load(open(os.path.join(ROOT, REL["scheduler"]))))


def tokenizer():
    """CLIPTokenizer from assets/clip's vocab/merges and the pipeline fixture's SD 1.5 configs."""
    with tempfile.TemporaryDirectory() as d:
        shutil.copyfile(os.path.join(ROOT, REL["vocab"]), os.path.join(d, "vocab.json"))
        shutil.copyfile(os.path.join(ROOT, REL["merges"]), os.path.join(d, "merges.txt"))
        for f in sorted(os.listdir(os.path.join(ROOT, REL["tokenizer_dir"]))):
            shutil.copyfile(os.path.join(ROOT, REL["tokenizer_dir"], f), os.path.join(d, f))
        tok = CLIPTokenizer.from_pretrained(d)
    assert tok.model_max_length == 77
    return tok


def load_components():
    enc = CLIPTextModel.from_pretrained(os.path.join(ROOT, REL["text_encoder"]), dtype=torch.float32,
                                        attn_implementation="eager").eval()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, REL["unet"])).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(ROOT, REL["vae"])).eval()
    return dict(vae=vae, text_encoder=enc, tokenizer=tokenizer(), unet=unet, scheduler=make_scheduler("pndm"),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def generators(seeds):
    gs = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return gs[0] if len(gs) == 1 else gs


def fresh_init(seeds, pipe):
    shape = (len(seeds), pipe.unet.config.in_channels, H // pipe.vae_scale_factor, W // pipe.vae_scale_factor)
    return randn_tensor(shape, generator=generators(seeds), device=torch.device("cpu"), dtype=torch.float32)


def f(x):
    """A Python float of a 0-dim tensor / numpy scalar / int (exact: f32 -> f64 is exact)."""
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


class Draws:
    """Records randn_tensor draws made by a pipeline module, without changing them."""

    def __init__(self, module):
        self.module, self.orig, self.draws = module, module.randn_tensor, []

        def inner(*a, **k):
            out = self.orig(*a, **k)
            self.draws.append(out.detach().clone())
            return out
        module.randn_tensor = inner

    def close(self):
        self.module.randn_tensor = self.orig


class StepRecorder:
    """Wraps the pipeline's scheduler.step (an instance attribute): records (t, sample, prev_sample)."""

    def __init__(self, sched, on_step=None):
        self.calls, orig = [], sched.step

        def step(model_output, timestep, sample, *a, **k):
            out = orig(model_output, timestep, sample, *a, **k)
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            self.calls.append(dict(t=int(timestep), sample=sample.detach().clone(), prev=prev.detach().clone()))
            if on_step is not None:
                on_step()
            return out
        sched.step = step


def postprocess_check(pipe, latents, image):
    with torch.no_grad():
        dec = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    manual = (dec / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
    assert torch.equal(manual, image), "decode/postprocess rule differs"


# ----------------------------------------------------------------------------------------------- PAG


def pag_modules(pipe):
    pag = (PAGCFGIdentitySelfAttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0)
    return sorted(n[: -len(".processor")] for n, p in pipe.unet.attn_processors.items() if isinstance(p, pag))


def run_pag_once(pipe, case, output_type):
    pipe.scheduler = make_scheduler(case["scheduler"])
    pipe.set_pag_applied_layers(case["pag_layers"])
    rec = dict(latents=[], scales=[], modules=None, guided0=None, unet_out0=None)
    orig_scale, orig_apply = pipe._get_pag_scale, pipe._apply_perturbed_attention_guidance

    def get_scale(t):
        s = orig_scale(t)
        if rec["modules"] is None:
            rec["modules"] = pag_modules(pipe)  # the processors are set for the call only
        rec["scales"].append(s)
        return s

    def apply(noise_pred, *a, **k):
        out = orig_apply(noise_pred, *a, **k)
        if rec["guided0"] is None:
            rec["unet_out0"] = noise_pred.detach().clone()
            rec["guided0"] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return out

    def on_step_end(p, i, t, kw):
        rec["latents"].append(kw["latents"].detach().clone())
        return kw

    def pre(module, args, kwargs):
        if rec.get("ehs") is None:
            rec["ehs"] = kwargs["encoder_hidden_states"].detach().clone()
    hook = pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)
    pipe._get_pag_scale, pipe._apply_perturbed_attention_guidance = get_scale, apply
    draws = Draws(pag_mod)
    try:
        with torch.no_grad():
            out = pipe(PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=case["steps"],
                       guidance_scale=case["guidance"], pag_scale=case["pag_scale"],
                       pag_adaptive_scale=case["pag_adaptive_scale"], generator=generators(case["seeds"]),
                       num_images_per_prompt=len(case["seeds"]), output_type=output_type,
                       callback_on_step_end=on_step_end).images
    finally:
        hook.remove()
        draws.close()
        del pipe._get_pag_scale, pipe._apply_perturbed_attention_guidance
        pipe.set_pag_applied_layers("mid")
    assert not pag_modules(pipe), "PAG processors left behind"
    rec["draws"], rec["timesteps"], rec["out"] = draws.draws, pipe.scheduler.timesteps.tolist(), out
    return rec


def run_pag(pipe, case, embeds):
    name, n = case["name"], len(case["seeds"])
    a = run_pag_once(pipe, case, "latent")
    b = run_pag_once(pipe, case, "np")
    image = torch.from_numpy(np.ascontiguousarray(b["out"])).float()
    assert image.shape == (n, H, W, 3)
    T = len(a["timesteps"])
    assert len(a["latents"]) == T and len(a["scales"]) == T, name
    # Rerun identity (the np run is a full rerun).
    assert a["timesteps"] == b["timesteps"] and a["modules"] == b["modules"], name
    assert all(torch.equal(x, y) for x, y in zip(a["latents"], b["latents"])), f"{name}: rerun differs"
    assert [f(s) for s in a["scales"]] == [f(s) for s in b["scales"]], name
    assert torch.equal(a["out"], a["latents"][-1]), name
    postprocess_check(pipe, a["latents"][-1], image)
    init = fresh_init(case["seeds"], pipe)
    assert len(a["draws"]) == 1 and torch.equal(a["draws"][0], init), f"{name}: init latents"
    # The guided prediction at step 0 is the documented formula on the batched UNet output.
    s0, w = a["scales"][0], case["guidance"]
    if w > 1:
        u, c, p = a["unet_out0"].chunk(3)
        ref = u + w * (c - u) + s0 * (c - p)
    else:
        c, p = a["unet_out0"].chunk(2)
        ref = c + s0 * (c - p)
    assert torch.equal(ref, a["guided0"]), f"{name}: guidance formula"
    # What the UNet saw: [uncond, cond, cond] (CFG) or [cond, cond]; uncond is the empty prompt's.
    chunks = a["ehs"].chunk(3 if w > 1 else 2)
    assert all(torch.equal(c, embeds.expand(n, -1, -1)) for c in chunks[-2:]), name
    if w > 1:
        assert not torch.equal(chunks[0], chunks[1]), name
    if case["pag_adaptive_scale"] > 0:
        assert any(f(s) == 0 for s in a["scales"]) and any(f(s) > 0 for s in a["scales"]), name
    tensors = {f"{name}.init_latents": init, f"{name}.latents": torch.stack(a["latents"]),
               f"{name}.image": image, f"{name}.prompt_embeds": embeds,
               f"{name}.guided_noise_pred0": a["guided0"], f"{name}.unet_out0": a["unet_out0"]}
    meta = dict(name=name, method="pag", prompt=PROMPT, negative_prompt=NEGATIVE, scheduler=case["scheduler"],
                steps=case["steps"], guidance_scale=case["guidance"], width=W, height=H, seeds=case["seeds"],
                timesteps=a["timesteps"], pag_scale=case["pag_scale"],
                pag_adaptive_scale=case["pag_adaptive_scale"], pag_layers=case["pag_layers"],
                pag_scale_per_step=[f(s) for s in a["scales"]], pag_modules=a["modules"],
                unet_out0_chunks=["uncond", "cond", "perturbed"] if case["guidance"] > 1 else ["cond", "perturbed"])
    return tensors, meta


def check_pag_zero_equals_sd(pag_pipe, sd_pipe):
    """pag_scale 0 disables PAG entirely: the PAG pipeline equals StableDiffusionPipeline bit for bit."""
    for w, seed in ((7.5, 0), (1.0, 1)):
        outs = []
        for pipe, extra in ((pag_pipe, dict(pag_scale=0.0)), (sd_pipe, {})):
            pipe.scheduler = make_scheduler("ddim")
            with torch.no_grad():
                outs.append(pipe(PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=4,
                                 guidance_scale=w, generator=generators([seed]), output_type="latent",
                                 **extra).images)
        assert torch.equal(outs[0], outs[1]), f"PAG with pag_scale 0 differs from SD (w {w})"


# ---------------------------------------------------------------------------------- Attend-and-Excite


def smoothed_maps(pipe, indices):
    """Diagnostics only: the per-token smoothed maps, recomputed from the attention store as diffusers'
    _compute_max_attention_per_index does (mean over the stored maps, drop keys 0 and 76, *100,
    softmax over the remaining 75, reflect pad 1, 3x3 GaussianSmoothing)."""
    with torch.no_grad():
        maps = pipe.attention_store.aggregate_attention(from_where=("up", "down", "mid")).detach()
        text = torch.softmax(maps[:, :, 1:-1] * 100, dim=-1)
        sm = aae_mod.GaussianSmoothing()
        out = []
        for i in indices:
            img = F.pad(text[:, :, i - 1].unsqueeze(0).unsqueeze(0), (1, 1, 1, 1), mode="reflect")
            out.append(sm(img).squeeze(0).squeeze(0))
        return out


class AaeRecorder:
    """Instance-level wrappers on the AaE pipeline; one record per (step position i, image)."""

    def __init__(self, pipe, indices):
        self.pipe, self.indices = pipe, indices
        self.steps, self.cur, self.inside = [], [], False
        o_loss, o_upd, o_ref = pipe._compute_loss, pipe._update_latent, pipe._perform_iterative_refinement_step

        def compute_loss(max_attention_per_index):
            loss = o_loss(max_attention_per_index)
            maxes = [f(m) for m in max_attention_per_index]
            # The recomputation must match the pipeline's maxima exactly; margins for branch flips.
            sm = smoothed_maps(pipe, indices)
            assert [f(m.max()) for m in sm] == maxes, "smoothing recomputation differs"
            srt = sorted(maxes)
            worst = int(np.argmin(maxes))
            top2 = torch.topk(sm[worst].flatten(), 2).values
            # Margins that decide where the gradient goes (the loss value itself is continuous there).
            ev = dict(loss=f(loss), maxes=maxes, worst=worst, argmax=int(sm[worst].flatten().argmax()),
                      token_gap=srt[1] - srt[0] if len(srt) > 1 else None, pixel_gap=f(top2[0] - top2[1]))
            if self.inside:
                self.cur[-1]["refinement_evals"].append(ev)
            else:
                self.cur.append(dict(first=ev, refinement_evals=[], refined=False, inner_updates=0,
                                     updated=False, step_size=None, threshold=None, loss_final=ev["loss"]))
            return loss

        def update_latent(latents, loss, step_size):
            out = o_upd(latents, loss, step_size)
            rec = self.cur[-1]
            if self.inside:
                rec["inner_updates"] += 1
            else:
                assert not rec["updated"]
                rec["updated"] = True
            assert rec["step_size"] in (None, step_size)
            rec["step_size"] = step_size
            return out

        def refine(latents, indices, loss, threshold, text_embeddings, step_size, t, **k):
            assert not k, k  # max_refinement_steps is never passed: its default (20) applies
            self.inside = True
            try:
                out = o_ref(latents=latents, indices=indices, loss=loss, threshold=threshold,
                            text_embeddings=text_embeddings, step_size=step_size, t=t)
            finally:
                self.inside = False
            rec = self.cur[-1]
            rec.update(refined=True, threshold=threshold, loss_final=f(out[0]))
            rec["step_size"] = step_size if rec["step_size"] is None else rec["step_size"]
            return out

        pipe._compute_loss, pipe._update_latent = compute_loss, update_latent
        pipe._perform_iterative_refinement_step = refine

    def end_step(self):
        self.steps.append(self.cur)
        self.cur = []

    def close(self):
        del self.pipe._compute_loss, self.pipe._update_latent, self.pipe._perform_iterative_refinement_step


def run_aae_once(pipe, case, indices, output_type):
    n = len(case["seeds"])
    pipe.scheduler = make_scheduler(case["scheduler"])
    rec = AaeRecorder(pipe, indices)
    steps = StepRecorder(pipe.scheduler, rec.end_step)
    cfg_inputs, grad_ehs = [], []

    def pre(module, args, kwargs):  # the CFG UNet call is the only one without grad
        if not torch.is_grad_enabled():
            cfg_inputs.append(args[0].detach().clone())
        else:
            grad_ehs.append(kwargs["encoder_hidden_states"].detach().clone())
    hook = pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)
    draws = Draws(aae_mod)
    try:
        out = pipe(PROMPT, token_indices=indices, negative_prompt=NEGATIVE, height=H, width=W,
                   num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                   generator=generators(case["seeds"]), num_images_per_prompt=n, output_type=output_type,
                   max_iter_to_alter=case["max_iter_to_alter"], thresholds=dict(case["thresholds"]),
                   scale_factor=case["scale_factor"], attn_res=ATTN_RES).images
    finally:
        hook.remove()
        draws.close()
        rec.close()
    assert all(type(p).__name__ != "AttendExciteAttnProcessor" for p in pipe.unet.attn_processors.values())
    return dict(steps=rec.steps, calls=steps.calls, cfg_inputs=cfg_inputs, grad_ehs=grad_ehs, draws=draws.draws,
                out=out, timesteps=pipe.scheduler.timesteps.tolist())


def run_aae(pipe, case, indices, ids, embeds):
    name, n = case["name"], len(case["seeds"])
    a = run_aae_once(pipe, case, indices, "latent")
    b = run_aae_once(pipe, case, indices, "np")
    image = torch.from_numpy(np.ascontiguousarray(b["out"])).float()
    assert image.shape == (n, H, W, 3)
    T = len(a["timesteps"])
    assert len(a["steps"]) == T and len(a["calls"]) == T and len(a["cfg_inputs"]) == T, name
    # Rerun identity.
    assert a["steps"] == b["steps"] and a["timesteps"] == b["timesteps"], f"{name}: rerun records differ"
    for x, y in zip(a["calls"], b["calls"]):
        assert torch.equal(x["sample"], y["sample"]) and torch.equal(x["prev"], y["prev"]), f"{name}: rerun"
    assert torch.equal(a["out"], a["calls"][-1]["prev"]), name
    postprocess_check(pipe, a["calls"][-1]["prev"], image)
    init = fresh_init(case["seeds"], pipe)
    assert len(a["draws"]) == 1 and torch.equal(a["draws"][0], init), f"{name}: init latents"
    assert pipe.scheduler.init_noise_sigma == 1.0
    # Every grad forward is batch 1 on the prompt's embedding.
    assert a["grad_ehs"] and all(torch.equal(e, embeds) for e in a["grad_ehs"]), name

    step_size = case["scale_factor"] * np.sqrt(np.linspace(1.0, 0.5, T))  # as diffusers computes it
    mita, thr = case["max_iter_to_alter"], case["thresholds"]
    per_step, prev = [], init
    gaps = ([], [])  # token / argmax-pixel margins of the evaluations whose gradient is applied
    for i, (imgs, call, cfg_in) in enumerate(zip(a["steps"], a["calls"], a["cfg_inputs"])):
        assert call["t"] == a["timesteps"][i] and len(imgs) == n, name
        # The CFG pass and the scheduler see the same (updated) z, batch [z, z].
        assert torch.equal(cfg_in, torch.cat([call["sample"]] * 2)), name
        out_imgs = []
        for k, r in enumerate(imgs):
            evals = r["refinement_evals"]
            if r["refined"]:
                # In-loop forwards, then the final one; the first in-loop forward repeats the step's first.
                iters = len(evals) - 1
                assert iters >= 1 and evals[0] == r["first"] and r["loss_final"] == evals[-1]["loss"], name
                assert r["inner_updates"] == iters and iters <= MAX_REFINEMENT_STEPS
                assert r["threshold"] == thr[i]
            else:
                iters = 0
                assert not evals and r["loss_final"] == r["first"]["loss"]
            # Branches as diffusers takes them; margins so that a port cannot flip them.
            target = 1.0 - thr[i] if i in thr else None
            if target is not None:
                compared = [r["first"]["loss"]] + [e["loss"] for e in evals[:-1]]
                assert all(abs(l - target) > THRESHOLD_MARGIN for l in compared), (name, i, compared, target)
                assert r["refined"] == (r["first"]["loss"] > target)
                if r["refined"] and iters < MAX_REFINEMENT_STEPS:
                    assert compared[-1] <= target
            assert r["updated"] == (i < mita and r["loss_final"] != 0), name
            if r["updated"] or r["refined"]:
                assert r["step_size"] == step_size[i]
            used = [e for e in evals[:-1] if e["loss"] != 0] + ([evals[-1] if evals else r["first"]]
                                                               if r["updated"] else [])
            for e in used:
                gaps[0].append(e["token_gap"])
                gaps[1].append(e["pixel_gap"])
            unchanged = not r["updated"] and not r["refined"]
            assert unchanged == torch.equal(call["sample"][k], prev[k]), (name, i, k)
            out_imgs.append(dict(loss_first=r["first"]["loss"], refinement_iters=iters, loss_final=r["loss_final"],
                                 updated=r["updated"],
                                 refinement_losses=[e["loss"] for e in evals[:-1]],
                                 max_attention_first=r["first"]["maxes"],
                                 max_attention_final=(evals[-1] if evals else r["first"])["maxes"],
                                 worst_token_first=indices[r["first"]["worst"]],
                                 argmax_pixel_first=r["first"]["argmax"]))
        per_step.append(dict(i=i, t=call["t"], step_size=float(step_size[i]), threshold=thr.get(i),
                             images=out_imgs))
        prev = call["prev"]

    tensors = {f"{name}.init_latents": init, f"{name}.latents": torch.stack([c["prev"] for c in a["calls"]]),
               f"{name}.aae_latents": torch.stack([c["sample"] for c in a["calls"]]),
               f"{name}.image": image, f"{name}.prompt_embeds": embeds}
    meta = dict(name=name, method="attend-and-excite", prompt=PROMPT, negative_prompt=NEGATIVE,
                scheduler=case["scheduler"], steps=case["steps"], guidance_scale=case["guidance"], width=W, height=H,
                seeds=case["seeds"], timesteps=a["timesteps"], token_indices=indices, token_ids=ids,
                max_iter_to_alter=mita, thresholds={str(k): v for k, v in sorted(thr.items())},
                scale_factor=case["scale_factor"], attn_res=list(ATTN_RES),
                max_refinement_steps=MAX_REFINEMENT_STEPS,
                max_refinement_steps_note="not a __call__ argument: the default of "
                                          "_perform_iterative_refinement_step, which __call__ never passes",
                min_token_gap_used=min(gaps[0]), min_argmax_pixel_gap_used=min(gaps[1]),
                per_step=per_step)
    return tensors, meta


def gaussian_kernel():
    return aae_mod.GaussianSmoothing().weight[0, 0]


def main():
    os.makedirs(OUT, exist_ok=True)
    comps = load_components()
    tok, enc = comps["tokenizer"], comps["text_encoder"]
    assert not getattr(enc.config, "use_attention_mask", False)
    pag_pipe = StableDiffusionPAGPipeline(**comps, pag_applied_layers="mid")
    aae_pipe = StableDiffusionAttendAndExcitePipeline(**comps)
    sd_pipe = StableDiffusionPipeline(**comps)
    for p in (pag_pipe, aae_pipe, sd_pipe):
        p.set_progress_bar_config(disable=True)
        assert p.vae_scale_factor == 2

    # Token ids / indices (BOS at 0) of the AaE target words.
    ids = tok(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    toks = tok.convert_ids_to_tokens(ids)
    indices = [toks.index(w + "</w>") for w in WORDS]
    assert ids[0] == tok.bos_token_id and len(ids) == 77
    with torch.no_grad():
        embeds = enc(torch.tensor([ids])).last_hidden_state
        pe, _ = pag_pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, False)
    assert torch.equal(pe, embeds)

    check_pag_zero_equals_sd(pag_pipe, sd_pipe)

    tensors, metas = {}, []
    for case in PAG_CASES:
        t, m = run_pag(pag_pipe, case, embeds)
        tensors.update(t)
        metas.append(m)
    for case in AAE_CASES:
        t, m = run_aae(aae_pipe, case, indices, ids, embeds)
        tensors.update(t)
        metas.append(m)

    # Coverage: some step refines, some threshold step does not, some update is skipped by max_iter_to_alter.
    aae = [m for m in metas if m["method"] == "attend-and-excite"]
    imgs = [(m, s, im) for m in aae for s in m["per_step"] for im in s["images"]]
    assert any(im["refinement_iters"] > 0 for _, _, im in imgs)
    assert any(s["threshold"] is not None and im["refinement_iters"] == 0 for _, s, im in imgs)
    assert any(s["i"] >= m["max_iter_to_alter"] and not im["updated"] for m, s, im in imgs)
    assert any(s["i"] >= m["max_iter_to_alter"] and im["refinement_iters"] > 0 for m, s, im in imgs)

    meta = dict(
        generator="tests/pyref/make_guidance_fixtures.py", diffusers=diffusers.__version__, torch=torch.__version__,
        transformers=transformers.__version__,
        notes=dict(
            components=REL,
            pag="one UNet call per step on [uncond, cond, cond] (CFG) or [cond, cond]; the last chunk goes "
                "through the perturbed self-attention (attn1 -> to_out(to_v(norm1 h))) in the matched layers "
                "(pag_modules); eps = eps_u + w(eps_c - eps_u) + s_t(eps_c - eps_p), no CFG: eps_c + "
                "s_t(eps_c - eps_p); adaptive s_t = max(0, s - a(1000 - t)) computed in float32 "
                "(t an int64 tensor)",
            aae_grad_pass="per image, batch 1, UNet(z, t, cond embedding) with no scale_model_input (identity "
                          "for DDIM/PNDM); all attention processors are AttendExciteAttnProcessor during the "
                          "call (baddbmm + softmax + bmm, also for the CFG pass); maps stored only when the "
                          "probabilities require grad and have attn_res[0]*attn_res[1] queries: here "
                          "up_blocks.1.attentions.{0,1} then down_blocks.0.attentions.0 (order 'up','down',"
                          "'mid'), 4 heads each, mean over the 12 maps",
            aae_loss="A[:, :, 1:-1] * 100 -> softmax over 75 keys; per token k: map k-1, reflect pad 1, "
                     "conv2d with gaussian_kernel; m_k = max; loss = max_k max(0, 1 - m_k) (Python max: an int 0 "
                     "when every m_k >= 1)",
            aae_update="z - step_size * dL/dz, step_size = scale_factor * sqrt(linspace(1, 0.5, T))[i] "
                       "(float64; torch rounds the scalar to float32 in the multiply)",
            aae_refinement="while loss > 1 - threshold: forward at z, loss, update if loss != 0, stop after "
                           "max_refinement_steps iterations; then one more forward gives loss_final; "
                           "refinement_losses are the in-loop losses (the first repeats loss_first)",
            gaussian_kernel=[[float(v) for v in row] for row in gaussian_kernel()],
        ),
        cases=metas,
    )
    json.dump(meta, open(os.path.join(OUT, "cases.json"), "w"), indent=1, allow_nan=False)
    save_file({k: v.detach().clone().contiguous().float() for k, v in sorted(tensors.items())},
              os.path.join(OUT, "reference.safetensors"), metadata={"format": "pt"})

    # Summary.
    print(f"diffusers {diffusers.__version__}  torch {torch.__version__}  token_indices {indices} "
          f"({[toks[i] for i in indices]})")
    for m in metas:
        line = f"{m['name']:19s} {m['scheduler']:4s} T={len(m['timesteps'])} seeds={m['seeds']} w={m['guidance_scale']}"
        if m["method"] == "pag":
            line += f" pag_scale/step={[round(s, 4) for s in m['pag_scale_per_step']]} modules={m['pag_modules']}"
        else:
            line += (f" thresholds={m['thresholds']} mita={m['max_iter_to_alter']} refine="
                     f"{[[im['refinement_iters'] for im in s['images']] for s in m['per_step']]} updated="
                     f"{[[int(im['updated']) for im in s['images']] for s in m['per_step']]}"
                     f" loss_first={[[round(im['loss_first'], 5) for im in s['images']] for s in m['per_step']]}"
                     f" margins of applied gradients: token>={m['min_token_gap_used']:.2e} "
                     f"argmax pixel>={m['min_argmax_pixel_gap_used']:.2e}")
        print(line)
    total = 0
    for fn in sorted(os.listdir(OUT)):
        p = os.path.join(OUT, fn)
        total += os.path.getsize(p)
        print(f"{os.path.relpath(p, ROOT):50s} {os.path.getsize(p):>9d} B")
    print(f"total {total} B")


if __name__ == "__main__":
    main()
