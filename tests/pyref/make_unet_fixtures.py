#!/usr/bin/env python3
"""Write the UNet and VAE reference fixtures (diffusers 0.42 on tiny random-init models).

    /opt/pyref-venv/bin/python tests/pyref/make_unet_fixtures.py               # -> tests/fixtures/
    /opt/pyref-venv/bin/python tests/pyref/make_unet_fixtures.py --full DIR    # full-size SD 1.5
        # UNet + VAE with random weights and reference outputs (3.7 GB, not committed); then
    DECORR_FULL_SD15=DIR cargo test --release -p decorr-unet --test parity -- --ignored

Each model folder is a diffusers layout (`unet/` or `vae/` with config.json and
diffusion_pytorch_model.safetensors) plus `reference.safetensors` (inputs and diffusers' outputs)
and `cases.json` (what each case feeds). Weights are perturbed after init so every norm scale and
bias is non-trivial (a swapped or unloaded tensor changes the output). Cross-attention maps come
from an attention processor that records diffusers' own `get_attention_scores` per module.
"""
import argparse, json, os, shutil

import torch
from safetensors.torch import save_file
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)

UNETS = {
    # SD 1.x-like: 1x1-conv projections, one head count for all blocks, a mid block.
    "unet_tiny_a": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8),
    # SD 2.x-like: linear projections, head counts per block (a list), several cross-attention
    # blocks, two transformer layers in one block, 2 resnets per block, fp16 variant file.
    "unet_tiny_b": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32, 32],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=2, cross_attention_dim=24, attention_head_dim=[2, 4, 4],
        transformer_layers_per_block=[1, 2, 1], use_linear_projection=True, norm_num_groups=8),
}
# (name, batch, height, width, timesteps, context tokens)
UNET_CASES = [
    ("b2_8x8", 2, 8, 8, [999.0, 1.0], 7),
    ("b1_16x16", 1, 16, 16, [500.0], 5),
    ("b1_odd_9x7", 1, 9, 7, [261.0], 4),
]
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32],
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  layers_per_block=1, norm_num_groups=8, sample_size=16)


class Recorder(AttnProcessor):
    """diffusers' AttnProcessor that also keeps the head-averaged probabilities."""

    def __init__(self, name, store):
        super().__init__()
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        b, n, _ = hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key = attn.head_to_batch_dim(attn.to_k(ctx))
        probs = attn.get_attention_scores(query, key, None)
        self.store[self.name] = probs.reshape(b, attn.heads, n, -1).mean(1).contiguous()
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def write_unet(name, cfg, out, seed):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg).eval()
    perturb(unet, seed + 100)
    folder = os.path.join(out, name)
    shutil.rmtree(folder, ignore_errors=True)
    unet.save_pretrained(os.path.join(folder, "unet"))
    if name == "unet_tiny_b":
        unet.half().save_pretrained(os.path.join(folder, "unet"), variant="fp16")
        unet.float()
        os.remove(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
        # The reference runs on the fp16 weights as loaded back in f32 (what our loader does).
        unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), variant="fp16",
                                                    torch_dtype=torch.float32).eval()
    store = {}
    unet.set_attn_processor({k: Recorder(k[: -len(".processor")], store) for k in unet.attn_processors})
    ref, cases = {}, []
    g = torch.Generator().manual_seed(seed + 1)
    for case, b, h, w, ts, toks in UNET_CASES:
        x = torch.randn(b, cfg["in_channels"], h, w, generator=g)
        ctx = torch.randn(b, toks, cfg["cross_attention_dim"], generator=g)
        store.clear()
        with torch.no_grad():
            y = unet(x, torch.tensor(ts), encoder_hidden_states=ctx).sample
        ref[f"{case}.sample"], ref[f"{case}.context"], ref[f"{case}.out"] = x, ctx, y
        maps = sorted(k for k in store if k.endswith("attn2"))
        for k in maps:
            ref[f"{case}.cross.{k}"] = store[k]
        ref[f"{case}.self.{maps[0][:-1]}1"] = store[maps[0][:-1] + "1"]
        cases.append(dict(name=case, timesteps=ts, cross_modules=maps, self_module=maps[0][:-1] + "1"))
        print(name, case, tuple(y.shape), "max |out|", float(y.abs().max()))
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(folder, "reference.safetensors"))
    json.dump(dict(cases=cases), open(os.path.join(folder, "cases.json"), "w"), indent=1)


