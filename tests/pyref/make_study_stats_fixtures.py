#!/usr/bin/env python3
"""Write the human-study statistics fixture (tests/fixtures/study/stats.json) that
crates/decorr-study/tests/stats_parity.rs compares `decorr_study::stats` against, within 1e-9.

Every expected value comes from the reference packages themselves, not from decorr:
- `mean_std`: numpy `mean` and `std(ddof=1)` (the sample standard deviation);
- `krippendorff`: `krippendorff.alpha(reliability_data=..., level_of_measurement="ordinal")` and
  `"interval"` (raters x units, NaN = missing); cases the package refuses (a one-value domain, no
  unit rated twice) are stored with `"alpha": null` and the package's message;
- `wilcoxon`: `scipy.stats.wilcoxon(x, y)` with its defaults (zero_method="wilcox",
  correction=False, two-sided, method="auto"), plus the p value of every method scipy can be forced
  to (`"exact"`, `"asymptotic"`, and `PermutationMethod()` where len(d) <= 13, where its 2**n sign
  flips are enumerated exhaustively), so each path is checked on its own and the choice `auto`
  makes is checked too (`"auto_method"`: scipy's rule, replayed here and asserted to give auto's p);
- `bootstrap`: an index matrix drawn with numpy (`default_rng(seed).integers(0, n, (B, n))`), the
  resample means `xs[idx].mean(axis=1)` and `np.percentile(means, [2.5, 97.5])` (default linear
  interpolation); `percentile` holds a few more `np.percentile` calls on awkward inputs.

Ratings are integers 1..5 as the study's 5-point scales give; a few cases use per-item mean
ratings (non-integers, so without ties) to reach scipy's exact Wilcoxon distribution. Floats are
written by `json` as shortest round-trip decimals, so the Rust side parses the same f64 values.
Deterministic: re-running rewrites an identical file. Run from the repository root:

    /opt/pyref-venv/bin/pip install scipy krippendorff      # numpy is already there
    /opt/pyref-venv/bin/python tests/pyref/make_study_stats_fixtures.py
"""
import json
import math
import os

import krippendorff
import numpy as np
import scipy
from scipy import stats

OUT = os.path.join("tests", "fixtures", "study", "stats.json")


def fnum(v):
    """A float for JSON: None for NaN (JSON has no NaN)."""
    v = float(v)
    return None if math.isnan(v) else v


def ratings(rng, shape, p_missing=0.0):
    r = rng.integers(1, 6, size=shape).astype(float)
    if p_missing:
        r[rng.random(shape) < p_missing] = np.nan
    return r


def mean_std_cases(rng):
    inputs = [
        [1, 2, 3, 4, 5],
        [3, 3, 3, 3],
        [5, 1],
        [4],
        [2, 4, 4, 4, 5, 5, 7, 9],
        [1.5, 2.25, 3.125, 4.0625],
        ratings(rng, 30).tolist(),
        ratings(rng, 300).tolist(),
        (1e9 + ratings(rng, 50)).tolist(),  # a large offset: a one-pass formula would lose digits
    ]
    out = []
    for xs in inputs:
        a = np.asarray(xs, dtype=np.float64)
        out.append({"xs": [float(v) for v in a], "mean": fnum(a.mean()),
                    "std": fnum(a.std(ddof=1)) if len(a) > 1 else None})
    return out


