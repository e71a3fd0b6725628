#!/usr/bin/env python3
"""Write the SDXL UNet and VAE reference fixtures (tests/fixtures/sdxl_unet/) with diffusers 0.42
on the tiny random SDXL model of tests/fixtures/sdxl_tiny/ (tests/pyref/make_sdxl_tiny.py),
for crates/decorr-unet/tests/sdxl.rs.

    /root/torch29/bin/python tests/pyref/make_sdxl_unet_fixtures.py   # -> tests/fixtures/sdxl_unet/

Re-running rewrites the same files (fixed seeds, the committed tiny model's weights). Written:
- reference.safetensors: the UNet case `b2` (batch 2, 8x8 latents, two timesteps, a 77-token
  40-wide context, 20-wide pooled `text_embeds`, two rows of six `time_ids`): inputs, the
  prediction, every cross-attention map (`b2.cross.<module>`) and the mid block's first
  self-attention map, plus the intermediate `add_time_proj` sinusoids (`b2.time_proj`, [12, 8])
  and the added embedding (`b2.aug_emb`) for locating a difference; and a VAE decode
  (`decode.latent` [1, 4, 8, 8] unscaled, `decode.image`).
- cases.json: the timesteps and time ids, the captured module names, the tiny UNet's parameter
  count, and the full-size SDXL base UNet's and VAE's parameter counts from their configs,
  counted on the meta device (no weights are made).

The tiny model's weights are diffusers' initialisation (norm scales 1, shifts 0), as the SDXL
pipeline tests use them; its add_embedding, projections and convolutions are random.
Cross-attention maps come from an attention processor that records diffusers' own
`get_attention_scores` per module (as tests/pyref/make_unet_fixtures.py does).
"""
import json
import os

import torch
from safetensors.torch import save_file
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "tests", "fixtures", "sdxl_tiny")
OUT = os.path.join(ROOT, "tests", "fixtures", "sdxl_unet")
torch.set_num_threads(2)

# SDXL base 1.0's unet/config.json (stabilityai/stable-diffusion-xl-base-1.0), the keys that
# differ from UNet2DConditionModel's defaults; UNetConfig::sdxl() in decorr-unet.
SDXL_UNET = dict(
    sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
# Its vae/config.json: SD 1.x's VAE shape with scaling_factor 0.13025 (VaeConfig::sdxl()).
SDXL_VAE = dict(
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, sample_size=1024,
    scaling_factor=0.13025, force_upcast=True,
)
TIMESTEPS = [999.0, 261.0]
TIME_IDS = [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0], [32.0, 24.0, 2.0, 4.0, 16.0, 16.0]]


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


def meta_params(cls, cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in cls(**cfg).parameters())


def main():
    os.makedirs(OUT, exist_ok=True)
    ref = {}
    unet = UNet2DConditionModel.from_pretrained(os.path.join(TINY, "unet")).eval()
    store = {}
    unet.set_attn_processor({k: Recorder(k[: -len(".processor")], store) for k in unet.attn_processors})
    g = torch.Generator().manual_seed(30)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    text_embeds = torch.randn(2, pooled, generator=g)
    time_ids = torch.tensor(TIME_IDS)
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    with torch.no_grad():
        y = unet(x, torch.tensor(TIMESTEPS), encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        time_proj = unet.add_time_proj(time_ids.flatten())
        aug = unet.add_embedding(torch.cat([text_embeds, time_proj.reshape(2, -1)], dim=-1))
    ref.update({"b2.sample": x, "b2.context": ctx, "b2.text_embeds": text_embeds,
                "b2.time_ids": time_ids, "b2.out": y, "b2.time_proj": time_proj, "b2.aug_emb": aug})
    cross = sorted(k for k in store if k.endswith("attn2"))
    for k in cross:
        ref[f"b2.cross.{k}"] = store[k]
    self_module = "mid_block.attentions.0.transformer_blocks.0.attn1"
    ref[f"b2.self.{self_module}"] = store[self_module]
    print("unet b2", tuple(y.shape), "max |out|", float(y.abs().max()), len(cross), "cross maps")

    vae = AutoencoderKL.from_pretrained(os.path.join(TINY, "vae")).eval()
    z = torch.randn(1, vae.config.latent_channels, 8, 8, generator=g)
    with torch.no_grad():
        img = vae.decode(z).sample
    ref.update({"decode.latent": z, "decode.image": img})
    print("vae decode", tuple(img.shape))

    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(OUT, "reference.safetensors"))
    cases = dict(
        timesteps=TIMESTEPS, time_ids=TIME_IDS, cross_modules=cross, self_module=self_module,
        tiny_unet_params=sum(p.numel() for p in unet.parameters()),
        sdxl_unet_params=meta_params(UNet2DConditionModel, SDXL_UNET),
        sdxl_vae_params=meta_params(AutoencoderKL, SDXL_VAE),
        vae_scaling_factor=vae.config.scaling_factor, vae_force_upcast=vae.config.force_upcast,
    )
    assert cases["sdxl_unet_params"] == 2_567_463_684, cases["sdxl_unet_params"]
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
    print("->", OUT, cases["sdxl_unet_params"], cases["sdxl_vae_params"])


if __name__ == "__main__":
    main()
