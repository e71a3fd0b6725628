#!/usr/bin/env python3
"""CPU timings of diffusers/PyTorch at their best on random SDXL base weights, the reference for
decorr's SDXL benchmarks (run both through `tests/pyref/bench_backends.py --only
sdxl-unet,sdxl-image,sdxl-finetune`):

    python tests/pyref/bench_sdxl.py unet [HW=64] [N=3]       # vs `unet` bench: sdxl HW N
    python tests/pyref/bench_sdxl.py image [HW=64] [STEPS=20] # vs `sample_loop` bench: HW STEPS sdxl
    python tests/pyref/bench_sdxl.py finetune 1|2 [N=5]       # vs `train_step` bench: N all sdxl1|sdxl2
    (each also takes --configs DIR)

Models are built from the configs in DIR (a diffusers folder with unet/, vae/, text_encoder/,
text_encoder_2/ and scheduler/ configs; default crates/decorr-convert/assets/sdxl, SDXL base's),
random weights, f32, 2 threads. `--configs tests/fixtures/sdxl_tiny` runs the tiny SDXL model: a
quick check of the harness, not a measurement.
- unet: diffusers' `UNet2DConditionModel` under `torch.inference_mode()` with its default SDPA
  attention (AttnProcessor2_0), HW x HW latents, context [B, 77, 2048], text_embeds [B, 1280],
  the six time ids of an 8 HW px image, timestep 981; batch 2 (CFG's batch), then batch 1, each
  a median of N calls after one warm-up call.
- image: diffusers' `StableDiffusionXLPipeline` (its EulerDiscrete scheduler, guidance 5,
  force_zeros_for_empty_prompt, no watermark) on "rusty tracks with an old train", seed 42,
  8 HW x 8 HW px, output_type="np"; one 1-step call first (as decorr's bench does), then the
  timed call: text encoding, STEPS CFG steps at batch 2, VAE decode.
- finetune: bench_finetune.py's step (../shared/reference/pyref, copied here) for SDXL's encoder 1
  (`CLIPTextModel`) or 2 (`CLIPTextModelWithProjection`) at layer n-2 (`hidden_states[-2]`, what
  the UNet reads): eager attention, loss a[T, C] - min a[T, 1:T] of the head-averaged map
  (T = 6 "train", C = 2), AdamW (lr 1e-5, wd 1e-2) over all parameters. The layer past n-2 cannot
  change the loss, so it is dropped (decorr does not run it either). Four ways: torch's default
  AdamW or fused=True, on all 77 tokens (tokenizer_2 pads with "!") or on the causal prefix
  0..=T; median of N steps after 2 warm-up steps each; the harness takes the best.
Prints one result line per timing; the process's peak RSS is measured by the harness.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SDXL = os.path.join(ROOT, "crates", "decorr-convert", "assets", "sdxl")
CLIP = os.path.join(ROOT, "assets", "clip")
PROMPT = "rusty tracks with an old train"
T, C = 6, 2  # target "train" (after BOS), a fixed corr token, as bench_finetune.py

torch.set_num_threads(2)


def median_of(fn, n, warm=1):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def tokenizer(second):
    from transformers import CLIPTokenizer
    kw = dict(pad_token="!") if second else {}  # SDXL base's tokenizer_2 pads with "!"
    return CLIPTokenizer(os.path.join(CLIP, "vocab.json"), os.path.join(CLIP, "merges.txt"),
                         model_max_length=77, **kw)


def text_config(configs, second, attn=None):
    from transformers import CLIPTextConfig
    cfg = CLIPTextConfig.from_json_file(os.path.join(configs, "text_encoder_2" if second else "text_encoder",
                                                     "config.json"))
    if attn:
        cfg._attn_implementation = attn
    return cfg


def text_encoder(configs, second, attn=None):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    cls = CLIPTextModelWithProjection if second else CLIPTextModel
    return cls(text_config(configs, second, attn)).float()


def unet_model(configs):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(1)
    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(configs, "unet"))).float().eval()


def bench_unet(configs, hw, n):
    unet = unet_model(configs)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    px = float(hw * 8)
    for b in (2, 1):
        x = torch.randn(b, cfg.in_channels, hw, hw)
        ctx = torch.randn(b, 77, cfg.cross_attention_dim)
        added = dict(text_embeds=torch.randn(b, pooled), time_ids=torch.tensor([[px, px, 0.0, 0.0, px, px]] * b))
        t = torch.tensor([981] * b)
        with torch.inference_mode():
            s = median_of(lambda: unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample, n)
        print(f"sdxl unet call, batch {b}, {hw}x{hw} (PyTorch {torch.__version__}, SDPA, median of {n}): {s:.3f} s",
              flush=True)


def bench_image(configs, hw, steps):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    torch.manual_seed(0)
    te = text_encoder(configs, False).eval()
    te2 = text_encoder(configs, True).eval()
    unet = unet_model(configs)
    torch.manual_seed(2)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(configs, "vae"))).float().eval()
    sched = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(os.path.join(configs, "scheduler")))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tokenizer(False),
                                     tokenizer_2=tokenizer(True), unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    marks = []

    def run(k):
        return pipe(PROMPT, height=hw * 8, width=hw * 8, num_inference_steps=k, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(42), output_type="np",
                    callback_on_step_end=lambda p, i, t, kw: (marks.append(time.perf_counter()), kw)[1])

    run(1)  # warm-up, as decorr's bench (which materialises its lazily built weights there)
    marks.clear()
    t0 = time.perf_counter()
    img = run(steps).images
    total = time.perf_counter() - t0
    per = sorted(b - a for a, b in zip(marks, marks[1:]))
    med = statistics.median(per) if per else float("nan")
    print(f"SDXL cfg (diffusers {__import__('diffusers').__version__}), Euler {steps} steps, {hw * 8}x{hw * 8}: "
          f"total {total:.3f} s, median step {med:.3f} s, image {list(img.shape)}", flush=True)


def bench_finetune(configs, which, n):
    second = which == 2
    tok = tokenizer(second)
    full = torch.tensor([tok(PROMPT, padding="max_length", max_length=77).input_ids])
    cfg = text_config(configs, second)
    layer = cfg.num_hidden_layers - 2
    for fused in (False, True):
        for ntok in (77, T + 1):
            torch.manual_seed(0)
            m = text_encoder(configs, second, attn="eager")
            # Layers past `layer` cannot change its attention: run (and train) only 0..=layer.
            enc = (m.text_model if hasattr(m, "text_model") else m).encoder  # transformers 5's CLIPTextModel is flat
            enc.layers = enc.layers[:layer + 1]
            m.train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=1e-2, fused=fused)
            ids = full[:, :ntok]

            def step():
                a = m(ids, output_attentions=True).attentions[layer].mean(1)[0]
                loss = a[T, C] - a[T, 1:T].min()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            s = median_of(step, n, warm=2)
            print("RESULT", json.dumps(dict(bench=f"sdxl_finetune_step_all_te{which}", fused_adamw=fused, tokens=ntok,
                                            layer=layer, layers=cfg.num_hidden_layers, width=cfg.hidden_size,
                                            median_s=round(s, 5))), flush=True)
            del m, enc, opt, step
            gc.collect()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["unet", "image", "finetune"])
    p.add_argument("args", nargs="*", type=int)
    p.add_argument("--configs", default=SDXL, help="a diffusers folder of SDXL configs (default: SDXL base's)")
    a = p.parse_args()
    if a.mode == "unet":
        hw, n = (a.args + [64, 3][len(a.args):])[:2]
        bench_unet(a.configs, hw, n)
    elif a.mode == "image":
        hw, steps = (a.args + [64, 20][len(a.args):])[:2]
        bench_image(a.configs, hw, steps)
    else:
        if not a.args or a.args[0] not in (1, 2):
            sys.exit("finetune 1|2 [N]: which SDXL text encoder")
        bench_finetune(a.configs, a.args[0], a.args[1] if len(a.args) > 1 else 5)


if __name__ == "__main__":
    main()
