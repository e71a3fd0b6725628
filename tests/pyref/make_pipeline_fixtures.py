#!/usr/bin/env python3
"""Write the end-to-end text-to-image reference fixtures (diffusers' StableDiffusionPipeline on the
tiny committed models) that decorr-pipeline's Rust tests compare against. Run from the repo root:

    /opt/pyref-venv/bin/python tests/pyref/make_pipeline_fixtures.py    # -> tests/fixtures/pipeline/

Deterministic and re-runnable (the output folder's generated files are rewritten each time).

Inputs, reused and never modified:
  tests/fixtures/clip_tiny_train/text_encoder   the pre-trained text encoder (CLIPTextModel, width 16)
  tests/fixtures/unet_tiny_a/unet               UNet2DConditionModel (cross_attention_dim 16)
  tests/fixtures/vae_tiny/vae                   AutoencoderKL (vae_scale_factor 2: 16x16 px -> 8x8 latents)
  assets/clip/{vocab.json,merges.txt}           transformers' CLIPTokenizer, model_max_length 77
  /work/shared/reference/sd15/scheduler/scheduler_config.json   SD 1.5's PNDM config (and its
                                                tokenizer/ configs; override with DECORR_SD15_REF)

Writes under tests/fixtures/pipeline/:
  tuned_text_encoder/        a "fine-tuned" encoder: clip_tiny_train + 0.02*randn (torch.Generator
                             seed 7, over `named_parameters()` in order), saved by
                             `model.half().save_pretrained` (fp16 safetensors, transformers' own key
                             names). References use these fp16-rounded weights reloaded as fp32.
  scheduler/scheduler_config.json   SD 1.5's scheduler config, copied as-is.
  tokenizer/{tokenizer_config.json,special_tokens_map.json}   SD 1.5's tokenizer configs (vocab
                             and merges are assets/clip's, byte-identical to SD 1.5's).
  model_index.json           a diffusers model_index.json; `_decorr_assembly` names the fixture
                             folders that make up the pipeline (weights are not duplicated).
  cases.json                 per case: settings, token ids, timesteps, sigmas, UNet calls, checks.
  reference.safetensors      per case `{case}.init_latents` (randn before * init_noise_sigma),
                             `{case}.prompt_embeds` / `{case}.negative_prompt_embeds` (what the UNet
                             saw; no negative for guidance <= 1), `{case}.latents_final` (before VAE
                             decode), `{case}.image` (np output, float32 [B, H, W, 3] in [0, 1]),
                             and for euler-a `{case}.step_noise` ([steps, B, 4, h, w], the per-step
                             ancestral noise drawn from the same generator after the latents).

Every case is checked here: init latents recreated with `randn_tensor` equal what the pipeline drew,
a rerun with `latents=` (and the generator advanced past the latents) gives the identical image,
the `output_type="latent"` run equals the last latents of the image run, the image equals
`postprocess(vae.decode(latents / scaling_factor))`, the embeddings equal a straightforward
tokenize(max_length 77, truncation) -> last_hidden_state, and the assembled folder loads with
`StableDiffusionPipeline.from_pretrained` and reproduces the first case bit for bit.
"""
import json, os, shutil, tempfile

import numpy as np
import torch
from safetensors.torch import save_file, load_file

import diffusers, transformers
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion as sd_mod
from diffusers.schedulers import scheduling_euler_ancestral_discrete as ea_mod
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

torch.set_num_threads(1)
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "pipeline")
# SD 1.5's config files (scheduler/, tokenizer/); when that folder is absent the copies this script
# committed under tests/fixtures/pipeline/ are reused, so a re-run needs no SD 1.5 download.
SD15 = os.environ.get("DECORR_SD15_REF", "/work/shared/reference/sd15")
if not os.path.isfile(os.path.join(SD15, "scheduler", "scheduler_config.json")):
    SD15 = OUT
REL = dict(text_encoder="tests/fixtures/clip_tiny_train/text_encoder",
           unet="tests/fixtures/unet_tiny_a/unet",
           vae="tests/fixtures/vae_tiny/vae",
           tuned_text_encoder="tests/fixtures/pipeline/tuned_text_encoder",
           scheduler="tests/fixtures/pipeline/scheduler")
PROMPT = "rusty tracks with an old train"
TUNE_SEED, TUNE_STD = 7, 0.02

