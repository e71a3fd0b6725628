#!/usr/bin/env python3
"""CPU timing of diffusers' own PAG and Attend-and-Excite pipelines on random full-size SD 1.5
weights, the reference for `cargo bench -p decorr-pipeline --bench sample_loop -- HW N pag|aae`.

    /opt/pyref-venv/bin/python tests/pyref/bench_guidance.py pag|aae|cfg [HW=32] [STEPS=50]

Same setting as ours: DDIM, guidance 7.5, prompt "rusty tracks with an old train", seed 42,
HW x HW latents (32: 256 px), 2 threads; PAG scale 3 on `mid`; Attend-and-Excite on tokens 2 and
6 with its defaults (attn_res 16x16, thresholds {0: .05, 10: .5, 20: .8}, max_iter_to_alter 25).
Model configs come from ../shared/reference/pyref/sd15_configs.py (override the folder with
DECORR_PYREF). Prints per-step times (from the step callbacks), the total and peak RSS.
"""
import os, resource, statistics, sys, time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.environ.get("DECORR_PYREF", os.path.join(ROOT, "..", "shared", "reference", "pyref")))
from sd15_configs import TEXT_FULL, UNET_FULL, VAE_FULL, SCHED  # noqa: E402
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPAGPipeline,  # noqa: E402
                       StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

torch.set_num_threads(2)
mode = sys.argv[1]
hw = int(sys.argv[2]) if len(sys.argv) > 2 else 32
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 50

torch.manual_seed(0)
te = CLIPTextModel(CLIPTextConfig(**TEXT_FULL)).eval()
torch.manual_seed(1)
unet = UNet2DConditionModel(**UNET_FULL).eval()
torch.manual_seed(2)
vae = AutoencoderKL(**VAE_FULL).eval()
tok = CLIPTokenizer(os.path.join(ROOT, "assets/clip/vocab.json"), os.path.join(ROOT, "assets/clip/merges.txt"),
                    model_max_length=77)
sched = DDIMScheduler(**SCHED)
parts = dict(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
prompt = "rusty tracks with an old train"
marks = []
if mode == "pag":
    pipe = StableDiffusionPAGPipeline(**parts, pag_applied_layers=["mid"])
    kw = dict(pag_scale=3.0, callback_on_step_end=lambda p, i, t, k: (marks.append(time.perf_counter()), k)[1])
elif mode == "aae":
    from diffusers import StableDiffusionAttendAndExcitePipeline
    pipe = StableDiffusionAttendAndExcitePipeline(**parts)
    kw = dict(token_indices=[2, 6], callback=lambda i, t, l: marks.append(time.perf_counter()), callback_steps=1)
else:
    pipe = StableDiffusionPipeline(**parts)
    kw = dict(callback_on_step_end=lambda p, i, t, k: (marks.append(time.perf_counter()), k)[1])
pipe.set_progress_bar_config(disable=True)
t0 = time.perf_counter()
pipe(prompt, height=hw * 8, width=hw * 8, num_inference_steps=steps, guidance_scale=7.5,
     generator=torch.Generator().manual_seed(42), output_type="np", **kw)
total = time.perf_counter() - t0
per = sorted(b - a for a, b in zip(marks, marks[1:]))
print(f"{mode} (diffusers), DDIM {steps} steps, {hw * 8}x{hw * 8}: total {total:.1f} s, "
      f"median step {statistics.median(per):.2f} s, mean step {sum(per) / max(1, len(per)):.2f} s, "
      f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
