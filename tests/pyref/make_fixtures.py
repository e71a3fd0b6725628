#!/usr/bin/env python3
"""Write the reference fixtures that decorr's Rust tests compare against.

Everything here is produced by the reference libraries (transformers' CLIPTokenizer and
CLIPTextModel) on tiny random-init models, so the Rust tests check parity with the reference,
never with decorr's own earlier output. Re-run after changing what is recorded:

    python3 -m venv /opt/pyref-venv        # once, outside the repo
    /opt/pyref-venv/bin/pip install torch transformers safetensors open_clip_torch
    /opt/pyref-venv/bin/python tests/pyref/make_fixtures.py            # -> tests/fixtures/
    /opt/pyref-venv/bin/python tests/pyref/make_fixtures.py --full DIR # full-size SD 1.5 text
                                  # encoder and a short `all` fine-tuning run on it (not committed)

The saved-encoder check (transformers loads what `decorr finetune` wrote) needs the Rust tool:

    cargo run -p decorr-cli -- finetune --prompt "rusty tracks with an old train" --target train \
        --layer 1 --epochs 3 --steps-per-epoch 3 --lr 1e-3 --quiet \
        --weights tests/fixtures/clip_tiny_train --out /tmp/ft --overwrite
    /opt/pyref-venv/bin/python tests/pyref/make_fixtures.py --check-saved /tmp/ft

(the same run as `finetune_writes_every_promised_file_and_reloads` in crates/decorr-cli/tests).

The tokenizer is transformers' CLIPTokenizer built from `assets/clip/` (the embedded vocabulary,
itself rebuilt from open_clip's BPE file by `cargo xtask clip-vocab`).
"""
import argparse, json, os, shutil, sys

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)

# Prompts for tokenizer and encoder fixtures: the paper's pair, punctuation, unicode, repeated
# words, special-token text, whitespace, empty, and one longer than 75 tokens.
PROMPTS = [
    "rusty tracks with an old train",
    "an old train with rusty tracks",
    "A photo of an astronaut riding a horse on Mars!",
    "  Hello,   WORLD's 123 café naïve 🚂 <|endoftext|> x",
    "don't stop-believing... 3.14 -- (red) [blue] {green}",
    "a cat and a dog and a cat",
    "Ünïcödé ﬁ straße 東京 タワー emoji 😀👍",
    "",
    "\t\n  ",
    " ".join(["a very long prompt about trains"] * 20),
]
ENCODER_PROMPTS = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[-1]]

TINY = {
    # vocab 49408 so the real tokenizer feeds it; SD 1.x-like (quick_gelu); weights written in
    # fp16 with the `text_model.` prefix of real SD 1.5 files.
    "clip_tiny_a": dict(config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37,
                                    projection_dim=32, num_hidden_layers=3, num_attention_heads=4,
                                    max_position_embeddings=77, hidden_act="quick_gelu",
                                    layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                                    pad_token_id=1),
                        dtype=torch.float16, prefix="text_model.", vocab_mod=None),
    # SD 2.x-like (gelu), other width/heads/depth; fp32 keys without prefix as transformers 5
    # `save_pretrained` writes them; ids are the real ids modulo the small vocabulary.
    "clip_tiny_b": dict(config=dict(vocab_size=1000, hidden_size=48, intermediate_size=64,
                                    projection_dim=48, num_hidden_layers=2, num_attention_heads=6,
                                    max_position_embeddings=77, hidden_act="gelu",
                                    layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                                    pad_token_id=1),
                        dtype=torch.float32, prefix="", vocab_mod=1000),
}
# For fine-tuning parity: vocab 49408 (real tokenizer, so `decorr finetune` runs on it end to end),
# narrow (16) so the recorded trained weights stay small; 3 layers, training reads layer 1.
TINY_TRAIN = dict(config=dict(vocab_size=49408, hidden_size=16, intermediate_size=24,
                              projection_dim=16, num_hidden_layers=3, num_attention_heads=2,
                              max_position_embeddings=77, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1),
                  dtype=torch.float32, prefix="text_model.", vocab_mod=None)
TRAIN = dict(layer=1, epochs=4, steps_per_epoch=5, lr=5e-5, betas=(0.9, 0.999), eps=1e-8,
             weight_decay=1e-2, tau=0.5,
             prompts=[("rusty tracks with an old train", "train"), ("a photo of a cat with a dog", "dog")])
# Full-size trajectory (`--full DIR`, not committed): the paper's layer 11 and tau, lr 1e-4 so that
# six steps move weights well past the 1e-4 weight tolerance.
FULL_TRAIN = dict(TRAIN, layer=11, epochs=2, steps_per_epoch=3, lr=1e-4, tau=5.0)
FULL_SD15 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                 pad_token_id=1)


