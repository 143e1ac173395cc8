"""Normalisations and selections over an axis: Softmax, LRN, MVN and ArgMax."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from calibrator.graph.layer import Layer, register
from calibrator.graph.layers._common import canonical_axis, check_io, count
from calibrator.graph.layers.pooling import caffe_ave_pool


@register("Softmax")
class Softmax(Layer):
    keeps_shape = True

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, 1))
        self.axis = canonical_axis(self, param.softmax_param.axis, len(self.bottom_shapes[0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.softmax(x, dim=self.axis),)


@register("LRN")
class LRN(Layer):
    """Local response normalisation of a 4-D bottom.

    ACROSS_CHANNELS: x / (k + alpha / n * sum of x^2 over n channels centred on c)^beta,
    with zeros beyond the channel range. WITHIN_CHANNEL: Caffe builds it from an AVE pooling
    of x^2 (n x n, pad (n-1)/2, stride 1, Caffe's divisor rule) and a Power layer, giving
    x / (1 + alpha * avg(x^2))^beta; k is not used there."""
    keeps_shape = True

    ACROSS_CHANNELS, WITHIN_CHANNEL = 0, 1

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, 1))
        lrn = param.lrn_param
        self.size = lrn.local_size
        if self.size % 2 != 1:
            raise self.error(f"local_size must be odd, got {self.size}")
        self.alpha, self.beta, self.k = (float(np.float32(v)) for v in (lrn.alpha, lrn.beta, lrn.k))
        self.region = lrn.norm_region
        if self.region not in (self.ACROSS_CHANNELS, self.WITHIN_CHANNEL):
            raise self.error(f"unknown norm_region {self.region}")
        if len(self.bottom_shapes[0]) != 4:
            raise self.error(f"needs a 4-D bottom, got {self.bottom_shapes[0]}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        square = x * x
        half = (self.size - 1) // 2
        if self.region == self.ACROSS_CHANNELS:
            # Sum over a channel window: pool the (N, 1, C, H, W) view along C only.
            padded = F.pad(square.unsqueeze(1), (0, 0, 0, 0, half, half))
            window_sum = F.avg_pool3d(padded, (self.size, 1, 1), stride=1,
                                      divisor_override=1).squeeze(1)
            scale = self.k + (self.alpha / self.size) * window_sum
        else:
            height, width = x.shape[2:]
            window_mean = caffe_ave_pool(square, (self.size,) * 2, (half,) * 2, (1, 1),
                                         (height, width))
            scale = 1 + self.alpha * window_mean
        return (x * torch.pow(scale, -self.beta),)


@register("MVN")
class MVN(Layer):
    """Mean (and variance) normalisation per channel, or per sample with across_channels:
    (x - mean) / (std + eps), eps added after the square root as Caffe does."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, 1))
        mvn = param.mvn_param
        self.normalize_variance = mvn.normalize_variance
        self.across_channels = mvn.across_channels
        self.eps = float(np.float32(mvn.eps))
        if len(self.bottom_shapes[0]) < 2 and not self.across_channels:
            raise self.error("needs a channel axis unless across_channels")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        groups = x.shape[0] if self.across_channels else x.shape[0] * x.shape[1]
        flat = x.reshape(groups, -1)
        centred = flat - flat.mean(dim=1, keepdim=True)
        if self.normalize_variance:
            std = centred.square().mean(dim=1, keepdim=True).sqrt()
            centred = centred / (std + self.eps)
        return (centred.reshape(x.shape),)


@register("ArgMax")
class ArgMax(Layer):
    """Indices (or values) of the top_k largest entries.

    With ``axis``: along that axis, the axis becoming top_k long, values instead of indices
    if out_max_val. Without: over each sample flattened, top shape (N, 1, top_k, 1...) of
    indices, or (N, 2, top_k, ...) holding indices then values if out_max_val. Ties go to the
    higher index, as Caffe's partial_sort of (value, index) pairs with std::greater does."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, 1))
        am = param.argmax_param
        shape = self.bottom_shapes[0]
        self.out_max_val = am.out_max_val
        self.top_k = am.top_k
        if self.top_k < 1:
            raise self.error("top_k must be at least 1")
        self.axis = canonical_axis(self, am.axis, len(shape)) if am.HasField("axis") else None
        length = shape[self.axis] if self.axis is not None else count(shape, 1)
        if self.top_k > length:
            raise self.error(f"top_k {self.top_k} exceeds the {length} values to choose from")

    def _top_k(self, x: torch.Tensor, dim: int):
        """Values and indices of the top_k largest along ``dim``, higher index first on ties."""
        length = x.shape[dim]
        # A stable descending sort of the reversed axis puts the later index first on ties.
        values, reversed_index = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
        values = values.narrow(dim, 0, self.top_k)
        index = (length - 1) - reversed_index.narrow(dim, 0, self.top_k)
        return values, index.to(x.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        if self.axis is not None:
            values, index = self._top_k(x, self.axis)
            return ((values if self.out_max_val else index).contiguous(),)
        values, index = self._top_k(x.reshape(x.shape[0], -1), 1)
        trailing = (1,) * (max(x.dim(), 3) - 3)
        parts = [index, values] if self.out_max_val else [index]
        top = torch.stack(parts, dim=1)  # (N, 1 or 2, top_k)
        return (top.reshape(top.shape + trailing),)
