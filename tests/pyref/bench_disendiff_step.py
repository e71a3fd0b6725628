#!/usr/bin/env python3
"""CPU timing of one DisenDiff training micro-step in PyTorch on FULL-SIZE SD 1.5 random weights: the
reference for the Rust DisenDiff trainer's step time (issue 18's algorithm, ../shared/BASELINES.md
section 3; tests/fixtures/disendiff/README.md describes it step by step).

    /opt/pyref-venv/bin/python tests/pyref/bench_disendiff_step.py [--json PATH] [--steps 5] [--warmup 2]
        [--threads 2] [--configs default,foreach,fused] [--extra] [--device cpu|cuda] [--pixels 256]

On a GPU (tests/pyref/gpu_check.py runs it so): --device cuda --pixels 512 --configs
fused,fused_sdpa,fused_sdpa_fp16; each part is timed after torch.cuda.synchronize(), and each
configuration reports torch.cuda.max_memory_allocated. --pixels P scales the latents (P / 8), the map
size (P / 32: the same five layers, SD's 16x16 ones at 512 px) and the far mask's geometry. The text
below describes the default, 256 px on the CPU.

What one micro-step is (batch 2, 256x256 px = 32x32 latents, float32, CPU), exactly the fixture's
`micro_step` (imported from tests/pyref/make_disendiff_fixtures.py, which has no side effects on
import besides torch.set_num_threads(1), reset here) plus backward and the optimiser:
  forward+loss  CLIPTextModel (SD 1.5 config, vocab resized to 49410, rows 49408/49409 = copies of rows
                47629/42170, eager attention) on two captions, its embedding output (token + position)
                detached except at the <new1>/<new2> positions; x_t = DDPMScheduler.add_noise(z0, noise,
                t = [999, 500]); the UNet forward with the fixture's attn processor in all 32 attention
                layers (attn2: k/v detached at key 0; probabilities kept with their graph in the 8x8
                layers down_blocks.2.attentions.{0,1} and up_blocks.1.attentions.{0,1,2}, i.e. SD's
                16x16 layers at 512 px, 5 layers x 8 heads = 40 maps per token); L_rec (masked: sample
                0 all ones, sample 1 a "far" mask from BASELINES' rule at 256 px, r = 128, (cx, cy) =
                (80, 160): rows 3..17, columns 13..27); L_attn over both samples (mean over layers x
                heads, min-max norm, 3x3 Gaussian smoothing with reflect pad, squared for class tokens,
                the three IoU terms); Loss = L_rec + 0.01 L_attn
  backward      Loss.backward() into the 32 attn2.to_k / to_v weights of the 16 cross-attentions and the
                whole [49410, 768] token-embedding matrix (requires_grad; every other parameter frozen)
  optimizer     torch.optim.AdamW over those 33 tensors (lr 8e-5, betas (0.9, 0.999), eps 1e-8, weight
                decay 0.01): opt.step(); opt.zero_grad(set_to_none=True)
Each part is timed inside the same step (perf_counter around each); "step" is the whole micro-step.
Warm-up `--warmup` steps, then `--steps` timed steps; median and min seconds per step are reported.

Configurations (`--configs`, each a fresh AdamW from the same initial parameters, restored before it):
  default   torch.optim.AdamW(...) as is. On CPU torch picks neither foreach nor fused (its foreach
            default covers cuda/xpu/mtia only), so this is the single-tensor for-loop implementation.
  foreach   foreach=True (torch's multi-tensor path; on CPU a per-tensor fallback of the _foreach ops)
  fused     fused=True (torch's fused CPU AdamW kernel)
  fused_sdpa_fp16 (CUDA only) fused_sdpa with the forward under torch.autocast fp16, parameters and AdamW
            in fp32 (diffusers' training scripts' --mixed_precision fp16; no loss scaling: timing only)
`--extra` adds: `fused_sdpa` (the same math with F.scaled_dot_product_attention in every attention layer
whose probabilities are not kept: all attn1, and attn2 outside the 5 map layers, still with the key-0
detach; the map layers keep the fixture's eager processor) and `fused_nomkldnn`
(torch.backends.mkldnn disabled). torch.compile is not used. "reference_at_its_best" is the
configuration with the smallest median step time. The first configuration of a process runs
10-25% slower in forward/backward even after its warm-up (seen with default first and with fused
first), and run-to-run noise is about 10%: compare configurations over two orders (--configs);
the optimizer part is the stable difference between them.

Models: SD 1.5 configs from ../shared/reference/pyref/sd15_configs.py (TEXT_FULL, UNET_FULL; override
the folder with DECORR_PYREF), torch default init: torch.manual_seed(0) text encoder,
torch.manual_seed(1) UNet. Tokenizer: assets/sd-tiny/tokenizer + <new1>, <new2> (ids 49408, 49409).
Noise schedule: DDPMScheduler.from_config(tests/fixtures/pipeline/scheduler/scheduler_config.json), SD
1.5's, as the fixture. Inputs: torch.manual_seed(2), then z0 = randn [2, 4, 32, 32], noise = randn
[2, 4, 32, 32]. No other randomness. Threads: torch.set_num_threads(--threads, default 2 = this machine's cores).

Prints a JSON summary (also written to --json PATH): per configuration the loss of its first step
(equal across configurations that share the attention path), step / forward_loss / backward /
optimizer median and min seconds with all timed samples, whether a cargo/rustc process was seen while
it ran (polled every second: a concurrent compile disturbs the numbers), and the process's peak RSS
(resource.getrusage ru_maxrss).
"""
import argparse, json, os, platform, resource, statistics, subprocess, sys, threading, time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.environ.get("DECORR_PYREF", os.path.join(ROOT, "..", "shared", "reference", "pyref")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from sd15_configs import TEXT_FULL, UNET_FULL  # noqa: E402
except ImportError:  # a lent GPU machine has no ../shared: gpu_check.py carries a copy of the configs
    from gpu_check import TEXT_FULL, UNET_FULL  # noqa: E402
import make_disendiff_fixtures as fx  # noqa: E402  (constants and functions only; main() is not run)
import diffusers, transformers  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

MAP_LAYERS = sorted(f"{b}.attentions.{i}.transformer_blocks.0.attn2" for b, n in
                    (("down_blocks.2", 2), ("up_blocks.1", 3)) for i in range(n))
HW, B = 32, 2                                         # latents; --pixels sets HW = pixels / 8
TIMESTEPS = [999, 500]
CAPTIONS = [fx.TARGET, "a far away " + fx.TARGET]
FAR = dict(px=256, factor=8, r=128, cx=80, cy=160)    # BASELINES "Augmentation" mask rule at 256 px


def set_pixels(px):
    """Latents px / 8; maps at px / 32 (the second-smallest cross-attention size: SD's 16x16 layers
    at 512 px, the same five layers at any size); the far mask's geometry scaled with the image."""
    global HW
    assert px % 32 == 0, px
    HW = px // 8
    fx.STANDIN_RES = px // 32
    k = px / 256
    FAR.update(px=px, r=round(128 * k), cx=round(80 * k), cy=round(160 * k))


def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # ru_maxrss is in KiB on Linux


class CompileWatch:
    """Polls `pgrep -x cargo` / `pgrep rustc` every second; `seen` is set while one runs."""

    def __init__(self):
        self.seen, self.stop = False, threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    @staticmethod
    def busy():
        for cmd in (["pgrep", "-x", "cargo"], ["pgrep", "rustc"]):
            try:
                if subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                    return True
            except OSError:   # no pgrep (a bare lent machine): nothing to watch
                return False
        return False

    def run(self):
        while not self.stop.wait(1.0):
            if self.busy():
                self.seen = True


class SdpaKV0Processor:
    """attn2 outside the map layers: the fixture's math (k/v detached at key 0) through SDPA."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        assert encoder_hidden_states is not None and attention_mask is None and attn.norm_cross is None
        q, key, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        key = torch.cat([key[:, :1].detach(), key[:, 1:]], dim=1)
        v = torch.cat([v[:, :1].detach(), v[:, 1:]], dim=1)
        b, h = q.shape[0], attn.heads
        q, key, v = (x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2) for x in (q, key, v))
        o = F.scaled_dot_product_attention(q, key, v, scale=attn.scale).transpose(1, 2).reshape(b, -1, h * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](o))


def set_processors(unet, store, attn):
    procs = {}
    for name in unet.attn_processors:
        layer = name[:-len(".processor")]
        if attn == "eager" or layer in MAP_LAYERS:
            procs[name] = fx.DisenDiffAttnProcessor(layer, store)
        elif layer.endswith("attn1"):
            procs[name] = AttnProcessor2_0()
        else:
            procs[name] = SdpaKV0Processor()
    unet.set_attn_processor(procs)


def far_mask():
    r, cx, cy, f = FAR["r"], FAR["cx"], FAR["cy"], FAR["factor"]
    m = torch.zeros(HW, HW)
    m[(cx - r // 2) // f + 1:(cx + r // 2) // f - 1, (cy - r // 2) // f + 1:(cy + r // 2) // f - 1] = 1.0
    return m


def stats(xs):
    return dict(median_s=round(statistics.median(xs), 4), min_s=round(min(xs), 4), all_s=[round(x, 4) for x in xs])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the summary here")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default="default,foreach,fused")
    ap.add_argument("--extra", action="store_true", help="also fused_sdpa and fused_nomkldnn")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--pixels", type=int, default=256, help="image side (default 256; 512 is the method's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)   # after the fixture module's set_num_threads(1)
    configs = args.configs.split(",") + (["fused_sdpa", "fused_nomkldnn"] if args.extra else [])
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    set_pixels(args.pixels)
    watch = CompileWatch()
    compile_at_start = watch.busy()

    # --- models -----------------------------------------------------------------------------------
    t_build = time.perf_counter()
    tok, modifier_ids = fx.load_tokenizer()
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**TEXT_FULL, attn_implementation="eager")).float()
    base = te.get_input_embeddings().weight.detach().clone()
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        assert emb.shape == (49410, 768) and torch.equal(emb[:49408], base)
        for m, new_id in zip(fx.MODIFIERS, modifier_ids):
            emb[new_id] = base[fx.INIT_ROWS[m]]
    del base
    te.to(dev)
    emb = te.get_input_embeddings().weight
    te.requires_grad_(False)
    emb.requires_grad_(True)
    te.train()
    hook = fx.EmbeddingDetach(modifier_ids)
    te.embeddings.register_forward_hook(hook, with_kwargs=True)

    torch.manual_seed(1)
    unet = UNet2DConditionModel(**UNET_FULL).float().to(dev)
    unet.requires_grad_(False)
    kv = {n: p for n, p in unet.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    for p in kv.values():
        p.requires_grad_(True)
    unet.train()
    kv_names = sorted(kv)
    assert len(kv_names) == 32
    params = [emb] + [kv[n] for n in kv_names]
    init = [p.detach().clone() for p in params]
    store = {}
    fx.KERNEL = fx.gaussian_kernel().to(dev)
    sched = DDPMScheduler.from_config(json.load(open(os.path.join(ROOT, fx.REL["scheduler"]))))
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.num_train_timesteps == 1000

    ids = tok(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    for row in ids:
        p1, p2 = row.tolist().index(modifier_ids[0]), row.tolist().index(modifier_ids[1])
        assert row[p1 + 1] == 7579 and row[p2 + 1] == 3231, row     # 'tracks', 'train' follow the modifiers
    torch.manual_seed(2)
    z0 = torch.randn(B, 4, HW, HW)
    noise = torch.randn(B, 4, HW, HW)
    mask = torch.stack([torch.ones(HW, HW), far_mask()])
    data = {"micro0.input_ids": ids, "micro0.z0": z0, "micro0.noise": noise,
            "micro0.timesteps": torch.tensor(TIMESTEPS, dtype=torch.long), "micro0.mask": mask}
    data = {k: v.to(dev) for k, v in data.items()}
    build_s = time.perf_counter() - t_build
    rss_after_build = rss_gb()

    # --- timing -----------------------------------------------------------------------------------
    results = {}
    for cfg in configs:
        kw = dict(lr=fx.LR, betas=fx.BETAS, eps=fx.ADAM_EPS, weight_decay=fx.WEIGHT_DECAY)
        if cfg.startswith("fused"):
            kw["fused"] = True
        elif cfg == "foreach":
            kw["foreach"] = True
        else:
            assert cfg == "default", cfg
        attn = "sdpa" if cfg.startswith("fused_sdpa") else "eager"
        mkldnn = cfg != "fused_nomkldnn"
        # fused_sdpa_fp16: the forward under CUDA autocast in fp16 (parameters and AdamW in fp32, as
        # diffusers' training scripts with --mixed_precision fp16; no loss scaling: a timing, not a run)
        amp = cfg == "fused_sdpa_fp16"
        assert cfg in ("default", "foreach", "fused", "fused_sdpa", "fused_nomkldnn", "fused_sdpa_fp16"), cfg
        assert not amp or cuda, "fused_sdpa_fp16 needs --device cuda"
        with torch.no_grad():
            for p, p0 in zip(params, init):
                p.copy_(p0)
                p.grad = None
        set_processors(unet, store, attn)
        opt = torch.optim.AdamW(params, **kw)
        watch.seen = watch.busy()
        parts = dict(step=[], forward_loss=[], backward=[], optimizer=[])
        first = None
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
        with torch.backends.mkldnn.flags(enabled=mkldnn):
            for i in range(args.warmup + args.steps):
                sync()
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                    r = fx.micro_step(0, data, te, hook, unet, store, sched, modifier_ids, MAP_LAYERS)
                sync()
                t1 = time.perf_counter()
                r["total"].backward()
                sync()
                t2 = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                t3 = time.perf_counter()
                if first is None:
                    first = {k: r[k].item() for k in ("l_rec", "l_attn", "total")}
                del r
                if i >= args.warmup:
                    for k, v in zip(parts, (t3 - t0, t1 - t0, t2 - t1, t3 - t2)):
                        parts[k].append(v)
                print(f"{cfg} step {i}{' (warm-up)' if i < args.warmup else ''}: {t3 - t0:.3f} s "
                      f"(fwd+loss {t1 - t0:.3f}, bwd {t2 - t1:.3f}, opt {t3 - t2:.4f})", file=sys.stderr, flush=True)
        st = opt.state_dict()["param_groups"][0]
        results[cfg] = dict(adamw=dict(foreach=st.get("foreach"), fused=st.get("fused")), attention=attn,
                            mkldnn=mkldnn, autocast_fp16=amp, first_step_loss=first,
                            cuda_peak_gib=round(torch.cuda.max_memory_allocated() / 1024 ** 3, 3) if cuda else None,
                            compile_seen_during=watch.seen, **{k: stats(v) for k, v in parts.items()})
        del opt
    watch.stop.set()

    best = min(results, key=lambda c: results[c]["step"]["median_s"])
    summary = dict(
        bench="disendiff_micro_step",
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                      python=platform.python_version()),
        setting=dict(device=str(dev), gpu=torch.cuda.get_device_name(dev) if cuda else None, dtype="float32", torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                     batch=B, pixels=HW * 8, latents=HW, timesteps=TIMESTEPS, captions=CAPTIONS,
                     input_ids_unpadded=[r[:r.tolist().index(49407) + 1].tolist() for r in ids],
                     map_layers=MAP_LAYERS, heads=unet.get_submodule(MAP_LAYERS[0]).heads,
                     far_mask=dict(FAR, ones=int(far_mask().sum())), lr=fx.LR, weight_decay=fx.WEIGHT_DECAY,
                     attn_weight=fx.ATTN_WEIGHT, trained_tensors=len(params),
                     trained_elements=sum(p.numel() for p in params),
                     text_encoder_params=sum(p.numel() for p in te.parameters()),
                     unet_params=sum(p.numel() for p in unet.parameters()),
                     warmup=args.warmup, timed_steps=args.steps),
        build_s=round(build_s, 2),
        configs=results,
        reference_at_its_best=dict(config=best, step=results[best]["step"]),
        peak_rss_gb=round(rss_gb(), 3), rss_after_build_gb=round(rss_after_build, 3),
        compile_running_at_start=compile_at_start,
        compile_seen=any(r["compile_seen_during"] for r in results.values()),
    )
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
