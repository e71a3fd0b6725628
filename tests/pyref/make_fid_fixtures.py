#!/usr/bin/env python3
"""Write the FID reference fixtures (tests/fixtures/fid/) that crates/decorr-eval/tests/fid.rs
compares against. Everything is computed by pytorch-fid 0.3.0 itself: its `InceptionV3([3])`
(the FID Inception network), `calculate_frechet_distance` and the mean / `np.cov` of
`calculate_activation_statistics`. Re-run after changing what is recorded:

    /opt/pyref-venv/bin/pip install torch torchvision pytorch-fid==0.3.0 scipy safetensors pillow
    /opt/pyref-venv/bin/python tests/pyref/make_fid_fixtures.py        # -> tests/fixtures/fid/

pytorch-fid's real weights (pt_inception-2015-12-05-6726825d.pth, 24M parameters) are too big to
commit, so the network gets weights from a formula that the Rust test evaluates bit-identically
(`synthetic_weight` there): tensor number k of the state dict (in state_dict order, without
`fc.*` and `num_batches_tracked`), element i, u = splitmix64(((k + 1) << 32) + i) mapped to
[-1, 1) through f64, then
    conv weights     sqrt(6 / fan_in) * u      (He-uniform, so activations keep their scale)
    bn.weight        1 + 0.1 u
    bn.bias          0.1 u
    bn.running_mean  0.1 u
    bn.running_var   1 + 0.5 |u|
each computed in f64 and rounded once to f32.

Written files:
    small/ large/ big/*.png   synthetic RGB images: 4 of 64x48 (upscaled by the resize),
                              2 of 299x299 (no resize), 1 of 512x384 (downscaled)
    modes/{L,LA,P,RGBA}.png   grey, grey+alpha, palette, RGBA PNGs and PIL's .convert('RGB')
                              of each (modes/*_rgb.png)
    jpeg/*.jpg, jpeg/*_pil.png two of them as JPEG (4:2:0 q90, 4:4:4 q75) and PIL's decoding
    features.safetensors      `features` [7, 2048] f32: InceptionV3([3]) pool features of
                              small/, large/, big/ (sorted names), as get_activations computes them
    params.json               [name, shape] of every weight tensor in state_dict order
    a1.npz a2.npz             dim-16 statistics (np.savez_compressed, f64) and
    b1.npz b2.npz             dim-128 near-singular statistics (eigenvalues down to 1e-9)
    a1_f32_plain.npz          a1 as float32 with np.savez (uncompressed)
    act.npz                   `act` [10, 8] f32 features and their `mu`, `sigma` (f64) as
                              calculate_activation_statistics computes them
    singular.npz              f32 features x1 [20, 64], x2 [100, 64], x3 [30, 64]: FIDs of
                              singular covariances (fewer samples than dimensions)
    partial.pth               a few weight tensors, torch.save (zip format)
    partial_legacy.pth        the same, torch.save(..., _use_new_zipfile_serialization=False)
    reference.json            calculate_frechet_distance values and image names
"""
import json, os, shutil

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file
import torchvision.transforms as TF

import pytorch_fid.inception as pfi
from pytorch_fid.fid_score import calculate_frechet_distance

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "fid")
torch.set_num_threads(2)

M64 = 0xFFFFFFFFFFFFFFFF


