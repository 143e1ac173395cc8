"""``MSE``: the threshold minimising the expected squared quantization error over the
histogram (rounding error step^2/12 inside the range, clipping error outside), every bin
edge a candidate; vectorised over the candidates."""

from __future__ import annotations

import numpy as np

from calibrator.quant.estimators.base import HISTOGRAM, Estimator, TensorStats
from calibrator.quant.kl import NUM_BINS


class MeanSquaredError(Estimator):
    name = "MSE"
    description = "least expected squared quantization error over the |x| histogram"
    needs = frozenset({HISTOGRAM})

    def estimate(self, stats: TensorStats, bits: int) -> float:
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
