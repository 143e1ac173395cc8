"""Element-wise activations, each written the way Caffe's CPU code computes it."""

from __future__ import annotations

import numpy as np
import torch

from calibrator.graph.layer import Layer, register
from calibrator.graph.layers._common import check_io, load_named


class _Elementwise(Layer):
    """One bottom, one top of the same shape; subclasses define :meth:`apply`."""
    keeps_shape = True

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.apply(x),)

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    #: :meth:`apply_` computes what :meth:`apply` does, on ``x`` itself
    in_place = False

    def apply_(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@register("ReLU")
class ReLU(_Elementwise):
    """max(x, 0) + negative_slope * min(x, 0) (a leaky ReLU when the slope is non-zero)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.negative_slope = float(np.float32(param.relu_param.negative_slope))

    @property
    def in_place(self) -> bool:
        return self.negative_slope == 0

    def apply(self, x):
        if self.negative_slope == 0:
            return torch.relu(x)
        return torch.clamp(x, min=0) + self.negative_slope * torch.clamp(x, max=0)

    def apply_(self, x):
        return torch.relu_(x)


@register("ReLU6")
class ReLU6(_Elementwise):
    """min(max(x, 0), 6), as in the MobileNet forks of Caffe."""

    in_place = True
    #: (low, high): :meth:`apply_` is ``x.clamp_(low, high)`` (a reader of the blob may do
    #: that clamp itself: see ``calibrator.quant.statistics``)
    clamp_bounds = (0.0, 6.0)

    def apply(self, x):
        return torch.clamp(x, *self.clamp_bounds)

    def apply_(self, x):
        return x.clamp_(*self.clamp_bounds)


@register("Clip")
class Clip(_Elementwise):
    """max(min, min(x, max)) with ``clip_param`` bounds."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        clip = param.clip_param
        if not (clip.HasField("min") and clip.HasField("max")):
            raise self.error("clip_param needs both min and max")
        self.low, self.high = float(np.float32(clip.min)), float(np.float32(clip.max))

    in_place = True

    def apply(self, x):
        return torch.clamp(torch.clamp(x, max=self.high), min=self.low)

    def apply_(self, x):
        return x.clamp_(max=self.high).clamp_(min=self.low)


@register("PReLU")
class PReLU(_Elementwise):
    """max(x, 0) + slope * min(x, 0), one learned slope per channel (axis 1) or one shared."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        shape = self.bottom_shapes[0]
        self.channel_shared = param.prelu_param.channel_shared
        self.channels = 1 if len(shape) < 2 else shape[1]
        self.register_parameter("slope", None)

    def blob_shapes(self):
        return [(1,) if self.channel_shared else (self.channels,)]

    def load_blobs(self, blobs):
        load_named(self, ["slope"], blobs)

    def apply(self, x):
        if self.slope is None:
            raise self.error("learned blobs were never loaded")
        if self.channel_shared or x.dim() < 2:
            slope = self.slope.reshape(())
        else:
            slope = self.slope.reshape((-1,) + (1,) * (x.dim() - 2))
        return torch.clamp(x, min=0) + slope * torch.clamp(x, max=0)


@register("Sigmoid")
class Sigmoid(_Elementwise):
    def apply(self, x):
        return torch.sigmoid(x)


@register("TanH")
class TanH(_Elementwise):
    def apply(self, x):
        return torch.tanh(x)


@register("AbsVal")
class AbsVal(_Elementwise):
    def apply(self, x):
        return torch.abs(x)


@register("ELU")
class ELU(_Elementwise):
    """max(x, 0) + alpha * (exp(min(x, 0)) - 1)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.alpha = float(np.float32(param.elu_param.alpha))

    def apply(self, x):
        return torch.clamp(x, min=0) + self.alpha * (torch.exp(torch.clamp(x, max=0)) - 1)


@register("BNLL")
class BNLL(_Elementwise):
    """log(1 + exp(x)), split at 0 as Caffe does so large |x| neither overflows nor cancels."""

    def apply(self, x):
        return torch.where(x > 0, x + torch.log1p(torch.exp(-x)), torch.log1p(torch.exp(x)))


@register("Threshold")
class Threshold(_Elementwise):
    """1 where x > threshold, else 0."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.threshold = float(np.float32(param.threshold_param.threshold))

    def apply(self, x):
        return (x > self.threshold).to(x.dtype)


@register("Power")
class Power(_Elementwise):
    """(shift + scale * x) ^ power; constant when power * scale is 0, as in Caffe."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.power_param
        self.power, self.scale, self.shift = (float(np.float32(v))
                                              for v in (p.power, p.scale, p.shift))

    def apply(self, x):
        if self.power * self.scale == 0:
            value = 1.0 if self.power == 0 else float(np.float32(self.shift)
                                                      ** np.float32(self.power))
            return torch.full_like(x, value)
        y = x
        if self.scale != 1:
            y = y * self.scale
        if self.shift != 0:
            y = y + self.shift
        if self.power != 1:
            y = torch.pow(y, self.power)
        return y


@register("Exp")
class Exp(_Elementwise):
    """base ^ (shift + scale * x), computed as Caffe does: outer * exp(inner * x) with
    inner = ln(base) * scale and outer = base ^ shift; base -1 means e."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.exp_param
        base, scale, shift = (np.float32(v) for v in (p.base, p.scale, p.shift))
        if base != -1 and base <= 0:
            raise self.error(f"base must be strictly positive, got {base}")
        log_base = np.float32(1) if base == -1 else np.log(base)
        self.inner_scale = float(log_base * scale)
        if shift == 0:
            self.outer_scale = 1.0
        else:
            self.outer_scale = float(np.exp(shift) if base == -1 else base ** shift)

    def apply(self, x):
        y = torch.exp(x if self.inner_scale == 1 else x * self.inner_scale)
        return y if self.outer_scale == 1 else y * self.outer_scale


@register("Log")
class Log(_Elementwise):
    """log_base(shift + scale * x); base -1 means the natural logarithm."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.log_param
        base, self.scale, self.shift = (np.float32(v) for v in (p.base, p.scale, p.shift))
        if base != -1 and base <= 0:
            raise self.error(f"base must be strictly positive, got {base}")
        if base == 1:
            raise self.error("base 1 has no logarithm")
        self.base_scale = 1.0 if base == -1 else float(np.float32(1) / np.log(base))
        self.scale, self.shift = float(self.scale), float(self.shift)

    def apply(self, x):
        y = x
        if self.scale != 1:
            y = y * self.scale
        if self.shift != 0:
            y = y + self.shift
        y = torch.log(y)
        return y if self.base_scale == 1 else y * self.base_scale
