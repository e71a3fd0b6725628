#!/usr/bin/env python3
"""Write the DisenDiff reference fixtures (issue 18; the algorithm is ../shared/BASELINES.md section 3):
a PyTorch reference of DisenDiff's training step (Custom Diffusion's k/v + two new token embeddings,
denoising loss + attention-calibration loss) on the tiny committed models, its 3 AdamW steps with
gradient accumulation 2, a cross-check of the Custom Diffusion part against diffusers'
CustomDiffusionAttnProcessor, and an OUT folder in diffusers' Custom Diffusion format with an image
diffusers generates from it. Run from the repo root:

    /opt/pyref-venv/bin/python tests/pyref/make_disendiff_fixtures.py    # -> tests/fixtures/disendiff/

Deterministic and re-runnable (CPU, float32, one thread; every input is drawn here from fixed
torch.Generator seeds and stored, so the Rust side needs no RNG). tests/fixtures/disendiff/README.md
says what each file holds and every choice made where BASELINES.md is silent. The reference is
written from BASELINES.md's description only; no code of the DisenDiff repository is used.

Inputs, reused and never modified (the assets/sd-tiny folder links them):
  tests/fixtures/clip_tiny_train/text_encoder   CLIPTextModel (vocab 49408, width 16), eager attention
  tests/fixtures/unet_tiny_a/unet               UNet2DConditionModel, sample size 8, 4 heads; cross-
                                                attention at 8x8 (down_blocks.0, up_blocks.1 x2) and
                                                at 4x4 (mid block) for 8x8 latents
  tests/fixtures/vae_tiny/vae                   AutoencoderKL (factor 2: 16x16 px -> 8x8 latents)
  tests/fixtures/pipeline/scheduler             SD 1.5's scheduler config (scaled-linear betas
                                                0.00085..0.012, 1000 steps): DDPMScheduler.add_noise
                                                for training, DDIMScheduler for sampling
  assets/sd-tiny/tokenizer                      CLIPTokenizer (CLIP's BPE vocab/merges, max 77)
  assets/sd-tiny                                the same models as one diffusers folder (sampling)

Writes under tests/fixtures/disendiff/ (README.md there describes every key):
  reference.safetensors   inputs of the 6 micro-batches (pixels, posterior eps, z0, noise, timesteps,
                          token ids, masks); the first micro-step's attention maps (every stage),
                          encoder states, noisy latents and noise prediction; the gradients of L_rec,
                          L_attn and the total at the first micro-step; the trained parameters before
                          and after each optimiser step, for lr 8e-5 and (prefix large_lr.) lr 3e-3;
                          the image diffusers samples from out/ (prefix sample.)
  cases.json              settings, captions, token ids, per-micro-step losses (each term, per sample),
                          cross-check results, OUT's keys, sampling settings and prompt
  out/                    the large-lr run's result in diffusers' Custom Diffusion format:
                          pytorch_custom_diffusion_weights.safetensors, <new1>.safetensors, <new2>.safetensors

Checks (the script fails otherwise): class words are single BPE tokens right after the modifiers; the
stand-in layers are the three 8x8 cross-attentions; the smoothing kernel equals diffusers'
GaussianSmoothing; only the two new embedding rows get a gradient, other rows only decay;
grad(total) = grad(L_rec) + 0.01 grad(L_attn); the accumulated gradient after the first backward is
grad(total) / 2; both runs agree before their first optimiser step; diffusers'
CustomDiffusionAttnProcessor (train_kv) gives the same UNet output at the initial and at both runs'
trained weights and the same L_rec gradients w.r.t. k/v; OUT's keys and tensors are the trained ones;
the pipeline that loaded OUT gives the trained UNet's output and rows; its image is reproduced from
the stored initial latents.
"""
import json, math, os, shutil, tempfile

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers, safetensors, transformers
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from diffusers.models.attention_processor import Attention, CustomDiffusionAttnProcessor
from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (
    GaussianSmoothing)
from transformers import CLIPTextModel, CLIPTokenizer

torch.set_num_threads(1)
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "disendiff")
DELTA_DIR = os.path.join(OUT_DIR, "out")  # the trained result in diffusers' Custom Diffusion format
REL = dict(sd_tiny="assets/sd-tiny",
           text_encoder="tests/fixtures/clip_tiny_train/text_encoder",
           unet="tests/fixtures/unet_tiny_a/unet",
           vae="tests/fixtures/vae_tiny/vae",
           scheduler="tests/fixtures/pipeline/scheduler/scheduler_config.json",
           tokenizer="assets/sd-tiny/tokenizer")

