#!/usr/bin/env python3
"""Write the SDXL fixtures of decorr-convert (tests/fixtures/sdxl_convert/).

    /root/torch29/bin/python tests/pyref/make_sdxl_convert_fixtures.py

Re-runnable and deterministic (no randomness: everything derives from tests/fixtures/sdxl_tiny,
made by make_sdxl_tiny.py). torch 2.9, diffusers 0.42.1, transformers 5.24.

1. The reference single file. tests/fixtures/sdxl_tiny is written in the original SDXL
   (generative-models) naming, as diffusers' scripts/convert_diffusers_to_original_sdxl.py does:
   UNet `model.diffusion_model.*` (SD's LDM names plus `label_emb.0.{0,2}` for add_embedding),
   VAE `first_stage_model.*` (attention q/k/v/proj_out as 1x1 convs), CLIP-L
   `conditioner.embedders.0.transformer.text_model.*` and OpenCLIP bigG
   `conditioner.embedders.1.model.*` (q/k/v fused into `attn.in_proj_*`, `ln_1`, `mlp.c_fc`, ...).
   That script hard-codes SDXL base's block counts (3 levels, 2 layers per block), so the tiny
   UNet/VAE (1 layer per block) are mapped with the general tables of make_convert_fixtures.py;
   `sdxl_names()` checks on every full-size SDXL base name that those tables give exactly the
   script's names. Two deliberate differences from the script, both toward the original
   release's naming (which is what diffusers' own loader reads):
   - `text_projection`: stored as the original [width, proj] matrix (the Linear weight
     transposed). The script copies `text_projection.weight` unchanged, a name that neither
     diffusers' `convert_open_clip_checkpoint` nor generative-models reads.
   - CLIP-L keeps `text_model.` in its names (transformers >= 5.6 saves CLIPTextModel without
     it; the script would copy that, and diffusers' `clip_sdxl` detection key then is absent),
     plus the int64 `position_ids` buffer the original release carries.
   The file is checked against diffusers' own functions (convert_ldm_unet_checkpoint,
   convert_ldm_vae_checkpoint) and loaded with
   `StableDiffusionXLPipeline.from_single_file(file, config=tests/fixtures/sdxl_tiny)`, whose
   components must hold exactly the tensors of tests/fixtures/sdxl_tiny.

2. Digests instead of the file. The single file is 10.9 MB (the two 49408-row token embeddings
   are 7.9 MB of it) and random floats do not compress, so the fixture stores, for every tensor,
   dtype, shape, the CRC-32 of its little-endian bytes and its first values
   (`reference.json.gz`, ~70 kB): `single_file` (the reference file above) and `diffusers`
   (text_encoder, text_encoder_2, unet, vae as diffusers' from_single_file loaded them; CLIP-L
   names with `text_model.`, as in SD files and the crate's output; position_ids buffers left
   out, as transformers does not save them). The Rust test rebuilds the file from
   tests/fixtures/sdxl_tiny with its own diffusers -> single-file converter, so matching digests
   mean it wrote this file, and converting that file back must match diffusers' digests.
   `model_index.json`: what diffusers' save_pretrained writes for the loaded pipeline.

3. sdxl_names.json.gz: `[ldm name, diffusers name]` for every tensor of full-size SDXL base
   (models built on the meta device from the presets in crates/decorr-convert/assets/sdxl, which
   are checked here to have SDXL base's parameter counts), verified with diffusers' converters
   and its model-type inference (`xl_base`); `ignored`: LDM names diffusers drops.
"""
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import zlib

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_convert_fixtures import check_equal, hf_text_to_open_clip, unet_to_ldm, vae_to_ldm  # noqa: E402

from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
TINY = os.path.join(FIX, "sdxl_tiny")
OUT = os.path.join(FIX, "sdxl_convert")
ASSETS = os.path.join(ROOT, "crates", "decorr-convert", "assets", "sdxl")

