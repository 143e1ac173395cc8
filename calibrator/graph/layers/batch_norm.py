"""BatchNorm, Scale and Bias: Caffe splits a batch norm into a normalisation (BatchNorm) and
an affine part (Scale with bias_term), and the two are usually stacked."""

from __future__ import annotations

import numpy as np
import torch

from calibrator.graph.layer import Layer, register
from calibrator.graph.layers._common import canonical_axis, check_io, field_or, load_named


@register("BatchNorm")
class BatchNorm(Layer):
    """(x - mean) / sqrt(var + eps) per channel (axis 1).

    The caffemodel stores running sums: mean and variance must be multiplied by
    1 / factor (the third blob), or by 0 when the factor is 0. With use_global_stats false
    Caffe normalises by the statistics of the batch itself, which is reproduced here too."""
    keeps_shape = True

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, 1))
        bn = param.batch_norm_param
        # Deploy nets run in the TEST phase, where Caffe's default is the stored statistics.
        self.use_global_stats = bn.use_global_stats if bn.HasField("use_global_stats") else True
        self.eps = float(np.float32(bn.eps))
        if not np.isfinite(self.eps) or self.eps < 0:
            raise self.error(f"eps {bn.eps} must be a finite number >= 0")
        self.fused_relu = field_or(bn, "relu", False)  # Intel Caffe's fused ReLU
        shape = self.bottom_shapes[0]
        self.channels = 1 if len(shape) == 1 else shape[1]
        self.register_buffer("mean", None)
        self.register_buffer("variance", None)

    def blob_shapes(self):
        return [(self.channels,), (self.channels,), (1,)]

    def load_blobs(self, blobs):
        load_named(self, ["_mean_sum", "_variance_sum", "_factor"], blobs)
        factor = np.float32(blobs[2][0])
        if factor < 0:
            raise self.error(f"the moving-average factor (blob 2) is {factor:g}, negative: "
                             "the stored statistics are damaged")
        scale = np.float32(0) if factor == 0 else np.float32(1) / factor
        with np.errstate(over="ignore", invalid="ignore"):
            mean = (blobs[0] * scale).astype(np.float32)
            variance = (blobs[1] * scale).astype(np.float32)
        if self.use_global_stats:
            bad = ~np.isfinite(mean) | ~np.isfinite(variance) | ~(variance + self.eps > 0)
            if bad.any():
                channel = int(np.argmax(bad))
                raise self.error(f"channel {channel}: mean {mean[channel]:g}, variance "
                                 f"{variance[channel]:g} (eps {self.eps:g}): the variance "
                                 "must be a finite number with variance + eps > 0; the "
                                 "stored statistics are damaged")
        self.mean = torch.from_numpy(mean)
        self.variance = torch.from_numpy(variance)

    def _per_channel(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return values.reshape((1, -1) + (1,) * (x.dim() - 2)) if x.dim() > 1 else values

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        if self.use_global_stats:
            if self.mean is None:
                raise self.error("learned blobs were never loaded")
            mean = self._per_channel(self.mean, x)
            variance = self._per_channel(self.variance, x)
        else:
            reduce = [d for d in range(x.dim()) if d != 1]
            mean = x.mean(dim=reduce, keepdim=True)
            variance = (x - mean).square().mean(dim=reduce, keepdim=True)
        # one new buffer, updated in place: the same arithmetic as Caffe, less memory traffic
        top = x.sub(mean).div_(torch.sqrt(variance + self.eps))
        return (top.relu_() if self.fused_relu else top,)

    def channel_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, c) with y = a*x + c per channel: what folding into a convolution needs."""
        if not self.use_global_stats or self.fused_relu:
            raise self.error("cannot be folded (batch statistics or a fused ReLU)")
        inv_std = 1.0 / torch.sqrt(self.variance + self.eps)
        return inv_std, -self.mean * inv_std


def _learned_shape(layer: Layer, bottom_shape, axis: int, num_axes: int) -> tuple[int, ...]:
    """bottom_shape[axis : axis + num_axes] (num_axes -1: to the end), Caffe's rule for the
    learned blob of Scale and Bias."""
    axis = canonical_axis(layer, axis, len(bottom_shape))
    if num_axes < -1:
        raise layer.error(f"num_axes must be >= -1, got {num_axes}")
    end = len(bottom_shape) if num_axes == -1 else axis + num_axes
    if end > len(bottom_shape):
        raise layer.error(f"axis {axis} + num_axes {num_axes} exceeds the bottom's "
                          f"{len(bottom_shape)} axes")
    return tuple(bottom_shape[axis:end])


def _broadcastable(layer: Layer, x: torch.Tensor, operand: torch.Tensor, axis: int):
    """``operand`` (shape of x's axes from ``axis``) reshaped to broadcast against x.

    A scalar operand applies everywhere, as in Caffe (which then ignores the axis)."""
    if operand.dim() == 0:
        return operand
    axis = canonical_axis(layer, axis, x.dim())
    if tuple(x.shape[axis:axis + operand.dim()]) != tuple(operand.shape):
        raise layer.error(f"operand shape {tuple(operand.shape)} does not match bottom shape "
                          f"{tuple(x.shape)} from axis {axis}")
    return operand.reshape(operand.shape + (1,) * (x.dim() - axis - operand.dim()))


class _AxisOperand(Layer):
    """Shared by Scale and Bias: the operand is learned, or comes from a second bottom."""
    keeps_shape = True

    def _setup(self, param, axis: int, num_axes: int, learned_names: list[str]):
        check_io(self, param, (1, 2), (1, 1))
        self.axis = axis
        bottom = self.bottom_shapes[0]
        canonical_axis(self, axis, len(bottom))
        if len(self.bottom_shapes) == 2:
            operand = self.bottom_shapes[1]
            start = 0 if len(operand) == 0 else canonical_axis(self, axis, len(bottom))
            if tuple(bottom[start:start + len(operand)]) != tuple(operand):
                raise self.error(f"second bottom shape {operand} does not match the first "
                                 f"bottom {bottom} from axis {start}")
            self.operand_shape = tuple(operand)
        else:
            self.operand_shape = _learned_shape(self, bottom, axis, num_axes)
        self.learned_names = learned_names
        for name in learned_names:
            self.register_parameter(name, None)

    def blob_shapes(self):
        return [self.operand_shape] * len(self.learned_names)

    def load_blobs(self, blobs):
        load_named(self, self.learned_names, blobs)

    def _learned(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise self.error("learned blobs were never loaded")
        return value


@register("Scale")
class Scale(_AxisOperand):
    """x * gamma (+ beta), gamma spanning ``num_axes`` axes from ``axis`` (default one, the
    channels). Gamma is learned, or is the second bottom; beta is learned when bias_term."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        sp = param.scale_param
        self.bias_term = sp.bias_term
        names = [] if len(bottom_shapes) == 2 else ["gamma"]
        self._setup(param, sp.axis, sp.num_axes, names + (["beta"] if self.bias_term else []))

    def forward(self, x: torch.Tensor, *gamma_bottom: torch.Tensor) -> tuple[torch.Tensor]:
        gamma = gamma_bottom[0] if gamma_bottom else self._learned("gamma")
        y = x * _broadcastable(self, x, gamma, self.axis)
        if self.bias_term:
            y.add_(_broadcastable(self, x, self._learned("beta"), self.axis))
        return (y,)

    def channel_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta) per channel, for folding; only a learned per-channel gamma folds."""
        if not self.learned_names or self.learned_names[0] != "gamma" or self.axis != 1 \
                or len(self.operand_shape) != 1:
            raise self.error("only a learned per-channel Scale can be folded")
        gamma = self._learned("gamma")
        beta = self._learned("beta") if self.bias_term else torch.zeros_like(gamma)
        return gamma, beta


@register("Bias")
class Bias(_AxisOperand):
    """x + beta, beta spanning ``num_axes`` axes from ``axis``; learned or the second bottom."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        bp = param.bias_param
        names = [] if len(bottom_shapes) == 2 else ["beta"]
        self._setup(param, bp.axis, bp.num_axes, names)

    def forward(self, x: torch.Tensor, *beta_bottom: torch.Tensor) -> tuple[torch.Tensor]:
        beta = beta_bottom[0] if beta_bottom else self._learned("beta")
        return (x + _broadcastable(self, x, beta, self.axis),)
