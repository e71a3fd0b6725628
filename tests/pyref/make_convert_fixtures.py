#!/usr/bin/env python3
"""Write the single-file checkpoint fixtures of decorr-convert (tests/fixtures/convert/).

    /opt/pyref-venv/bin/python tests/pyref/make_convert_fixtures.py

Deterministic: no randomness; everything derives from the repo's tiny diffusers models
(text encoder tests/fixtures/clip_tiny_train/text_encoder cut to a 200-token vocabulary,
UNet tests/fixtures/unet_tiny_a/unet, VAE tests/fixtures/vae_tiny/vae).

- diffusers/{text_encoder,unet,vae}/config.json and diffusers/text_encoder/model.safetensors:
  the configs describing the tiny models (passed as `--config DIR`) and the small text encoder.
- tiny.safetensors: the three models in the original LDM single-file naming (f32), plus CLIP's
  position_ids buffer and two noise-schedule buffers, as real SD 1.x files carry them.
- tiny.ckpt: torch.save({"state_dict": ..., "global_step": 7}) of the same tensors in f16, (without the schedule buffers) plus
  EMA weights (`model_ema.*`, UNet weights * 0.5) and one non-contiguous and one Parameter
  tensor (strided storage views and `_rebuild_parameter`).
- malicious.ckpt: a torch-zip whose pickle REDUCEs os.system("touch /tmp/decorr-pwned-marker")
  (crafted with a __reduce__ class; never loaded here).
- truncated.ckpt: the first 4096 bytes of tiny.ckpt.
- sd15_names.json.gz: `[ldm name, diffusers name]` for every tensor of full-size SD 1.5
  (models built on the meta device from the SD 1.5 configs in crates/decorr-convert/assets),
  checked the same way against diffusers' converter.

The LDM naming is produced by inverting diffusers' converter here, and verified by running
diffusers' own convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint /
convert_ldm_clip_checkpoint on the result: they must give back exactly the original tensors.
"""
import gzip, io, json, os, pickle, shutil, zipfile

import torch
from safetensors.torch import load_file, save_file
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "convert")
VOCAB = 200


def unet_to_ldm(sd, cfg):
    """diffusers UNet2DConditionModel names -> LDM `model.diffusion_model.*` names."""
    lpb = cfg["layers_per_block"]
    n = len(cfg["block_out_channels"])
    down_attn = ["CrossAttn" in t for t in cfg["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    prefixes = [
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("conv_in.", "input_blocks.0.0.", False),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]
    for i in range(n):
        for j in range(lpb):
            idx = 1 + i * (lpb + 1) + j
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0.", True))
            if down_attn[i]:
                prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.", False))
        if i < n - 1:
            idx = 1 + i * (lpb + 1) + lpb
            prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{idx}.0.op.", False))
        for j in range(lpb + 1):
            idx = i * (lpb + 1) + j
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0.", True))
            if up_attn[i]:
                prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.", False))
        if i < n - 1:
            idx = i * (lpb + 1) + lpb
            k = 2 if up_attn[i] else 1
            prefixes.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{idx}.{k}.conv.", False))
    resnet = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
              ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
              ("conv_shortcut.", "skip_connection.")]
    out = {}
    for key, t in sd.items():
        hits = [(d, l, r) for d, l, r in prefixes if key.startswith(d)]
        assert len(hits) == 1, (key, hits)
        d, l, is_res = hits[0]
        rest = key[len(d):]
        if is_res:
            for a, b in resnet:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
        out["model.diffusion_model." + l + rest] = t
    return out


