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
- sd2/: a tiny SD 2.x-like single file, see `sd2()`.
- sd2_names.json.gz: the same for full-size SD 2.x (OpenCLIP text encoder), see `sd2_names()`.
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
    convert_open_clip_checkpoint,
    create_diffusers_clip_model_from_ldm,
    infer_diffusers_model_type,
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
    sd2()
    sd2_names()

    total = 0
    for dirpath, _, files in os.walk(OUT):
        if os.path.relpath(dirpath, OUT).split(os.sep)[0] == "sd2":
            continue
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    print(f"wrote {OUT} ({total / 1e6:.2f} MB, sd2/ not counted)")
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




# ---------------------------------------------------------------------------------------------
# SD 2.x: OpenCLIP ViT-H text encoder (`cond_stage_model.model.*`).

OPEN_CLIP = "cond_stage_model.model."


def hf_text_to_open_clip(te, n_extra_layers_from=None):
    """transformers CLIPTextModel names (with `text_model.`) -> OpenCLIP names (no prefix):
    q/k/v fused into `in_proj_{weight,bias}`, the inverse of convert_open_clip_checkpoint."""
    out = {}
    qkv = {}
    layer_map = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                 ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj.")]
    for k, v in te.items():
        if k == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("text_model.final_layer_norm."):
            out["ln_final." + k[len("text_model.final_layer_norm."):]] = v
        elif k.startswith("text_model.encoder.layers."):
            rest = k[len("text_model.encoder.layers."):]
            i, rest = rest.split(".", 1)
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                qkv.setdefault((i, kind), {})[proj[0]] = v
                continue
            for a, b in layer_map:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            else:
                raise AssertionError(k)
            out[f"transformer.resblocks.{i}.{rest}"] = v
        else:
            raise AssertionError(k)
    for (i, kind), d in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([d["q"], d["k"], d["v"]])
    return out


def randomize(sd, gen):
    """Distinct seeded values for every tensor (layer norms included), so a swapped name shows."""
    return {k: (torch.randn(v.shape, generator=gen) * 0.1).to(v.dtype) for k, v in sd.items()}


