#!/usr/bin/env python3
"""Write the DeBERTa (v1) fixtures that `crates/decorr-eval/tests/deberta.rs` compares against.

Everything is produced by the reference libraries (transformers 5.24's DebertaModel and
DebertaTokenizer, bert_score 0.3.13) on tiny random models, so the Rust tests check parity with
the reference. Deterministic (fixed seeds). Re-run from the repository root:

    HF_HUB_OFFLINE=1 /opt/pyref-venv/bin/python tests/pyref/make_deberta_fixtures.py

Writes under tests/fixtures/deberta/:

- tiny/: a DebertaModel with the switches of microsoft/deberta-xlarge-mnli (relative_attention,
  max_relative_positions -1, pos_att_type c2p+p2c, position_biased_input false, type_vocab_size
  0, gelu, layer_norm_eps 1e-7), hidden 32, 3 layers, 4 heads, max_position_embeddings 24 (so a
  30-token sentence exercises the clamped relative positions). config.json, model.safetensors,
  tokenizer.json + tokenizer_config.json (transformers' save_pretrained) and vocab.json +
  merges.txt (the same byte-level BPE, trained here with the `tokenizers` library).
- tiny_bin/: the same weights as a DebertaForSequenceClassification `pytorch_model.bin`
  (torch.save, `deberta.`-prefixed keys plus pooler/classifier heads and an unused
  `deberta.embeddings.position_embeddings.weight`, as hub checkpoints carry), config.json,
  vocab.json + merges.txt only.
- tiny_abs/: the other switches: position_biased_input true, type_vocab_size 2, pos_att_type
  ["c2p"] only, max_relative_positions 8, embedding_size 16 (embed_proj), relu. Hidden states only.
- reference.json: token ids as bert_score's `sent_encode` makes them, the padded batches, and
  BERTScore P/R/F of `bert_score.score(cands, refs, model_type=tiny/, num_layers=2)`; also with
  the leading space bert_score added under transformers < 4.24 (`bertscore_prefix_space`).
- hidden_<folder>.safetensors: `<batch>.hidden.<l>` for every layer l of transformers'
  `hidden_states` tuple (0 = embeddings), for each padded batch.
"""
import json, os, shutil, sys

# bert_score batches the distinct sentences of a `set`, so its P/R/F move in the last float32
# digit with Python's hash seed: pin it (re-executing once) for byte-identical fixtures.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, [sys.executable] + sys.argv,
              {**os.environ, "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"})
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
import transformers
from transformers import (AutoTokenizer, DebertaConfig, DebertaForSequenceClassification,
                          DebertaModel)
import bert_score
from bert_score.utils import sent_encode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "deberta")
torch.set_num_threads(2)

SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
TRAIN = [
    "a cat sat on the mat", "the dog ran in the park", "rusty tracks with an old train",
    "an old train with rusty tracks", "A photo of an astronaut riding a horse on Mars",
    "two people walking along a beach at sunset", "a red car parked next to a tree",
]
# Leading/trailing whitespace (bert_score strips), capitals, punctuation, unicode, special-token
# text ([MASK] eats the space before it), and one sentence longer than max_position_embeddings.
SENTENCES = [
    "a cat sat on the mat",
    "  the dog ran in the park  ",
    "A photo of an astronaut riding a horse on Mars!",
    "Ünïcödé café 東京 😀 -- (x)",
    "a [MASK] sat on [CLS] the mat",
    "rusty tracks with an old train, an old train with rusty tracks and a cat on the mat",
]
CANDS = ["a cat sat on the mat", "an old train with rusty tracks", "a red car next to a tree"]
REFS = ["the cat sat on a mat", "rusty tracks with an old train", "two people walking on a beach"]

XLARGE_SWITCHES = dict(relative_attention=True, max_relative_positions=-1,
                       pos_att_type=["c2p", "p2c"], position_biased_input=False,
                       type_vocab_size=0, hidden_act="gelu", layer_norm_eps=1e-7)


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN * 3, tr)
    return tok


