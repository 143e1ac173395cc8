"""Eltwise: element-wise PROD, SUM (with one coefficient per bottom) or MAX of its bottoms."""

from __future__ import annotations

import numpy as np
import torch

from calibrator.graph.layer import Layer, register
from calibrator.graph.layers._common import check_io


@register("Eltwise")
class Eltwise(Layer):
    keeps_shape = True
    PROD, SUM, MAX = 0, 1, 2

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (2, None), (1, 1))
        ew = param.eltwise_param
        self.operation = ew.operation
        if self.operation not in (self.PROD, self.SUM, self.MAX):
            raise self.error(f"unknown operation {self.operation}")
        coeffs = [float(np.float32(c)) for c in ew.coeff]
        if coeffs and len(coeffs) != len(self.bottom_shapes):
            raise self.error(f"takes one coefficient per bottom: {len(coeffs)} coefficients "
                             f"for {len(self.bottom_shapes)} bottoms")
        if coeffs and self.operation == self.PROD:
            raise self.error("only SUM takes coefficients")
        self.coeffs = coeffs or [1.0] * len(self.bottom_shapes)
        if any(s != self.bottom_shapes[0] for s in self.bottom_shapes):
            raise self.error(f"all bottoms must have the same shape, got {self.bottom_shapes}")

    def forward(self, *bottoms: torch.Tensor) -> tuple[torch.Tensor]:
        if self.operation == self.PROD:
            top = bottoms[0] * bottoms[1]
            for x in bottoms[2:]:
                top = top * x
        elif self.operation == self.SUM:
            # Caffe accumulates coeff * bottom into a zeroed top, one bottom at a time.
            top = None
            for coeff, x in zip(self.coeffs, bottoms):
                term = x if coeff == 1 else x * coeff
                top = term if top is None else top + term
        else:
            # Caffe's comparison order, which decides ties of -0/+0 and NaNs: the first pair
            # keeps bottom 0 only if strictly larger, later bottoms win only if strictly larger.
            top = torch.where(bottoms[0] > bottoms[1], bottoms[0], bottoms[1])
            for x in bottoms[2:]:
                top = torch.where(x > top, x, top)
        return (top,)
