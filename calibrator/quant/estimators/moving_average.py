"""``MA``: the running average (momentum 0.5) of the per-batch max |x|."""

from __future__ import annotations

from calibrator.quant.estimators.base import Estimator, TensorStats

MA_MOMENTUM = 0.5


class MovingAverage(Estimator):
    name = "MA"
    description = "running average (momentum 0.5) of the per-batch max |x|"

    def estimate(self, stats: TensorStats, bits: int) -> float:
        if not stats.batch_absmax:
            return stats.absmax
        value = stats.batch_absmax[0]
        for batch in stats.batch_absmax[1:]:
            value = MA_MOMENTUM * value + (1 - MA_MOMENTUM) * batch
        return float(value)
