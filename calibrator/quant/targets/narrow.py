"""``int7``: narrower operands, exact accumulation (ARM-style kernels that keep products of
two 7-bit values in int16, or ``--bits 7`` runtimes).

Weights are clamped to [-2^(b-1), 2^(b-1) - 1] and activations to u_b [0, 2^b - 1] /
s_b [-2^(b-1), 2^(b-1) - 1]; the products are then accumulated exactly. A plan built with
``--bits 7`` is unchanged by it; an 8-bit plan shows what clamping to 7 bits costs."""

from __future__ import annotations

import torch

from calibrator.quant.targets.base import Target


class NarrowOperands(Target):
    def __init__(self, name: str, description: str, bits: int):
        super().__init__(name, description)
        self.bits = bits

    @property
    def exact(self) -> bool:
        return False

    def accumulate(self, kernel, q_in: torch.Tensor, record=None) -> torch.Tensor:
        bits = self.bits
        if kernel.quant.input_unsigned:
            q_in = q_in.clamp(0, 2 ** bits - 1)
        else:
            q_in = q_in.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        key = ("narrow", bits)
        if key not in kernel.cache:
            kernel.cache[key] = kernel.q_weight.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return kernel.exact_accumulate(q_in, kernel.cache[key])