# name, scheduler, steps, seeds (one generator per image), guidance, height, width,
# negative prompt (None: diffusers' default, i.e. ""), mode
CASES = [
    dict(name="ddim_cfg", scheduler="ddim", steps=4, seeds=[0], guidance=7.5, height=16, width=16,
         negative=None, mode="cfg"),
    dict(name="pndm_cfg", scheduler="pndm", steps=4, seeds=[1], guidance=7.5, height=16, width=16,
         negative=None, mode="cfg"),
    dict(name="ddim_negative", scheduler="ddim", steps=4, seeds=[2], guidance=5.0, height=16, width=24,
         negative="blurry", mode="cfg"),
    dict(name="ddim_batch2", scheduler="ddim", steps=4, seeds=[3, 4], guidance=7.5, height=16, width=16,
         negative=None, mode="cfg"),
    dict(name="euler_a_cfg", scheduler="euler-a", steps=4, seeds=[5], guidance=7.5, height=16, width=16,
         negative=None, mode="cfg"),
    dict(name="dpmpp_cfg", scheduler="dpmpp-2m", steps=4, seeds=[6], guidance=7.5, height=16, width=16,
         negative=None, mode="cfg"),
    dict(name="ddim_decorrelated", scheduler="ddim", steps=4, seeds=[0], guidance=7.5, height=16,
         width=16, negative=None, mode="decorrelated"),
    dict(name="ddim_guidance1", scheduler="ddim", steps=4, seeds=[0], guidance=1.0, height=16, width=16,
         negative=None, mode="cfg"),
]
SCHEDULERS = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler-a": EulerAncestralDiscreteScheduler,
              "dpmpp-2m": DPMSolverMultistepScheduler}


def sched_config():
    return json.load(open(os.path.join(SD15, "scheduler", "scheduler_config.json")))


def make_scheduler(name):
    # A fresh scheduler per run: no state (PNDM ets, DPM model_outputs, step_index) carries over.
    return SCHEDULERS[name].from_config(sched_config())


def tokenizer():
    # As tests/pyref/make_fixtures.py, plus SD's model_max_length (without a tokenizer_config.json
    # transformers leaves it at 1e30 and the pipeline would not pad to 77).
    return CLIPTokenizer.from_pretrained(os.path.join(ROOT, "assets", "clip"), model_max_length=77)


def load_encoder(path):
    return CLIPTextModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def write_tuned_encoder(folder):
    shutil.rmtree(folder, ignore_errors=True)
    model = load_encoder(os.path.join(ROOT, REL["text_encoder"]))
    g = torch.Generator("cpu").manual_seed(TUNE_SEED)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(TUNE_STD * torch.randn(p.shape, generator=g, dtype=torch.float32))
    model.half().save_pretrained(folder)
    # The reference uses the fp16-rounded weights as decorr loads them (fp16 -> f32).
    return load_encoder(folder)


def to_json(v):
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return to_json(v.tolist())
    if isinstance(v, (np.floating, np.integer)):
        return to_json(v.item())
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)  # e.g. DPM's lambda_min_clipped = -inf -> "-inf" (strict JSON has no -Infinity)
    if isinstance(v, (list, tuple)):
        return [to_json(x) for x in v]
    if isinstance(v, dict):
        return {k: to_json(x) for k, x in v.items()}
    return v


class Recorder:
    """Records every UNet call (inputs) and every randn_tensor draw of the pipeline and of the
    euler-a scheduler, without changing what they compute."""

    def __init__(self, pipe):
        self.unet_calls, self.pipe_draws, self.sched_draws = [], [], []
        self.hook = pipe.unet.register_forward_pre_hook(self._pre, with_kwargs=True)
        self._orig_pipe, self._orig_ea = sd_mod.randn_tensor, ea_mod.randn_tensor
        sd_mod.randn_tensor = self._wrap(self._orig_pipe, self.pipe_draws)
        ea_mod.randn_tensor = self._wrap(self._orig_ea, self.sched_draws)

    def _pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.unet_calls.append(dict(sample=sample.detach().clone(), t=torch.as_tensor(t).clone(),
                                    ehs=ehs.detach().clone()))

    @staticmethod
    def _wrap(fn, store):
        def inner(*a, **k):
            out = fn(*a, **k)
            store.append(out.detach().clone())
            return out
        return inner

    def close(self):
        self.hook.remove()
        sd_mod.randn_tensor, ea_mod.randn_tensor = self._orig_pipe, self._orig_ea


