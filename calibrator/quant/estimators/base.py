"""The Estimator contract and the statistics it reads.

An estimator turns the statistics of one tensor (:class:`TensorStats`) into a threshold T,
the largest |x| that keeps its own integer (scale = qmax / T). Like the observers of
``torch.ao.quantization``, each is a small object that declares the statistics it needs
(``needs``: the calibration collects only those) and keeps the shared threshold rules in
this base class: a tensor that is all zero gets T = 0 (scale 1), an estimate that is not a
positive finite number falls back to max|x|, and T never exceeds max|x|."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: statistics the first pass always gathers: min, max, max|x|, per-batch max|x|, zeros
BASIC = "basic"
#: the int64 histogram of |x| over [0, max|x|] (a second pass over the batches)
HISTOGRAM = "histogram"


@dataclass
class TensorStats:
    """What the passes over the calibration batches learn about a tensor."""

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


def levels(bits: int) -> int:
    """Quantization levels on one side of zero: 128 for 8 bits."""
    return 2 ** (bits - 1)


class Estimator:
    """Base: T = max|x| (subclasses override :meth:`estimate`)."""

    name = ""
    description = ""
    needs: frozenset[str] = frozenset({BASIC})

    def estimate(self, stats: TensorStats, bits: int) -> float:
        """The raw estimate; :meth:`threshold` applies the shared rules."""
        return stats.absmax

    def threshold(self, stats: TensorStats, bits: int = 8) -> float:
        """T for ``stats``: never negative, never NaN, never above max|x|; cached."""
        key = (self.name, bits)
        if key not in stats.thresholds:
            stats.thresholds[key] = self._threshold(stats, bits)
        return stats.thresholds[key]

    def _threshold(self, stats: TensorStats, bits: int) -> float:
        if stats.absmax <= 0 or not np.isfinite(stats.absmax):
            return 0.0
        if HISTOGRAM in self.needs and stats.hist is None:
            raise ValueError(f"{self.name} needs the histogram of the tensor")
        value = float(self.estimate(stats, bits))
        if not np.isfinite(value) or value <= 0:
            return stats.absmax
        return min(value, stats.absmax)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
