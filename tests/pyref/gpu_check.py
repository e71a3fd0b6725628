#!/usr/bin/env python3
"""GPU check (issue 16): decorr and diffusers side by side on the same prompt, seed and weights.

What it does, in order:
1. Weights. Full-size SD 1.5 with random weights: CLIPTextModel, UNet2DConditionModel and
   AutoencoderKL from the configs below (copied from ../shared/reference/pyref/sd15_configs.py),
   each built on the CPU in PyTorch's default initialisation after `torch.manual_seed(0 / 1 / 2)`
   (the same weights as pyref's `build("full")` and tests/pyref/bench_guidance.py), SD 1.5's
   scheduler config as DDIM, the CLIP tokenizer from assets/clip; saved as one diffusers folder
   (fp32 safetensors) that both sides load. No rescaling is needed: at this init the
   activations stay small (checked on the CPU in fp32 at 64x64 px: under ~10 in the UNet, ~30
   in the VAE, far from fp16's range) and the images are noise-like but not constant (mean
   ~0.49, sd ~0.16).
   With --tiny: the repo's assets/sd-tiny folder (tiny random models) instead.
2. diffusers (StableDiffusionPipeline loaded from that folder, DDIM, CFG, batch 1, the
   generator `torch.Generator("cpu").manual_seed(seed)`): fp16 with diffusers' default
   attention processor (SDPA on torch 2), then fp32 (torch's defaults: cuDNN may use TF32 for
   convolutions, matmuls do not; the flags are in the JSON). Each: a 2-step warm-up run, then
   the measured run; per-step times from `callback_on_step_end` after `torch.cuda.synchronize()`
   (the first step measured from the UNet's first call), the call's wall time, and
   `torch.cuda.max_memory_allocated` (weights included) after `reset_peak_memory_stats`.
3. decorr (the binary given by --decorr, built with --features vulkan,tch): `decorr generate` in
   each --configs BACKEND:DTYPE (default tch:f16, vulkan:f16, tch:f32: PyTorch's own kernels
   through LibTorch against cubecl's Vulkan path, and half against full precision; wgpu:f16
   for wgpu's WGSL compiler), on the same folder,
   prompt and seed (--seed S --num-images 1: OUT/seed-S.png), DDIM, no warm-up run (the first
   step, with its shader compilation and autotuning, is left out of the per-step figures),
   `--timings` for its per-step times (each after a device sync; decorr's f16 keeps the VAE
   in f32, diffusers' fp16 decodes in fp16);
   peak GPU memory of the process by polling nvidia-smi every 0.2 s (the process's own row,
   or the whole GPU's use above the level before it started when the process's id is not
   visible, as in some containers; this includes the CUDA/Vulkan context, unlike the diffusers
   figure). Each run has a timeout so that the whole check fits --budget-s; a run that times
   out or fails is reported as such and the check goes on.
4. DisenDiff training (only with --disendiff-steps N, N >= 2): PyTorch's micro-step
   (tests/pyref/bench_disendiff_step.py --device cuda --pixels 512, configurations fused,
   fused_sdpa, fused_sdpa_fp16: AdamW fused, eager or SDPA attention, fp32 or fp16 autocast) and
   `decorr disendiff` on the same weights (--backend: the first of --configs; f32, as training
   always is) for N optimiser steps at the default batch 2 x accumulation 4 at --height px, on
   two noise PNGs as training images; its report.json's step_seconds (the first step, with its
   shader compilation, left out). PyTorch's optimiser step = 4 x (forward+loss + backward) +
   AdamW, from the micro-step's part medians. The expected time of the default run (250 steps,
   plus 8 generated training images of --steps steps: the first decorr generate run's total, or
   diffusers fp16's for the PyTorch side) is printed for both.
5. One table (per-step median and mean without the first step, ratios to diffusers fp16 and
   fp32, totals, peak memory) and the images' max differences in /255 units; everything as
   JSON (--json) and the images as PNGs (--out-dir: 5 files by default; decorr's own output goes into
   the log, so that a lent machine's $OUT stays within the 8 files that come back).
   Exit status 1 when a decorr run failed, timed out or had no time left, or diffusers or a
   DisenDiff run failed.

Here (no GPU; CPU torch with diffusers installed, on one thread, decorr on flex, tiny models,
16x16, 5 steps; fp16 on CPU torch is tried and skipped if it fails):

    /opt/pyref-venv/bin/python tests/pyref/gpu_check.py --tiny --decorr target/debug/decorr \
        --json /tmp/gpu-check/gpu-check.json --out-dir /tmp/gpu-check

On the lent GPU machine (tests/pyref/gpu_check_prepare.sh fills .gpu/ here first; then the
device command is `bash tests/pyref/gpu_check.sh`, which installs the carried diffusers wheel
and runs this with --decorr .gpu/decorr):

    python3 tests/pyref/gpu_check.py --decorr .gpu/decorr --json OUT/gpu-check.json --out-dir OUT

For issue 18's DisenDiff figure, a second call on the lent machine, with one generate run so that
it fits the budget: `bash tests/pyref/gpu_check.sh --configs vulkan:f16 --disendiff-steps 3`
(the weights are built again: a fresh call has a fresh $OUT and temporary folder).

Time budget: --budget-s (default 450 s) bounds the whole script, so that with the wheel install
and the machine's start a lent-machine session stays under 8 minutes. On an H100/H200 the
weights take ~30 s to build and save, diffusers' four runs ~20 s; the decorr runs share what is
left (each gets the remaining time divided by the runs still to go, less a reserve for the
report).
"""
import argparse
import gc
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "assets", "sd-tiny")

