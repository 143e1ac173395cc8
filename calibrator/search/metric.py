"""What a full evaluation measures: the value of the metric blob over ``-i`` batches, and
per-sample outcomes where the metric has them (Accuracy: right or wrong per image)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from calibrator.errors import CalibratorError


@dataclass
class BatchOutcome:
    value: float                      # the metric blob of this batch
    per_sample: np.ndarray | None     # bool per sample (Accuracy) or None
    extra: object = None              # what combine() needs beyond the value (mAP rows)


class Metric:
    """Base: the blobs a forward pass must return, and how to read one batch."""

    blob: str
    class_scores = False  # the sensitivity compares class scores (softmax KL), not cosine

    def outputs(self) -> list[str]:
        return [self.blob]

    def start(self, net) -> None:
        """Called before batch 0 of every full evaluation."""

    def read(self, outputs: dict[str, torch.Tensor]) -> BatchOutcome:
        return BatchOutcome(float(outputs[self.blob].float().mean()), None)

    def combine(self, batches: list[BatchOutcome]) -> float:
        """Caffe's ``caffe test`` value: the mean of the per-batch values."""
        return float(np.mean([b.value for b in batches]))


class AccuracyMetric(Metric):
    """The top of an Accuracy layer; per-sample correctness from the layer itself."""

    class_scores = True

    def __init__(self, net, blob: str, node):
        self.blob = blob
        self.node = node
        self.scores, self.label = node.bottoms[0], node.bottoms[1]

    def outputs(self) -> list[str]:
        return [self.blob, self.scores, self.label]

    def read(self, outputs):
        correct = self.node.module.per_sample(outputs[self.scores], outputs[self.label])
        return BatchOutcome(float(outputs[self.blob].float().reshape(-1)[0]),
                            correct.detach().cpu().numpy().astype(bool))


class BlobMetric(Metric):
    """Any scalar output blob (a loss, a custom score): the mean of its values."""

    def __init__(self, blob: str):
        self.blob = blob


def primary_accuracy_layer(layers):
    """The Accuracy layer with the smallest top_k (Intel's default metric), or None.

    ``layers``: LayerParameters in prototxt order."""
    best = None
    for layer in layers:
        if layer.type == "Accuracy" and len(layer.top) and len(layer.bottom):
            if best is None or layer.accuracy_param.top_k < best.accuracy_param.top_k:
                best = layer
    return best


def make_metric(net, blob: str) -> Metric:
    producers = [n for n in net.nodes if blob in n.tops]
    if not producers:
        raise CalibratorError(f"-n {blob}: no layer of the TEST net produces this blob")
    node = producers[-1]
    if node.type == "Accuracy" and node.tops[0] == blob:
        return AccuracyMetric(net, blob, node)
    if node.type == "DetectionEvaluate":
        from calibrator.search.detection_metric import DetectionMetric

        return DetectionMetric(net, blob, node)
    return BlobMetric(blob)
