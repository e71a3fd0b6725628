#!/usr/bin/env python3
"""Write the SDXL text-encoder fixtures that crates/decorr-clip/tests/sdxl.rs compares against.

Everything recorded here comes from the reference libraries (transformers' CLIPTokenizer,
CLIPTextModel, CLIPTextModelWithProjection; diffusers' StableDiffusionXLPipeline.encode_prompt)
run on the tiny random SDXL model of tests/fixtures/sdxl_tiny/ (tests/pyref/make_sdxl_tiny.py),
never on decorr's own output. Output, in tests/fixtures/sdxl_clip/ (about 1.5 MB):

- tokens.json: the prompts, both tokenizers' 77 ids for each (tokenizer_2 pads with "!", id 0),
  the pooling position transformers picks for each row of encoder 2, the parameter counts of the
  full-size SDXL base encoders (built on the meta device, nothing allocated) and the versions used.
- reference.safetensors (fp32, ids i64), for ENCODER_PROMPTS, per encoder `te1.` / `te2.`:
  input_ids, attentions.{layer} (every layer, [batch, heads, 77, 77]), hidden_states.-2 and
  hidden_states.-3 (what SDXL conditions on without / with clip_skip=1: outputs of a layer, no
  final layer norm), last_hidden_state; for encoder 2 also pooler_output and text_embeds (the
  pooled output times text_projection). Then diffusers' own encode_prompt results:
  prompt_embeds / pooled_prompt_embeds, and the same with clip_skip=1 (`.clip_skip_1`).

Re-run (rewrites the same files: the weights are fixed, no randomness here):

    /root/torch29/bin/python tests/pyref/make_sdxl_clip_fixtures.py

Checking a text encoder 2 that decorr saved (save_text_encoder) loads in transformers as
CLIPTextModelWithProjection, with no missing or unexpected key, and gives the fixture's outputs:

    DECORR_SDXL_SAVED=/tmp/te2 cargo test -p decorr-clip --test sdxl save
    /root/torch29/bin/python tests/pyref/make_sdxl_clip_fixtures.py --check-saved /tmp/te2
"""
import argparse
import json
import os
import sys

import torch
import transformers
import diffusers
from safetensors.torch import save_file
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "tests", "fixtures", "sdxl_tiny")
OUT = os.path.join(ROOT, "tests", "fixtures", "sdxl_clip")
torch.set_num_threads(2)

# Encoder prompts: the paper's prompt, punctuation and capitals, and one longer than 75 tokens
# (truncated: the EOS and so the pooling position is the last of the 77).
ENCODER_PROMPTS = [
    "rusty tracks with an old train",
    "A photo of an astronaut riding a horse on Mars!",
    " ".join(["a very long prompt about trains"] * 20),
]
# Tokenizer-only prompts besides those: the empty prompt (SDXL's default negative prompt),
# exclamation marks (tokenizer_2's pad token "!" is special, so split out of words before BPE),
# a prompt spelling the EOS token, unicode.
TOKEN_PROMPTS = ENCODER_PROMPTS + [
    "",
    "wow!! a!b ?! hi!!!there 😀!",
    "  Hello,   WORLD's 123 café naïve 🚂 <|endoftext|> x",
    "Ünïcödé ﬁ straße 東京 タワー emoji 😀👍",
]

# SDXL base 1.0's text_encoder / text_encoder_2 config.json values (stabilityai/
# stable-diffusion-xl-base-1.0): CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with its projection.
SDXL_TE1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                pad_token_id=1)
SDXL_TE2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                pad_token_id=1)


