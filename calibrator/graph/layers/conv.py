"""Convolution and Deconvolution (2-D), following Caffe's ``BaseConvolutionLayer`` rules.

Caffe spells kernel, stride and pad either as a repeated field (one value for both axes or
one per axis) or as an ``_h``/``_w`` pair, never both; the checks below mirror its CHECKs so a
prototxt Caffe would refuse is refused here too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calibrator.graph.layer import Layer, register
from calibrator.graph.layers._common import check_io, field_or, has_field, load_named

_DEPTHWISE_TYPES = ("ConvolutionDepthwise", "DepthwiseConvolution")


def _per_axis(layer: Layer, conv, repeated: str, h_name: str | None, w_name: str | None,
              default: int | None) -> tuple[int, int]:
    """(h, w) of one spatial setting, from ``repeated`` or from its ``_h``/``_w`` pair."""
    values = list(getattr(conv, repeated))
    if h_name and (has_field(conv, h_name) or has_field(conv, w_name)):
        if values:
            raise layer.error(f"either {repeated} or {h_name}/{w_name}, not both")
        return getattr(conv, h_name), getattr(conv, w_name)
    if not values and default is not None:
        return default, default
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise layer.error(f"{repeated} needs 1 or 2 values for a 2-D convolution, got {len(values)}")


@register("Convolution", *_DEPTHWISE_TYPES)
class Convolution(Layer):
    """Caffe convolution; every bottom is convolved with the same weights into its own top.

    The depthwise variants from Caffe forks are grouped convolutions with one group per
    input channel."""

    transposed = False

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, None), (len(self.bottom_shapes),) * 2)
        shape = self.bottom_shapes[0]
        if any(s != shape for s in self.bottom_shapes):
            raise self.error(f"all bottoms must have the same shape, got {self.bottom_shapes}")
        if len(shape) != 4:
            raise self.error(f"only 2-D convolution is supported, bottom shape {shape}")
        conv = param.convolution_param
        if conv.axis not in (1, -3):
            raise self.error(f"only channel axis 1 is supported, got axis {conv.axis}")

        self.kernel = _per_axis(self, conv, "kernel_size", "kernel_h", "kernel_w", None)
        self.stride = _per_axis(self, conv, "stride", "stride_h", "stride_w", 1)
        self.pad = _per_axis(self, conv, "pad", "pad_h", "pad_w", 0)
        self.dilation = _per_axis(self, conv, "dilation", None, None, 1)
        for name, values in (("kernel", self.kernel), ("stride", self.stride),
                             ("dilation", self.dilation)):
            if min(values) <= 0:
                raise self.error(f"{name} must be positive, got {values}")

        channels = shape[1]
        self.num_output = conv.num_output
        if param.type in _DEPTHWISE_TYPES:
            self.num_output = self.num_output or channels
            if param.type == "ConvolutionDepthwise" and self.num_output != channels:
                raise self.error(f"num_output {self.num_output} must equal the input "
                                 f"channels {channels}")
            self.group = channels
        else:
            self.group = conv.group
        if self.num_output <= 0:
            raise self.error("num_output must be positive")
        if self.group <= 0 or channels % self.group or self.num_output % self.group:
            raise self.error(f"group {self.group} must divide the input channels {channels} "
                             f"and num_output {self.num_output}")
        self.bias_term = conv.bias_term
        # Intel Caffe fuses a following ReLU into the convolution (slope from relu_param).
        self.fused_relu_slope = (float(param.relu_param.negative_slope)
                                 if field_or(conv, "relu", False) else None)

        extents = [d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel)]
        if self.transposed:
            out = [s * (i - 1) + e - 2 * p
                   for i, s, e, p in zip(shape[2:], self.stride, extents, self.pad)]
        else:
            out = [(i + 2 * p - e) // s + 1
                   for i, s, e, p in zip(shape[2:], self.stride, extents, self.pad)]
        if min(out) <= 0:
            raise self.error(f"output size {tuple(out)} is empty for bottom shape {shape}")
        self.output_size = tuple(out)
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def workspace_bytes(self) -> int:
        """An im2col (col2im) buffer of one image: what the generic kernels allocate."""
        shape = self.bottom_shapes[0]
        spatial = shape[2:] if self.transposed else self.output_size
        channels = shape[1] if not self.transposed else self.num_output
        return 4 * channels * self.kernel[0] * self.kernel[1] * spatial[0] * spatial[1]

    def top_shapes(self):
        return [(shape[0], self.num_output, *self.output_size) for shape in self.bottom_shapes]

    def blob_shapes(self):
        channels = self.bottom_shapes[0][1]
        if self.transposed:
            weight = (channels, self.num_output // self.group, *self.kernel)
        else:
            weight = (self.num_output, channels // self.group, *self.kernel)
        return [weight, (self.num_output,)] if self.bias_term else [weight]

    def load_blobs(self, blobs):
        load_named(self, ["weight", "bias"], blobs)

    def forward(self, *bottoms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.weight is None:
            raise self.error("learned blobs were never loaded")
        tops = tuple(self._convolve(x) for x in bottoms)
        slope = self.fused_relu_slope
        if slope is None:
            return tops
        return tuple(torch.clamp(t, min=0) + slope * torch.clamp(t, max=0) for t in tops)

    # -- the surface quantization uses (it never touches the attributes) --------------------
    def weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight with output channels first, bias or None)."""
        if self.transposed:
            raise self.error("Deconvolution is not quantized")
        return self.weight, self.bias

    def run_with(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
        """This layer's convolution with other weights (quantized ones, for simulation)."""
        return F.conv2d(x, weight, bias, self.stride, self.pad, self.dilation, self.group)

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.dilation,
                        self.group)


@register("Deconvolution")
class Deconvolution(Convolution):
    """Caffe deconvolution: the transpose of convolution, weight stored (C_in, O/g, kh, kw)."""

    transposed = True

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.pad, 0,
                                  self.group, self.dilation)
