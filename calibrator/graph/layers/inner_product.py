"""InnerProduct: a fully connected layer over everything from ``axis`` on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calibrator.graph.layer import Layer, register
from calibrator.graph.layers._common import canonical_axis, check_io, count, load_named


@register("InnerProduct")
class InnerProduct(Layer):
    """Caffe flattens the bottom from ``axis`` (K inputs) and keeps the leading axes, so a
    (N, C, H, W) bottom with axis 1 gives (N, num_output). With ``transpose`` the caffemodel
    stores the weight as (K, num_output) instead of (num_output, K)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, 1))
        ip = param.inner_product_param
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(self, ip.axis, len(shape))
        self.num_output = ip.num_output
        if self.num_output <= 0:
            raise self.error("num_output must be positive")
        self.num_inputs = count(shape, self.axis)
        self.transpose = ip.transpose
        self.bias_term = ip.bias_term
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def top_shapes(self):
        return [self.bottom_shapes[0][:self.axis] + (self.num_output,)]

    def blob_shapes(self):
        weight = ((self.num_inputs, self.num_output) if self.transpose
                  else (self.num_output, self.num_inputs))
        return [weight, (self.num_output,)] if self.bias_term else [weight]

    def load_blobs(self, blobs):
        load_named(self, ["weight", "bias"], blobs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        if self.weight is None:
            raise self.error("learned blobs were never loaded")
        # The weight keeps the caffemodel layout; with transpose its output axis is 1.
        return (self.run_with(x, *self.weight_bias()),)

    # -- the surface quantization uses ------------------------------------------------------
    def weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight as (num_output, K) whatever the stored layout, bias or None)."""
        if self.weight is None:
            raise self.error("learned blobs were never loaded")
        return (self.weight.t() if self.transpose else self.weight), self.bias

    def run_with(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
        """This layer with other weights, given as (num_output, K)."""
        return F.linear(x.flatten(self.axis), weight, bias)
