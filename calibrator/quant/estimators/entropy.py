"""``KL``: the entropy threshold (TensorRT's method in ncnn's convention), see
:mod:`calibrator.quant.kl` for the vectorised search over all candidates."""

from __future__ import annotations

import torch

from calibrator.quant.estimators.base import HISTOGRAM, Estimator, TensorStats, levels
from calibrator.quant.kl import kl_threshold


class Entropy(Estimator):
    name = "KL"
    description = "entropy: the threshold minimising KL(P || Q) over the |x| histogram"
    needs = frozenset({HISTOGRAM})

    def estimate(self, stats: TensorStats, bits: int) -> float:
        return kl_threshold(torch.from_numpy(stats.hist), stats.absmax, levels(bits))