def perturb(model, seed):
    """Random weights of order-one effect: LayerNorm gains/biases and q/v biases non-trivial,
    projections scaled by 1/sqrt(fan_in) so attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * r)
            elif p.dim() == 1:
                p.copy_(0.2 * r)
            elif "embeddings" in name:
                p.copy_(r)
            else:
                p.copy_(r / p.shape[1] ** 0.5)


def batches(ids_list, pad):
    n = max(len(x) for x in ids_list)
    ids = [x + [pad] * (n - len(x)) for x in ids_list]
    mask = [[1] * len(x) + [0] * (n - len(x)) for x in ids_list]
    return ids, mask


def hidden_states(model, ids, mask):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    return [h.contiguous() for h in out.hidden_states]


def main():
    assert transformers.__version__ == "5.24.0", transformers.__version__
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    tiny, tiny_bin, tiny_abs = (os.path.join(OUT, d) for d in ("tiny", "tiny_bin", "tiny_abs"))
    for d in (tiny, tiny_bin, tiny_abs):
        os.makedirs(d)

    # Tokenizer: vocab.json + merges.txt from the `tokenizers` library, then transformers'
    # DebertaTokenizer loads them and save_pretrained writes tokenizer.json. model_max_length
    # is needed: bert_score passes max_length=model_max_length and transformers 5's default
    # (1e30) overflows the Rust tokenizer's truncation ("int too big to convert").
    trained = train_tokenizer()
    trained.model.save(tiny)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tiny, f), os.path.join(tiny_bin, f))
    vocab_size = trained.get_vocab_size()
    json.dump({"model_max_length": 512}, open(os.path.join(tiny, "tokenizer_config.json"), "w"))
    json.dump({"model_max_length": 512}, open(os.path.join(tiny_bin, "tokenizer_config.json"), "w"))

    torch.manual_seed(0)
    cfg = DebertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=37, max_position_embeddings=24,
                        pad_token_id=0, **XLARGE_SWITCHES)
    model = DebertaModel(cfg).eval()
    perturb(model, 1)
    model.save_pretrained(tiny)  # config.json + model.safetensors
    cfg.save_pretrained(tiny_bin)

    tok = AutoTokenizer.from_pretrained(tiny, use_fast=False)
    assert type(tok).__name__ == "DebertaTokenizer", type(tok)
    tok.save_pretrained(tiny)  # tokenizer.json + tokenizer_config.json (keeps model_max_length)
    tok = AutoTokenizer.from_pretrained(tiny, use_fast=False)
    tok_files = AutoTokenizer.from_pretrained(tiny_bin, use_fast=False)
    tokens = [sent_encode(tok, s) for s in SENTENCES]
    assert tokens == [sent_encode(tok_files, s) for s in SENTENCES]

    # The classification checkpoint: same encoder under `deberta.`, plus heads bert_score ignores.
    clf_cfg = DebertaConfig(**{**cfg.to_dict(), "id2label": {0: "a", 1: "b", 2: "c"}})
    clf = DebertaForSequenceClassification(clf_cfg).eval()
    clf.deberta.load_state_dict(model.state_dict())
    sd = {k: v.clone() for k, v in clf.state_dict().items()}
    sd["deberta.embeddings.position_embeddings.weight"] = torch.randn(24, 32)
    torch.save(sd, os.path.join(tiny_bin, "pytorch_model.bin"))

    # Padded batches: bert_score pads with pad_token_id and a 0/1 mask.
    short = [tokens[0], tokens[1], tokens[4]]
    long = [tokens[0], tokens[5], tokens[3]]
    assert max(len(x) for x in long) > cfg.max_position_embeddings
    assert max(len(x) for x in short) < cfg.max_position_embeddings
    ref = {"transformers": transformers.__version__, "bert_score": bert_score.__version__,
           "sentences": SENTENCES, "tokens": tokens, "batches": {}}
    hid = {}
    for name, rows in (("short", short), ("long", long)):
        ids, mask = batches(rows, tok.pad_token_id)
        ref["batches"][name] = {"input_ids": ids, "attention_mask": mask}
        for l, h in enumerate(hidden_states(model, ids, mask)):
            hid[f"{name}.hidden.{l}"] = h
    save_file(hid, os.path.join(OUT, "hidden_tiny.safetensors"))

    # The other switches.
    torch.manual_seed(2)
    abs_cfg = DebertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=24,
                            max_position_embeddings=40, relative_attention=True,
                            max_relative_positions=8, pos_att_type="c2p",
                            position_biased_input=True, type_vocab_size=2, hidden_act="relu",
                            layer_norm_eps=1e-5, embedding_size=16, pad_token_id=0)
    abs_model = DebertaModel(abs_cfg).eval()
    assert abs_model.embeddings.embed_proj is not None
    perturb(abs_model, 3)
    abs_model.save_pretrained(tiny_abs)
    hid = {}
    for name, rows in (("short", short), ("long", long)):
        ids, mask = batches(rows, tok.pad_token_id)
        for l, h in enumerate(hidden_states(abs_model, ids, mask)):
            hid[f"{name}.hidden.{l}"] = h
    save_file(hid, os.path.join(OUT, "hidden_tiny_abs.safetensors"))
    for dirpath, _, files in os.walk(OUT):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)

    # End-to-end BERTScore (no idf, no baseline rescaling) at layer 2.
    P, R, F = bert_score.score(CANDS, REFS, model_type=tiny, num_layers=2, batch_size=2)
    ref["bertscore"] = {"model": "tiny", "num_layers": 2, "idf": False, "cands": CANDS,
                        "refs": REFS, "P": P.tolist(), "R": R.tolist(), "F": F.tolist()}
    # Under transformers < 4.24 DebertaTokenizer subclassed GPT2Tokenizer, so bert_score took its
    # GPT-2 branch: encode(sent, add_prefix_space=True), i.e. a leading space. Reproduce that
    # branch (transformers 5 ignores the keyword, so the space is prepended by hand).
    import bert_score.utils as bsu
    plain = bsu.sent_encode
    bsu.sent_encode = lambda tok, sent: (plain(tok, sent) if sent.strip() == "" else tok.encode(
        " " + sent.strip(), add_special_tokens=True, max_length=tok.model_max_length,
        truncation=True))
    P, R, F = bert_score.score(CANDS, REFS, model_type=tiny, num_layers=2, batch_size=2)
    bsu.sent_encode = plain
    ref["bertscore_prefix_space"] = {"P": P.tolist(), "R": R.tolist(), "F": F.tolist()}
    json.dump(ref, open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8"),
              ensure_ascii=False, indent=1)
    print("tokens:", tokens)
    print("bertscore:", ref["bertscore"])


if __name__ == "__main__":
    main()