# --- The method's settings (BASELINES.md section 3, unless marked as this fixture's) -------------------
PROMPT = "rusty tracks with an old train"          # the paper's running example (its table 2)
OBJECTS = ("tracks", "train")                      # object A, object B: single BPE tokens
MODIFIERS = ("<new1>", "<new2>")                   # ids 49408 / 49409
INIT_ROWS = {"<new1>": 47629, "<new2>": 42170}     # BASELINES "Trained": <new1> <- 'pll', <new2> <- 'ktn'
TEMPLATE = "photo of a {}"                         # BASELINES "Data": target caption "photo of a {caption}"
LR = 8e-5                                          # the issue's --lr default (BASELINES: 1e-5*4*1*2)
BETAS, ADAM_EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 1e-2   # torch AdamW's defaults (its weight decay is 1e-2)
LARGE_LR = 3e-3                                    # this fixture's second run, whose result OUT holds
ACCUM = 2                                          # this fixture's accumulation (the method's default is 4)
OPT_STEPS = 3
ATTN_WEIGHT = 0.01                                 # Loss = L_rec + 0.01 * L_attn
IOU_SMOOTH = 1.0                                   # IoU(a, b) = (sum ab + 1) / (sum a + sum b - sum ab + 1)
NORM_EPS = 1e-8                                    # (a - min) / (max - min + 1e-8)
SMOOTH_KERNEL, SMOOTH_SIGMA = 3, 0.5               # AaE smoothing (BASELINES section 2, step 5)
STANDIN_RES = 8                                    # stand-in for SD's 16x16 (BASELINES "Parity test": 8x8)
PX, LATENT_FACTOR = 16, 2                          # 16x16 images, 8x8 latents
VAE_SCALE = 0.18215

# Sampling from OUT (BASELINES "Sampling": for the paper, the project's shared sampler, seeds, w = 7.5).
SAMPLE = dict(scheduler="ddim", steps=4, guidance_scale=7.5, eta=0.0, seed=0, height=16, width=16,
              negative_prompt="")


def sampling_prompt(prompt, objects, modifiers):
    """Our choice (BASELINES ambiguity 3): each modifier goes immediately before its object's word,
    the only placement for which the class token is at p + 1 as L_attn needs."""
    words = prompt.split(" ")
    for obj, mod in zip(objects, modifiers):
        hits = [i for i, w in enumerate(words) if w == obj]
        assert len(hits) == 1, (obj, prompt)
        words[hits[0]] = f"{mod} {obj}"
    return " ".join(words)


SAMPLING_PROMPT = sampling_prompt(PROMPT, OBJECTS, MODIFIERS)   # "rusty <new1> tracks with an old <new2> train"
TARGET = TEMPLATE.format(SAMPLING_PROMPT)
# Regularisation captions stand in for the reg set's own captions (BASELINES ambiguity 2 leaves the
# reg set open; here they are only strings: the pair's prompt without modifiers, and a variant).
REG = (PROMPT, "an old train on rusty tracks")

# Six micro-batches of B = 2 (3 optimiser steps x accumulation 2). Each sample: caption, kind, the
# augmentation it stands for and its stand-in geometry, timestep. "far" samples (r < 0.6 size) get a
# partial mask from BASELINES' rule at the stand-in scale (size 16 px, latent factor 2):
# rows (cx - r/2)//2 + 1 .. (cx + r/2)//2 - 1, columns likewise with cy (end exclusive).
MICRO = [
    [dict(caption=TARGET, kind="target", aug="none", t=999),
     dict(caption="a far away " + TARGET, kind="target", aug="far", r=8, cx=5, cy=10, t=0)],
    [dict(caption=REG[0], kind="reg", aug="none", t=500),
     dict(caption="zoomed in " + TARGET, kind="target", aug="zoom", t=37)],
    [dict(caption=REG[0], kind="reg", aug="none", t=250),
     dict(caption=REG[1], kind="reg", aug="none", t=750)],
    [dict(caption="very small " + TARGET, kind="target", aug="far", r=8, cx=11, cy=5, t=1),
     dict(caption=REG[1], kind="reg", aug="none", t=998)],
    [dict(caption="close up " + TARGET, kind="target", aug="zoom", t=421),
     dict(caption=TARGET, kind="target", aug="none", t=613)],
    [dict(caption=REG[1], kind="reg", aug="none", t=100),
     dict(caption=TARGET, kind="target", aug="none", t=900)],
]
assert len(MICRO) == OPT_STEPS * ACCUM