def splitmix64(x):
    """splitmix64 on a uint64 array (wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(k, n):
    """n values in [-1, 1) (f64) for tensor number k."""
    seed = np.uint64(((k + 1) << 32) & M64)
    z = splitmix64(seed + np.arange(n, dtype=np.uint64))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0


def synthetic_weight(k, name, shape):
    n = int(np.prod(shape))
    u = uniform(k, n)
    if name.endswith("conv.weight"):
        fan_in = int(np.prod(shape[1:]))
        v = np.sqrt(6.0 / fan_in) * u
    elif name.endswith("bn.weight"):
        v = 1.0 + 0.1 * u
    elif name.endswith("bn.bias") or name.endswith("bn.running_mean"):
        v = 0.1 * u
    elif name.endswith("bn.running_var"):
        v = 1.0 + 0.5 * np.abs(u)
    else:
        raise ValueError(name)
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def wanted(name):
    return not (name.startswith("fc.") or name.endswith("num_batches_tracked"))


def synthetic_state_dict(template):
    names = [n for n in template if wanted(n)]
    sd = {}
    for k, n in enumerate(names):
        sd[n] = synthetic_weight(k, n, tuple(template[n].shape))
    for n, t in template.items():
        if n not in sd:
            sd[n] = t  # fc.*, num_batches_tracked: unused by the features
    return sd, names


# pytorch-fid downloads its weights inside fid_inception_v3(); hand it the synthetic ones.
_MARK = object()
pfi.load_state_dict_from_url = lambda url, progress=True: _MARK
_orig_load = torch.nn.Module.load_state_dict


def _load(self, sd, *a, **kw):
    if sd is _MARK:
        sd, _ = synthetic_state_dict(self.state_dict())
    return _orig_load(self, sd, *a, **kw)


torch.nn.Module.load_state_dict = _load


def images():
    """Deterministic synthetic RGB images as uint8 HxWx3 arrays."""
    small, large = {}, {}
    h, w = 48, 64
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    small["s0_gradient.png"] = np.stack(
        [x / (w - 1) * 255, y / (h - 1) * 255, np.full_like(x, 128)], -1)
    check = ((x // 8 + y // 8) % 2).astype(np.float64)
    small["s1_checker.png"] = np.stack([check * 230 + 10, (1 - check) * 200, check * 90 + 40], -1)
    circ = (((x - 30) ** 2 + (y - 22) ** 2) < 15 ** 2).astype(np.float64)
    small["s2_circle.png"] = np.stack([circ * 255, circ * 240 + 10, 60 + 140 * (1 - circ)], -1)
    small["s3_stripes.png"] = np.stack(
        [127.5 + 127.5 * np.sin((x + y) / 3.0), 127.5 + 127.5 * np.cos(x / 5.0),
         127.5 + 127.5 * np.sin(y / 2.0)], -1)
    H = W = 299
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    r = np.sqrt((x - 150) ** 2 + (y - 140) ** 2)
    large["l0_radial.png"] = np.stack(
        [255 * np.clip(r / 212, 0, 1), 255 * (1 - np.clip(r / 212, 0, 1)), 128 + 100 * np.sin(r / 9)],
        -1)
    sq = ((np.abs(x - 100) < 60) & (np.abs(y - 180) < 40)).astype(np.float64)
    tri = ((y > 40) & (y < 140) & (np.abs(x - 220) < (y - 40) / 2)).astype(np.float64)
    large["l1_shapes.png"] = np.stack(
        [30 + 200 * sq + 20 * tri, 50 + 180 * tri, 200 - 150 * sq + 30 * np.cos(x / 20)], -1)
    big = {}
    y, x = np.mgrid[0:384, 0:512].astype(np.float64)
    big["b0_waves.png"] = np.stack(
        [127.5 + 127.5 * np.sin(x / 7.0 + y / 23.0), 127.5 + 127.5 * np.cos(np.hypot(x - 256, y - 192) / 11.0),
         255 * (((x // 32) + (y // 32)) % 2)], -1)
    conv = lambda d: {k: np.clip(np.round(v), 0, 255).astype(np.uint8) for k, v in d.items()}
    return conv(small), conv(large), conv(big)


def spd(rng, d, eig):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = (q * eig) @ q.T
    return (s + s.T) / 2


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(os.path.join(OUT, "small"))
    os.makedirs(os.path.join(OUT, "large"))
    os.makedirs(os.path.join(OUT, "big"))

    model = pfi.InceptionV3([3])
    model.eval()
    names = [n for n in pfi.fid_inception_v3().state_dict() if wanted(n)]
    full = pfi.fid_inception_v3().state_dict()
    with open(os.path.join(OUT, "params.json"), "w") as f:
        json.dump([[n, list(full[n].shape)] for n in names], f)

    small, large, big = images()
    order = []
    feats = []
    for sub, group in (("small", small), ("large", large), ("big", big)):
        paths = []
        for name in sorted(group):
            p = os.path.join(OUT, sub, name)
            Image.fromarray(group[name], "RGB").save(p)
            paths.append(p)
            order.append(f"{sub}/{name}")
        # As pytorch_fid.fid_score.get_activations: PIL RGB, ToTensor, batch, pool features.
        batch = torch.stack([TF.ToTensor()(Image.open(p).convert("RGB")) for p in paths])
        with torch.no_grad():
            pred = model(batch)[0]
        feats.append(pred.squeeze(3).squeeze(2).numpy())
    feats = np.concatenate(feats).astype(np.float32)
    save_file({"features": feats}, os.path.join(OUT, "features.safetensors"))

    rng = np.random.default_rng(20240611)
    ref = {"images": order,
           "feature_abs_max": float(np.abs(feats).max()),
           "feature_spread": float(np.abs(feats - feats.mean(0)).max())}
    # dim 16, well conditioned
    a = [(rng.standard_normal(16), spd(rng, 16, rng.uniform(0.1, 3.0, 16))) for _ in range(2)]
    # dim 128, near-singular: eigenvalues from 1e-9 to 10
    b = [(rng.standard_normal(128) * 0.5,
          spd(rng, 128, np.logspace(-9, 1, 128)[rng.permutation(128)])) for _ in range(2)]
    for tag, pair in (("a", a), ("b", b)):
        for i, (mu, sigma) in enumerate(pair, 1):
            np.savez_compressed(os.path.join(OUT, f"{tag}{i}.npz"), mu=mu, sigma=sigma)
        ref[f"fid_{tag}"] = float(calculate_frechet_distance(pair[0][0], pair[0][1],
                                                             pair[1][0], pair[1][1]))
        # The symmetric form the Rust code uses, for the record.
        s1, s2 = pair[0][1], pair[1][1]
        w, v = np.linalg.eigh(s1)
        r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        lam = np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
        d = pair[0][0] - pair[1][0]
        ref[f"fid_{tag}_eigh"] = float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum())
    np.savez(os.path.join(OUT, "a1_f32_plain.npz"), mu=a[0][0].astype(np.float32),
             sigma=a[0][1].astype(np.float32))

    act = rng.standard_normal((10, 8)).astype(np.float32) * 3 + 1
    pred_arr = np.empty((10, 8))  # float64, as get_activations
    pred_arr[:] = act
    np.savez_compressed(os.path.join(OUT, "act.npz"), act=act, mu=np.mean(pred_arr, axis=0),
                        sigma=np.cov(pred_arr, rowvar=False))

    # Statistics of fewer samples than dimensions (singular covariances), as small evaluation
    # sets give: x1 (20 x 64) and x3 (30 x 64) singular, x2 (100 x 64) positive definite.
    xs = {f"x{i}": (rng.standard_normal((n, 64)) * rng.uniform(0.1, 2.0, 64) + 0.1 * i)
          .astype(np.float32) for i, n in ((1, 20), (2, 100), (3, 30))}
    np.savez_compressed(os.path.join(OUT, "singular.npz"), **xs)
    st = {k: (np.mean(v.astype(np.float64), axis=0), np.cov(v.astype(np.float64), rowvar=False))
          for k, v in xs.items()}
    for a_, b_ in (("x1", "x2"), ("x2", "x1"), ("x1", "x3")):
        ref[f"fid_{a_}_{b_}"] = float(calculate_frechet_distance(*st[a_], *st[b_]))

    # PNG colour types other than RGB, and PIL's `.convert('RGB')` of each (grey replicated,
    # alpha dropped without compositing, palette expanded).
    os.makedirs(os.path.join(OUT, "modes"))
    base = Image.fromarray(small["s2_circle.png"][:16, 20:36], "RGB")
    alpha = Image.fromarray((np.arange(256).reshape(16, 16)).astype(np.uint8), "L")
    variants = {"L": base.convert("L"), "LA": base.convert("LA"), "P": base.convert("P")}
    rgba = base.copy()
    rgba.putalpha(alpha)
    variants["RGBA"] = rgba
    la = variants["LA"].copy()
    la.putalpha(alpha)
    variants["LA"] = la
    for mode, im in variants.items():
        p = os.path.join(OUT, "modes", f"{mode}.png")
        im.save(p)
        Image.open(p).convert("RGB").save(os.path.join(OUT, "modes", f"{mode}_rgb.png"))

    # JPEG decoding: the image crate (zune-jpeg) against PIL (libjpeg), as `.convert('RGB')`.
    os.makedirs(os.path.join(OUT, "jpeg"))
    for name in ("s2_circle", "s3_stripes"):
        src = Image.open(os.path.join(OUT, "small", name + ".png"))
        for q, sub in ((90, 2), (75, 0)):
            p = os.path.join(OUT, "jpeg", f"{name}_q{q}.jpg")
            src.save(p, quality=q, subsampling=sub)
            Image.open(p).convert("RGB").save(p[:-4] + "_pil.png")

    sd, _ = synthetic_state_dict(full)
    part = {k: sd[k] for k in list(sd) if k.startswith("Conv2d_1a_3x3.")
            or k.startswith("Mixed_5b.branch_pool.")}
    torch.save(part, os.path.join(OUT, "partial.pth"))
    torch.save(part, os.path.join(OUT, "partial_legacy.pth"), _use_new_zipfile_serialization=False)
    ref["partial_keys"] = sorted(part)

    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print(json.dumps({k: v for k, v in ref.items() if k != "images"}, indent=1))


if __name__ == "__main__":
    main()
