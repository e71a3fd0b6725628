#!/usr/bin/env python3
"""Write the `torch.randn` reference fixtures for `decorr_pipeline::rng` (tests/fixtures/rng/*.json).

Every number here comes from PyTorch itself: `torch.randn(shape, generator=g, dtype=torch.float32)`
on the CPU with `g = torch.Generator("cpu").manual_seed(seed)`, which is what diffusers'
`randn_tensor` calls for the initial latents and for ancestral-sampler noise. The Rust tests in
crates/decorr-pipeline/tests/rng.rs compare `TorchGenerator` against them bit for bit. Run from the
repository root (deterministic: re-running rewrites identical files):

    /opt/pyref-venv/bin/python tests/pyref/make_rng_fixtures.py

(the venv needs torch, numpy and diffusers 0.42; no network access is used; the CPU must have AVX2).

PyTorch has two CPU kernels for float32 `normal_` on a contiguous tensor of >= 16 elements: the AVX2
one (`normal_fill_AVX2`, Cephes-style vector log/sincos), which x86-64 builds use on every CPU with
AVX2 (AVX-512 machines too: `normal_stub` has no AVX-512 variant), and the scalar one
(`normal_fill`, libm `logf`/`cosf`/`sinf`), used by the DEFAULT capability. Each kernel is run in a
child process with `ATEN_CPU_CAPABILITY` forcing it (`avx2`, `default`); the child checks that the
capability took effect. Tensors of < 16 elements take a third path (float64 Box-Muller with a cached
second value), the same under both capabilities.

Files:
- `avx2_sizes.json`: for each seed, `randn(n)` for small sizes, and the SD 1.5 / SDXL latents
  (1x4x64x64, 1x4x128x128) as head/tail/sum/hash;
- `avx2_sequences.json`: several consecutive draws on one generator (the state, including the cached
  Box-Muller value of the < 16 path, carries over), and a re-seed in the middle;
- `diffusers_batch.json`: diffusers' `randn_tensor((2, 4, 8, 8))` with a list of generators
  `[seed, seed + 1]` and with one generator for the batch;
- `scalar_sizes.json`: like `avx2_sizes.json` (fewer seeds) for the DEFAULT-capability kernel.

A draw is stored as `{"n", "values"}` (all values) when n <= 256, else as `{"n", "head", "tail",
"sum", "fnv1a"}`: the first and last 64 values, the exactly rounded float64 sum of all values
(`math.fsum`) and the 64-bit FNV-1a hash of their float32 bit patterns (little-endian bytes), so a
single differing bit anywhere is caught. Values are the shortest decimal strings that round-trip
their float32 (the Rust side parses them with `str::parse::<f32>`, which is exact).
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch

OUT = os.path.join("tests", "fixtures", "rng")
FULL_MAX = 256
HEAD = 64
SEEDS = [0, 1, 42, 2**32 + 5, 2**63 - 1, 2**64 - 1]
SIZES = [1, 2, 3, 15, 16, 17, 33, 4 * 8 * 8]
LATENTS = {"sd15": (1, 4, 64, 64), "sdxl": (1, 4, 128, 128)}
SEQUENCES = [[7, 300], [300, 5], [3, 300, 1, 2], [1, 1, 1, 1, 1], [17, 16, 15]]
SEQUENCE_SEEDS = [0, 42]
SCALAR_SEEDS = [0, 42]
SCALAR_SIZES = [1, 3, 16, 17, 33, 4 * 8 * 8]
BATCH_SHAPE = (2, 4, 8, 8)
BATCH_SEEDS = [42]


def f32_str(v):
    return np.format_float_positional(np.float32(v), unique=True, trim="-")


def fnv1a(a):
    h = 0xCBF29CE484222325
    for b in a.astype("<f4").tobytes():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def record(t):
    a = t.detach().reshape(-1).numpy().astype(np.float32)
    strs = [f32_str(v) for v in a]
    for s, v in zip(strs, a):
        assert np.float32(s).view(np.uint32) == v.view(np.uint32), (s, v)
    if a.size <= FULL_MAX:
        return {"n": int(a.size), "values": strs}
    return {
        "n": int(a.size),
        "head": strs[:HEAD],
        "tail": strs[-HEAD:],
        "sum": math.fsum(float(v) for v in a),
        "fnv1a": fnv1a(a),
    }


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def randn(shape, g):
    return torch.randn(shape, generator=g, dtype=torch.float32)


def check_shapes():
    """The kernels fill the contiguous buffer linearly: any shape with n elements gives randn(n)."""
    for shape in [(2, 3, 5), (1, 4, 2, 2), (3, 1, 7), (2, 4, 8, 8)]:
        n = math.prod(shape)
        assert torch.equal(randn(shape, gen(7)).reshape(-1), randn(n, gen(7))), shape


def sizes(seeds, sizes_):
    out = []
    for seed in seeds:
        case = {"seed": seed, "draws": [record(randn(n, gen(seed))) for n in sizes_]}
        for name, shape in LATENTS.items():
            case[name] = {"shape": list(shape), **record(randn(shape, gen(seed)))}
        out.append(case)
    return out


def sequences():
    out = []
    for seed in SEQUENCE_SEEDS:
        for seq in SEQUENCES:
            g = gen(seed)
            out.append({"seed": seed, "draws": [record(randn(n, g)) for n in seq]})
        # manual_seed drops the cached Box-Muller value: 3 (caches one), re-seed, 2.
        g = gen(seed)
        randn(3, g)
        g.manual_seed(seed)
        out.append({"seed": seed, "reseed_after_3": record(randn(2, g))})
    return out


def diffusers_batch():
    from diffusers.utils.torch_utils import randn_tensor

    out = []
    for seed in BATCH_SEEDS:
        listed = randn_tensor(BATCH_SHAPE, generator=[gen(seed), gen(seed + 1)], dtype=torch.float32)
        single = randn_tensor(BATCH_SHAPE, generator=gen(seed), dtype=torch.float32)
        out.append(
            {
                "seed": seed,
                "shape": list(BATCH_SHAPE),
                "generator_list": record(listed),
                "one_generator": record(single),
            }
        )
    return out


def worker(kernel):
    cap = torch.backends.cpu.get_cpu_capability()
    want = {"avx2": "AVX2", "default": "DEFAULT"}[kernel]
    if cap != want:
        sys.exit(f"ATEN_CPU_CAPABILITY={kernel} gave capability {cap}; this CPU cannot run that kernel")
    check_shapes()
    meta = {"torch": torch.__version__, "cpu_capability": cap}
    if kernel == "avx2":
        import diffusers

        meta["diffusers"] = diffusers.__version__
        files = {
            "avx2_sizes.json": {**meta, "cases": sizes(SEEDS, SIZES)},
            "avx2_sequences.json": {**meta, "cases": sequences()},
            "diffusers_batch.json": {**meta, "cases": diffusers_batch()},
        }
    else:
        files = {"scalar_sizes.json": {**meta, "cases": sizes(SCALAR_SEEDS, SCALAR_SIZES)}}
    json.dump(files, sys.stdout)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return
    os.makedirs(OUT, exist_ok=True)
    for kernel in ["avx2", "default"]:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel}
        done = subprocess.run(
            [sys.executable, __file__, "--worker", kernel], env=env, check=True, stdout=subprocess.PIPE
        )
        for name, content in json.loads(done.stdout).items():
            path = os.path.join(OUT, name)
            with open(path, "w") as f:
                json.dump(content, f, separators=(",", ":"))
                f.write("\n")
            print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
