#!/usr/bin/env python3
"""Write the SDXL text-to-image reference fixtures: diffusers 0.42's StableDiffusionXLPipeline
(CFG) and StableDiffusionXLPAGPipeline (PAG) on the tiny random SDXL model
(tests/fixtures/sdxl_tiny, made by make_sdxl_tiny.py). Run from the repo root:

    /root/torch29/bin/python tests/pyref/make_sdxl_pipeline_fixtures.py   # -> tests/fixtures/sdxl_pipeline/

Deterministic and re-runnable.

Writes under tests/fixtures/sdxl_pipeline/:
  tuned/encoder-2/text_encoder   a "fine-tuned" second encoder (see write_tuned), laid out as
                          `decorr finetune` writes SDXL's.
  cases.json              per case: settings, timesteps, and the time ids the UNet saw.
  reference.safetensors   per case `{case}.prompt_embeds` [1, 77, 40] and `{case}.pooled`
                          [1, 20] (the conditional branch), `{case}.negative_prompt_embeds` /
                          `{case}.negative_pooled` (zeros when the negative prompt is empty:
                          force_zeros_for_empty_prompt), `{case}.init_latents` (the randn draw,
                          before init_noise_sigma), `{case}.latents_final` (before the VAE),
                          `{case}.image` (float32 [B, H, W, 3] in [0, 1]).

Each case is checked here: the embeddings equal a straightforward encoding (hidden_states[-2] of
both encoders, concatenated; text_embeds of text_encoder_2), and `output_type="latent"` gives the
last latents of the image run.
"""
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor

torch.set_num_threads(1)
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(REPO, "tests", "fixtures", "sdxl_tiny")
OUT = os.path.join(REPO, "tests", "fixtures", "sdxl_pipeline")

CASES = [
    # name, method, prompt, negative, steps, guidance, size, seeds, extra
    dict(name="cfg_euler", method="cfg", prompt="rusty tracks with an old train", negative="",
         steps=4, guidance_scale=7.5, width=16, height=16, seeds=[0, 1]),
    dict(name="cfg_negative", method="cfg", prompt="a red bus next to a tree",
         negative="blurry, dark", steps=3, guidance_scale=5.0, width=16, height=24, seeds=[3]),
    dict(name="no_guidance", method="cfg", prompt="a cat on a sofa", negative="", steps=3,
         guidance_scale=1.0, width=16, height=16, seeds=[5]),
    dict(name="pag_mid", method="pag", prompt="rusty tracks with an old train", negative="",
         steps=3, guidance_scale=7.5, width=16, height=16, seeds=[0], pag_scale=3.0,
         pag_applied_layers=["mid"]),
    # Eq. 6 with the fine-tuned second encoder (tuned/encoder-2/text_encoder): the conditional
    # branch from it, the unconditional one zeros (empty negative) or the pre-trained encoders'.
    dict(name="decorrelated", method="decorrelated", prompt="rusty tracks with an old train",
         negative="", steps=3, guidance_scale=7.5, width=16, height=16, seeds=[0, 1]),
    dict(name="decorrelated_negative", method="decorrelated", prompt="rusty tracks with an old train",
         negative="blurry", steps=3, guidance_scale=7.5, width=16, height=16, seeds=[2]),
]

TUNED = os.path.join(OUT, "tuned", "encoder-2", "text_encoder")


