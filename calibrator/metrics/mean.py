"""``mean``: any output blob (a loss, a custom score) averaged over the batches, element by
element as ``caffe test`` prints it; its value is the mean of those means."""

from __future__ import annotations

import numpy as np

from calibrator.metrics.base import BatchOutcome, Metric


class BlobMean(Metric):
    description = "the mean of the -n blob over the batches (any scalar or small blob)"

    def __init__(self, net, blob: str):
        self.blob = blob

    def read(self, outputs) -> BatchOutcome:
        value = outputs[self.blob].detach().double().cpu().numpy()
        return BatchOutcome(float(value.mean()), None, value)

    def summary(self, batches) -> np.ndarray:
        """The element-wise mean over the batches (None when the shape varies)."""
        arrays = [b.extra for b in batches]
        if not arrays or any(a.shape != arrays[0].shape for a in arrays):
            return None
        total = arrays[0].astype(np.float64)
        for array in arrays[1:]:
            total = total + array
        return total / len(arrays)
