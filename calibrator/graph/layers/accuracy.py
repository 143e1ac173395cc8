"""Accuracy: the share of samples whose label is among the top_k scores, Caffe's way.

BVLC Caffe (1.0) counts a sample as correct when fewer than top_k classes *other than the
label* score at least as high as the label (``>=``): a tie with another class counts against
the sample, unlike a plain top-k with arbitrary tie breaking.
"""

from __future__ import annotations

import torch

from calibrator.graph.layer import Layer, register
from calibrator.graph.layers._common import canonical_axis, check_io, count


@register("Accuracy")
class Accuracy(Layer):
    """Bottoms: scores (.., C, ..) with the classes on ``axis``, and labels holding one float
    label per position of the other axes. Tops: the accuracy (a scalar) and, optionally, the
    per-class accuracy (C,)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (2, 2), (1, 2))
        if set(param.top) & set(param.bottom):
            raise self.error("cannot run in place: its tops must not overwrite the scores or "
                             "labels it judges")
        ap = param.accuracy_param
        scores, labels = self.bottom_shapes
        self.top_k = ap.top_k
        self.axis = canonical_axis(self, ap.axis, len(scores))
        self.ignore_label = ap.ignore_label if ap.HasField("ignore_label") else None
        self.per_class = len(param.top) == 2
        self.num_classes = scores[self.axis]
        if count(scores, 0, self.axis) * count(scores, self.axis + 1) != count(labels):
            raise self.error(f"{count(labels)} labels for scores of shape {scores}: need one per "
                             f"position outside the class axis {self.axis}")
        if not 1 <= self.top_k <= self.num_classes:
            raise self.error(f"top_k {self.top_k} must be within 1..{self.num_classes} classes")

    def top_shapes(self):
        return [()] + ([(self.num_classes,)] if self.per_class else [])

    def _judge(self, scores: torch.Tensor, label: torch.Tensor):
        """(correct, valid, label index), each flattened over all samples."""
        outer = count(scores.shape, 0, self.axis)
        grid = scores.reshape(outer, self.num_classes, -1)  # (outer, C, inner)
        label_index = label.reshape(outer, -1).to(torch.int64)  # truncates like static_cast
        valid = torch.ones_like(label_index, dtype=torch.bool)
        if self.ignore_label is not None:
            valid = label_index != self.ignore_label
        in_range = (label_index >= 0) & (label_index < self.num_classes)
        if bool((valid & ~in_range).any()):
            raise self.error(f"a label is outside 0..{self.num_classes - 1}")
        safe_index = torch.where(valid, label_index, torch.zeros_like(label_index))
        label_score = grid.gather(1, safe_index.unsqueeze(1))  # (outer, 1, inner)
        # The label itself is among the scores >= its own, hence the - 1.
        others_at_least = (grid >= label_score).sum(dim=1) - 1
        correct = (others_at_least < self.top_k) & valid
        return correct.flatten(), valid.flatten(), safe_index.flatten()

    def per_sample(self, scores: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Correctness of every non-ignored sample (bool, 1-D, in blob order); ignored samples
        are left out, so the mean of this is the layer's accuracy."""
        correct, valid, _ = self._judge(scores, label)
        return correct[valid]

    def forward(self, scores: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, ...]:
        correct, valid, label_index = self._judge(scores, label)
        num_valid = valid.sum()
        accuracy = torch.where(num_valid > 0, correct.sum().to(scores.dtype)
                               / num_valid.clamp(min=1).to(scores.dtype),
                               torch.zeros((), dtype=scores.dtype, device=scores.device))
        if not self.per_class:
            return (accuracy,)
        seen = torch.bincount(label_index[valid], minlength=self.num_classes)
        hits = torch.bincount(label_index[correct], minlength=self.num_classes)
        ratio = hits.to(scores.dtype) / seen.clamp(min=1).to(scores.dtype)
        per_class = torch.where(seen > 0, ratio, torch.zeros_like(ratio))
        return accuracy, per_class