def vae_to_ldm(sd, cfg):
    """diffusers AutoencoderKL names -> LDM `first_stage_model.*` names (attention 1x1 convs)."""
    lpb = cfg["layers_per_block"]
    n = len(cfg["down_block_types"])
    prefixes = [("quant_conv.", "quant_conv.", None), ("post_quant_conv.", "post_quant_conv.", None)]
    for part in ["encoder", "decoder"]:
        prefixes += [
            (f"{part}.conv_in.", f"{part}.conv_in.", None),
            (f"{part}.conv_out.", f"{part}.conv_out.", None),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", None),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", "res"),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", "res"),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", "attn"),
        ]
    for i in range(n):
        for j in range(lpb):
            prefixes.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", "res"))
        if i < n - 1:
            prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", None))
        b = n - 1 - i
        for j in range(lpb + 1):
            prefixes.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{b}.block.{j}.", "res"))
        if i < n - 1:
            prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{b}.upsample.conv.", None))
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, t in sd.items():
        hits = [(d, l, r) for d, l, r in prefixes if key.startswith(d)]
        assert len(hits) == 1, (key, hits)
        d, l, kind = hits[0]
        rest = key[len(d):]
        if kind == "res":
            rest = rest.replace("conv_shortcut.", "nin_shortcut.")
        elif kind == "attn":
            for a, b2 in attn:
                if rest.startswith(a):
                    rest = b2 + rest[len(a):]
                    break
            if rest.endswith("weight") and not rest.startswith("norm."):
                t = t[:, :, None, None]
        out["first_stage_model." + l + rest] = t
    return out


def check_equal(name, got, want):
    assert set(got) == set(want), (name, sorted(set(got) ^ set(want))[:10])
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (name, k)
    print(f"  diffusers maps {name} back exactly ({len(want)} tensors)")