# Full-size SD 1.5 configs, copied from ../shared/reference/pyref/sd15_configs.py (that folder is
# not on the lent machine).
TEXT_FULL = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
    hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
    initializer_range=0.02, initializer_factor=1.0,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
UNET_FULL = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=768, attention_head_dim=8,
)
VAE_FULL = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu",
    norm_num_groups=32, scaling_factor=0.18215,
)
SCHED = dict(  # SD 1.5's scheduler_config.json (PNDM there); DDIM from the same betas
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon",
)
# SD 1.5's tokenizer folder: vocabulary and merges from assets/clip, configs as our fixtures have.
TOKENIZER_CONFIG = {
    "add_prefix_space": False, "bos_token": "<|startoftext|>", "do_lower_case": True,
    "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77,
    "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>",
}
SPECIAL_TOKENS_MAP = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                      "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}

GIB = 1024 ** 3


def log(msg=""):
    print(msg, flush=True)


def stats(step_s):
    """Median and mean of the per-step times, the first step left out."""
    rest = step_s[1:]
    if not rest:
        return None, None
    return statistics.median(rest), sum(rest) / len(rest)


# ---------------------------------------------------------------------------------------------
# weights


def write_tokenizer(dst):
    os.makedirs(dst, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(REPO, "assets", "clip", f), os.path.join(dst, f))
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=2)
    with open(os.path.join(dst, "special_tokens_map.json"), "w") as f:
        json.dump(SPECIAL_TOKENS_MAP, f, indent=2)


def build_full(dst):
    """Random full-size SD 1.5 as one diffusers folder (fp32 safetensors) at dst."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    t0 = time.perf_counter()
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_FULL)).eval()
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**UNET_FULL).eval()
    torch.manual_seed(2)
    vae = AutoencoderKL(**VAE_FULL).eval()
    tok_dir = dst + ".tokenizer"
    write_tokenizer(tok_dir)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**SCHED), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    t1 = time.perf_counter()
    pipe.save_pretrained(dst, safe_serialization=True)
    # Whatever the tokenizer's save wrote, the folder also holds SD 1.5's own four files.
    write_tokenizer(os.path.join(dst, "tokenizer"))
    shutil.rmtree(tok_dir, ignore_errors=True)
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in
         (("text_encoder", text), ("unet", unet), ("vae", vae))}
    del pipe, text, unet, vae
    gc.collect()
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
    return dict(build_s=round(t1 - t0, 2), save_s=round(time.perf_counter() - t1, 2),
                params=n, bytes=size)


# ---------------------------------------------------------------------------------------------
# diffusers


def diffusers_run(folder, dtype_name, a, device):
    """Warm-up (2 steps) and one measured run of StableDiffusionPipeline; returns a result dict
    (and the image as floats in [0, 1] under "_image")."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    cuda = device.type == "cuda"
    res = dict(config=f"diffusers {dtype_name}", side="diffusers", dtype=dtype_name)
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    res["load_s"] = round(time.perf_counter() - t0, 2)
    res["attn_processor"] = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    marks, first = [], []

    def pre_hook(_module, _args):  # the denoising loop's start: the UNet's first call
        if not first:
            sync()
            first.append(time.perf_counter())

    def on_step_end(_pipe, _i, _t, kw):
        sync()
        marks.append(time.perf_counter())
        return kw

    pipe.unet.register_forward_pre_hook(pre_hook)

    def call(steps):
        marks.clear()
        first.clear()
        return pipe(a.prompt, height=a.height, width=a.width, num_inference_steps=steps,
                    guidance_scale=a.guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(a.seed), output_type="np",
                    callback_on_step_end=on_step_end)

    try:
        with torch.inference_mode():
            call(2)  # warm-up
            if cuda:
                sync()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            c0 = time.perf_counter()
            out = call(a.steps)
            sync()
            c1 = time.perf_counter()
    finally:
        del pipe
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    img = np.asarray(out.images[0], dtype=np.float32)
    step_s = [marks[0] - first[0]] + [b - a_ for a_, b in zip(marks, marks[1:])]
    res.update(status="ok", steps=len(step_s), step_s=[round(x, 5) for x in step_s],
               encode_s=round(first[0] - c0, 4), decode_s=round(c1 - marks[-1], 4),
               total_s=round(c1 - c0, 3))
    if cuda:
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
        res["peak_note"] = "torch.cuda.max_memory_allocated (weights included)"
    res["nonfinite"] = int((~np.isfinite(img)).sum())
    res["_image"] = img
    return res