def krippendorff_cases(rng):
    nan = np.nan
    named = {
        # The package's own docstring examples (Krippendorff 2011, "Computing Krippendorff's alpha").
        "docstring_a": [[nan, nan, nan, nan, nan, 3, 4, 1, 2, 1, 1, 3, 3, nan, 3],
                        [1, nan, 2, 1, 3, 3, 4, 3, nan, nan, nan, nan, nan, nan, nan],
                        [nan, nan, 2, 1, 3, 4, 4, nan, 2, 1, 1, 3, 3, nan, 4]],
        "docstring_b": [[1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
                        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
                        [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
                        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan]],
        # 3 appears only in units rated once: in the value domain, but with no pairable count.
        "unpaired_middle_value": [[1, 5, 3, 1, 5, nan, 2],
                                  [1, 4, nan, 2, 5, 3, 2],
                                  [2, 5, nan, 1, 4, nan, nan]],
        "perfect_agreement": [[1, 2, 3, 4, 5, 2], [1, 2, 3, 4, 5, 2], [1, 2, 3, 4, 5, 2]],
        "systematic_disagreement": [[1, 5, 1, 5, 1, 5], [5, 1, 5, 1, 5, 1]],
        "two_values_only": [[1, 1, 2, 2, 1], [1, 2, 2, 1, 1]],
        "non_contiguous_values": [[1, 1, 5, 5, 4], [1, 2, 5, 4, 4], [2, 1, 5, 5, nan]],
        "two_raters_missing": [[3, 4, nan, 2, 5, 1, 3], [3, 5, 2, nan, 4, 1, 2]],
        # Undefined: the package raises (one value / no unit with two ratings) or divides 0 by 0.
        "all_equal": [[3, 3, 3, 3], [3, 3, 3, nan]],
        "single_rater": [[1, 2, 3, 4, 5]],
        "no_unit_rated_twice": [[1, nan, 3], [nan, 2, nan]],
        "paired_values_equal": [[4, 4, 1, nan], [4, 4, nan, 5]],
    }
    named["random_5x30_missing"] = ratings(rng, (5, 30), 0.2).tolist()
    named["random_3x20"] = ratings(rng, (3, 20)).tolist()
    # Correlated raters (a shared item effect plus noise), as a real study gives.
    base = rng.integers(1, 6, size=60)
    noisy = np.clip(base[None, :] + rng.integers(-1, 2, size=(8, 60)), 1, 5).astype(float)
    noisy[rng.random((8, 60)) < 0.15] = np.nan
    named["correlated_8x60_missing"] = noisy.tolist()
    out = []
    for name, data in named.items():
        case = {"name": name,
                "data": [[None if math.isnan(v) else float(v) for v in row] for row in data]}
        for level in ("ordinal", "interval"):
            try:
                with np.errstate(invalid="ignore"):  # 0 / 0 where all pairable values agree
                    a = krippendorff.alpha(reliability_data=np.asarray(data, dtype=float),
                                           level_of_measurement=level)
                case[level] = fnum(a)
                if case[level] is None:
                    case[level + "_error"] = "nan (zero expected disagreement)"
            except ValueError as e:
                case[level] = None
                case[level + "_error"] = str(e)
        out.append(case)
    return out


def wilcoxon_cases(rng):
    def means(shape):  # per-item mean of 5 raters' 1..5 ratings: non-integers
        return ratings(rng, shape + (5,)).mean(axis=-1)

    def unique_means(n):  # continuous scores without tied |differences| and without zeros
        while True:
            x, y = np.round(rng.normal(3.0, 1.0, n), 6), np.round(rng.normal(3.2, 1.0, n), 6)
            d = np.abs(x - y)
            if np.all(d > 0) and len(np.unique(d)) == n:
                return x, y

    named = {}
    named["exact_n6_all_positive"] = ([5.5, 4.25, 3.0, 4.875, 2.5, 3.125], [1.0, 2.0, 1.5, 3.75, 2.25, 1.0])
    for n in (5, 10, 20, 50):
        named[f"exact_n{n}"] = unique_means(n)
    named["asymptotic_n51_no_ties"] = unique_means(51)
    named["asymptotic_n80_no_ties"] = unique_means(80)
    # 5-point ratings: ties and zeros everywhere.
    named["permutation_n8_ties"] = ([4, 5, 3, 4, 5, 2, 4, 5], [3, 3, 1, 2, 4, 4, 2, 3])
    named["permutation_n10_ties_zeros"] = ([3, 4, 5, 2, 4, 3, 5, 1, 4, 4], [3, 2, 4, 2, 1, 4, 3, 1, 4, 2])
    named["permutation_n13_zero"] = tuple(ratings(rng, (2, 13)))
    named["permutation_n3_one_zero"] = ([2, 4, 5], [2, 1, 1])
    named["exact_n1"] = ([5], [2])
    named["asymptotic_n14_zeros"] = tuple(ratings(rng, (2, 14)))
    named["asymptotic_n30_ties"] = tuple(ratings(rng, (2, 30)))
    # 50 pairs, 3 of them zero differences: len(d) = 50, so auto still looks at ties, not n.
    while True:  # (a draw whose rank sums are not both at their mean, where every method gives 1)
        x, y = unique_means(47)
        if stats.wilcoxon(x, y).pvalue < 0.9:
            break
    named["asymptotic_n50_three_zeros"] = (np.concatenate([x, [2.0, 3.0, 4.0]]),
                                           np.concatenate([y, [2.0, 3.0, 4.0]]))
    # 14 continuous pairs plus zeros: no ties but zeros, len(d) > 13 -> asymptotic.
    x, y = unique_means(12)
    named["asymptotic_n14_no_ties_two_zeros"] = (np.concatenate([x, [1.0, 5.0]]),
                                                 np.concatenate([y, [1.0, 5.0]]))
    # 60 raters' ratings of one method vs the pre-trained model: ties, zeros, n > 50.
    named["asymptotic_n60_ratings"] = (np.clip(ratings(rng, 60) + 1, 1, 5), ratings(rng, 60))
    # Per-item means of 5 raters (steps of 0.2): redrawn until no |difference| ties or is zero.
    # Compared after rounding: float differences such as 3.2 - 2.8 and 3.6 - 3.2 differ in the
    # last bit, which would "untie" them for scipy (and for decorr, which ranks the same floats).
    while True:
        x, y = means((10,)), means((10,))
        d = np.round(np.abs(x - y), 9)
        if np.all(d > 0) and len(np.unique(d)) == len(d):
            named["exact_n10_item_means"] = (x, y)
            break
    out = []
    for name, (x, y) in named.items():
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        res = stats.wilcoxon(x, y)
        d = x - y
        case = {"name": name, "x": [float(v) for v in x], "y": [float(v) for v in y],
                "statistic": fnum(res.statistic), "p_value": fnum(res.pvalue),
                "n_nonzero": int(np.count_nonzero(d))}
        forced = {"exact": fnum(stats.wilcoxon(x, y, method="exact").pvalue),
                  "asymptotic": fnum(stats.wilcoxon(x, y, method="asymptotic").pvalue)}
        if 2 <= len(d) <= 13:  # permutation_test needs two observations
            forced["permutation"] = fnum(stats.wilcoxon(x, y, method=stats.PermutationMethod()).pvalue)
        case["p_forced"] = forced
        # scipy 1.17's rule for method="auto" (scipy/stats/_wilcoxon.py, `_wilcoxon_nd`): len(d)
        # counts the zero differences too.
        nz = np.abs(d[d != 0])
        if len(d) > 50:
            auto = "asymptotic"
        elif len(np.unique(nz)) == len(nz) and len(nz) == len(d):
            auto = "exact"
        elif len(d) <= 13:
            auto = "permutation"
        else:
            auto = "asymptotic"
        assert forced[auto] == case["p_value"], (name, auto, case["p_value"], forced)
        assert name.split("_")[0] == auto, (name, auto)
        case["auto_method"] = auto
        out.append(case)
    return out


def bootstrap_cases(rng):
    out = []
    for n, b, seed in ((12, 200, 17), (7, 50, 3)):
        xs = ratings(rng, n)
        idx = np.random.default_rng(seed).integers(0, n, size=(b, n))
        means = xs[idx].mean(axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        out.append({"xs": [float(v) for v in xs], "indices": idx.tolist(),
                    "means": [float(v) for v in means], "lo": float(lo), "hi": float(hi)})
    return out


def percentile_cases(rng):
    inputs = [
        [3.0],
        [1.0, 2.0],
        [5.0, 1.0, 3.0, 3.0, 2.0],
        ratings(rng, 41).tolist(),
        rng.normal(0.0, 1.0, 200).tolist(),
        rng.normal(1e6, 1.0, 17).tolist(),
    ]
    qs = [0.0, 2.5, 5.0, 25.0, 50.0, 62.5, 97.5, 100.0]
    return [{"values": [float(v) for v in vals], "q": qs,
             "expected": [float(v) for v in np.percentile(np.asarray(vals), qs)]} for vals in inputs]


def main():
    rng = np.random.default_rng(20240517)
    ref = {
        "versions": {"numpy": np.__version__, "scipy": scipy.__version__,
                     "krippendorff": getattr(krippendorff, "__version__", None)
                     or __import__("importlib.metadata").metadata.version("krippendorff")},
        "mean_std": mean_std_cases(rng),
        "krippendorff": krippendorff_cases(rng),
        "wilcoxon": wilcoxon_cases(rng),
        "bootstrap": bootstrap_cases(rng),
        "percentile": percentile_cases(rng),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(ref, f, indent=1, allow_nan=False)
        f.write("\n")
    print(f"wrote {OUT}: versions {ref['versions']}")
    for c in ref["wilcoxon"]:
        print(f"  wilcoxon {c['name']:36s} auto={c['auto_method']:10s} p={c['p_value']!r}")
    for c in ref["krippendorff"]:
        print(f"  alpha {c['name']:28s} ordinal={c['ordinal']!r} interval={c['interval']!r}")


if __name__ == "__main__":
    main()