def torch_zip(path, obj_pickle):
    """A torch-zip archive holding only the given data.pkl bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in [("malicious/data.pkl", obj_pickle), ("malicious/version", b"3\n")]:
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


class Pwn:
    def __reduce__(self):
        return (os.system, ("touch /tmp/decorr-pwned-marker",))


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)

    # Tiny text encoder with a 1000-token vocabulary (conversion never needs the tokenizer).
    te_dir = os.path.join(OUT, "diffusers", "text_encoder")
    os.makedirs(te_dir)
    te_cfg = json.load(open(os.path.join(FIX, "clip_tiny_train", "text_encoder", "config.json")))
    te_cfg["vocab_size"] = VOCAB
    json.dump(te_cfg, open(os.path.join(te_dir, "config.json"), "w"), indent=2)
    te = load_file(os.path.join(FIX, "clip_tiny_train", "text_encoder", "model.safetensors"))
    te = {k: v for k, v in te.items() if not k.endswith("position_ids")}
    te["text_model.embeddings.token_embedding.weight"] = te["text_model.embeddings.token_embedding.weight"][:VOCAB].contiguous()
    save_file(te, os.path.join(te_dir, "model.safetensors"), metadata={"format": "pt"})

    unet_cfg = json.load(open(os.path.join(FIX, "unet_tiny_a", "unet", "config.json")))
    vae_cfg = json.load(open(os.path.join(FIX, "vae_tiny", "vae", "config.json")))
    for name, src in [("unet", "unet_tiny_a/unet"), ("vae", "vae_tiny/vae")]:
        os.makedirs(os.path.join(OUT, "diffusers", name))
        shutil.copy(os.path.join(FIX, src, "config.json"), os.path.join(OUT, "diffusers", name, "config.json"))
    unet = load_file(os.path.join(FIX, "unet_tiny_a", "unet", "diffusion_pytorch_model.safetensors"))
    vae = load_file(os.path.join(FIX, "vae_tiny", "vae", "diffusion_pytorch_model.safetensors"))

    ldm = {}
    ldm.update({"cond_stage_model.transformer." + k: v for k, v in te.items()})
    n_pos = te["text_model.embeddings.position_embedding.weight"].shape[0]
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(n_pos, dtype=torch.int64)[None]
    ldm.update(unet_to_ldm(unet, unet_cfg))
    ldm.update(vae_to_ldm(vae, vae_cfg))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ldm["betas"] = betas.float()
    ldm["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    ldm = {k: v.contiguous() for k, v in ldm.items()}

    # Verify the inverse with diffusers' own converter.
    check_equal("unet", convert_ldm_unet_checkpoint(ldm, unet_cfg), unet)
    check_equal("vae", convert_ldm_vae_checkpoint(ldm, vae_cfg), vae)
    clip = {k: v for k, v in convert_ldm_clip_checkpoint(ldm).items() if not k.endswith("position_ids")}
    check_equal("text encoder", clip, te)

    save_file(ldm, os.path.join(OUT, "tiny.safetensors"), metadata={"format": "pt"})

    # .ckpt: f16, with EMA, one strided view and one Parameter.
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in ldm.items() if k not in ("betas", "alphas_cumprod")}
    ema = {}
    for k, v in ldm.items():
        if k.startswith("model.diffusion_model."):
            ema["model_ema." + "".join(k.split(".")[1:])] = (v * 0.5).half()
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int32)
    strided_key = "model.diffusion_model.time_embed.0.weight"
    w = half[strided_key]
    half[strided_key] = w.t().contiguous().t()  # same values, column-major storage
    assert not half[strided_key].is_contiguous()
    param_key = "first_stage_model.quant_conv.weight"
    half[param_key] = torch.nn.Parameter(half[param_key], requires_grad=False)
    sd = dict(half)
    sd.update(ema)
    assert sum(k.startswith("model_ema") for k in sd) > 100
    check_equal(
        "ckpt EMA unet",
        convert_ldm_unet_checkpoint(sd, unet_cfg, extract_ema=True),
        {k: (v * 0.5).half() for k, v in unet.items()},
    )
    ckpt_path = os.path.join(OUT, "tiny.ckpt")
    torch.save({"state_dict": sd, "global_step": 7}, ckpt_path)
    # Re-read safely to be sure what was written.
    back = torch.load(ckpt_path, weights_only=True)["state_dict"]
    assert set(back) == set(sd)

    # malicious.ckpt: never loaded.
    torch_zip(os.path.join(OUT, "malicious.ckpt"), pickle.dumps({"state_dict": Pwn()}, protocol=2))

    data = open(ckpt_path, "rb").read()
    open(os.path.join(OUT, "truncated.ckpt"), "wb").write(data[:4096])

    sd15_names()

    total = 0
    for dirpath, _, files in os.walk(OUT):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")
    assert total < 3e6, total


def sd15_names():
    assets = os.path.join(ROOT, "crates", "decorr-convert", "assets", "sd15")
    ucfg = json.load(open(os.path.join(assets, "unet", "config.json")))
    vcfg = json.load(open(os.path.join(assets, "vae", "config.json")))
    tcfg = json.load(open(os.path.join(assets, "text_encoder", "config.json")))
    with torch.device("meta"):
        ukeys = list(UNet2DConditionModel.from_config(ucfg).state_dict())
        vkeys = list(AutoencoderKL.from_config(vcfg).state_dict())
        tkeys = [k for k in CLIPTextModel(CLIPTextConfig(**tcfg)).state_dict() if not k.endswith("position_ids")]
    # transformers 5 keeps `text_model.` in saved files (and SD files carry it) but not in the
    # in-memory module's names.
    tkeys = [k if k.startswith("text_model.") else "text_model." + k for k in tkeys]
    # Placeholder values that identify each tensor; (1, 1) so the VAE attention reshape applies.
    def tag(keys):
        return {k: torch.full((1, 1), float(i)) for i, k in enumerate(keys)}
    unet, vae, te = tag(ukeys), tag(vkeys), tag(tkeys)
    lu, lv = unet_to_ldm(unet, ucfg), vae_to_ldm(vae, vcfg)
    lt = {"cond_stage_model.transformer." + k: v for k, v in te.items()}
    ldm = {**lu, **lv, **lt}
    back_u = convert_ldm_unet_checkpoint(ldm, ucfg)
    back_v = convert_ldm_vae_checkpoint(ldm, vcfg)
    back_t = convert_ldm_clip_checkpoint(ldm)
    check_equal("sd15 unet names", back_u, unet)
    check_equal("sd15 vae names", back_v, vae)
    check_equal("sd15 text encoder names", back_t, te)
    pairs = []
    for ldm_part, orig in [(lu, unet), (lv, vae), (lt, te)]:
        by_id = {}
        for k, v in orig.items():
            by_id[float(v.flatten()[0])] = k
        for lk, v in ldm_part.items():
            pairs.append([lk, by_id[float(v.flatten()[0])]])
    # Per-model tags collide across models; pairs were built per model above.
    raw = json.dumps({"unet": [p for p in pairs if p[0].startswith("model.")],
                      "vae": [p for p in pairs if p[0].startswith("first_stage_model.")],
                      "text_encoder": [p for p in pairs if p[0].startswith("cond_stage_model.")]},
                     indent=0, sort_keys=True).encode()
    with open(os.path.join(OUT, "sd15_names.json.gz"), "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as g:
            g.write(raw)
    print(f"  sd15 names: {len(lu)} unet, {len(lv)} vae, {len(lt)} text encoder")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