# ---------------------------------------------------------------------------------------------
# decorr


def nvidia_smi(*query):
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")]
            for line in out.stdout.splitlines() if line.strip()]


def gpu_used_mib():
    rows = nvidia_smi("--query-gpu=memory.used")
    try:
        return sum(float(r[0]) for r in rows) if rows else None
    except ValueError:
        return None


class MemPoller(threading.Thread):
    """Peak GPU memory of one process (nvidia-smi every 0.2 s) and its peak host RSS."""

    def __init__(self, pid, baseline_mib):
        super().__init__(daemon=True)
        self.pid, self.baseline = pid, baseline_mib
        self.own_mib = None      # the process's own row in --query-compute-apps
        self.gpu_mib = None      # the whole GPU's memory.used, peak
        self.rss_kib = None
        self.stop = threading.Event()

    def run(self):
        have_smi = shutil.which("nvidia-smi") is not None
        while not self.stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.rss_kib = int(line.split()[1])
            except (OSError, ValueError):
                pass
            if have_smi:
                for row in nvidia_smi("--query-compute-apps=pid,used_memory") or []:
                    try:
                        if int(row[0]) == self.pid:
                            self.own_mib = max(self.own_mib or 0.0, float(row[1]))
                    except (ValueError, IndexError):
                        pass
                used = gpu_used_mib()
                if used is not None:
                    self.gpu_mib = max(self.gpu_mib or 0.0, used)
            self.stop.wait(0.2)

    def result(self):
        if self.own_mib is not None:
            return self.own_mib / 1024, "nvidia-smi, the process's own row (context included)"
        if self.gpu_mib is not None and self.baseline is not None:
            return (max(0.0, self.gpu_mib - self.baseline) / 1024,
                    "nvidia-smi, the GPU's memory.used above its level before the run "
                    "(the process's id was not visible)")
        return None, "n/a (no nvidia-smi)"


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def run_process(cmd, logf, timeout_s, res):
    """Runs cmd (output into logf) with a timeout, polling its peak GPU memory and host RSS into
    res (with the command, process_s, rc and the log's last 40 lines); returns (rc, timed_out)."""
    res["command"] = shlex.join(cmd)
    res["timeout_s"] = round(timeout_s, 1)
    log(f"  $ {res['command']}")
    log(f"  (timeout {timeout_s:.0f} s)")
    baseline = gpu_used_mib()
    t0 = time.perf_counter()
    with open(logf, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        poller = MemPoller(proc.pid, baseline)
        poller.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        poller.stop.set()
        poller.join()
    res["process_s"] = round(time.perf_counter() - t0, 2)
    res["rc"] = rc
    peak, note = poller.result()
    res["peak_gib"] = None if peak is None else round(peak, 3)
    res["peak_note"] = note
    if poller.rss_kib is not None:
        res["host_peak_rss_gib"] = round(poller.rss_kib / 1024 ** 2, 3)
    res["log_tail"] = tail(logf, 40)
    return rc, timed_out


def skipped(res, timeout_s, need):
    """Marks res skipped when less than `need` seconds are left for it; True when it was."""
    if timeout_s >= need:
        return False
    res.update(status="skipped", reason=f"out of time budget ({timeout_s:.0f} s left for it)")
    log(f"  SKIPPED: {res['reason']}")
    return True


def failed(res, rc, timed_out, timeout_s, hint="", show_log=True):
    """Marks res failed or timed out from a run_process result (hint added to the reason), logs
    it with the log's last lines unless the caller prints the log itself; True when it was."""
    if timed_out:
        res.update(status="timeout", reason=f"killed after {timeout_s:.0f} s")
    elif rc != 0:
        res.update(status="failed", reason=f"exit status {rc}{hint}")
    else:
        return False
    log(f"  {res['config']}: {res['status'].upper()}: {res['reason']}")
    for line in res["log_tail"][-15:] if show_log else []:
        log(f"    | {line}")
    return True


def decorr_run(a, weights, dtype, backend, work, timeout_s):
    """One `decorr generate`; returns a result dict (the image as uint8 under "_png")."""
    res = dict(config=f"decorr {backend} {dtype}", side="decorr", dtype=dtype, backend=backend)
    if skipped(res, timeout_s, 10):
        return res
    tag = f"{backend}-{dtype}"
    out = os.path.join(work, f"decorr-{tag}")
    shutil.rmtree(out, ignore_errors=True)  # a fresh folder: generate would skip a finished image
    timings = os.path.join(work, f"decorr-{tag}-timings.json")
    if os.path.exists(timings):
        os.remove(timings)
    logf = os.path.join(work, f"decorr-{tag}.log")  # printed below, not in --out-dir
    cmd = [a.decorr, "generate", "--weights", weights, "--backend", backend, "--dtype", dtype,
           "--prompt", a.prompt, "--seed", str(a.seed), "--num-images", "1",
           "--steps", str(a.steps), "--scheduler", "ddim", "--height", str(a.height),
           "--width", str(a.width), "--guidance-scale", str(a.guidance_scale),
           "--out", out, "--timings", timings, "--quiet"]
    rc, timed_out = run_process(cmd, logf, timeout_s, res)
    lines = res["log_tail"]
    text = "\n".join(tail(logf, 200)) if rc != 0 else ""
    missing = [f for f in ("--dtype", "--timings") if f"unexpected argument '{f}'" in text]
    hint = f": this decorr has no {' / '.join(missing)} flag (built before it landed?)" \
        if missing else ""
    failed(res, rc, timed_out, timeout_s, hint, show_log=False)  # the whole tail follows
    if lines:
        log(f"  decorr's output{' (last 40 lines)' if len(lines) == 40 else ''}:")
    for line in lines:
        log(f"    | {line}")
    try:
        with open(timings) as f:
            t = json.load(f)
        res.update(steps=t.get("steps"), step_s=t.get("step_s"), encode_s=t.get("encode_s"),
                   decode_s=t.get("decode_s"), total_s=t.get("total_s"),
                   reported=dict(backend=t.get("backend"), dtype=t.get("dtype")))
    except (OSError, ValueError) as e:
        if rc == 0 and not timed_out:
            res.update(status="failed", reason=f"no readable --timings file ({e})")
    png = os.path.join(out, f"seed-{a.seed:06d}.png")
    if os.path.exists(png):
        img = np.asarray(Image.open(png).convert("RGB"), dtype=np.uint8)
        res["_png"] = img
        dst = os.path.join(a.out_dir, f"decorr-{tag}.png")
        shutil.copyfile(png, dst)
        res["png"] = dst
    elif rc == 0 and not timed_out:
        res.update(status="failed", reason=f"no image at {png}")
    res.setdefault("status", "ok")
    return res


# ---------------------------------------------------------------------------------------------
# DisenDiff training (issue 18)

DD_ACCUM = 4                  # decorr disendiff's default accumulation (batch 2 per micro-step)
DD_DEFAULT_STEPS = 250        # the default run: 250 optimiser steps ...
DD_DEFAULT_IMAGES = 8         # ... on 8 generated training images


def disendiff_torch(a, device, work, timeout_s):
    """PyTorch's DisenDiff micro-step on the full-size model (bench_disendiff_step.py) in each
    configuration; an optimiser step is DD_ACCUM micro-steps' forward+loss and backward plus
    AdamW, from the part medians."""
    res = dict(config="PyTorch DisenDiff", side="diffusers")
    if skipped(res, timeout_s, 30):
        return res
    js = os.path.join(work, "disendiff-torch.json")
    cuda = device.type == "cuda"
    configs = "fused,fused_sdpa" + (",fused_sdpa_fp16" if cuda else "")
    cmd = [sys.executable, os.path.join(REPO, "tests", "pyref", "bench_disendiff_step.py"),
           "--device", device.type, "--pixels", str(64 if a.tiny else a.height),
           "--configs", configs, "--json", js]
    cmd += ["--steps", "1", "--warmup", "0", "--threads", "1"] if not cuda else \
        ["--steps", "3", "--warmup", "2"]
    rc, timed_out = run_process(cmd, os.path.join(work, "disendiff-torch.log"), timeout_s, res)
    if failed(res, rc, timed_out, timeout_s):
        return res
    with open(js) as f:
        bench = json.load(f)
    res["setting"] = bench["setting"]
    res["configs"] = {}
    for name, c in bench["configs"].items():
        micro = c["forward_loss"]["median_s"] + c["backward"]["median_s"]
        res["configs"][name] = dict(
            micro_step_s=round(micro, 4), optimizer_s=c["optimizer"]["median_s"],
            step_s=round(DD_ACCUM * micro + c["optimizer"]["median_s"], 4),
            peak_gib=c.get("cuda_peak_gib"), first_step_loss=c["first_step_loss"])
    best = min(res["configs"], key=lambda k: res["configs"][k]["step_s"])
    res.update(status="ok", best=best, step_s=res["configs"][best]["step_s"])
    for name, c in res["configs"].items():
        log(f"  {name}: {c['step_s']:.3f} s per optimiser step (micro-step {c['micro_step_s']:.3f} "
            f"s x {DD_ACCUM} + AdamW {c['optimizer_s']:.4f} s), peak "
            + ("n/a" if c["peak_gib"] is None else f"{c['peak_gib']:.2f} GiB"))
    return res


def disendiff_decorr(a, weights, backend, work, timeout_s):
    """`decorr disendiff` for --disendiff-steps optimiser steps on two noise PNGs; its
    report.json's step_seconds (saving every step, so that a timeout keeps the finished ones)."""
    res = dict(config=f"decorr {backend} f32 DisenDiff", side="decorr", backend=backend)
    if skipped(res, timeout_s, 30):
        return res
    images = os.path.join(work, "disendiff-images")
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        px = rng.integers(0, 256, size=(a.height, a.width, 3), dtype=np.uint8)
        Image.fromarray(px).save(os.path.join(images, f"{i}.png"))
    out = os.path.join(work, "disendiff-out")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [a.decorr, "disendiff", "--weights", weights, "--backend", backend,
           "--prompt", a.prompt, "--objects", a.disendiff_objects, "--images", images,
           "--max-train-steps", str(a.disendiff_steps), "--grad-accum", str(DD_ACCUM),
           "--resolution", str(a.height), "--save-every", "1", "--out", out, "--quiet"]
    rc, timed_out = run_process(cmd, os.path.join(work, "disendiff-decorr.log"), timeout_s, res)
    res["step_s"] = []
    try:
        with open(os.path.join(out, "report.json")) as f:
            report = json.load(f)
        res["step_s"] = [round(x, 4) for x in report.get("step_seconds", [])]
        res["step_losses"] = report.get("step_losses")
    except (OSError, ValueError) as e:
        if rc == 0 and not timed_out:
            res.update(status="failed", reason=f"no readable report.json ({e})")
    failed(res, rc, timed_out, timeout_s)  # a timeout still reports the steps it finished
    med, mean = stats(res["step_s"])
    if med is None:
        if "status" not in res:
            res.update(status="failed", reason="report.json has no step_seconds (a decorr "
                       "built before they were recorded?)" if not res["step_s"] else
                       "one step timed; need 2 (the first has the shader compilation)")
            log(f"  FAILED: {res['reason']}")
        return res
    res.setdefault("status", "ok")
    res.update(step_median_s=round(med, 4), step_mean_s=round(mean, 4))
    log(f"  {med:.3f} s per optimiser step (median of {len(res['step_s']) - 1}, the first "
        f"{res['step_s'][0]:.1f} s left out), process {res['process_s']:.1f} s, peak {peak_text(res)}")
    return res


def disendiff_expected(dd_torch, dd_decorr, runs, comparable):
    """The default run's expected time on this GPU: 250 optimiser steps plus 8 training images
    (decorr: its first generate run; PyTorch: diffusers fp16). With --tiny the two sides train
    different models (PyTorch's bench is full-size only), so no ratio."""
    gen = {r["config"]: r.get("total_s") for r in runs if r.get("status") == "ok"}
    ours_gen = next((t for c, t in gen.items() if c.startswith("decorr")), None)
    out = {}
    for side, step, image in (("decorr", dd_decorr.get("step_median_s"), ours_gen),
                              ("pytorch", dd_torch.get("step_s"), gen.get("diffusers fp16"))):
        if step is None:
            out[side] = None
            continue
        train = DD_DEFAULT_STEPS * step
        images = DD_DEFAULT_IMAGES * image if image is not None else None
        out[side] = dict(train_s=round(train, 1), images_s=None if images is None else round(images, 1),
                         total_min=round((train + (images or 0.0)) / 60, 1))
    if comparable and out.get("decorr") and out.get("pytorch"):
        out["ratio_train"] = round(out["decorr"]["train_s"] / out["pytorch"]["train_s"], 2)
    return out


# ---------------------------------------------------------------------------------------------
# report


def to_u8(img):
    """diffusers' quantisation: round(x * 255) (numpy_to_pil); NaN maps to 0."""
    return np.nan_to_num(np.clip(np.round(img * 255.0), 0, 255)).astype(np.uint8)


def diff(x, y):
    if x is None or y is None:
        return None
    if x.shape != y.shape:
        return dict(error=f"shapes differ: {x.shape} vs {y.shape}")
    d = np.abs(x.astype(np.float64) - y.astype(np.float64))
    return dict(max=round(float(d.max()), 4), mean=round(float(d.mean()), 4),
                frac_over_2=round(float((d > 2).mean()), 6))


def fmt(x, spec=".4f"):
    return "n/a" if x is None else format(x, spec)


def peak_text(r, unit=True):
    """GPU peak, or the host's peak RSS where there is no GPU figure."""
    g = " GiB" if unit else ""
    if r.get("peak_gib") is not None:
        return f"{r['peak_gib']:.2f}{g}"
    if r.get("host_peak_rss_gib") is not None:
        return f"{r['host_peak_rss_gib']:.2f}{g} (host RSS)"
    return "n/a"


def table(runs, ref16, ref32):
    head = ["configuration", "step median (s)", "step mean (s)", "/ diffusers fp16", "/ fp32",
            "total (s)", "peak (GiB)", "note"]
    rows = []
    for r in runs:
        med, mean = stats(r.get("step_s") or [])
        x16 = med / ref16 if med and ref16 else None
        x32 = med / ref32 if med and ref32 else None
        note = r.get("status", "")
        if r.get("status") not in (None, "ok"):
            note = f"{r['status'].upper()}: {r.get('reason', '')}"
        elif r["side"] == "decorr":
            note = f"process {r['process_s']:.1f} s incl. loading"
        else:
            note = ",".join(r.get("attn_processor", []))
        rows.append([r["config"], fmt(med), fmt(mean), fmt(x16, ".2f") + ("x" if x16 else ""),
                     fmt(x32, ".2f") + ("x" if x32 else ""), fmt(r.get("total_s"), ".2f"),
                     peak_text(r, unit=False), note])
    w = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = [" | ".join(h.ljust(w[i]) for i, h in enumerate(head)),
             "-+-".join("-" * x for x in w)]
    lines += [" | ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decorr", help="the decorr binary (without it only diffusers runs)")
    p.add_argument("--tiny", action="store_true",
                   help="assets/sd-tiny, CPU torch, decorr on flex, 16x16, 5 steps (no GPU needed)")
    p.add_argument("--configs", help="decorr's runs as BACKEND:DTYPE,... (default "
                   "tch:f16,vulkan:f16,tch:f32: which GPU backend is fastest; "
                   "flex:f16,flex:f32 with --tiny)")
    p.add_argument("--torch-device", help="diffusers' device (default cuda when there is one; "
                   "cpu with --tiny)")
    p.add_argument("--weights-dir", help="where to write the full-size folder (reused if it has "
                   "model_index.json; default a temporary folder, removed at the end)")
    p.add_argument("--prompt", default="rusty tracks with an old train")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--steps", type=int, help="denoising steps (default 50; 5 with --tiny)")
    p.add_argument("--height", type=int, help="default 512; 16 with --tiny")
    p.add_argument("--width", type=int, help="default 512; 16 with --tiny")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--disendiff-steps", type=int, default=0,
                   help="also time DisenDiff training: PyTorch's step and N >= 2 optimiser steps of "
                   "`decorr disendiff` (default 0: not run; 3 is enough for a median of 2)")
    p.add_argument("--disendiff-objects", default="tracks,train",
                   help="the two object words of --prompt DisenDiff trains for")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="time for the whole script; the decorr runs' timeouts come from it")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--out-dir", default="gpu-check-out", help="the PNGs")
    a = p.parse_args()
    start = time.perf_counter()
    deadline = start + a.budget_s
    a.steps = a.steps or (5 if a.tiny else 50)
    a.height = a.height or (16 if a.tiny else 512)
    a.width = a.width or (16 if a.tiny else 512)
    a.configs = a.configs or ("flex:f16,flex:f32" if a.tiny else "tch:f16,vulkan:f16,tch:f32")
    configs = [tuple(c.split(":", 1)) for c in a.configs.split(",") if c]
    if any(len(c) != 2 for c in configs):
        p.error("--configs: BACKEND:DTYPE,... e.g. vulkan:f16,wgpu:f16")
    if a.disendiff_steps == 1 or a.disendiff_steps < 0:
        p.error("--disendiff-steps: 0 (off) or at least 2 (the first step is left out)")
    backend = ",".join(dict.fromkeys(b for b, _ in configs))
    device = torch.device(a.torch_device or ("cuda" if torch.cuda.is_available() and not a.tiny
                                             else "cpu"))
    if device.type == "cpu":
        # CPU figures are only a try-out; one thread keeps them steady (with two, torch's OpenMP
        # threads stall for seconds per step when a build shares the cores)
        torch.set_num_threads(1)
    if a.decorr:
        a.decorr = os.path.abspath(a.decorr)
    os.makedirs(a.out_dir, exist_ok=True)
    a.out_dir = os.path.abspath(a.out_dir)

    import diffusers
    import transformers
    for lib in (diffusers, transformers):  # no loading bars or CPU-fp16 warnings in the log
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    env = dict(python=platform.python_version(), torch=torch.__version__,
               diffusers=diffusers.__version__, transformers=transformers.__version__,
               torch_device=str(device), cuda=torch.version.cuda,
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
               matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
               decorr=a.decorr, decorr_backend=backend)
    log(f"gpu_check: {a.width}x{a.height}, {a.steps} DDIM steps, CFG {a.guidance_scale}, "
        f"seed {a.seed}, prompt {a.prompt!r}, budget {a.budget_s:.0f} s")
    log(f"  torch {env['torch']} on {device}" + (f" ({env['gpu']})" if env["gpu"] else "")
        + f", diffusers {env['diffusers']}, transformers {env['transformers']}, decorr {backend}")

    report = dict(args=vars(a), env=env, runs=[], diffs={}, disendiff=None)
    # the DisenDiff stage's two runs share the decorr runs' time
    extra = 2 if a.disendiff_steps else 0
    # the weights (unless --weights-dir), decorr's output folders and logs
    tmp = tempfile.mkdtemp(prefix="gpu-check-")
    try:
        # 1. weights
        if a.tiny:
            weights = TINY
            report["weights"] = dict(folder=TINY,
                                     what="assets/sd-tiny: the tiny random test models")
        else:
            weights = (os.path.abspath(a.weights_dir) if a.weights_dir
                       else os.path.join(tmp, "sd15-random"))
            what = ("full-size SD 1.5, random: PyTorch's default init after torch.manual_seed "
                    "0 (text encoder), 1 (UNet), 2 (VAE) on the CPU, as pyref's build('full'); "
                    "fp32 safetensors, DDIM scheduler config")
            if os.path.exists(os.path.join(weights, "model_index.json")):
                log(f"weights: reusing {weights}")
                report["weights"] = dict(folder=weights, what=what, reused=True)
            else:
                log(f"weights: building random full-size SD 1.5 in {weights} ...")
                info = build_full(weights)
                log(f"  built in {info['build_s']} s, saved in {info['save_s']} s "
                    f"({info['bytes'] / GIB:.2f} GiB; parameters {info['params']})")
                report["weights"] = dict(folder=weights, what=what, **info)

        # 2. diffusers
        runs = report["runs"]
        images = {}
        for dt in ("fp16", "fp32"):
            log(f"diffusers {dt}: warm-up (2 steps), then {a.steps} steps ...")
            try:
                r = diffusers_run(weights, dt, a, device)
            except Exception as e:  # noqa: BLE001 -- reported, and the check goes on
                status = "skipped" if (dt == "fp16" and device.type == "cpu") else "failed"
                r = dict(config=f"diffusers {dt}", side="diffusers", dtype=dt, status=status,
                         reason=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
                if status == "skipped":
                    r["reason"] = "fp16 on CPU torch failed: " + r["reason"]
                log(f"  {status.upper()}: {r['reason']}")
            img = r.pop("_image", None)
            if img is not None:
                images[f"diffusers-{dt}"] = to_u8(img)
                images[f"diffusers-{dt}-float"] = img
                r["png"] = os.path.join(a.out_dir, f"diffusers-{dt}.png")
                Image.fromarray(images[f"diffusers-{dt}"]).save(r["png"])
                med, mean = stats(r["step_s"])
                log(f"  total {r['total_s']:.2f} s, step median {fmt(med)} s, mean {fmt(mean)} s"
                    + (f", peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r else "")
                    + (f", {r['nonfinite']} non-finite pixels" if r.get("nonfinite") else ""))
            runs.append(r)

        # 3. decorr
        if not a.decorr:
            log("decorr: not run (no --decorr given)")
        for i, (be, dt) in enumerate(configs if a.decorr else []):
            left = deadline - time.perf_counter() - 15  # keep 15 s for the report
            timeout_s = left / (len(configs) - i + extra)
            log(f"decorr {dt} on {be}: {a.steps} steps ...")
            if os.access(a.decorr, os.X_OK):
                r = decorr_run(a, weights, dt, be, tmp, timeout_s)
            else:
                r = dict(config=f"decorr {be} {dt}", side="decorr", dtype=dt, backend=be,
                         status="failed", reason=f"{a.decorr} is not an executable file")
                log(f"  FAILED: {r['reason']}")
            png = r.pop("_png", None)
            if png is not None:
                images[f"decorr-{be}-{dt}"] = png
            if r["status"] == "ok":
                med, mean = stats(r.get("step_s") or [])
                log(f"  total {fmt(r.get('total_s'), '.2f')} s (process {r['process_s']:.1f} s), "
                    f"step median {fmt(med)} s, mean {fmt(mean)} s, peak {peak_text(r)}")
            runs.append(r)

        # 4. DisenDiff training
        if a.disendiff_steps:
            left = deadline - time.perf_counter() - 15
            log(f"DisenDiff, PyTorch: the micro-step at {64 if a.tiny else a.height} px ...")
            dd_torch = disendiff_torch(a, device, tmp, left / 2)
            dd_decorr = dict(config="decorr DisenDiff", side="decorr", status="failed",
                             reason="no --decorr given")
            if a.decorr and not os.access(a.decorr, os.X_OK):
                dd_decorr["reason"] = f"{a.decorr} is not an executable file"
            elif a.decorr:
                be = configs[0][0]
                left = deadline - time.perf_counter() - 15
                log(f"DisenDiff, decorr on {be}: {a.disendiff_steps} optimiser steps at "
                    f"{a.height} px ...")
                dd_decorr = disendiff_decorr(a, weights, be, tmp, left)
            expected = disendiff_expected(dd_torch, dd_decorr, runs, comparable=not a.tiny)
            report["disendiff"] = dict(pytorch=dd_torch, decorr=dd_decorr, expected_default_run=expected)

        # 5. report
        same = {"f32": "fp32", "f16": "fp16", "bf16": "fp16"}
        pairs = [(f"decorr {be} {dt} vs diffusers {same[dt]}", f"decorr-{be}-{dt}",
                  f"diffusers-{same[dt]}") for be, dt in configs if dt in same]
        pairs += [(f"decorr {be} {dt} vs decorr {be} f32", f"decorr-{be}-{dt}", f"decorr-{be}-f32")
                  for be, dt in configs if dt != "f32" and (be, "f32") in configs]
        pairs.append(("diffusers fp16 vs diffusers fp32", "diffusers-fp16", "diffusers-fp32"))
        for name, x, y in pairs:
            d = diff(images.get(x), images.get(y))
            if d is not None and x.startswith("decorr") and y.startswith("diffusers"):
                # against diffusers' unquantised floats too
                d["vs_float"] = diff(images[x], images[y + "-float"] * 255.0)
            report["diffs"][name] = d if d is not None else "n/a (an image is missing)"
        ref = {r["dtype"]: stats(r["step_s"])[0] for r in runs
               if r["side"] == "diffusers" and r.get("status") == "ok"}
        log()
        log(f"{env['gpu'] or 'CPU'}: SD 1.5 {'tiny ' if a.tiny else ''}{a.width}x{a.height}, "
            f"{a.steps} DDIM steps, CFG {a.guidance_scale}, batch 1 (per-step figures without "
            "the first step)")
        log(table(runs, ref.get("fp16"), ref.get("fp32")))
        if device.type == "cuda":
            log("peak memory: diffusers = torch.cuda.max_memory_allocated (weights included); "
                "decorr = nvidia-smi (its GPU context included)")
        log()
        log("image differences (uint8 PNGs, /255 units):")
        for name, d in report["diffs"].items():
            if isinstance(d, dict) and "max" in d:
                log(f"  {name}: max {d['max']:.0f}, mean {d['mean']:.3f}, "
                    f"pixels over 2: {100 * d['frac_over_2']:.3f}%")
            else:
                log(f"  {name}: {d.get('error') if isinstance(d, dict) else d}")
        if report["disendiff"]:
            dd = report["disendiff"]
            log()
            log(f"DisenDiff training at {a.height} px, batch 2 x accumulation {DD_ACCUM}, f32, "
                "per optimiser step" + (" (--tiny: PyTorch's is the full-size model at 64 px, "
                                       "not comparable):" if a.tiny else ":"))
            t, o = dd["pytorch"], dd["decorr"]
            log(f"  PyTorch, best ({t.get('best', 'n/a')}): {fmt(t.get('step_s'), '.3f')} s"
                + ("" if t.get("status") == "ok" else f"  {t['status'].upper()}: {t.get('reason')}"))
            log(f"  {o['config']}: {fmt(o.get('step_median_s'), '.3f')} s"
                + ("" if o.get("status") == "ok" else f"  {o['status'].upper()}: {o.get('reason')}"))
            e = dd["expected_default_run"]
            for side in ("decorr", "pytorch"):
                if e.get(side):
                    x = e[side]
                    log(f"  expected default run, {side}: {x['total_min']} min ({DD_DEFAULT_STEPS} "
                        f"steps {x['train_s']} s + {DD_DEFAULT_IMAGES} images "
                        f"{fmt(x['images_s'], '.1f')} s)")
            if "ratio_train" in e:
                log(f"  training, decorr / PyTorch's best: {e['ratio_train']}x")
    finally:
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(report, f, indent=2, default=str)
        shutil.rmtree(tmp, ignore_errors=True)
    dd = report["disendiff"]
    dd_runs = [dd["pytorch"], dd["decorr"]] if dd else []
    bad = [r["config"] for r in report["runs"] + dd_runs if r.get("status") in ("failed", "timeout")
           or (r["side"] == "decorr" and r.get("status") == "skipped")]
    log(f"elapsed {report['elapsed_s']:.0f} s (budget {a.budget_s:.0f} s)"
        + (f"; JSON: {a.json}" if a.json else "")
        + (f"; not complete: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
