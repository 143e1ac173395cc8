"""Pooling with Caffe's own output size and average divisor, which differ from PyTorch's.

Caffe rounds the output size up (``ceil``) and then drops a last window that would start in
the bottom/right padding. Its average divides by the window clipped to the *padded* bounds
[-pad, size + pad), not by the number of real pixels, while the sum only covers real pixels.
Both rules are reproduced by padding explicitly and pooling without PyTorch's padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from calibrator.graph.layer import Layer, register
from calibrator.graph.layers._common import check_io, field_or, has_field

_FLT_MAX = torch.finfo(torch.float32).max


def caffe_pooled_size(size: int, kernel: int, pad: int, stride: int, ceil_mode: bool,
                      any_pad: bool) -> int:
    """Output length along one axis. ``any_pad`` is whether *either* axis is padded: Caffe
    applies the last-window rule to both axes as soon as one of them has padding."""
    rounding = math.ceil if ceil_mode else math.floor
    pooled = int(rounding((size + 2 * pad - kernel) / stride)) + 1
    if any_pad and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


def _pad_to_windows(x: torch.Tensor, kernel, pad, stride, pooled, value: float) -> torch.Tensor:
    """Pad (or crop) x so that plain pooling yields exactly ``pooled`` windows per axis, the
    first starting at -pad. Negative padding crops rows no window reaches."""
    height, width = x.shape[-2:]
    bottom = (pooled[0] - 1) * stride[0] + kernel[0] - height - pad[0]
    right = (pooled[1] - 1) * stride[1] + kernel[1] - width - pad[1]
    return F.pad(x, (pad[1], right, pad[0], bottom), value=value)


def caffe_max_pool(x, kernel, pad, stride, pooled, with_mask: bool = False):
    """Max over each window's real pixels. A window lying wholly in padding yields -FLT_MAX
    (Caffe's initial value) and mask -1; the mask indexes h * W + w within the plane."""
    padded = _pad_to_windows(x, kernel, pad, stride, pooled, -_FLT_MAX)
    if not with_mask:
        return F.max_pool2d(padded, kernel, stride)
    top, index = F.max_pool2d(padded, kernel, stride, return_indices=True)
    padded_width = padded.shape[-1]
    row = torch.div(index, padded_width, rounding_mode="floor") - pad[0]
    col = index % padded_width - pad[1]
    height, width = x.shape[-2:]
    inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
    mask = torch.where(inside, row * width + col, torch.full_like(row, -1))
    return top, mask.to(x.dtype)


def caffe_ave_pool_parts(x, kernel, pad, stride, pooled):
    """(sum of each window's real pixels, the window's size clipped to the padded bounds)."""
    padded = _pad_to_windows(x, kernel, pad, stride, pooled, 0.0)
    window_sum = F.avg_pool2d(padded, kernel, stride, divisor_override=1)
    height, width = x.shape[-2:]
    divisors = []
    for length, k, p, s, n in zip((height, width), kernel, pad, stride, pooled):
        start = torch.arange(n, device=x.device) * s - p
        end = torch.clamp(start + k, max=length + p)
        divisors.append((end - start).to(x.dtype))
    return window_sum, divisors[0][:, None] * divisors[1][None, :]


def caffe_ave_pool(x, kernel, pad, stride, pooled):
    """Sum of each window's real pixels divided by the window clipped to the padded bounds."""
    window_sum, divisor = caffe_ave_pool_parts(x, kernel, pad, stride, pooled)
    return window_sum / divisor


@register("Pooling")
class Pooling(Layer):
    """Caffe MAX or AVE pooling of a 4-D bottom; MAX may have a second top, the argmax mask.

    STOCHASTIC pooling is random in training and GPU-only in testing, so it is refused."""

    MAX, AVE, STOCHASTIC = 0, 1, 2

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        pool = param.pooling_param
        self.method = pool.pool
        if self.method == self.STOCHASTIC:
            raise self.error("STOCHASTIC pooling is not supported")
        if self.method not in (self.MAX, self.AVE):
            raise self.error(f"unknown pooling method {self.method}")
        check_io(self, param, (1, 1), (1, 2 if self.method == self.MAX else 1))
        self.with_mask = len(param.top) == 2
        if len(self.bottom_shapes[0]) != 4:
            raise self.error(f"needs a 4-D bottom, got shape {self.bottom_shapes[0]}")
        self.global_pooling = pool.global_pooling
        if self.global_pooling:
            if pool.HasField("kernel_size") or pool.HasField("kernel_h") or \
                    pool.HasField("kernel_w"):
                raise self.error("with global_pooling the kernel size cannot be given")
            self.kernel = None  # the bottom's height and width, known in forward
        else:
            if pool.HasField("kernel_size") == (pool.HasField("kernel_h")
                                                and pool.HasField("kernel_w")):
                raise self.error("give kernel_size or both kernel_h and kernel_w")
            self.kernel = ((pool.kernel_size,) * 2 if pool.HasField("kernel_size")
                           else (pool.kernel_h, pool.kernel_w))
            if min(self.kernel) <= 0:
                raise self.error("kernel size must be positive")
        self.pad = self._pair(pool, "pad", "pad_h", "pad_w")
        self.stride = self._pair(pool, "stride", "stride_h", "stride_w")
        if min(self.stride) <= 0:
            raise self.error("stride must be positive")
        if self.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            raise self.error("with global_pooling only pad 0 and stride 1 are allowed")
        if self.kernel and (self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]):
            raise self.error(f"pad {self.pad} must be smaller than the kernel {self.kernel}")
        # round_mode exists in some forks (NVCaffe): CEIL = 0 (Caffe's behaviour), FLOOR = 1.
        self.ceil_mode = field_or(pool, "round_mode", 0) == 0
        pooled = self._pooled(self.bottom_shapes[0][2:])
        if min(pooled) <= 0:
            raise self.error(f"output size {pooled} is empty for bottom {self.bottom_shapes[0]}")

    def workspace_bytes(self) -> int:
        """The explicitly padded bottom (and, with a mask, the int64 indices)."""
        shape = self.bottom_shapes[0]
        kernel = self.kernel or tuple(shape[2:])
        pooled = self._pooled(shape[2:])
        padded = [(n - 1) * s + k for n, s, k in zip(pooled, self.stride, kernel)]
        padded = [max(p, d + q) for p, d, q in zip(padded, shape[2:], self.pad)]
        values = shape[0] * shape[1] * padded[0] * padded[1]
        return values * 4 + (shape[0] * shape[1] * pooled[0] * pooled[1] * 8
                             if self.with_mask else 0)

    def _pair(self, pool, name, h_name, w_name):
        if has_field(pool, h_name) or has_field(pool, w_name):
            if pool.HasField(name) or not (pool.HasField(h_name) and pool.HasField(w_name)):
                raise self.error(f"give {name} or both {h_name} and {w_name}")
            return getattr(pool, h_name), getattr(pool, w_name)
        return (getattr(pool, name),) * 2

    def _pooled(self, spatial):
        kernel = self.kernel or tuple(spatial)
        any_pad = self.pad != (0, 0)
        return tuple(caffe_pooled_size(n, k, p, s, self.ceil_mode, any_pad)
                     for n, k, p, s in zip(spatial, kernel, self.pad, self.stride))

    def top_shapes(self):
        shape = self.bottom_shapes[0]
        return [shape[:2] + self._pooled(shape[2:])] * (2 if self.with_mask else 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kernel = self.kernel or tuple(x.shape[2:])
        pooled = self._pooled(x.shape[2:])
        if self.method == self.AVE:
            return (caffe_ave_pool(x, kernel, self.pad, self.stride, pooled),)
        if self.with_mask:
            return caffe_max_pool(x, kernel, self.pad, self.stride, pooled, with_mask=True)
        return (caffe_max_pool(x, kernel, self.pad, self.stride, pooled),)
