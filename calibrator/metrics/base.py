"""The Metric contract: one number from a pass over TEST batches.

A metric names the blobs a forward pass must return (``outputs``), reads each batch into a
:class:`BatchOutcome` (``read``) and combines the batches into its value (``combine``), the
way ``caffe test`` reports it. Metrics with per-sample outcomes (right or wrong per image)
let the search compare configurations sample by sample and stop an evaluation early once
its verdict is decided."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class BatchOutcome:
    value: float                      # the metric of this batch alone
    per_sample: np.ndarray | None     # bool per sample (Accuracy, agreement) or None
    extra: object = None              # what combine() needs beyond the value (mAP rows)


class Metric:
    """Base: the mean of a blob over the batches (what ``caffe test`` prints). A metric whose
    batches carry ``per_sample`` outcomes is the share of good samples, so its value over
    the whole set can be bounded before the last batch (``bounds``)."""

    #: registry name (``--metric``); set by ``register_metric``
    kind = ""
    description = ""
    blob: str
    #: the sensitivity compares class scores (softmax KL) rather than by cosine
    class_scores = False

    def outputs(self) -> list[str]:
        return [self.blob]

    def start(self, net) -> None:
        """Called before batch 0 of every pass."""

    def remember(self, outputs: dict[str, torch.Tensor]) -> None:
        """Called with each batch of an FP32 pass (a metric relative to FP32 keeps it)."""

    def read(self, outputs: dict[str, torch.Tensor]) -> BatchOutcome:
        return BatchOutcome(float(outputs[self.blob].double().mean()), None)

    def combine(self, batches: list[BatchOutcome]) -> float:
        """Caffe's ``caffe test`` value: the mean of the per-batch values."""
        return float(np.mean([b.value for b in batches])) if batches else float("nan")

    def bounds(self, batches: list[BatchOutcome], total: int) -> tuple[float, float] | None:
        """(lowest, highest) value ``combine`` can still give over ``total`` batches when
        ``batches`` are the first ones read: the rest all wrong, or all right (computed by
        ``combine`` itself, which is monotone in them, so the bounds are exact). None when
        the metric has no per-sample outcomes: an early stop of an evaluation whose verdict
        is decided relies on it."""
        if not batches or any(b.per_sample is None for b in batches):
            return None
        size = len(batches[-1].per_sample)
        rest = max(total - len(batches), 0)
        worst = [BatchOutcome(0.0, np.zeros(size, bool))] * rest
        best = [BatchOutcome(1.0, np.ones(size, bool))] * rest
        return self.combine(list(batches) + worst), self.combine(list(batches) + best)

    def summary(self, batches: list[BatchOutcome]) -> np.ndarray:
        """What ``calibrator test`` prints for this blob (the value, as an array)."""
        return np.asarray(self.combine(batches))