def stand_in_mask(s):
    m = torch.zeros(PX // LATENT_FACTOR, PX // LATENT_FACTOR)
    if s["aug"] != "far":
        return m + 1.0
    r, cx, cy, f = s["r"], s["cx"], s["cy"], LATENT_FACTOR
    assert r < 0.6 * PX and r % 2 == 0
    m[(cx - r // 2) // f + 1:(cx + r // 2) // f - 1, (cy - r // 2) // f + 1:(cy + r // 2) // f - 1] = 1.0
    assert m.sum() > 0
    return m


def stand_in_image(s, g):
    """A deterministic 3x16x16 image in [-1, 1]; a "far" sample is a patch on a zero canvas."""
    if s["aug"] != "far":
        return torch.rand(3, PX, PX, generator=g) * 2 - 1
    r, cx, cy = s["r"], s["cx"], s["cy"]
    img = torch.zeros(3, PX, PX)
    img[:, cx - r // 2:cx + r // 2, cy - r // 2:cy + r // 2] = torch.rand(3, r, r, generator=g) * 2 - 1
    return img


# --- models -----------------------------------------------------------------------------------------
def load_tokenizer():
    tok = CLIPTokenizer.from_pretrained(os.path.join(ROOT, REL["tokenizer"]))
    base_len = len(tok)
    ids = []
    for m in MODIFIERS:
        assert tok.add_tokens(m) == 1
        ids.append(tok.convert_tokens_to_ids(m))
    assert ids == [base_len, base_len + 1] == [49408, 49409], ids
    return tok, ids


def load_text_encoder(n_tokens):
    te = CLIPTextModel.from_pretrained(os.path.join(ROOT, REL["text_encoder"]), attn_implementation="eager").float()
    base = te.get_input_embeddings().weight.detach().clone()
    te.resize_token_embeddings(n_tokens)
    w = te.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(w[:base.shape[0]], base)
        for m, new_id in zip(MODIFIERS, (49408, 49409)):
            w[new_id] = base[INIT_ROWS[m]]
    te.requires_grad_(False)
    w.requires_grad_(True)         # the whole matrix is the optimiser's parameter (BASELINES "Optimiser")
    te.train()                     # no dropout in CLIP's config (attention_dropout 0); train() as the repo
    return te


class EmbeddingDetach:
    """Forward hook on the text embeddings (token + position): detached at every position whose token
    is not a modifier (BASELINES stop-gradient 1). Values are unchanged."""

    def __init__(self, modifier_ids):
        self.modifier_ids, self.ids = modifier_ids, None

    def __call__(self, module, args, kwargs, output):
        keep = torch.zeros_like(self.ids, dtype=torch.bool)
        for i in self.modifier_ids:
            keep |= self.ids == i
        return torch.where(keep[..., None], output, output.detach())


def encode(te, hook, ids):
    hook.ids = ids
    return te(input_ids=ids).last_hidden_state


class DisenDiffAttnProcessor:
    """Attention as diffusers' AttnProcessor (get_attention_scores: baddbmm with scale, float softmax),
    plus, in cross-attention, k and v detached at key position 0 (BASELINES stop-gradient 2), and the
    softmax probabilities recorded (with their graph) when the layer has STANDIN_RES^2 queries."""

    def __init__(self, name, store):
        self.name, self.store = name, store

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        assert attention_mask is None and attn.group_norm is None and attn.spatial_norm is None
        assert attn.norm_cross is None and not attn.residual_connection and attn.rescale_output_factor == 1.0
        assert hidden_states.ndim == 3
        cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if cross else hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        if cross:
            key = torch.cat([key[:, :1].detach(), key[:, 1:]], dim=1)
            value = torch.cat([value[:, :1].detach(), value[:, 1:]], dim=1)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, None)          # [(B heads), N, 77], b-major
        if cross and probs.shape[1] == STANDIN_RES * STANDIN_RES:
            self.store[self.name] = probs
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def load_unet(store):
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, REL["unet"])).float()
    unet.requires_grad_(False)
    kv = {}
    for name, p in unet.named_parameters():
        if name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            p.requires_grad_(True)
            kv[name] = p
    unet.set_attn_processor({k: DisenDiffAttnProcessor(k[:-len(".processor")], store) for k in unet.attn_processors})
    unet.train()                   # dropout 0 everywhere; train() as the repo
    return unet, kv


def gaussian_kernel():
    """g ~ exp(-((x - 1) / (2 sigma))^2), x in {0, 1, 2}, normalised; G = g g^T (BASELINES section 2,
    step 5: not the textbook Gaussian). Checked against diffusers' GaussianSmoothing."""
    x = torch.arange(SMOOTH_KERNEL, dtype=torch.float32)
    mean = (SMOOTH_KERNEL - 1) / 2
    g1 = 1 / (SMOOTH_SIGMA * math.sqrt(2 * math.pi)) * torch.exp(-(((x - mean) / (2 * SMOOTH_SIGMA)) ** 2))
    k = g1[:, None] * g1[None, :]
    k = k / k.sum()
    ref = GaussianSmoothing(channels=1, kernel_size=SMOOTH_KERNEL, sigma=SMOOTH_SIGMA, dim=2).weight[0, 0]
    assert torch.allclose(k, ref, atol=1e-7, rtol=0), (k, ref)
    return ref.clone()


KERNEL = None


def smooth(a):
    x = F.pad(a[None, None], (1, 1, 1, 1), mode="reflect")
    return F.conv2d(x, KERNEL[None, None])[0, 0]


def iou(a, b):
    inter = (a * b).sum()
    return (inter + IOU_SMOOTH) / (a.sum() + b.sum() - inter + IOU_SMOOTH)


# --- one micro-step ----------------------------------------------------------------------------------
def micro_step(i, data, te, hook, unet, store, sched, modifier_ids, layers, keep_maps=False):
    ids, z0, noise, t, mask = (data[f"micro{i}.{k}"] for k in ("input_ids", "z0", "noise", "timesteps", "mask"))
    ehs = encode(te, hook, ids)
    x_t = sched.add_noise(z0, noise, t)
    store.clear()
    eps = unet(x_t, t, encoder_hidden_states=ehs).sample
    m = mask[:, None]                                                        # [B, 1, h, w]
    rec_b = ((noise - eps) ** 2 * m).sum([1, 2, 3]) / m.sum([1, 2, 3])       # 4x the MSE when m = 1
    l_rec = rec_b.mean()
    assert sorted(store) == layers, sorted(store)
    B = ids.shape[0]
    rec = dict(l_rec=l_rec, rec_per_sample=rec_b, ehs=ehs, eps=eps, x_t=x_t)
    terms, maps = [], {}
    for b in range(B):
        p1 = (ids[b] == modifier_ids[0]).nonzero().flatten().tolist()
        p2 = (ids[b] == modifier_ids[1]).nonzero().flatten().tolist()
        if not p1:
            assert not p2
            continue
        assert len(p1) == 1 and len(p2) == 1, (p1, p2)
        p1, p2 = p1[0], p2[0]
        positions = [p1, p1 + 1, p2, p2 + 1]                                 # M1, C1, M2, C2
        per_layer = [store[l].view(B, -1, STANDIN_RES * STANDIN_RES, store[l].shape[-1])[b] for l in layers]
        probs = torch.cat(per_layer, dim=0)                                  # [layers * heads, 64, 77]
        stages = dict(mean=[], norm=[], smooth=[], final=[])
        for j, pos in enumerate(positions):
            a = probs[:, :, pos].mean(0).view(STANDIN_RES, STANDIN_RES)
            n = (a - a.min()) / (a.max() - a.min() + NORM_EPS)
            s = smooth(n)
            f = s * s if j in (1, 3) else s                                   # squared for class tokens only
            for k, v in zip(stages, (a, n, s, f)):
                stages[k].append(v)
        M1, C1, M2, C2 = stages["final"]
        iou1, iou2, iou12 = iou(C1.detach(), M1), iou(C2.detach(), M2), iou(C1, C2)
        l_b = (1 - iou1) + (1 - iou2) + iou12
        terms.append(dict(b=b, p1=p1, p2=p2, iou1=iou1, iou2=iou2, iou12=iou12, l_b=l_b))
        if keep_maps:
            maps[b] = dict(probs=torch.stack([pl[:, :, positions] for pl in per_layer]),  # [L, heads, 64, 4]
                           **{k: torch.stack(v) for k, v in stages.items()})
    l_attn = torch.stack([x["l_b"] for x in terms]).mean() if terms else None
    total = l_rec + ATTN_WEIGHT * l_attn if l_attn is not None else l_rec
    rec.update(terms=terms, l_attn=l_attn, total=total, maps=maps)
    return rec


def margins(a):
    """Gap between the largest two and the smallest two values (the min/max gradient routing)."""
    v = a.flatten().sort().values
    return f32(v[-1] - v[-2]), f32(v[1] - v[0])


# --- inputs ------------------------------------------------------------------------------------------
def build_inputs(tok, vae, modifier_ids, obj_ids):
    """Explicit micro-batch inputs from one fixed generator: pixels, the VAE posterior's eps, z0, noise,
    timesteps, token ids and masks."""
    data, meta = {}, []
    g = torch.Generator().manual_seed(1818)
    for i, batch in enumerate(MICRO):
        caps = [s["caption"] for s in batch]
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        for s, row in zip(batch, ids):
            if s["kind"] == "target":
                p1, p2 = row.tolist().index(modifier_ids[0]), row.tolist().index(modifier_ids[1])
                assert row[p1 + 1] == obj_ids[0] and row[p2 + 1] == obj_ids[1], row
            else:
                assert not any(int(x) in modifier_ids for x in row)
        pixels = torch.stack([stand_in_image(s, g) for s in batch])
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        post_eps = torch.randn(dist.mean.shape, generator=g)
        z0 = VAE_SCALE * (dist.mean + dist.std * post_eps)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.tensor([s["t"] for s in batch], dtype=torch.long)
        mask = torch.stack([stand_in_mask(s) for s in batch])
        data.update({f"micro{i}.input_ids": ids, f"micro{i}.pixels": pixels, f"micro{i}.posterior_eps": post_eps,
                     f"micro{i}.z0": z0, f"micro{i}.noise": noise, f"micro{i}.timesteps": t,
                     f"micro{i}.mask": mask})
        meta.append(dict(index=i, optimizer_step=i // ACCUM, captions=caps,
                         samples=[{k: v for k, v in s.items() if k != "caption"} for s in batch],
                         input_ids_unpadded=[r[:r.tolist().index(49407) + 1].tolist() for r in ids]))
    return data, meta


def f32(x):
    return float(x.detach().item()) if torch.is_tensor(x) else float(x)


# --- training -----------------------------------------------------------------------------------------
def train(lr, full, tok, modifier_ids, decay_row, data, sched, standin_layers):
    """3 AdamW steps with accumulation 2 on fresh models. `full`: also the first micro-step's gradients
    (each term) and attention maps. Returns the records, the tensors to store and the trained models."""
    te = load_text_encoder(len(tok))
    hook = EmbeddingDetach(modifier_ids)
    te.embeddings.register_forward_hook(hook, with_kwargs=True)
    store = {}
    unet, kv = load_unet(store)
    emb = te.get_input_embeddings().weight
    kv_names = sorted(kv)
    ref = {"init.embedding.new1": emb[modifier_ids[0]].detach().clone(),
           "init.embedding.new2": emb[modifier_ids[1]].detach().clone(),
           "init.embedding.decay_row": emb[decay_row].detach().clone()}
    ref.update({f"init.{n}": kv[n].detach().clone() for n in kv_names})
    params = [emb] + [kv[n] for n in kv_names]
    opt = torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
    assert not opt.defaults["amsgrad"] and not opt.defaults["maximize"]

    def grads_of(loss):
        # allow_unused: L_attn does not reach the last stand-in layer's to_v (its probabilities do not
        # depend on it, and no later layer is in the set); that gradient is zero.
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        gs = [torch.zeros_like(p) if g_ is None else g_ for p, g_ in zip(params, gs)]
        out = {"embedding.new1": gs[0][modifier_ids[0]].clone(), "embedding.new2": gs[0][modifier_ids[1]].clone()}
        others = gs[0].clone()
        others[modifier_ids] = 0
        assert torch.count_nonzero(others) == 0  # only the two new rows get a gradient
        out.update({n: g_.clone() for n, g_ in zip(kv_names, gs[1:])})
        return out

    records, first = [], None
    for step in range(OPT_STEPS):
        for a in range(ACCUM):
            i = step * ACCUM + a
            r = micro_step(i, data, te, hook, unet, store, sched, modifier_ids, standin_layers,
                           keep_maps=(full and i == 0))
            if full and i == 0:
                first = r
                g_rec, g_attn, g_tot = grads_of(r["l_rec"]), grads_of(r["l_attn"]), grads_of(r["total"])
                for k in g_tot:
                    ref[f"grad0.rec.{k}"], ref[f"grad0.attn.{k}"], ref[f"grad0.total.{k}"] = g_rec[k], g_attn[k], g_tot[k]
                    assert torch.allclose(g_tot[k], g_rec[k] + ATTN_WEIGHT * g_attn[k], atol=1e-7, rtol=1e-4), k
                ref["micro0.encoder_hidden_states"] = r["ehs"].detach().clone()
                ref["micro0.noisy_latents"] = r["x_t"].detach().clone()
                ref["micro0.noise_pred"] = r["eps"].detach().clone()
                for b, mp in r["maps"].items():
                    for k, v in mp.items():
                        ref[f"attn0.sample{b}.{k}"] = v.detach().clone()
            (r["total"] / ACCUM).backward()
            if full and i == 0:
                # The accumulated gradient after the first backward is grad0.total / ACCUM.
                for k, row in zip(("embedding.new1", "embedding.new2"), modifier_ids):
                    assert torch.allclose(emb.grad[row], g_tot[k] / ACCUM, rtol=1e-6, atol=0), k
                for n in kv_names:
                    assert torch.allclose(kv[n].grad, g_tot[n] / ACCUM, rtol=1e-6, atol=1e-12), n
            records.append(dict(
                index=i, l_rec=f32(r["l_rec"]), rec_per_sample=[f32(x) for x in r["rec_per_sample"]],
                l_attn=None if r["l_attn"] is None else f32(r["l_attn"]), total=f32(r["total"]),
                attn_terms=[dict(sample=x["b"], p1=x["p1"], p2=x["p2"], iou_c1_m1=f32(x["iou1"]),
                                 iou_c2_m2=f32(x["iou2"]), iou_c1_c2=f32(x["iou12"]), l_b=f32(x["l_b"]))
                            for x in r["terms"]]))
        # Conditioning of the accumulated gradient (Adam's first step is ~ lr * sign(g)).
        acc = torch.cat([emb.grad[modifier_ids].flatten()] + [kv[n].grad.flatten() for n in kv_names])
        records[-1]["accumulated_grad_abs"] = dict(min=f32(acc.abs().min()), max=f32(acc.abs().max()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref[f"step{step + 1}.embedding.new1"] = emb[modifier_ids[0]].detach().clone()
        ref[f"step{step + 1}.embedding.new2"] = emb[modifier_ids[1]].detach().clone()
        ref[f"step{step + 1}.embedding.decay_row"] = emb[decay_row].detach().clone()
        for n in kv_names:
            ref[f"step{step + 1}.{n}"] = kv[n].detach().clone()
    # Rows without a gradient only decay: p * (1 - lr * wd) per step.
    expect = ref["init.embedding.decay_row"] * (1 - lr * WEIGHT_DECAY) ** OPT_STEPS
    assert torch.allclose(ref[f"step{OPT_STEPS}.embedding.decay_row"], expect, rtol=1e-6, atol=0)
    moved = max(f32((ref[f"step{OPT_STEPS}.{n}"] - ref[f"init.{n}"]).abs().max()) for n in kv_names)
    return dict(records=records, ref=ref, first=first, te=te, hook=hook, unet=unet, kv=kv, kv_names=kv_names,
                emb=emb, max_kv_change=moved)


# --- main ---------------------------------------------------------------------------------------------
def main():
    global KERNEL
    KERNEL = gaussian_kernel()
    # Rewrite the generated files (README.md there is hand-written and kept).
    shutil.rmtree(DELTA_DIR, ignore_errors=True)
    for f in ("reference.safetensors", "cases.json"):
        if os.path.exists(os.path.join(OUT_DIR, f)):
            os.remove(os.path.join(OUT_DIR, f))
    os.makedirs(DELTA_DIR)

    tok, modifier_ids = load_tokenizer()
    vae = AutoencoderKL.from_pretrained(os.path.join(ROOT, REL["vae"])).float().eval()
    assert abs(vae.config.scaling_factor - VAE_SCALE) < 1e-12
    sched = DDPMScheduler.from_config(json.load(open(os.path.join(ROOT, REL["scheduler"]))))
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.num_train_timesteps == 1000
    assert sched.config.prediction_type == "epsilon"

    # Which attn2 layers see STANDIN_RES^2 queries with 8x8 latents: found by a probe forward.
    store = {}
    probe, _ = load_unet(store)
    with torch.no_grad():
        probe(torch.zeros(1, 4, 8, 8), torch.tensor([0]), encoder_hidden_states=torch.zeros(1, 77, 16))
    standin_layers = sorted(store)
    assert standin_layers == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                              "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                              "up_blocks.1.attentions.1.transformer_blocks.0.attn2"], standin_layers
    heads = probe.get_submodule(standin_layers[0]).heads
    del probe

    # Class words: single BPE tokens right after the modifiers.
    obj_ids = [tok(o, add_special_tokens=False).input_ids for o in OBJECTS]
    assert all(len(x) == 1 for x in obj_ids), obj_ids
    obj_ids = [x[0] for x in obj_ids]
    decay_row = obj_ids[0]  # an untouched row ('tracks'): weight decay only

    data, micro_meta = build_inputs(tok, vae, modifier_ids, obj_ids)
    ref = dict(data)

    main_run = train(LR, True, tok, modifier_ids, decay_row, data, sched, standin_layers)
    ref.update(main_run["ref"])
    big = train(LARGE_LR, False, tok, modifier_ids, decay_row, data, sched, standin_layers)
    ref.update({f"large_lr.{k}": v for k, v in big["ref"].items() if not k.startswith("init.")})
    # Before the first optimiser step both runs are the same computation.
    for a, b in zip(main_run["records"][:ACCUM], big["records"][:ACCUM]):
        assert a["total"] == b["total"], (a, b)
    first, kv_names, emb = main_run["first"], main_run["kv_names"], main_run["emb"]
    records = main_run["records"]
    te, hook, unet, kv = big["te"], big["hook"], big["unet"], big["kv"]   # OUT is the large-lr run's result

    # Margins of the min/max the normalisation routes gradients through (first micro-step's maps).
    map_margins = {f"sample{b}": [dict(zip(("max_gap", "min_gap"), margins(mp["mean"][j]))) for j in range(4)]
                   for b, mp in first["maps"].items()}

    # --- cross-check against diffusers' CustomDiffusionAttnProcessor ------------------------------------
    def cd_unet(kv_state):
        u = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, REL["unet"])).float()
        u.requires_grad_(False)
        procs = {}
        for name in u.attn_processors:
            layer = name[:-len(".processor")]
            if name.endswith("attn1.processor"):
                # As diffusers' train_custom_diffusion.py sets up self-attention.
                procs[name] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False, hidden_size=None,
                                                           cross_attention_dim=None)
            else:
                w_k, w_v = kv_state[layer + ".to_k.weight"], kv_state[layer + ".to_v.weight"]
                p = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=w_k.shape[0],
                                                 cross_attention_dim=w_k.shape[1])
                p.load_state_dict({"to_k_custom_diffusion.weight": w_k, "to_v_custom_diffusion.weight": w_v})
                procs[name] = p
        u.set_attn_processor(procs)
        return u

    cross = {}
    d0 = {k: data[f"micro0.{k}"] for k in ("noise", "timesteps", "mask")}
    # (a) gradients of L_rec w.r.t. k/v at the initial weights, on micro-step 0's inputs.
    u0 = cd_unet({n: ref[f"init.{n}"] for n in kv_names})
    eps_cd = u0(ref["micro0.noisy_latents"], d0["timesteps"], encoder_hidden_states=ref["micro0.encoder_hidden_states"]).sample
    m = d0["mask"][:, None]
    l_rec_cd = (((d0["noise"] - eps_cd) ** 2 * m).sum([1, 2, 3]) / m.sum([1, 2, 3])).mean()
    l_rec_cd.backward()
    cross["init_forward_max_abs_diff"] = f32((eps_cd - ref["micro0.noise_pred"]).abs().max())
    cross["l_rec_rel_diff"] = f32(abs(l_rec_cd - first["l_rec"]) / first["l_rec"])
    gd = 0.0
    for n in kv_names:
        layer, which = n.rsplit(".", 2)[0], n.rsplit(".", 2)[1]
        proc = u0.attn_processors[layer + ".processor"]
        g_cd = getattr(proc, f"{which}_custom_diffusion").weight.grad
        gd = max(gd, f32((g_cd - ref[f"grad0.rec.{n}"]).abs().max() / ref[f"grad0.rec.{n}"].abs().max()))
    cross["grad_rec_kv_max_rel_diff"] = gd
    # (b) forward with the trained k/v (and the trained embeddings) of both runs on micro-step 0's inputs.
    x_t = sched.add_noise(data["micro0.z0"], d0["noise"], d0["timesteps"])
    for name, run in (("default", main_run), ("large_lr", big)):
        u_cd = cd_unet({n: run["kv"][n].detach().clone() for n in kv_names})
        with torch.no_grad():
            ehs_run = encode(run["te"], run["hook"], data["micro0.input_ids"])
            ours = run["unet"](x_t, d0["timesteps"], encoder_hidden_states=ehs_run).sample
            theirs = u_cd(x_t, d0["timesteps"], encoder_hidden_states=ehs_run).sample
        cross[f"trained_{name}_forward_max_abs_diff"] = f32((ours - theirs).abs().max())
        assert cross[f"trained_{name}_forward_max_abs_diff"] <= 1e-6
    # OUT is the large-lr run's result: u_cd, ours and ehs_run are that run's now.
    trained = {n: kv[n].detach().clone() for n in kv_names}
    u3, ehs3, out_emb = u_cd, ehs_run, big["emb"]
    print("cross-check vs CustomDiffusionAttnProcessor:", json.dumps(cross))
    assert cross["init_forward_max_abs_diff"] <= 1e-6
    assert cross["grad_rec_kv_max_rel_diff"] <= 1e-5 and cross["l_rec_rel_diff"] <= 1e-6

    # --- OUT in diffusers' Custom Diffusion format, through diffusers' own writer ----------------------
    u3.save_attn_procs(DELTA_DIR, safe_serialization=True)   # drops the empty attn1 entries (warns)
    for mod, new_id in zip(MODIFIERS, modifier_ids):
        # As train_custom_diffusion.py's save_new_embed: {token: 1-D row}, metadata {"format": "pt"}.
        save_file({mod: out_emb[new_id].detach().clone().contiguous()}, os.path.join(DELTA_DIR, f"{mod}.safetensors"),
                  metadata={"format": "pt"})
    weight_file = os.path.join(DELTA_DIR, "pytorch_custom_diffusion_weights.safetensors")
    with safe_open(weight_file, "pt") as f:
        out_keys, out_meta = sorted(f.keys()), f.metadata()
    expect_keys = sorted(f"{n.rsplit('.', 2)[0]}.processor.{n.rsplit('.', 2)[1]}_custom_diffusion.weight" for n in kv_names)
    assert out_keys == expect_keys, out_keys
    sd = load_file(weight_file)
    for n in kv_names:
        assert torch.equal(sd[f"{n.rsplit('.', 2)[0]}.processor.{n.rsplit('.', 2)[1]}_custom_diffusion.weight"], trained[n])

    # --- diffusers loads OUT, then samples -------------------------------------------------------------
    def fresh_pipe():
        p = StableDiffusionPipeline.from_pretrained(os.path.join(ROOT, REL["sd_tiny"]), safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
        p.scheduler = DDIMScheduler.from_config(p.scheduler.config)
        p.set_progress_bar_config(disable=True)
        return p

    pipe = fresh_pipe()
    before = {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()}
    pipe.unet.load_attn_procs(DELTA_DIR, weight_name="pytorch_custom_diffusion_weights.safetensors")
    after = {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()}
    load_notes = dict(load_attn_procs_is_noop=(before == after))
    # diffusers 0.42.1: load_attn_procs builds the processors but installs them only when the private
    # `_pipeline` argument is given (huggingface/diffusers#9320); and the safetensors file lacks the
    # attn1 entries, so installing them alone fails set_attn_processor's count check. We install what
    # diffusers' own parser (_process_custom_diffusion) builds, with attn1 set as a `{}` entry of the
    # .bin format would set it (CustomDiffusionAttnProcessor without weights).
    procs = pipe.unet._process_custom_diffusion(state_dict=load_file(weight_file))
    try:
        pipe.unet.set_attn_processor(dict(procs))
        load_notes["partial_set_raises"] = False
    except ValueError:
        load_notes["partial_set_raises"] = True

    def install(p):
        procs = p.unet._process_custom_diffusion(state_dict=load_file(weight_file))
        full = {name: procs.get(name) or CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False,
                                                                       hidden_size=None, cross_attention_dim=None)
                for name in p.unet.attn_processors}
        assert sum(name in procs for name in full) == len(kv_names) // 2
        p.unet.set_attn_processor(full)

    install(pipe)
    for mod in MODIFIERS:
        pipe.load_textual_inversion(DELTA_DIR, weight_name=f"{mod}.safetensors")
    assert [pipe.tokenizer.convert_tokens_to_ids(m) for m in MODIFIERS] == modifier_ids
    pe = pipe.text_encoder.get_input_embeddings().weight
    assert all(torch.equal(pe[i], out_emb[i]) for i in modifier_ids)
    with torch.no_grad():
        loaded = pipe.unet(x_t, d0["timesteps"], encoder_hidden_states=ehs3).sample
    load_notes["loaded_unet_max_abs_diff"] = f32((loaded - ours).abs().max())
    assert load_notes["loaded_unet_max_abs_diff"] <= 1e-6

    sp_ids = pipe.tokenizer(SAMPLING_PROMPT, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
    assert int(sp_ids[0].tolist().index(modifier_ids[0])) + 1 == sp_ids[0].tolist().index(obj_ids[0])

    def generate(p, output_type, latents=None):
        gen = torch.Generator("cpu").manual_seed(SAMPLE["seed"])
        return p(SAMPLING_PROMPT, negative_prompt=SAMPLE["negative_prompt"], height=SAMPLE["height"],
                 width=SAMPLE["width"], num_inference_steps=SAMPLE["steps"], guidance_scale=SAMPLE["guidance_scale"],
                 eta=SAMPLE["eta"], generator=gen, output_type=output_type, latents=latents).images

    with torch.no_grad():
        image = torch.from_numpy(np.ascontiguousarray(generate(pipe, "np"))).float()
        latents = generate(pipe, "latent").float()
        prompt_embeds, neg_embeds = pipe.encode_prompt(SAMPLING_PROMPT, "cpu", 1, True, SAMPLE["negative_prompt"])
    init_latents = torch.randn((1, 4, SAMPLE["height"] // 2, SAMPLE["width"] // 2),
                               generator=torch.Generator("cpu").manual_seed(SAMPLE["seed"]))
    with torch.no_grad():   # the pipeline's own draw is this randn (init_noise_sigma is 1 for DDIM)
        assert np.array_equal(generate(pipe, "np", latents=init_latents.clone()), image.numpy())
    # The same prompt with only the embeddings loaded (no k/v delta): how much the delta moves the image.
    base = fresh_pipe()
    for mod in MODIFIERS:
        base.load_textual_inversion(DELTA_DIR, weight_name=f"{mod}.safetensors")
    # And with the k/v delta but the embeddings' initial rows (ids 47629 / 42170 copied).
    init_emb = fresh_pipe()
    install(init_emb)
    for mod, new_id in zip(MODIFIERS, modifier_ids):
        init_emb.load_textual_inversion({mod: main_run["ref"][f"init.embedding.new{new_id - 49407}"].clone()})
    with torch.no_grad():
        image_no_kv = torch.from_numpy(np.ascontiguousarray(generate(base, "np"))).float()
        image_init_emb = torch.from_numpy(np.ascontiguousarray(generate(init_emb, "np"))).float()
    sample_meta = dict(SAMPLE, prompt=SAMPLING_PROMPT, input_ids_unpadded=sp_ids[0][:sp_ids[0].tolist().index(49407) + 1].tolist(),
                       image_max_abs_diff_without_kv_delta_in_255=f32((image - image_no_kv).abs().max() * 255),
                       image_max_abs_diff_with_initial_embeddings_in_255=f32((image - image_init_emb).abs().max() * 255))
    ref.update({"sample.image": image, "sample.latents_final": latents, "sample.init_latents": init_latents,
                "sample.prompt_embeds": prompt_embeds, "sample.negative_prompt_embeds": neg_embeds})
    print("sampling:", json.dumps({k: v for k, v in sample_meta.items() if k.startswith(("prompt", "image_"))}))

    # --- write ----------------------------------------------------------------------------------------
    save_file({k: v.detach().contiguous() for k, v in sorted(ref.items())}, os.path.join(OUT_DIR, "reference.safetensors"))
    cases = dict(
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                      safetensors=safetensors.__version__, numpy=np.__version__),
        models={k: v for k, v in REL.items()},
        settings=dict(prompt=PROMPT, objects=list(OBJECTS), modifiers=list(MODIFIERS), modifier_ids=modifier_ids,
                      object_ids=obj_ids, init_rows={m: INIT_ROWS[m] for m in MODIFIERS}, template=TEMPLATE,
                      target_caption=TARGET, reg_captions=list(REG), sampling_prompt=SAMPLING_PROMPT,
                      lr=LR, betas=list(BETAS), adam_eps=ADAM_EPS, weight_decay=WEIGHT_DECAY,
                      grad_accum=ACCUM, optimizer_steps=OPT_STEPS, micro_batch=2, attn_weight=ATTN_WEIGHT,
                      iou_smooth=IOU_SMOOTH, norm_eps=NORM_EPS, smoothing=dict(kernel=SMOOTH_KERNEL, sigma=SMOOTH_SIGMA,
                      weights=KERNEL.tolist(), pad="reflect"), standin_res=STANDIN_RES, standin_layers=standin_layers,
                      heads=heads, maps_per_token=len(standin_layers) * heads, vae_scaling_factor=VAE_SCALE,
                      image_px=PX, latent_factor=LATENT_FACTOR, decay_row=decay_row,
                      trained_kv=kv_names, noise_scheduler="DDPMScheduler.from_config(scheduler_config).add_noise"),
        micro_batches=micro_meta, losses=records, max_kv_change=main_run["max_kv_change"],
        map_margins_micro0=map_margins,
        large_lr=dict(lr=LARGE_LR, losses=big["records"], max_kv_change=big["max_kv_change"]),
        cross_check=cross, out=dict(folder="out", files=sorted(os.listdir(DELTA_DIR)), weight_keys=out_keys,
                                    weight_metadata=out_meta, **load_notes),
        sample=sample_meta)
    with open(os.path.join(OUT_DIR, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")
    for name, run in (("default", main_run), ("large_lr", big)):
        for r in run["records"]:
            print(f"{name} micro {r['index']}: L_rec {r['l_rec']:.7g} L_attn {r['l_attn']} total {r['total']:.7g}")
        print(f"{name}: max |k/v change| after {OPT_STEPS} steps {run['max_kv_change']:.3g}")


if __name__ == "__main__":
    main()
