"""Writes the tiny random SDXL model (tests/fixtures/sdxl_tiny/, a diffusers folder that
StableDiffusionXLPipeline.from_pretrained loads) and links it as assets/sdxl-tiny/.

Shape, chosen to exercise what SDXL adds over SD 1.x while staying a few MB:
- text_encoder: CLIPTextModel, width 16, 3 layers, 2 heads, quick_gelu (CLIP ViT-L's kind).
- text_encoder_2: CLIPTextModelWithProjection, width 24, 4 layers, 3 heads, gelu, projection 20
  (OpenCLIP bigG's kind; a non-square projection catches a transposed text_projection).
- unet: 3 levels (DownBlock2D, then two cross-attention levels), transformer_layers_per_block
  [1, 1, 2] (the mid block takes the last, 2), linear projections, text_time addition embedding
  (addition_time_embed_dim 8; 6 * 8 + 20 = 68 inputs), cross_attention_dim 16 + 24 = 40.
- vae: factor 2, scaling_factor 0.13025, force_upcast true (SDXL's VAE config values).
- scheduler: SDXL base's EulerDiscreteScheduler config (timestep_spacing leading).
- tokenizer / tokenizer_2: CLIP's BPE (assets/clip); tokenizer_2 pads with "!" as SDXL's does.
- model_index.json: force_zeros_for_empty_prompt true (SDXL base).

Usage: python tests/pyref/make_sdxl_tiny.py   (torch, transformers, diffusers 0.42)
Re-running rewrites the same weights (fixed seeds).
"""
import json
import os
import shutil

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(REPO, "tests", "fixtures", "sdxl_tiny")
ASSET = os.path.join(REPO, "assets", "sdxl-tiny")
CLIP_VOCAB = os.path.join(REPO, "assets", "clip")


def text_encoders():
    torch.manual_seed(10)
    c1 = CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=49408,
                        hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                        num_attention_heads=2, hidden_act="quick_gelu", projection_dim=16,
                        max_position_embeddings=77, layer_norm_eps=1e-5)
    te1 = CLIPTextModel(c1).eval()
    torch.manual_seed(11)
    c2 = CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=49408,
                        hidden_size=24, intermediate_size=40, num_hidden_layers=4,
                        num_attention_heads=3, hidden_act="gelu", projection_dim=20,
                        max_position_embeddings=77, layer_norm_eps=1e-5)
    te2 = CLIPTextModelWithProjection(c2).eval()
    return te1, te2


def unet():
    torch.manual_seed(12)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True, cross_attention_dim=40, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=68,
    ).eval()


def vae():
    torch.manual_seed(13)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=0.13025,
        force_upcast=True,
    ).eval()


def scheduler():
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, prediction_type="epsilon", interpolation_type="linear",
        use_karras_sigmas=False, steps_offset=1, timestep_spacing="leading",
    )


def tokenizer_files(dst, pad):
    os.makedirs(dst, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):  # links, as assets/sd-tiny's: one copy in the repo
        os.symlink(os.path.relpath(os.path.join(CLIP_VOCAB, f), dst), os.path.join(dst, f))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": pad}
    with open(os.path.join(dst, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    cfg = dict(special, add_prefix_space=False, do_lower_case=True, errors="replace",
               model_max_length=77, tokenizer_class="CLIPTokenizer")
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    te1, te2 = text_encoders()
    te1.save_pretrained(os.path.join(OUT, "text_encoder"))
    te2.save_pretrained(os.path.join(OUT, "text_encoder_2"))
    unet().save_pretrained(os.path.join(OUT, "unet"))
    vae().save_pretrained(os.path.join(OUT, "vae"))
    scheduler().save_pretrained(os.path.join(OUT, "scheduler"))
    tokenizer_files(os.path.join(OUT, "tokenizer"), "<|endoftext|>")
    tokenizer_files(os.path.join(OUT, "tokenizer_2"), "!")
    index = {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(OUT, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)

    # The pipeline must load as diffusers loads SDXL.
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(OUT)
    assert pipe.tokenizer_2.pad_token == "!", pipe.tokenizer_2.pad_token

    shutil.rmtree(ASSET, ignore_errors=True)
    os.makedirs(ASSET)
    for entry in sorted(os.listdir(OUT)):
        os.symlink(os.path.join("..", "..", "tests", "fixtures", "sdxl_tiny", entry),
                   os.path.join(ASSET, entry))
    print("wrote", OUT, "and", ASSET)


if __name__ == "__main__":
    main()
