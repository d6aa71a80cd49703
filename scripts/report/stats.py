"""The statistics of every table and figure of the project, defined once.

Imported by scripts/report/plot.py and by the inline Python of the
benchmark scripts (scripts/bench-*-nested.sh, scripts/soak-migrate-nested.sh
run it with PYTHONPATH=scripts/report), so a p95 in a README table and in a
figure are the same number.
"""
import math


def pct(values, p):
    """The p-th percentile (0..100) of values, interpolated linearly between
    the closest ranks (numpy's default); NaNs are left out; NaN if nothing
    is left."""
    xs = sorted(x for x in values if not math.isnan(x))
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
