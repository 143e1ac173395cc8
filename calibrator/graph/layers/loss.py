"""Loss layers that TEST nets keep for reporting (train_val prototxts print the loss)."""

from __future__ import annotations

import torch

from calibrator.graph.layer import Layer, register
from calibrator.graph.layers._common import canonical_axis, check_io

FLT_MIN = 1.1754943508222875e-38


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(Layer):
    """Caffe's softmax + multinomial logistic loss: -mean log p[label], log clamped at
    FLT_MIN, normalised by the count of non-ignored labels (VALID, the default)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (2, 2), (1, 2))
        self.axis = canonical_axis(self, param.softmax_param.axis, len(self.bottom_shapes[0]))
        loss = param.loss_param
        self.ignore_label = loss.ignore_label if loss.HasField("ignore_label") else None
        if loss.HasField("normalization"):
            self.normalization = type(loss).NormalizationMode.Name(loss.normalization)
        elif loss.HasField("normalize"):
            self.normalization = "VALID" if loss.normalize else "BATCH_SIZE"
        else:
            self.normalization = "VALID"
        if len(param.top) > 1:
            raise self.error("the softmax probability top is not supported")

    def forward(self, scores, label):
        log_prob = torch.log_softmax(scores, dim=self.axis).clamp_min(torch.log(
            torch.tensor(FLT_MIN)).item())
        classes = scores.shape[self.axis]
        log_prob = log_prob.movedim(self.axis, -1).reshape(-1, classes)
        label = label.reshape(-1).long()
        valid = torch.ones_like(label, dtype=torch.bool)
        if self.ignore_label is not None:
            valid = label != self.ignore_label
        picked = log_prob.gather(1, label.clamp(0, classes - 1).unsqueeze(1)).squeeze(1)
        total = -(picked * valid).sum()
        if self.normalization == "FULL":
            norm = float(label.numel())
        elif self.normalization == "VALID":
            norm = valid.sum().float().clamp_min(1.0)
        elif self.normalization == "BATCH_SIZE":
            norm = float(scores.shape[0])
        else:
            norm = 1.0
        return (total / norm,)