def write_tuned():
    """A "fine-tuned" second encoder: sdxl_tiny's + 0.02 randn (seed 7, over named_parameters()
    in order), saved in fp16 (small); the references use it reloaded as f32."""
    from transformers import CLIPTextModelWithProjection
    enc = CLIPTextModelWithProjection.from_pretrained(os.path.join(MODEL, "text_encoder_2"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in enc.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    enc.half().save_pretrained(TUNED)
    return CLIPTextModelWithProjection.from_pretrained(TUNED, torch_dtype=torch.float32).eval()


def straight(pipe, text):
    """hidden_states[-2] of both encoders, concatenated; text_encoder_2's text_embeds."""
    hs, pooled = [], None
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = enc(ids, output_hidden_states=True)
        hs.append(out.hidden_states[-2])
        if enc is pipe.text_encoder_2:
            pooled = out[0]
    return torch.cat(hs, dim=-1), pooled


def run(case, tuned):
    negative_embeds = {}
    if case["method"] == "decorrelated" and case["negative"]:
        # The unconditional branch from the pre-trained encoders.
        base = StableDiffusionXLPipeline.from_pretrained(MODEL)
        _, neg, _, neg_pooled = base.encode_prompt(
            case["prompt"], negative_prompt=case["negative"], do_classifier_free_guidance=True)
        n = len(case["seeds"])
        negative_embeds = dict(negative_prompt_embeds=neg.repeat(n, 1, 1),
                               negative_pooled_prompt_embeds=neg_pooled.repeat(n, 1))
    if case["method"] == "pag":
        pipe = StableDiffusionXLPAGPipeline.from_pretrained(
            MODEL, pag_applied_layers=case["pag_applied_layers"])
    elif case["method"] == "decorrelated":
        pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, text_encoder_2=tuned)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("time_ids", kwargs["added_cond_kwargs"]["time_ids"].clone())
        seen.setdefault("text_embeds", kwargs["added_cond_kwargs"]["text_embeds"].clone())
        seen.setdefault("context", kwargs["encoder_hidden_states"].clone())
    h = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    gens = lambda: [torch.Generator("cpu").manual_seed(s) for s in case["seeds"]]
    with_negative = case["negative"] and not negative_embeds
    kw = dict(prompt=[case["prompt"]] * len(case["seeds"]),
              negative_prompt=[case["negative"]] * len(case["seeds"]) if with_negative else None,
              **negative_embeds,
              num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"],
              width=case["width"], height=case["height"])
    if case["method"] == "pag":
        kw["pag_scale"] = case["pag_scale"]
    img = pipe(generator=gens(), output_type="np", **kw).images
    h.remove()
    lat = pipe(generator=gens(), output_type="latent", **kw).images
    # The initial noise as the pipeline drew it (before init_noise_sigma).
    g = gens()
    shape = (len(case["seeds"]), 4, case["height"] // 2, case["width"] // 2)
    init = randn_tensor(shape, generator=g, dtype=torch.float32)
    pipe.scheduler.set_timesteps(case["steps"])
    emb, pooled = straight(pipe, case["prompt"])
    n = len(case["seeds"])
    ctx = seen["context"]
    cfg = case["guidance_scale"] > 1.0
    cond_ctx = ctx[-n:] if cfg else ctx
    assert (cond_ctx[:1] - emb).abs().max() < 1e-5, ("conditional embeddings", (cond_ctx[:1] - emb).abs().max())
    assert (seen["text_embeds"][-n:][:1] - pooled).abs().max() < 1e-5, "pooled embeddings"
    t = {f"{case['name']}.prompt_embeds": emb, f"{case['name']}.pooled": pooled,
         f"{case['name']}.init_latents": init, f"{case['name']}.latents_final": lat,
         f"{case['name']}.image": torch.from_numpy(np.ascontiguousarray(img)).float()}
    if cfg:
        t[f"{case['name']}.negative_prompt_embeds"] = ctx[:1]
        t[f"{case['name']}.negative_pooled"] = seen["text_embeds"][:1]
        if not case["negative"]:
            assert not ctx[:1].any() and not seen["text_embeds"][:1].any(), "zeros"
    meta = dict(case, timesteps=[float(x) for x in pipe.scheduler.timesteps],
                time_ids=seen["time_ids"][0].tolist())
    return meta, t


def main():
    os.makedirs(OUT, exist_ok=True)
    metas, tensors = [], {}
    with torch.no_grad():
        tuned = write_tuned()
        for case in CASES:
            m, t = run(case, tuned)
            metas.append(m)
            tensors.update(t)
    meta = dict(diffusers=diffusers.__version__, transformers=transformers.__version__,
                torch=torch.__version__)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"meta": meta, "cases": metas}, f, indent=1)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(OUT, "reference.safetensors"))
    print("wrote", OUT, len(metas), "cases")


if __name__ == "__main__":
    main()