def generators(seeds):
    gs = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return gs[0] if len(gs) == 1 else gs


def straight_embed(encoder, tok, text):
    """A straightforward SD 1.x encoding: pad to 77 with truncation, last_hidden_state, no mask."""
    ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids).last_hidden_state, ids[0].tolist()


def run_case(pipe, case, tok, base_enc, tuned_enc):
    name, n = case["name"], len(case["seeds"])
    h, w = case["height"], case["width"]
    cfg = case["guidance"] > 1.0  # diffusers: do_classifier_free_guidance = guidance_scale > 1
    neg_text = "" if case["negative"] is None else case["negative"]
    cond_ref, prompt_ids = straight_embed(tuned_enc if case["mode"] == "decorrelated" else base_enc, tok, PROMPT)
    uncond_ref, neg_ids = straight_embed(base_enc, tok, neg_text)

    def call(**extra):
        pipe.scheduler = make_scheduler(case["scheduler"])
        kw = dict(num_inference_steps=case["steps"], guidance_scale=case["guidance"], height=h, width=w,
                  num_images_per_prompt=n)
        if case["mode"] == "decorrelated":
            kw.update(prompt_embeds=cond_ref.clone(), negative_prompt_embeds=uncond_ref.clone())
        else:
            kw.update(prompt=PROMPT, negative_prompt=case["negative"])
        kw.update(extra)
        if "generator" not in kw:
            kw["generator"] = generators(case["seeds"])
        with torch.no_grad():
            return pipe(**kw)

    # Run A: the image, recording UNet inputs and every random draw.
    rec = Recorder(pipe)
    last = {}

    def on_step_end(p, i, t, kw):
        last["latents"] = kw["latents"].detach().clone()
        return kw
    try:
        image = call(output_type="np", callback_on_step_end=on_step_end).images
    finally:
        rec.close()
    sched = pipe.scheduler
    image = torch.from_numpy(np.ascontiguousarray(image)).float()
    assert image.shape == (n, h, w, 3), image.shape

    # Initial latents: recreated exactly as prepare_latents draws them; equal to the recorded draw.
    shape = (n, pipe.unet.config.in_channels, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor)
    g = generators(case["seeds"])
    init = randn_tensor(shape, generator=g, device=torch.device("cpu"), dtype=torch.float32)
    assert len(rec.pipe_draws) == 1 and torch.equal(rec.pipe_draws[0], init), name
    if case["scheduler"] == "euler-a":
        assert len(rec.sched_draws) == case["steps"], len(rec.sched_draws)
        # The step noise continues the same generator after the initial latents.
        again = [randn_tensor(shape, generator=g, device=torch.device("cpu"), dtype=torch.float32)
                 for _ in range(case["steps"])]
        assert all(torch.equal(a, b) for a, b in zip(again, rec.sched_draws)), name
    else:
        assert not rec.sched_draws

    # Run B: latents= the recreated init, generator advanced past it (matters for euler-a only).
    g_adv = generators(case["seeds"])
    randn_tensor(shape, generator=g_adv, device=torch.device("cpu"), dtype=torch.float32)
    image_b = torch.from_numpy(call(output_type="np", latents=init.clone(), generator=g_adv).images)
    assert torch.equal(image_b, image), f"{name}: latents= rerun differs"

    # Run C: output_type="latent" (latents before VAE decode) == last latents of run A.
    latents_final = call(output_type="latent").images.detach().clone()
    assert torch.equal(latents_final, last["latents"]), name
    with torch.no_grad():
        dec = pipe.vae.decode(latents_final / pipe.vae.config.scaling_factor, return_dict=False)[0]
    manual = (dec / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
    assert torch.equal(manual, image), f"{name}: decode/postprocess rule differs"

    # What the UNet saw: the same encoder_hidden_states every call, [uncond, cond] when CFG.
    ehs = rec.unet_calls[0]["ehs"]
    assert all(torch.equal(c["ehs"], ehs) for c in rec.unet_calls)
    unet_batch = 2 * n if cfg else n
    assert ehs.shape == (unet_batch, 77, pipe.text_encoder.config.hidden_size)
    assert all(c["sample"].shape[0] == unet_batch for c in rec.unet_calls)
    if cfg:
        neg_seen, cond_seen = ehs.chunk(2)
        assert torch.equal(neg_seen, uncond_ref.expand(n, -1, -1)), f"{name}: uncond embedding"
    else:
        neg_seen, cond_seen = None, ehs
    assert torch.equal(cond_seen, cond_ref.expand(n, -1, -1)), f"{name}: cond embedding"

    tensors = {f"{name}.init_latents": init, f"{name}.prompt_embeds": cond_seen.contiguous(),
               f"{name}.latents_final": latents_final.contiguous(), f"{name}.image": image.contiguous()}
    if neg_seen is not None:
        tensors[f"{name}.negative_prompt_embeds"] = neg_seen.contiguous()
    if rec.sched_draws:
        tensors[f"{name}.step_noise"] = torch.stack(rec.sched_draws).contiguous()

    meta = dict(
        name=name, scheduler=case["scheduler"], scheduler_class=type(sched).__name__,
        steps=case["steps"], seeds=case["seeds"], guidance_scale=case["guidance"],
        height=h, width=w, latent_shape=list(shape), prompt=PROMPT, negative_prompt=neg_text,
        negative_prompt_passed=case["negative"], num_images=n, mode=case["mode"],
        do_classifier_free_guidance=cfg, unet_batch=unet_batch, eta=0.0, clip_skip=None,
        cond_encoder="tuned_text_encoder" if case["mode"] == "decorrelated" else "text_encoder",
        uncond_encoder="text_encoder" if cfg else None,
        prompt_ids=prompt_ids, negative_prompt_ids=neg_ids if cfg else None,
        timesteps=to_json(sched.timesteps),
        unet_timesteps=[to_json(c["t"]) for c in rec.unet_calls], unet_calls=len(rec.unet_calls),
        init_noise_sigma=float(sched.init_noise_sigma),
        sigmas=to_json(sched.sigmas) if hasattr(sched, "sigmas") else None,
        step_noise_draws=len(rec.sched_draws),
        scheduler_config={k: to_json(v) for k, v in sched.config.items() if not k.startswith("_")},
        image_max=float(image.max()), image_min=float(image.min()),
    )
    return tensors, meta


def write_assembly(tok):
    sdir = os.path.join(OUT, "scheduler")
    os.makedirs(sdir, exist_ok=True)
    if SD15 != OUT:
        shutil.copyfile(os.path.join(SD15, "scheduler", "scheduler_config.json"),
                        os.path.join(sdir, "scheduler_config.json"))
    tdir = os.path.join(OUT, "tokenizer")
    os.makedirs(tdir, exist_ok=True)
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if SD15 != OUT:
            shutil.copyfile(os.path.join(SD15, "tokenizer", f), os.path.join(tdir, f))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "_decorr_assembly": {
            "note": "Assemble a diffusers folder from these repo-relative paths: each component "
                    "folder is copied (or linked) as <root>/<component>/, and this file as "
                    "<root>/model_index.json. tuned_text_encoder is the decorrelated case's "
                    "conditional encoder, not a pipeline component.",
            "text_encoder": REL["text_encoder"],
            "unet": REL["unet"],
            "vae": REL["vae"],
            "scheduler": REL["scheduler"],
            "tokenizer": {"vocab.json": "assets/clip/vocab.json", "merges.txt": "assets/clip/merges.txt",
                          "tokenizer_config.json": "tests/fixtures/pipeline/tokenizer/tokenizer_config.json",
                          "special_tokens_map.json": "tests/fixtures/pipeline/tokenizer/special_tokens_map.json"},
            "tuned_text_encoder": REL["tuned_text_encoder"],
        },
    }
    json.dump(index, open(os.path.join(OUT, "model_index.json"), "w"), indent=2)
    return index