def tokenizer():
    return CLIPTokenizer.from_pretrained(os.path.join(ROOT, "assets", "clip"))


def tokenizer_fixture(tok, out):
    rows = []
    for p in PROMPTS:
        full = tok(p, add_special_tokens=False).input_ids
        ids = tok(p, padding="max_length", max_length=77, truncation=True).input_ids
        rows.append({"prompt": p, "ids": ids, "content_tokens": len(full),
                     "tokens": tok.convert_ids_to_tokens(ids[: ids.index(tok.eos_token_id) + 1])})
    meta = {"transformers": transformers.__version__, "class": type(tok).__name__}
    json.dump({"meta": meta, "prompts": rows}, open(out, "w", encoding="utf-8"), ensure_ascii=False, indent=1)


def write_encoder(name, spec, folder, tok, seed=0):
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    cfg = CLIPTextConfig(**spec["config"])
    torch.manual_seed(seed)
    model = CLIPTextModel(cfg).eval()
    cfg.architectures = ["CLIPTextModel"]
    cfg.to_json_file(os.path.join(folder, "config.json"))
    sd = {spec["prefix"] + k: v.to(spec["dtype"]).contiguous() for k, v in model.state_dict().items()}
    fname = "model.fp16.safetensors" if spec["dtype"] == torch.float16 else "model.safetensors"
    save_file(sd, os.path.join(folder, fname), metadata={"format": "pt"})
    # Reference outputs come from the files as written (fp16 rounding included), reloaded in fp32.
    ref_model = CLIPTextModel.from_pretrained(folder, attn_implementation="eager",
                                              dtype=torch.float32,
                                              **({"variant": "fp16"} if fname.startswith("model.fp16") else {})).eval()
    ids = torch.tensor([tok(p, padding="max_length", max_length=77, truncation=True).input_ids
                        for p in ENCODER_PROMPTS], dtype=torch.int64)
    if spec["vocab_mod"]:
        ids = ids % spec["vocab_mod"]
    with torch.no_grad():
        o = ref_model(ids, output_attentions=True, output_hidden_states=True)
    ref = {"input_ids": ids, "last_hidden_state": o.last_hidden_state}
    for i, h in enumerate(o.hidden_states):
        ref[f"hidden_states.{i}"] = h
    for i, a in enumerate(o.attentions):
        ref[f"attentions.{i}"] = a
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(folder, "reference.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__})
    print(name, "->", folder, {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))})


def trains(name, preset, layer):
    """METHOD.md's presets, by transformers parameter name (without `text_model.`)."""
    parts = name.split(".")
    if parts[0] == "final_layer_norm":
        return False
    if parts[:2] == ["encoder", "layers"] and int(parts[2]) > layer:
        return False
    if preset == "all":
        return True
    projs = ["q_proj", "k_proj"] + (["v_proj", "out_proj"] if preset == "attn" else [])
    return any(f".self_attn.{p}." in name + "." for p in projs)


def target_index(tok, prompt, word):
    """Last BPE token of the first occurrence of `word` (METHOD.md's choice)."""
    ids = tok(prompt).input_ids
    wids = tok(word, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(wids) + 1):
        if ids[i:i + len(wids)] == wids:
            return i + len(wids) - 1
    raise ValueError(word)


def head_avg(model, ids, layer):
    return model(ids, output_attentions=True).attentions[layer].mean(1)


