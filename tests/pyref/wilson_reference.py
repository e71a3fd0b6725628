#!/usr/bin/env python3
"""Print the Wilson score intervals that `decorr_eval::omission`'s unit tests compare against.

The values come from scipy (`binomtest(...).proportion_ci(method="wilson")`), not from decorr.
They are pasted into the `SCIPY` table of crates/decorr-eval/src/omission.rs (no fixture file:
the table is small). Re-run after changing the cases:

    /opt/pyref-venv/bin/python tests/pyref/wilson_reference.py
"""

from scipy.stats import binomtest, norm

CASES = [(0, 10), (5, 10), (10, 10), (81, 263), (15, 148), (0, 20), (1, 29), (3, 7)]

print(f"Z_95 = {float(norm.ppf(0.975))!r}")
for s, n in CASES:
    ci = binomtest(s, n).proportion_ci(confidence_level=0.95, method="wilson")
    print(f"({s}, {n}, {float(ci.low)!r}, {float(ci.high)!r}),")
