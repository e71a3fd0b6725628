#!/usr/bin/env python3
"""Write tests/fixtures/sdxl_finetune/: PyTorch's fine-tuning trajectory on both text encoders of
the tiny SDXL model (tests/fixtures/sdxl_tiny/), for crates/decorr-trainer/tests/
sdxl_finetune_parity.rs.

The run is make_fixtures.py's reference fine-tuning (its `trains`, `target_index`, `head_avg`
and the loop of its `train_reference`: full 77-token passes, eager attention,
torch.optim.AdamW, its TRAIN settings) with what SDXL changes:
- each encoder with its own tokenizer: `tokenizer/` pads with EOS, `tokenizer_2/` with "!"
  (id 0), so the padded ids are recorded and the Rust test checks its own against them;
- the layer the UNet reads, `hidden_states[-2]` = the output of layer n-2 (0-based): 1 for
  text_encoder (3 layers), 2 for text_encoder_2 (4 layers);
- text_encoder_2 is a CLIPTextModelWithProjection, loaded as one (its parameters are named
  `text_model.*` and `text_projection.weight`). The `all` preset marks the projection trainable,
  as decorr's does, but it is off the loss's graph at layer n-2: it gets no gradient, AdamW
  skips it, and it is recorded under `no_grad` (asserted unchanged here) instead of as trained;
- one prompt, the paper's: "rusty tracks with an old train", target "train".

`max_abs_grad` records each parameter's largest gradient element over the run: the k_proj biases'
are rounding noise (~1e-9; softmax ignores a shift shared by a row's logits, so their true
gradient is zero), which AdamW (eps 1e-8) turns into updates of a fraction of lr whose direction
is the noise's. The Rust test checks that premise from this record before it holds those biases
to a drift bound instead of the 1e-4 it applies to every other trained tensor.

What is stored, per encoder and preset (`{te1,te2}_{all,attn,qk}.{json,safetensors}`): the JSON
of make_fixtures.py (settings, per-step losses, per-epoch numbers, selected epoch) plus the
padded `input_ids`, `no_grad` and `max_abs_grad`, and every trained tensor after the last step,
named without `text_model.`. The one exception is the token table (49408 rows; 3 MB and 4.7 MB
in fp32, over this folder's budget): it is stored as the rows
`embeddings.token_embedding.weight.rows` of the ids `embeddings.token_embedding.weight.ids` =
the prompt's 77 ids (trained rows, and the
pad/EOS rows that only decay) and every 1000th id (rows that only decay). The folder is ~0.2 MB.

Usage (re-runnable; same output each time):
    /root/torch29/bin/python tests/pyref/make_sdxl_finetune_fixtures.py
(torch 2.9 CPU, transformers 5.24, safetensors.)
"""
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (its functions and TRAIN settings, reused as they are)

