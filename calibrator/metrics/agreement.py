"""``agreement``: a label-free metric, the share of samples whose INT8 top-1 equals
the FP32 model's own top-1 on the same input.

The FP32 prediction of each batch is kept under a fingerprint of the batch's input blobs
(the feeds, which the INT8 simulation never changes), so the metric needs no batch index
and survives a ``--resume`` that recalls the FP32 evaluation from the search state instead
of running it: a batch seen for the first time gets its FP32 reference from one extra FP32
forward pass of the same net. The FP32 evaluation itself therefore scores 1.0.

Scores blob: ``(N, C)`` or ``(N, C, 1, ...)`` class scores (logits or probabilities), top-1
along axis 1. A blob with spatial positions (``(N, C, H, W)``, e.g. segmentation) is scored
per position: a sample's value is the share of its positions that agree, and it counts as
agreeing (``per_sample``) only when all of them do.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from calibrator.errors import CalibratorError
from calibrator.metrics.accuracy import primary_accuracy_layer
from calibrator.metrics.base import BatchOutcome, Metric


def top1(scores: torch.Tensor) -> np.ndarray:
    """Arg-max over axis 1 as an ``(N, positions)`` int64 array (ties: the first index)."""
    if scores.dim() < 2:
        raise CalibratorError(f"agreement needs (N, C, ...) class scores, got a blob of "
                              f"shape {tuple(scores.shape)}")
    flat = scores.detach().reshape(scores.shape[0], scores.shape[1], -1)
    return flat.argmax(1).cpu().numpy().astype(np.int64)


def fingerprint(feeds: dict[str, torch.Tensor]) -> str:
    """Identifies a batch by the exact bytes (and shapes) of its input blobs."""
    digest = hashlib.sha256()
    for name in sorted(feeds):
        value = feeds[name].detach()
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class AgreementMetric(Metric):
    """Top-1 agreement of the evaluated configuration with FP32, per sample."""

    description = ("label-free: share of samples whose top-1 equals FP32's on the class "
                   "scores (-n names the scores blob; default: the Accuracy layer's)")
    class_scores = True

    def __init__(self, net, blob: str | None = None):
        blob = blob or default_scores_blob(net)
        if blob not in net.blob_shapes:
            raise CalibratorError(f"agreement: no blob '{blob}' in the TEST net")
        shape = net.blob_shapes[blob]
        if len(shape) < 2 or shape[1] < 2:
            raise CalibratorError(f"agreement: blob '{blob}' of shape {tuple(shape)} holds no "
                                  "class scores (need N x C with C >= 2)")
        self.net = net
        self.blob = blob
        self.inputs = list(net.input_shapes)
        self.reference: dict[str, np.ndarray] = {}  # batch fingerprint -> FP32 top-1

    def outputs(self) -> list[str]:
        return [self.blob, *self.inputs]

    def remember(self, outputs: dict[str, torch.Tensor]) -> None:
        """Take these outputs as the FP32 reference of their batch (an FP32 pass calls it;
        saves the extra forward pass)."""
        self.reference[fingerprint(self._feeds(outputs))] = top1(outputs[self.blob])

    def fp32_top1(self, feeds: dict[str, torch.Tensor]) -> np.ndarray:
        key = fingerprint(feeds)
        found = self.reference.get(key)
        if found is None:
            with torch.no_grad():
                scores = self.net(feeds, outputs=[self.blob])[self.blob]
            found = self.reference[key] = top1(scores)
        return found

    def _feeds(self, outputs) -> dict[str, torch.Tensor]:
        missing = [name for name in self.inputs if name not in outputs]
        if missing:
            raise CalibratorError(f"agreement: the forward pass did not return the input "
                                  f"blob(s) {', '.join(missing)}")
        return {name: outputs[name] for name in self.inputs}

    def read(self, outputs) -> BatchOutcome:
        reference = self.fp32_top1(self._feeds(outputs))
        current = top1(outputs[self.blob])
        if current.shape != reference.shape:
            raise CalibratorError(f"agreement: blob '{self.blob}' changed shape from "
                                  f"{reference.shape} to {current.shape}")
        same = current == reference
        return BatchOutcome(float(same.mean()), same.all(axis=1))

    def combine(self, batches: list[BatchOutcome]) -> float:
        """Agreeing samples over all samples (the mean of the batch values when every batch
        has the same size, as Caffe's batches do)."""
        total = sum(len(b.per_sample) for b in batches if b.per_sample is not None)
        if not batches or total == 0:
            return float(np.mean([b.value for b in batches])) if batches else 0.0
        return float(sum(b.value * len(b.per_sample) for b in batches) / total)


def default_scores_blob(net) -> str:
    """The blob ``--metric agreement`` compares when none is named: the scores under the
    Accuracy layer with the smallest top_k, else the net's only output with class scores."""
    layer = primary_accuracy_layer([node.param for node in net.nodes])
    if layer is not None:
        return layer.bottom[0]
    candidates = [name for name in net.output_names
                  if name not in net.input_shapes and len(net.blob_shapes.get(name, ())) >= 2
                  and net.blob_shapes[name][1] >= 2]
    if len(candidates) == 1:
        return candidates[0]
    raise CalibratorError("agreement: cannot tell which blob holds the class scores "
                          f"(outputs: {', '.join(net.output_names)}); name it with -n")