def train_reference(folder, tok, preset, out, T=TRAIN):
    """Run METHOD.md's fine-tuning in PyTorch (full 77-token passes) and record its trajectory."""
    model = CLIPTextModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    model.train()  # CLIP has no dropout; train() changes nothing but is what a trainer does
    tm = model  # transformers 5: parameters are named without `text_model.`
    names = {n: p for n, p in tm.named_parameters()}
    for n, p in names.items():
        p.requires_grad_(trains(n, preset, T["layer"]))
    opt = torch.optim.AdamW([p for p in tm.parameters() if p.requires_grad], lr=T["lr"],
                            betas=T["betas"], eps=T["eps"], weight_decay=T["weight_decay"])
    prompts = [p for p, _ in T["prompts"]]
    ids = torch.tensor([tok(p, padding="max_length", max_length=77).input_ids for p in prompts])
    targets = [target_index(tok, p, w) for p, w in T["prompts"]]
    nreal = [tok(p).input_ids.index(tok.eos_token_id) + 1 for p in prompts]
    with torch.no_grad():
        a_pre = head_avg(model, ids, T["layer"])
    corrs = []
    for k, t in enumerate(targets):
        row = a_pre[k, t]
        corrs.append(max(range(1, t), key=lambda s: (row[s].item(), -s)))
    steps, epochs = [], []
    for epoch in range(1, T["epochs"] + 1):
        for _ in range(T["steps_per_epoch"]):
            a = head_avg(model, ids, T["layer"])
            loss = torch.stack([a[k, t, c] - a[k, t, 1:t].min() for k, (t, c) in enumerate(zip(targets, corrs))]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps.append(loss.item())
        with torch.no_grad():
            a = head_avg(model, ids, T["layer"])
        m = dict(l_train=0.0, l_corr=0.0, l_align=0.0, l_val=0.0)
        for k, (t, c) in enumerate(zip(targets, corrs)):
            n = nreal[k]
            lt = (a[k, t, c] - a[k, t, 1:t].min()).item()
            lc = torch.log(a[k, t, c] / a[k, t, t]).item()
            d = (a[k, :n, :n] - a_pre[k, :n, :n]).abs().tril()
            for (i, j) in [(c, c), (t, c), (t, t)]:
                d[i, j] = 0.0
            la = d.max().item()
            for key, v in [("l_train", lt), ("l_corr", lc), ("l_align", la), ("l_val", lc + T["tau"] * la)]:
                m[key] += v / len(prompts)
        epochs.append(m)
    lvals = [e["l_val"] for e in epochs]
    selected = min(range(len(lvals)), key=lambda i: (lvals[i], i)) + 1
    json.dump({"settings": {**T, "params": preset, "targets": targets, "corrs": corrs},
               "step_losses": steps, "epochs": epochs, "selected_epoch": selected,
               "transformers": transformers.__version__, "torch": torch.__version__},
              open(out + ".json", "w"), indent=1)
    trained = {n: p.detach().contiguous() for n, p in names.items() if p.requires_grad}
    save_file(trained, out + ".safetensors")
    print("trained", preset, "selected", selected, "first losses", [round(x, 6) for x in steps[:3]])


def check_saved(folder, tok, out):
    """Load a text encoder that decorr saved, with transformers, and record its outputs."""
    model = CLIPTextModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    ids = torch.tensor([tok(p, padding="max_length", max_length=77).input_ids for p in ENCODER_PROMPTS[:2]])
    with torch.no_grad():
        o = model(ids)
    save_file({"input_ids": ids, "last_hidden_state": o.last_hidden_state.contiguous()}, out,
              metadata={"loaded_by": f"transformers {transformers.__version__} CLIPTextModel.from_pretrained"})
    print("transformers loaded", folder, "->", out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
    ap.add_argument("--full", help="write a full-size SD 1.5 text encoder (random) + references here")
    ap.add_argument("--check-saved", metavar="DIR",
                    help="load DIR/text_encoder (written by decorr finetune) with transformers and record "
                         "its outputs as tests/fixtures/finetune/saved_reload.safetensors")
    args = ap.parse_args()
    tok = tokenizer()
    if args.check_saved:
        check_saved(os.path.join(args.check_saved, "text_encoder"), tok,
                    os.path.join(args.out, "finetune", "saved_reload.safetensors"))
        return
    if args.full:
        enc = os.path.join(args.full, "text_encoder")
        write_encoder("sd15_full", dict(config=FULL_SD15, dtype=torch.float32, prefix="text_model.",
                                        vocab_mod=None), enc, tok)
        train_reference(enc, tok, "all", os.path.join(args.full, "finetune_all"), FULL_TRAIN)
        return
    os.makedirs(args.out, exist_ok=True)
    tokenizer_fixture(tok, os.path.join(args.out, "tokenizer_ids.json"))
    for name, spec in TINY.items():
        write_encoder(name, spec, os.path.join(args.out, name, "text_encoder"), tok)
    train_dir = os.path.join(args.out, "clip_tiny_train")
    write_encoder("clip_tiny_train", TINY_TRAIN, os.path.join(train_dir, "text_encoder"), tok, seed=3)
    os.makedirs(os.path.join(args.out, "finetune"), exist_ok=True)
    for preset in ["all", "attn", "qk"]:
        train_reference(os.path.join(train_dir, "text_encoder"), tok, preset,
                        os.path.join(args.out, "finetune", preset))
    # clip_tiny_a carries transformers' own tokenizer.json (and no vocab.json/merges.txt), so the
    # Rust tests exercise that loading path too; clip_tiny_b has none (embedded vocabulary).
    tdir = os.path.join(args.out, "clip_tiny_a", "tokenizer")
    shutil.rmtree(tdir, ignore_errors=True)
    tok.save_pretrained(tdir)
    for f in os.listdir(tdir):
        if f != "tokenizer.json":
            os.remove(os.path.join(tdir, f))


if __name__ == "__main__":
    main()