def sd2():
    """sd2/: a tiny SD 2.x-like single file and the diffusers folder diffusers makes of it.

    - tiny.safetensors: OpenCLIP text encoder (width 32, 4 heads, 3 resblocks, exact GELU,
      `text_projection` and `logit_scale` as real SD 2 files carry them), a UNet with linear
      transformer projections and per-block head dims, a VAE, and the noise-schedule buffers,
      all seeded random f32 values, in the original SD 2 naming.
    - diffusers/{text_encoder,unet,vae}: configs (the text encoder keeps 2 of the 3 layers, as
      SD 2 keeps 23 of 24) and the tensors diffusers' own single-file functions produce.
    """
    out2 = os.path.join(OUT, "sd2")
    ref = os.path.join(out2, "diffusers")
    gen = torch.Generator().manual_seed(2)
    tcfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, projection_dim=32,
                num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    with torch.device("meta"):
        tkeys = CLIPTextModel(CLIPTextConfig(**tcfg)).state_dict()
    te_full = {("text_model." + k if not k.startswith("text_model.") else k): torch.empty(v.shape)
               for k, v in tkeys.items() if not k.endswith("position_ids")}
    te_full = randomize(dict(sorted(te_full.items())), gen)
    ucfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=[8, 16], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=[2, 4],
                cross_attention_dim=32, use_linear_projection=True, norm_num_groups=4)
    unet_model = UNet2DConditionModel(**ucfg)
    unet = randomize(unet_model.state_dict(), gen)
    vcfg = dict(in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                latent_channels=4, norm_num_groups=4, sample_size=16)
    vae_model = AutoencoderKL(**vcfg)
    vae = randomize(vae_model.state_dict(), gen)

    ldm = {OPEN_CLIP + k: v for k, v in hf_text_to_open_clip(te_full).items()}
    ldm[OPEN_CLIP + "text_projection"] = torch.randn(32, 32, generator=gen) * 0.1
    ldm[OPEN_CLIP + "logit_scale"] = torch.tensor(4.6052)
    ldm.update(unet_to_ldm(unet, dict(unet_model.config)))
    ldm.update(vae_to_ldm(vae, dict(vae_model.config)))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ldm["betas"] = betas.float()
    ldm["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    ldm = {k: v.contiguous() for k, v in sorted(ldm.items())}

    # The reference folder: configs, then diffusers' own conversion of the single file.
    for name, model in [("unet", unet_model), ("vae", vae_model)]:
        model.save_config(os.path.join(ref, name))
    os.makedirs(os.path.join(ref, "text_encoder"))
    keep = dict(tcfg, num_hidden_layers=2, architectures=["CLIPTextModel"], model_type="clip_text_model")
    json.dump(dict(sorted(keep.items())), open(os.path.join(ref, "text_encoder", "config.json"), "w"), indent=2)

    ucfg_saved = json.load(open(os.path.join(ref, "unet", "config.json")))
    vcfg_saved = json.load(open(os.path.join(ref, "vae", "config.json")))
    d_unet = convert_ldm_unet_checkpoint(ldm, ucfg_saved)
    d_vae = convert_ldm_vae_checkpoint(ldm, vcfg_saved)
    check_equal("sd2 unet", d_unet, unet)
    check_equal("sd2 vae", d_vae, vae)
    # diffusers drops the last resblock by its literal full-size name (`resblocks.23`); for the
    # 3-block tiny file the 2-layer model it builds simply has no slot for block 2.
    with torch.device("meta"):
        stub = CLIPTextModel(CLIPTextConfig(**dict(tcfg, num_hidden_layers=2)))
    d_te = convert_open_clip_checkpoint(stub, ldm)
    assert any(".layers.2." in k for k in d_te)
    d_te = {k: v.contiguous() for k, v in d_te.items() if ".layers.2." not in k}
    want_te = {k: v for k, v in te_full.items() if ".layers.2." not in k}
    check_equal("sd2 text encoder", d_te, want_te)
    # The whole loading path, config folder and all: the model diffusers builds holds exactly these.
    model = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, ldm, config=ref, subfolder="text_encoder", local_files_only=True)
    loaded = {("text_model." + k if not k.startswith("text_model.") else k): v
              for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    check_equal("sd2 text encoder (create_diffusers_clip_model_from_ldm)", loaded, want_te)

    save_file(d_te, os.path.join(ref, "text_encoder", "model.safetensors"), metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in d_unet.items()},
              os.path.join(ref, "unet", "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in d_vae.items()},
              os.path.join(ref, "vae", "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    save_file(ldm, os.path.join(out2, "tiny.safetensors"), metadata={"format": "pt"})
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out2) for f in fs)
    print(f"  sd2: {len(ldm)} single-file tensors ({total / 1e6:.2f} MB)")
    assert total < 1.5e6, total


def sd2_names():
    """sd2_names.json.gz: for every tensor of full-size SD 2.x (models on the meta device from
    the SD 2 configs in crates/decorr-convert/assets/sd2), `[ldm name, diffusers name]` pairs
    (the fused `in_proj_*` of each resblock gives three), checked against diffusers' functions,
    and the LDM names diffusers drops (`ignored`: the 24th resblock, text_projection, logit_scale)."""
    assets = os.path.join(ROOT, "crates", "decorr-convert", "assets", "sd2")
    ucfg = json.load(open(os.path.join(assets, "unet", "config.json")))
    vcfg = json.load(open(os.path.join(assets, "vae", "config.json")))
    tcfg = json.load(open(os.path.join(assets, "text_encoder", "config.json")))
    with torch.device("meta"):
        ukeys = list(UNet2DConditionModel.from_config(ucfg).state_dict())
        vkeys = list(AutoencoderKL.from_config(vcfg).state_dict())
        full = CLIPTextModel(CLIPTextConfig(**dict(tcfg, num_hidden_layers=tcfg["num_hidden_layers"] + 1)))
        tkeys = [k for k in full.state_dict() if not k.endswith("position_ids")]
    tkeys = [k if k.startswith("text_model.") else "text_model." + k for k in tkeys]
    last = f"text_model.encoder.layers.{tcfg['num_hidden_layers']}."

    def tag(keys):
        return {k: torch.full((1, 1), float(i)) for i, k in enumerate(keys)}
    unet, vae, te_all = tag(ukeys), tag(vkeys), tag(tkeys)
    v2_key = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"
    unet[v2_key] = torch.full((1, 1024), unet[v2_key].item())
    lu, lv = unet_to_ldm(unet, ucfg), vae_to_ldm(vae, vcfg)
    lt = {OPEN_CLIP + k: v for k, v in hf_text_to_open_clip(te_all).items()}
    # text_projection (1, 1): diffusers splits in_proj by its first dim, here the 1-row q/k/v.
    lt[OPEN_CLIP + "text_projection"] = torch.full((1, 1), -1.0)
    lt[OPEN_CLIP + "logit_scale"] = torch.tensor(-2.0)
    ldm = {**lu, **lv, **lt}
    assert infer_diffusers_model_type(ldm) == "v2"
    te = {k: v for k, v in te_all.items() if not k.startswith(last)}
    with torch.device("meta"):
        stub = CLIPTextModel(CLIPTextConfig(**tcfg))
    check_equal("sd2 unet names", convert_ldm_unet_checkpoint(ldm, ucfg), unet)
    check_equal("sd2 vae names", convert_ldm_vae_checkpoint(ldm, vcfg), vae)
    check_equal("sd2 text encoder names", convert_open_clip_checkpoint(stub, ldm), te)
    pairs = {"unet": [], "vae": [], "text_encoder": []}
    for part, ldm_part, orig in [("unet", lu, unet), ("vae", lv, vae), ("text_encoder", lt, te)]:
        by_id = {float(v.flatten()[0]): k for k, v in orig.items()}
        for lk, v in ldm_part.items():
            for x in v.flatten().tolist() if part == "text_encoder" else [float(v.flatten()[0])]:
                if x in by_id:
                    pairs[part].append([lk, by_id[x]])
    ignored = sorted({k for k in lt} - {p[0] for p in pairs["text_encoder"]})
    assert len(ignored) == 12 + 2, ignored
    assert len(pairs["text_encoder"]) == len(te)
    raw = json.dumps({**pairs, "ignored": ignored}, indent=0, sort_keys=True).encode()
    with open(os.path.join(OUT, "sd2_names.json.gz"), "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as g:
            g.write(raw)
    print(f"  sd2 names: {len(lu)} unet, {len(lv)} vae, {len(lt)} text encoder ({len(ignored)} dropped)")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