ROOT = mf.ROOT
TINY = os.path.join(ROOT, "tests", "fixtures", "sdxl_tiny")
OUT = os.path.join(ROOT, "tests", "fixtures", "sdxl_finetune")
PROMPTS = [("rusty tracks with an old train", "train")]
# (fixture prefix, encoder folder, tokenizer folder, model class, layer = n_layers - 2)
ENCODERS = [
    ("te1", "text_encoder", "tokenizer", CLIPTextModel, 1),
    ("te2", "text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection, 2),
]
PRESETS = ["all", "attn", "qk"]
TABLE = "embeddings.token_embedding.weight"
SAMPLE_STRIDE = 1000


def short(name):
    """transformers' parameter name as make_fixtures.py's `trains` and the fixtures spell it."""
    return name.removeprefix("text_model.")


def train_reference(folder, cls, tok, preset, out, T):
    """make_fixtures.train_reference for `cls` (with or without projection), recording the token
    table as sampled rows and the trainable parameters that got no gradient."""
    model = cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    model.train()
    names = {short(n): p for n, p in model.named_parameters()}
    initial = {n: p.detach().clone() for n, p in names.items()}
    for n, p in names.items():
        p.requires_grad_(mf.trains(n, preset, T["layer"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=T["lr"],
                            betas=T["betas"], eps=T["eps"], weight_decay=T["weight_decay"])
    prompts = [p for p, _ in T["prompts"]]
    ids = torch.tensor([tok(p, padding="max_length", max_length=77).input_ids for p in prompts])
    targets = [mf.target_index(tok, p, w) for p, w in T["prompts"]]
    nreal = [tok(p).input_ids.index(tok.eos_token_id) + 1 for p in prompts]
    with torch.no_grad():
        a_pre = mf.head_avg(model, ids, T["layer"])
    corrs = []
    for k, t in enumerate(targets):
        row = a_pre[k, t]
        corrs.append(max(range(1, t), key=lambda s: (row[s].item(), -s)))
    grad_max = {}
    steps, epochs = [], []
    for epoch in range(1, T["epochs"] + 1):
        for _ in range(T["steps_per_epoch"]):
            a = mf.head_avg(model, ids, T["layer"])
            loss = torch.stack([a[k, t, c] - a[k, t, 1:t].min()
                                for k, (t, c) in enumerate(zip(targets, corrs))]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for n, p in names.items():
                if p.grad is not None:
                    grad_max[n] = max(grad_max.get(n, 0.0), p.grad.abs().max().item())
            opt.step()
            steps.append(loss.item())
        with torch.no_grad():
            a = mf.head_avg(model, ids, T["layer"])
        m = dict(l_train=0.0, l_corr=0.0, l_align=0.0, l_val=0.0)
        for k, (t, c) in enumerate(zip(targets, corrs)):
            n = nreal[k]
            lt = (a[k, t, c] - a[k, t, 1:t].min()).item()
            lc = torch.log(a[k, t, c] / a[k, t, t]).item()
            d = (a[k, :n, :n] - a_pre[k, :n, :n]).abs().tril()
            for (i, j) in [(c, c), (t, c), (t, t)]:
                d[i, j] = 0.0
            la = d.max().item()
            for key, v in [("l_train", lt), ("l_corr", lc), ("l_align", la),
                           ("l_val", lc + T["tau"] * la)]:
                m[key] += v / len(prompts)
        epochs.append(m)
    lvals = [e["l_val"] for e in epochs]
    selected = min(range(len(lvals)), key=lambda i: (lvals[i], i)) + 1

    trainable = {n for n, p in names.items() if p.requires_grad}
    got_grad = set(grad_max)
    no_grad = sorted(trainable - got_grad)
    for n in no_grad:  # AdamW skips a parameter whose .grad is None: no update, no decay
        assert torch.equal(names[n].detach(), initial[n]), n
    trained = {n: names[n].detach().contiguous() for n in sorted(got_grad)}
    if TABLE in trained:
        table = trained.pop(TABLE)
        rows = sorted(set(ids.flatten().tolist()) | set(range(0, table.shape[0], SAMPLE_STRIDE)))
        trained[TABLE + ".ids"] = torch.tensor(rows, dtype=torch.int64)
        trained[TABLE + ".rows"] = table[rows].contiguous()
    json.dump({"settings": {**T, "params": preset, "targets": targets, "corrs": corrs},
               "input_ids": ids.tolist(), "no_grad": no_grad,
               "max_abs_grad": dict(sorted(grad_max.items())),
               "step_losses": steps, "epochs": epochs, "selected_epoch": selected,
               "transformers": transformers.__version__, "torch": torch.__version__},
              open(out + ".json", "w"), indent=1)
    save_file(trained, out + ".safetensors")
    os.chmod(out + ".safetensors", 0o644)  # save_file creates it owner-only
    print(os.path.basename(out), "selected", selected, "no_grad", no_grad,
          "first losses", [round(x, 6) for x in steps[:3]])


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    for prefix, enc, tokdir, cls, layer in ENCODERS:
        tok = CLIPTokenizer.from_pretrained(os.path.join(TINY, tokdir))
        n_layers = json.load(open(os.path.join(TINY, enc, "config.json")))["num_hidden_layers"]
        assert layer == n_layers - 2, (enc, n_layers)
        T = dict(mf.TRAIN, layer=layer, prompts=PROMPTS)
        for preset in PRESETS:
            train_reference(os.path.join(TINY, enc), cls, tok, preset,
                            os.path.join(OUT, f"{prefix}_{preset}"), T)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print("wrote", OUT, f"{total / 1e6:.2f} MB")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