def write_vae(out, seed, cfg=VAE_CONFIG, name="vae_tiny", image_sizes=((1, 16, 16), (2, 18, 14)),
              latent_sizes=((1, 8, 8), (2, 5, 7)), old_keys=True):
    torch.manual_seed(seed)
    vae = AutoencoderKL(**cfg).eval()
    perturb(vae, seed + 100)
    folder = os.path.join(out, name)
    shutil.rmtree(folder, ignore_errors=True)
    vae.save_pretrained(os.path.join(folder, "vae"))
    ref, cases = {}, []
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b, h, w in image_sizes:
            x = torch.rand(b, 3, h, w, generator=g) * 2 - 1
            post = vae.encode(x).latent_dist
            c = f"encode_{b}x{h}x{w}"
            ref[f"{c}.image"], ref[f"{c}.mean"], ref[f"{c}.logvar"] = x, post.mean, post.logvar
            cases.append(dict(name=c, kind="encode"))
        for b, h, w in latent_sizes:
            z = torch.randn(b, cfg["latent_channels"], h, w, generator=g)
            c = f"decode_{b}x{h}x{w}"
            ref[f"{c}.latent"], ref[f"{c}.image"] = z, vae.decode(z).sample
            cases.append(dict(name=c, kind="decode"))
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(folder, "reference.safetensors"))
    json.dump(dict(cases=cases, scaling_factor=vae.config.scaling_factor),
              open(os.path.join(folder, "cases.json"), "w"), indent=1)
    if old_keys:
        # The same weights under the pre-0.14 attention names some VAE files still carry.
        from safetensors.torch import load_file
        sd = load_file(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
        ren = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        old = {}
        for k, v in sd.items():
            for new, o in ren.items():
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{o}.")
            old[k] = v
        os.makedirs(os.path.join(folder, "vae_old_keys", "vae"), exist_ok=True)
        shutil.copy(os.path.join(folder, "vae", "config.json"), os.path.join(folder, "vae_old_keys", "vae"))
        save_file(old, os.path.join(folder, "vae_old_keys", "vae", "diffusion_pytorch_model.safetensors"))
    print(name, "->", folder)


def write_full(out):
    """Full-size SD 1.5 UNet and VAE, random weights; one batch-2 64x64 UNet call, one decode."""
    cfg = json.load(open(os.path.join(ROOT, "..", "shared", "reference", "sd15", "unet", "config.json")))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).eval()
    unet.save_pretrained(os.path.join(out, "unet"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        y = unet(x, torch.tensor([981.0, 981.0]), encoder_hidden_states=ctx).sample
    save_file({"sample": x, "context": ctx, "out": y}, os.path.join(out, "unet_reference.safetensors"))
    del unet
    vcfg = json.load(open(os.path.join(ROOT, "..", "shared", "reference", "sd15", "vae", "config.json")))
    vcfg = {k: v for k, v in vcfg.items() if not k.startswith("_")}
    vae = AutoencoderKL(**vcfg).eval()
    vae.save_pretrained(os.path.join(out, "vae"))
    z = torch.randn(1, 4, 64, 64, generator=g)
    with torch.no_grad():
        img = vae.decode(z).sample
    save_file({"latent": z, "image": img}, os.path.join(out, "vae_reference.safetensors"))
    print("full-size SD 1.5 UNet + VAE ->", out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
    ap.add_argument("--full", help="write full-size SD 1.5 UNet + VAE (random) and references here")
    args = ap.parse_args()
    if args.full:
        write_full(args.full)
        return
    for i, (name, cfg) in enumerate(UNETS.items()):
        write_unet(name, cfg, args.out, seed=10 + i)
    write_vae(args.out, seed=20)


if __name__ == "__main__":
    main()
