"""Range estimators: a threshold T (the largest |x| that keeps its own integer) from the
statistics of one tensor. Each is a small function of :class:`TensorStats`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from calibrator.errors import CalibratorError
from calibrator.quant.kl import NUM_BINS, kl_threshold

MAXP_PERCENTILE = 99.995
MA_MOMENTUM = 0.5


@dataclass
class TensorStats:
    """What one pass over the calibration batches learns about a tensor."""

    absmax: float = 0.0
    minimum: float = float("inf")
    maximum: float = float("-inf")
    count: int = 0
    zeros: int = 0
    batch_absmax: list[float] = field(default_factory=list)
    hist: np.ndarray | None = None  # int64 counts of |x| over [0, absmax], zeros skipped
    thresholds: dict = field(default_factory=dict, repr=False)  # (estimator, bits) -> T

    @property
    def unsigned(self) -> bool:
        return self.minimum >= 0

    def to_json(self) -> dict:
        return {"absmax": self.absmax, "min": self.minimum, "max": self.maximum,
                "count": self.count, "zeros": self.zeros}


def _levels(bits: int) -> int:
    return 2 ** (bits - 1)


def direct(stats: TensorStats, bits: int = 8) -> float:
    return stats.absmax


def kl(stats: TensorStats, bits: int = 8) -> float:
    if stats.hist is None:
        raise ValueError("KL needs a histogram")
    return kl_threshold(torch.from_numpy(stats.hist), stats.absmax, _levels(bits))


def percentile(stats: TensorStats, p: float) -> float:
    """The p-th percentile of |x| (zeros included), read off the histogram with linear
    interpolation inside the bin."""
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


def maxp(stats: TensorStats, bits: int = 8) -> float:
    return percentile(stats, MAXP_PERCENTILE)


def moving_average(stats: TensorStats, bits: int = 8) -> float:
    """Running average (momentum 0.5) of the per-batch max |x|."""
    if not stats.batch_absmax:
        return stats.absmax
    value = stats.batch_absmax[0]
    for batch in stats.batch_absmax[1:]:
        value = MA_MOMENTUM * value + (1 - MA_MOMENTUM) * batch
    return float(value)


def mse(stats: TensorStats, bits: int = 8) -> float:
    """The threshold minimising the expected squared quantization error over the histogram
    (rounding error step^2/12 inside the range, clipping error outside), every bin edge a
    candidate; vectorised over candidates."""
    if stats.hist is None or stats.absmax <= 0:
        return stats.absmax
    qmax = 2 ** (bits - 1) - 1
    width = stats.absmax / NUM_BINS
    centers = (np.arange(NUM_BINS) + 0.5) * width
    counts = stats.hist.astype(np.float64)
    thresholds = np.arange(1, NUM_BINS + 1) * width                     # candidates
    step = thresholds / qmax
    clipped = np.clip(centers[None, :] - thresholds[:, None], 0, None) ** 2
    inside = (centers[None, :] <= thresholds[:, None]) * (step[:, None] ** 2 / 12.0)
    error = ((clipped + inside) * counts[None, :]).sum(1)
    return float(thresholds[int(np.argmin(error))])


ESTIMATORS = {"DIRECT": direct, "KL": kl, "MAXP": maxp, "MA": moving_average, "MSE": mse}


def parse_estimator(name: str) -> str:
    """Validate an estimator name: DIRECT, KL, MAXP, MA, MSE or PERCENTILE<p> (e.g.
    PERCENTILE99.99)."""
    upper = name.upper()
    if upper in ESTIMATORS:
        return upper
    if upper.startswith("PERCENTILE"):
        try:
            p = float(upper[len("PERCENTILE"):].lstrip(":=") or "99.99")
        except ValueError:
            p = -1
        if 0 < p <= 100:
            return f"PERCENTILE{p:g}"
    raise CalibratorError(f"unknown range estimator '{name}' (use DIRECT, KL, MAXP, MA, MSE "
                          "or PERCENTILE<p>, e.g. PERCENTILE99.99)")


def threshold(stats: TensorStats, estimator: str, bits: int = 8) -> float:
    """T for ``stats`` by the named estimator; never negative, never NaN."""
    name = parse_estimator(estimator)
    if (name, bits) in stats.thresholds:
        return stats.thresholds[(name, bits)]
    stats.thresholds[(name, bits)] = value = _compute_threshold(stats, name, bits)
    return value


def _compute_threshold(stats: TensorStats, name: str, bits: int) -> float:
    if stats.absmax <= 0 or not np.isfinite(stats.absmax):
        return 0.0
    if name.startswith("PERCENTILE"):
        value = percentile(stats, float(name[len("PERCENTILE"):]))
    else:
        value = ESTIMATORS[name](stats, bits)
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        return stats.absmax
    return min(value, stats.absmax)