def param_count(cls, cfg):
    """Parameters of the full-size model, built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = cls(CLIPTextConfig(**cfg))
    return sum(p.numel() for p in model.parameters())


def ids_of(tok, prompts):
    return [tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
            for p in prompts]


def pooling_position(model, ids):
    """transformers' CLIPTextModel rule: argmax of the ids for the legacy eos_token_id 2, else
    the first position of eos_token_id."""
    ids = torch.tensor(ids)
    if model.config.eos_token_id == 2:
        return ids.argmax(dim=-1).tolist()
    return (ids == model.config.eos_token_id).int().argmax(dim=-1).tolist()


def encoder_reference(prefix, model, ids, ref):
    n = model.config.num_hidden_layers
    with torch.no_grad():
        o = model(torch.tensor(ids), output_attentions=True, output_hidden_states=True)
    # hidden_states: the embeddings then every layer's output, the last one before the final
    # layer norm; checked here so that the recorded `-2` means what SDXL reads.
    assert len(o.hidden_states) == n + 1, len(o.hidden_states)
    assert len(o.attentions) == n, len(o.attentions)
    normed = model.text_model.final_layer_norm if hasattr(model, "text_model") else model.final_layer_norm
    assert torch.allclose(normed(o.hidden_states[-1]), o.last_hidden_state, atol=1e-6)
    ref[f"{prefix}.input_ids"] = torch.tensor(ids, dtype=torch.int64)
    for i, a in enumerate(o.attentions):
        ref[f"{prefix}.attentions.{i}"] = a
    ref[f"{prefix}.hidden_states.-2"] = o.hidden_states[-2]
    ref[f"{prefix}.hidden_states.-3"] = o.hidden_states[-3]
    ref[f"{prefix}.last_hidden_state"] = o.last_hidden_state
    if hasattr(o, "text_embeds"):
        ref[f"{prefix}.text_embeds"] = o.text_embeds
        with torch.no_grad():
            pooled = model.text_model(torch.tensor(ids)).pooler_output
        ref[f"{prefix}.pooler_output"] = pooled
        assert torch.allclose(model.text_projection(pooled), o.text_embeds, atol=1e-6)


def pipeline_reference(ref):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(TINY)
    pipe.text_encoder.set_attn_implementation("eager")
    pipe.text_encoder_2.set_attn_implementation("eager")
    for skip, suffix in ((None, ""), (1, ".clip_skip_1")):
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(
                ENCODER_PROMPTS, device="cpu", num_images_per_prompt=1,
                do_classifier_free_guidance=False, clip_skip=skip)
        ref[f"prompt_embeds{suffix}"] = embeds
        ref[f"pooled_prompt_embeds{suffix}"] = pooled
    return pipe


def main():
    os.makedirs(OUT, exist_ok=True)
    tok1 = CLIPTokenizer.from_pretrained(os.path.join(TINY, "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(os.path.join(TINY, "tokenizer_2"))
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0, (tok2.pad_token, tok2.pad_token_id)
    te1 = CLIPTextModel.from_pretrained(os.path.join(TINY, "text_encoder"),
                                        attn_implementation="eager").eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(TINY, "text_encoder_2"),
                                                      attn_implementation="eager").eval()

    ids1, ids2 = ids_of(tok1, TOKEN_PROMPTS), ids_of(tok2, TOKEN_PROMPTS)
    rows = [{"prompt": p, "tokenizer": a, "tokenizer_2": b, "pool_2": pos}
            for p, a, b, pos in zip(TOKEN_PROMPTS, ids1, ids2, pooling_position(te2, ids2))]
    presets = {
        "sdxl-text-encoder": param_count(CLIPTextModel, SDXL_TE1),
        "sdxl-text-encoder-2": param_count(CLIPTextModelWithProjection, SDXL_TE2),
    }
    meta = {"transformers": transformers.__version__, "diffusers": diffusers.__version__,
            "torch": torch.__version__, "script": "tests/pyref/make_sdxl_clip_fixtures.py"}
    with open(os.path.join(OUT, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "encoder_prompts": len(ENCODER_PROMPTS), "param_counts": presets,
                   "prompts": rows}, f, ensure_ascii=False, indent=1)

    ref = {}
    n = len(ENCODER_PROMPTS)
    encoder_reference("te1", te1, ids1[:n], ref)
    encoder_reference("te2", te2, ids2[:n], ref)
    pipeline_reference(ref)
    # The pipeline's context is the two penultimate states side by side, its pooled embedding
    # encoder 2's text_embeds: the decomposition the Rust test relies on.
    cat = torch.cat([ref["te1.hidden_states.-2"], ref["te2.hidden_states.-2"]], dim=-1)
    assert torch.allclose(cat, ref["prompt_embeds"], atol=1e-6)
    assert torch.allclose(ref["te2.text_embeds"], ref["pooled_prompt_embeds"], atol=1e-6)
    # One metadata key: safetensors writes several in random order, and a re-run should
    # rewrite the same bytes (the versions are in tokens.json).
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(OUT, "reference.safetensors"),
              metadata={"format": "pt"})
    sizes = {f: os.path.getsize(os.path.join(OUT, f)) for f in sorted(os.listdir(OUT))}
    print("wrote", OUT, sizes, "param counts", presets)


def check_saved(folder):
    """A decorr-saved encoder 2 loads as CLIPTextModelWithProjection with every key used and
    gives the fixture model's outputs."""
    model, info = CLIPTextModelWithProjection.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading {folder}: {bad}"
    ref = CLIPTextModelWithProjection.from_pretrained(os.path.join(TINY, "text_encoder_2"),
                                                      attn_implementation="eager").eval()
    tok = CLIPTokenizer.from_pretrained(os.path.join(TINY, "tokenizer_2"))
    ids = torch.tensor(ids_of(tok, ENCODER_PROMPTS))
    with torch.no_grad():
        a, b = model.eval()(ids), ref(ids)
    diff = max((a.text_embeds - b.text_embeds).abs().max().item(),
               (a.last_hidden_state - b.last_hidden_state).abs().max().item())
    assert diff <= 1e-6, diff
    print(f"{folder}: loads as CLIPTextModelWithProjection, no missing/unexpected keys, "
          f"max abs diff {diff:.1e}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-saved", metavar="DIR",
                    help="check a text_encoder_2 folder written by decorr's save_text_encoder")
    args = ap.parse_args()
    if args.check_saved:
        check_saved(args.check_saved)
    else:
        main()
    sys.exit(0)