def check_assembled(index, ref_image, case):
    """The assembly loads with StableDiffusionPipeline.from_pretrained and reproduces a case."""
    asm = index["_decorr_assembly"]
    with tempfile.TemporaryDirectory() as d:
        for comp in ("text_encoder", "unet", "vae", "scheduler"):
            shutil.copytree(os.path.join(ROOT, asm[comp]), os.path.join(d, comp),
                            ignore=shutil.ignore_patterns("reference.safetensors", "cases.json"))
        os.makedirs(os.path.join(d, "tokenizer"))
        for f, src in asm["tokenizer"].items():
            shutil.copyfile(os.path.join(ROOT, src), os.path.join(d, "tokenizer", f))
        shutil.copyfile(os.path.join(OUT, "model_index.json"), os.path.join(d, "model_index.json"))
        pipe = StableDiffusionPipeline.from_pretrained(d, dtype=torch.float32)
        assert pipe.tokenizer.model_max_length == 77
        pipe.set_progress_bar_config(disable=True)
        pipe.text_encoder = load_encoder(os.path.join(d, "text_encoder"))  # eager, as the references
        pipe.scheduler = make_scheduler(case["scheduler"])
        with torch.no_grad():
            img = pipe(PROMPT, num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                       height=case["height"], width=case["width"], output_type="np",
                       generator=generators(case["seeds"])).images
        assert torch.equal(torch.from_numpy(img), ref_image), "assembled pipeline differs"


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = tokenizer()
    base_enc = load_encoder(os.path.join(ROOT, REL["text_encoder"]))
    assert not getattr(base_enc.config, "use_attention_mask", False)
    tuned_enc = write_tuned_encoder(os.path.join(ROOT, REL["tuned_text_encoder"]))
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, REL["unet"])).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(ROOT, REL["vae"])).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=base_enc, tokenizer=tok, unet=unet,
                                   scheduler=make_scheduler("pndm"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2

    # The tuned encoder differs from the base one and reloads bit-identically from its fp16 file.
    sd = load_file(os.path.join(ROOT, REL["tuned_text_encoder"], "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in sd.values())
    tuned_keys = sorted(sd)

    assert not torch.equal(straight_embed(tuned_enc, tok, PROMPT)[0], straight_embed(base_enc, tok, PROMPT)[0])

    tensors, metas = {}, []
    for case in CASES:
        t, m = run_case(pipe, case, tok, base_enc, tuned_enc)
        tensors.update(t)
        metas.append(m)

    index = write_assembly(tok)
    check_assembled(index, tensors["ddim_cfg.image"], CASES[0])

    meta = dict(
        diffusers=diffusers.__version__, transformers=transformers.__version__, torch=torch.__version__,
        device="cpu", dtype="float32",
        uses_attention_mask=bool(getattr(base_enc.config, "use_attention_mask", False)),
        clip_skip=None, text_encoder_output="last_hidden_state", tokenizer_max_length=77,
        tokenizer_padding="max_length (pad id 49407 = <|endoftext|>), truncation=True",
        vae_scale_factor=pipe.vae_scale_factor, vae_scaling_factor=pipe.vae.config.scaling_factor,
        unet_batch_order="[uncond, cond] (torch.cat([negative_prompt_embeds, prompt_embeds]))",
        guidance="eps = eps_u + s * (eps_c - eps_u); CFG only when guidance_scale > 1",
        decode="image = vae.decode(latents / scaling_factor); (x / 2 + 0.5).clamp(0, 1); NCHW -> NHWC",
        tuned_text_encoder=dict(base=REL["text_encoder"], perturbation=f"p + {TUNE_STD} * randn(p.shape, "
                                f"generator=torch.Generator('cpu').manual_seed({TUNE_SEED})) over "
                                "named_parameters() in order, then saved fp16", keys=tuned_keys),
        components=index["_decorr_assembly"],
    )
    json.dump({"meta": meta, "cases": metas}, open(os.path.join(OUT, "cases.json"), "w"), indent=1,
              allow_nan=False)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "reference.safetensors"),
              metadata={"format": "pt"})

    # Summary.
    for m in metas:
        print(f"{m['name']:18s} {m['scheduler']:8s} seeds={m['seeds']} s={m['guidance_scale']} "
              f"{m['height']}x{m['width']} unet_calls={m['unet_calls']} timesteps={m['timesteps']} "
              f"init_sigma={m['init_noise_sigma']:.4f} image[{m['image_min']:.4f}, {m['image_max']:.4f}]")
    for k in sorted(tensors):
        print(f"  {k:36s} {tuple(tensors[k].shape)}")
    total = 0
    for dp, _, fs in os.walk(OUT):
        for f in sorted(fs):
            p = os.path.join(dp, f)
            total += os.path.getsize(p)
            print(f"{os.path.relpath(p, ROOT):70s} {os.path.getsize(p):>9d} B")
    print(f"total {total} B")


if __name__ == "__main__":
    main()