CLIP = "conditioner.embedders.0.transformer."
OPEN_CLIP = "conditioner.embedders.1.model."
UNET = "model.diffusion_model."
LABEL_EMB = [("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]


def with_text_model(sd):
    """transformers >= 5.6 CLIPTextModel names (no `text_model.`) -> the `text_model.` names."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}


def sdxl_unet_to_ldm(unet, cfg):
    """diffusers SDXL UNet -> `model.diffusion_model.*`: SD's tables plus label_emb."""
    out = {}
    rest = {}
    for k, v in unet.items():
        for d, l in LABEL_EMB:
            if k.startswith(d):
                out[UNET + l + k[len(d):]] = v
                break
        else:
            rest[k] = v
    out.update(unet_to_ldm(rest, cfg))
    return out


def text_2_to_ldm(te2):
    """CLIPTextModelWithProjection -> OpenCLIP names below `conditioner.embedders.1.model.`."""
    body = {k: v for k, v in te2.items() if k != "text_projection.weight"}
    out = {OPEN_CLIP + k: v for k, v in hf_text_to_open_clip(body).items()}
    out[OPEN_CLIP + "text_projection"] = te2["text_projection.weight"].T.contiguous()
    return out


def to_ldm(te1, te2, unet, vae, ucfg, vcfg):
    ldm = {}
    ldm.update({CLIP + k: v for k, v in with_text_model(te1).items()})
    n_pos = te1["embeddings.position_embedding.weight"].shape[0] if "embeddings.position_embedding.weight" in te1 \
        else te1["text_model.embeddings.position_embedding.weight"].shape[0]
    ldm[CLIP + "text_model.embeddings.position_ids"] = torch.arange(n_pos, dtype=torch.int64)[None]
    ldm.update(text_2_to_ldm(te2))
    ldm.update(sdxl_unet_to_ldm(unet, ucfg))
    ldm.update(vae_to_ldm(vae, vcfg))
    return {k: v.contiguous() for k, v in sorted(ldm.items())}


def digest(sd):
    """name -> {dtype, shape, crc32 of the little-endian bytes, first values}."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    out = {}
    for k, v in sorted(sd.items()):
        v = v.detach().contiguous().cpu()
        raw = v.view(torch.int16) if v.dtype == torch.bfloat16 else v
        out[k] = {
            "dtype": names[v.dtype],
            "shape": list(v.shape),
            "crc32": zlib.crc32(raw.numpy().tobytes()),
            "head": [float(x) for x in v.flatten()[:3].tolist()],
        }
    return out


def write_gz(path, obj):
    raw = json.dumps(obj, indent=0, sort_keys=True).encode()
    with open(path, "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as g:
            g.write(raw)


def load_tiny():
    te1 = load_file(os.path.join(TINY, "text_encoder", "model.safetensors"))
    te2 = load_file(os.path.join(TINY, "text_encoder_2", "model.safetensors"))
    unet = load_file(os.path.join(TINY, "unet", "diffusion_pytorch_model.safetensors"))
    vae = load_file(os.path.join(TINY, "vae", "diffusion_pytorch_model.safetensors"))
    ucfg = json.load(open(os.path.join(TINY, "unet", "config.json")))
    vcfg = json.load(open(os.path.join(TINY, "vae", "config.json")))
    return te1, te2, unet, vae, ucfg, vcfg


def reference():
    te1, te2, unet, vae, ucfg, vcfg = load_tiny()
    ldm = to_ldm(te1, te2, unet, vae, ucfg, vcfg)

    # diffusers' own functions give back the folder's tensors.
    check_equal("unet", convert_ldm_unet_checkpoint(ldm, ucfg), unet)
    check_equal("vae", convert_ldm_vae_checkpoint(ldm, vcfg), vae)
    d_te1 = {k: v for k, v in convert_ldm_clip_checkpoint(ldm).items() if not k.endswith("position_ids")}
    check_equal("text encoder", d_te1, with_text_model(te1))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sdxl_tiny.safetensors")
        save_file(ldm, path, metadata={"format": "pt"})
        size = os.path.getsize(path)
        pipe = StableDiffusionXLPipeline.from_single_file(path, config=TINY, local_files_only=True)
        loaded = {
            "text_encoder": with_text_model(pipe.text_encoder.state_dict()),
            "text_encoder_2": pipe.text_encoder_2.state_dict(),
            "unet": pipe.unet.state_dict(),
            "vae": pipe.vae.state_dict(),
        }
        loaded = {part: {k: v for k, v in sd.items() if not k.endswith("position_ids")} for part, sd in loaded.items()}
        for part, want in [("text_encoder", with_text_model(te1)), ("text_encoder_2", te2), ("unet", unet), ("vae", vae)]:
            check_equal(f"from_single_file {part}", loaded[part], want)
        assert pipe.vae.config.scaling_factor == 0.13025
        assert pipe.tokenizer_2.pad_token == "!"
        saved = os.path.join(tmp, "saved")
        pipe.save_pretrained(saved)
        shutil.copy(os.path.join(saved, "model_index.json"), os.path.join(OUT, "model_index.json"))

    write_gz(os.path.join(OUT, "reference.json.gz"), {
        "single_file": digest(ldm),
        "diffusers": {part: digest(sd) for part, sd in loaded.items()},
    })
    print(f"  reference single file: {len(ldm)} tensors, {size / 1e6:.2f} MB (stored as digests)")


# ---------------------------------------------------------------------------------------------
# The official reverse script's rules (scripts/convert_diffusers_to_original_sdxl.py), for SDXL
# base's fixed block counts: each diffusers name goes through the same ordered substring
# replacements the script applies.

def official_unet_rules():
    top = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
           ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
           ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
    resnet = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
              ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    layer = []
    for i in range(3):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i > 0:
                layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i < 2:
                layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        layer.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    layer.append(("output_blocks.2.2.conv.", "output_blocks.2.1.conv."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return top, resnet, layer


def official_unet_name(key, rules):
    top, resnet, layer = rules
    for sd, hf in top:
        if key.startswith(hf):
            return sd + key[len(hf):]
    if "resnets" in key:
        for sd, hf in resnet:
            key = key.replace(hf, sd)
    for sd, hf in layer:
        key = key.replace(hf, sd)
    return key


def official_vae_name(key):
    rules = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        for j in range(2):
            rules.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < 3:
            rules.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            rules.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(3):
            rules.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        rules.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    out = key
    for sd, hf in rules:
        out = out.replace(hf, sd)
    if "attentions" in key:
        for sd, hf in [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]:
            out = out.replace(hf, sd)
    return out


def official_open_clip_names(keys):
    """The script's text_encoder_2 names: regex relabel, q/k/v grouped into in_proj_*."""
    lst = [("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
           (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"), ("ln_final.", "text_model.final_layer_norm."),
           ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
           ("positional_embedding", "text_model.embeddings.position_embedding.weight")]
    protected = {re.escape(hf): sd for sd, hf in lst}
    pat = re.compile("|".join(protected))
    relabel = lambda k: pat.sub(lambda m: protected[re.escape(m.group(0))], k)  # noqa: E731
    out = {}
    for k in keys:
        m = re.match(r"(.*)\.(q|k|v)_proj\.(weight|bias)$", k)
        if m and m.group(1).endswith(".self_attn"):
            out[k] = relabel(m.group(1)) + ".in_proj_" + m.group(3)
        else:
            out[k] = relabel(k)
    return out


def sdxl_names():
    ucfg = json.load(open(os.path.join(ASSETS, "unet", "config.json")))
    vcfg = json.load(open(os.path.join(ASSETS, "vae", "config.json")))
    t1cfg = json.load(open(os.path.join(ASSETS, "text_encoder", "config.json")))
    t2cfg = json.load(open(os.path.join(ASSETS, "text_encoder_2", "config.json")))
    with torch.device("meta"):
        unet_m = UNet2DConditionModel.from_config(ucfg)
        vae_m = AutoencoderKL.from_config(vcfg)
        te1_m = CLIPTextModel(CLIPTextConfig(**t1cfg))
        te2_m = CLIPTextModelWithProjection(CLIPTextConfig(**t2cfg))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet_m, vae_m, te1_m, te2_m)]
    # SDXL base 1.0's parameter counts: the presets describe it.
    assert counts == [2567463684, 83653863, 123060480, 694659840], counts

    def tag(keys):
        return {k: torch.full((1, 1), float(i)) for i, k in enumerate(keys)}
    unet = tag(unet_m.state_dict())
    vae = tag(vae_m.state_dict())
    te1 = tag(with_text_model({k: 0 for k in te1_m.state_dict() if not k.endswith("position_ids")}))
    te2 = tag(k for k in te2_m.state_dict() if not k.endswith("position_ids"))
    lu = sdxl_unet_to_ldm(unet, ucfg)
    lv = vae_to_ldm(vae, vcfg)
    l1 = {CLIP + k: v for k, v in te1.items()}
    l2 = text_2_to_ldm(te2)
    l2[OPEN_CLIP + "logit_scale"] = torch.tensor(-2.0)
    ldm = {**lu, **lv, **l1, **l2}
    assert infer_diffusers_model_type(ldm) == "xl_base"

    # The general tables give the official script's names.
    rules = official_unet_rules()
    by_tag = lambda part: {float(v.flatten()[0]): k for k, v in part.items()}  # noqa: E731
    unet_ldm = {by_tag(lu)[float(v.flatten()[0])]: k for k, v in unet.items()}
    assert all(UNET + official_unet_name(d, rules) == l for l, d in unet_ldm.items())
    vae_ldm = {by_tag(lv)[float(v.flatten()[0])]: k for k, v in vae.items()}
    assert all("first_stage_model." + official_vae_name(d) == l for l, d in vae_ldm.items())
    official2 = official_open_clip_names(te2)
    ours2 = {OPEN_CLIP + v for k, v in official2.items() if k != "text_projection.weight"}
    assert ours2 | {OPEN_CLIP + "text_projection", OPEN_CLIP + "logit_scale"} == set(l2), \
        sorted(ours2 ^ set(l2))[:10]
    assert official2["text_projection.weight"] == "text_projection.weight"  # the script's untransposed name
    print("  the general tables give the official script's names for full-size SDXL base")

    check_equal("sdxl unet names", convert_ldm_unet_checkpoint(ldm, ucfg), unet)
    check_equal("sdxl vae names", convert_ldm_vae_checkpoint(ldm, vcfg), vae)
    check_equal("sdxl text encoder names", convert_ldm_clip_checkpoint(ldm), te1)
    with torch.device("meta"):
        stub = CLIPTextModelWithProjection(CLIPTextConfig(**t2cfg))
    got2 = convert_open_clip_checkpoint(stub, ldm, prefix=OPEN_CLIP)
    check_equal("sdxl text encoder 2 names", got2, te2)

    pairs = {"unet": [], "vae": [], "text_encoder": [], "text_encoder_2": []}
    for part, ldm_part, orig in [("unet", lu, unet), ("vae", lv, vae), ("text_encoder", l1, te1),
                                 ("text_encoder_2", l2, te2)]:
        names = by_tag(orig)
        for lk, v in ldm_part.items():
            for x in v.flatten().tolist():
                if x in names:
                    pairs[part].append([lk, names[x]])
    assert len(pairs["text_encoder_2"]) == len(te2)
    ignored = sorted(set(l2) - {p[0] for p in pairs["text_encoder_2"]})
    assert ignored == [OPEN_CLIP + "logit_scale"], ignored
    write_gz(os.path.join(OUT, "sdxl_names.json.gz"), {**pairs, "ignored": ignored})
    print(f"  sdxl names: {len(lu)} unet, {len(lv)} vae, {len(l1)} + {len(l2)} text encoders")


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    reference()
    sdxl_names()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total / 1e3:.0f} kB)")
    assert total < 500e3, total


if __name__ == "__main__":
    main()
