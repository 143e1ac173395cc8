"""``PERCENTILE<p>``: the p-th percentile of |x| (zeros included), read off the histogram
with linear interpolation inside the bin; ``MAXP`` is PERCENTILE99.995."""

from __future__ import annotations

import numpy as np

from calibrator.quant.estimators.base import HISTOGRAM, Estimator, TensorStats
from calibrator.quant.kl import NUM_BINS

MAXP_PERCENTILE = 99.995


def percentile(stats: TensorStats, p: float) -> float:
    if stats.hist is None or stats.absmax <= 0:
        return stats.absmax
    total = stats.zeros + int(stats.hist.sum())
    target = p / 100.0 * total - stats.zeros
    if target <= 0:
        return 0.0
    cumulative = np.cumsum(stats.hist)
    index = int(np.searchsorted(cumulative, target))
    index = min(index, NUM_BINS - 1)
    before = cumulative[index - 1] if index else 0
    inside = stats.hist[index]
    fraction = (target - before) / inside if inside else 1.0
    return float((index + min(max(fraction, 0.0), 1.0)) * stats.absmax / NUM_BINS)


class Percentile(Estimator):
    needs = frozenset({HISTOGRAM})

    def __init__(self, p: float, name: str | None = None):
        self.p = float(p)
        self.name = name or f"PERCENTILE{self.p:g}"
        self.description = f"the {self.p:g}th percentile of |x|"

    def estimate(self, stats: TensorStats, bits: int) -> float:
        return percentile(stats, self.p)


def maxp() -> Percentile:
    return Percentile(MAXP_PERCENTILE, "MAXP")
