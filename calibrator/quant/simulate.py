"""Simulated INT8 inference: what Intel Caffe's MKL-DNN INT8 convolution computes, as
fake-quant on the fused graph.

Per quantized unit:
  q_in  = saturate(round(x * scale_in))             u8 [0, 255] or s8 [-128, 127]
          (used as-is with force_u8_input: the data layer already produces u8 values)
  q_w   = saturate(round(W' * scale_params[o]))      s8, W' the folded weights
  q_b   = round(b' * scale_in * scale_params[o])     s32
  acc   = conv(q_in, q_w) + q_b                      exact int32 accumulation
  y     = acc / (scale_in * scale_params[o])  (+ residual)  -> fused ReLU
  out   = saturate(round(y * scale_out)) / scale_out     INT8 output, or y for FP32 output
A residual stored as INT8 with scale s_r enters as q_r * scale_out / s_r, i.e. its float value
times scale_out: the float form above is the same number.

A runtime that requantizes in float32 instead (ONNX Runtime's MLAS), and that has no fused
conv + sum (it rounds the conv output before a separate QLinearAdd), is reproduced integer
for integer by ``requant`` (unit -> ``RuntimeRequant``, read off the runtime's graph by
``calibrator.verify.ort_graph``).

The accumulation is exact: products and partial sums are integers, and float32 holds every
integer below 2^24. When a layer's worst case (largest input x the largest per-channel sum of
|integer weights|) could pass 2^24 the input is split into digits (4-bit halves, or narrower),
each convolved exactly, and recombined in float64; when even 1-bit digits could pass it, the
layer runs in float64.
Rounding is half-to-even (``torch.round``), as the runtime's nearbyint.

Exactness is the simulator's own business: every accumulation runs inside
:func:`exact_arithmetic`, which turns CUDA's TF32 off for its duration (TF32 convolutions
round the 8-bit operands' products; the caller's settings are restored afterwards).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from calibrator.quant.folding import folded_weights
from calibrator.quant.fusion import FusedGraph, FusedUnit
from calibrator.quant.scales import LayerQuant, QuantPlan
from calibrator.quant.targets import Target, get_target

EXACT_LIMIT = 2 ** 24


@contextlib.contextmanager
def exact_arithmetic():
    """No TF32 on CUDA while the block runs (restored afterwards): float32 convolutions of
    integers below 2^24 are then exact, which the integer simulation relies on."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def quantize(x: torch.Tensor, scale: float, unsigned: bool, bits: int = 8) -> torch.Tensor:
    """Integer values (as float tensors) of x at ``scale``."""
    q = (x * scale).round_()
    if unsigned:
        return q.clamp_(0, 2 ** bits - 1)
    return q.clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@dataclass(frozen=True)
class RuntimeRequant:
    """One unit as a float32-requantizing runtime runs it, in ONNX's convention
    (real = (q - zero_point) * scale):

    * input   q = clamp(rint(f32(x / x_scale)) + x_zero_point)
    * output  q = clamp(rint(f32(acc) * multiplier[o]) + y_zero_point), the unit's INT8
      output on the grid of whatever quantizes it next (its own Q, or the next unit's input
      Q when only a Relu/Clip lies between);
    * ``add`` = (a_scale, a_zp, b_scale, b_zp, c_scale, c_zp): that output is then added to
      the residual, q_c = clamp(rint(f32(f32(a_scale (q_a - a_zp) + b_scale (q_b - b_zp))
      / c_scale)) + c_zp); without it a residual is added in float32 and ``out`` = (scale,
      zero point) quantizes the sum (None: the sum stays float).
    ``multiplier`` None: the runtime runs the unit as a float conv (only the input rule)."""

    x_scale: float
    x_zero_point: int
    multiplier: tuple[float, ...] | None = None
    y_scale: float = 1.0
    y_zero_point: int = 0
    qmin: int = 0
    qmax: int = 255
    add: tuple | None = None
    out: tuple | None = None


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(np.float32(value), dtype=torch.float32)


def runtime_quantize(x: torch.Tensor, rule: RuntimeRequant) -> torch.Tensor:
    """The integers (zero point removed) a QuantizeLinear with ``rule``'s input scale gives."""
    q = torch.round(x.float() / _f32(rule.x_scale).to(x.device)) + rule.x_zero_point
    return q.clamp_(rule.qmin, rule.qmax).sub_(rule.x_zero_point)


def runtime_requantize(acc: torch.Tensor, rule: RuntimeRequant, residual=None,
                       relu_slope: float | None = None) -> torch.Tensor:
    """The unit's output, dequantized (float32), from its accumulator (bias included)."""
    device = acc.device

    def quantize_to(x, scale, zero):
        q = torch.round(x / _f32(scale).to(device)) + zero
        return q.clamp_(rule.qmin, rule.qmax)

    multiplier = torch.tensor(np.asarray(rule.multiplier, np.float32), device=device)
    q = torch.round(acc.float() * _per_channel(multiplier, acc)) + rule.y_zero_point
    q = q.clamp_(rule.qmin, rule.qmax)
    scale, zero = rule.y_scale, rule.y_zero_point
    if residual is not None and rule.add is not None:
        a_scale, a_zp, b_scale, b_zp, c_scale, c_zp = rule.add
        b = quantize_to(residual.float(), b_scale, b_zp)
        value = _f32(a_scale).to(device) * (q - a_zp) + _f32(b_scale).to(device) * (b - b_zp)
        q, scale, zero = quantize_to(value, c_scale, c_zp), c_scale, c_zp
    y = (q - zero) * _f32(scale).to(device)
    if residual is not None and rule.add is None:
        y = y + residual.float()
    if relu_slope is not None:  # (a runtime fuses a ReLU only into a zero-point clamp)
        y = torch.where(y > 0, y, y * relu_slope) if relu_slope else y.clamp_(min=0)
    if residual is not None and rule.add is None and rule.out is not None:
        y = (quantize_to(y, *rule.out) - rule.out[1]) * _f32(rule.out[0]).to(device)
    return y


@dataclass
class UnitKernel:
    """Precomputed integer weights and requantization factors of one unit, and how it
    accumulates (``target``; targets keep derived weights in ``cache``)."""

    unit: FusedUnit
    quant: LayerQuant
    q_weight: torch.Tensor
    q_bias: torch.Tensor          # float64, integer-valued
    dequant: torch.Tensor         # 1 / (scale_in * scale_params[o]), float64 (0 for a 0 scale)
    split: int | None             # bits per input digit (0: float64), None: one pass
    target: Target | None = None  # None: exact int32
    cache: dict = field(default_factory=dict, repr=False)

    def accumulate(self, q_in: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        with exact_arithmetic():
            acc = (self.exact_accumulate(q_in) if self.target is None
                   else self.target.accumulate(self, q_in, record))
        return acc.add_(_per_channel(self.q_bias, acc))  # acc is a fresh buffer

    def exact_accumulate(self, q_in: torch.Tensor,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
        """conv(q_in, weight or q_weight) in exact integer arithmetic, float64, no bias."""
        run = self.unit.layer.module.run_with
        weight = self.q_weight if weight is None else weight
        if self.split is None:
            acc = run(q_in, weight, None).double()
        elif self.split == 0:
            acc = run(q_in.double(), weight.double(), None)
        else:  # q = sum_k base^k d_k, d_k in [0, base): each digit accumulates exactly
            base, rest, acc = 2 ** self.split, q_in, None
            digits = -(-self.quant.bits // self.split)
            for k in range(digits):
                high = torch.div(rest, base, rounding_mode="floor") if k < digits - 1 else None
                digit = rest if high is None else rest - base * high
                part = run(digit, weight, None).double() * float(base ** k)
                acc = part if acc is None else acc + part
                rest = high
        return acc


def _digit_bits(weight_l1: float, qmax_in: int) -> int | None:
    """Bits per input digit that keep every digit's accumulation below 2^24 (None: the whole
    input does; 0: no digit width does, accumulate in float64).

    ``weight_l1`` is the largest sum of |integer weights| over one output channel: every
    partial sum of that channel is at most (largest input) x weight_l1, a far tighter bound
    than 127 x fan-in, so most layers need a single float32 pass."""
    if qmax_in * weight_l1 < EXACT_LIMIT:
        return None
    for bits in (4, 3, 2, 1):
        if (2 ** bits - 1) * weight_l1 < EXACT_LIMIT:
            return bits
    return 0


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape((1, -1) + (1,) * (like.dim() - 2))


def build_kernel(unit: FusedUnit, lq: LayerQuant, device,
                 target: Target | None = None) -> UnitKernel:
    weight, bias = folded_weights(unit)
    scales = torch.tensor(lq.scale_params, dtype=torch.float64, device=device)
    limit = 2 ** (lq.bits - 1) - 1
    shape = (-1,) + (1,) * (weight.dim() - 1)
    q_weight = torch.round(weight.double().to(device) * scales.reshape(shape)).clamp(
        -limit - 1, limit).float()
    q_bias = torch.round(bias.double().to(device) * lq.scale_in * scales)
    denominator = lq.scale_in * scales
    dequant = torch.where(denominator > 0, 1.0 / denominator.clamp(min=1e-300),
                          torch.zeros_like(denominator))
    weight_l1 = float(q_weight.abs().reshape(q_weight.shape[0], -1).sum(1).max())
    qmax_in = 2 ** lq.bits - 1 if lq.input_unsigned else 2 ** (lq.bits - 1)
    return UnitKernel(unit, lq, q_weight, q_bias, dequant, _digit_bits(weight_l1, qmax_in),
                      target)


class Int8Simulator:
    """Overrides for ``CaffeNet.forward`` that run each quantized unit as INT8 would.

    The unit's layer node computes the integer accumulation; its folded/fused nodes are
    skipped; its last node applies residual, ReLU and output requantization.

    ``target`` (a Target or its name; None: exact int32) is how the INT8 kernels
    accumulate; units in ``exact_units`` accumulate exactly whatever the target (those a
    runtime runs as float convolutions). Given a dict ``saturation``, the per-layer
    saturation of the target's kernels is collected there (layer -> SaturationRecord)."""

    def __init__(self, fused: FusedGraph, plan: QuantPlan, device=None,
                 requant: dict[str, RuntimeRequant] | None = None,
                 target: Target | str | None = None, exact_units=(),
                 saturation: dict | None = None):
        self.fused = fused
        self.plan = plan
        self.requant = dict(requant or {})
        self.target = None if target is None else get_target(target)
        self.saturation = saturation
        device = device or fused.net.device
        exact_units = frozenset(exact_units)
        kernel_target = None if self.target is None or self.target.exact else self.target
        self.kernels = {name: build_kernel(fused.by_name[name], lq, device,
                                           None if name in exact_units else kernel_target)
                        for name, lq in plan.layers.items()}
        self.overrides = {}
        for name, kernel in self.kernels.items():
            unit = kernel.unit
            for node in unit.nodes:
                self.overrides[node.index] = self._skip
            if unit.eltwise is not None and unit.eltwise is not unit.last:
                self.overrides[unit.eltwise.index] = self._make_stash(kernel)
            self.overrides[unit.layer.index] = self._make_start(kernel)
            self.overrides[unit.last.index] = self._make_finish(kernel, unit.layer.index
                                                                == unit.last.index)

    @staticmethod
    def _skip(node, blobs):
        return None

    def _make_stash(self, kernel: UnitKernel):
        """Keep the residual before the add's node frees it (a fused ReLU follows)."""
        def stash(node, blobs):
            blobs[f"\0res:{kernel.unit.name}"] = self._residual(kernel.unit, blobs)
            return None

        return stash

    def _residual(self, unit: FusedUnit, blobs) -> torch.Tensor:
        stashed = blobs.pop(f"\0res:{unit.name}", None)
        if stashed is not None:
            return stashed
        return blobs[unit.eltwise.bottoms[self._residual_position(unit)]]

    def _make_start(self, kernel: UnitKernel):
        key = f"\0acc:{kernel.unit.name}"
        single = kernel.unit.last is kernel.unit.layer

        rule = self.requant.get(kernel.unit.name)

        def start(node, blobs):
            x = blobs[node.bottoms[0]]
            lq = kernel.quant
            if rule is not None:
                q_in = runtime_quantize(x, rule)
            elif lq.force_u8_input:
                q_in = x
            else:
                q_in = quantize(x, lq.scale_in, lq.input_unsigned, lq.bits)
            blobs[key] = kernel.accumulate(q_in, self.saturation)
            if single:
                return self._finish(kernel, node, blobs)
            return None

        return start

    def _make_finish(self, kernel: UnitKernel, single: bool):
        if single:
            return self._make_start(kernel)

        def finish(node, blobs):
            return self._finish(kernel, node, blobs)

        return finish

    def _finish(self, kernel: UnitKernel, node, blobs):
        unit, lq = kernel.unit, kernel.quant
        y = blobs.pop(f"\0acc:{unit.name}")
        rule = self.requant.get(unit.name)
        if rule is not None and rule.multiplier is not None:
            residual = self._residual(unit, blobs) if unit.residual is not None else None
            return (runtime_requantize(y, rule, residual, unit.relu_slope),)
        # the accumulator is this unit's own float64 buffer: update it in place (the same
        # float64 operations in the same order, fewer allocations)
        y.mul_(_per_channel(kernel.dequant, y))
        if unit.residual is not None:
            y.add_(self._residual(unit, blobs))  # float32 -> float64 is exact
        slope = unit.relu_slope
        if slope is not None:
            y = torch.where(y > 0, y, y * slope) if slope else y.clamp_(min=0)
        if lq.output_int8:
            y = quantize(y, lq.scale_out, lq.output_unsigned, lq.bits).div_(lq.scale_out)
        return (y.float(),)

    def _residual_position(self, unit: FusedUnit) -> int:
        bottoms = unit.eltwise.bottoms
        for i, name in enumerate(bottoms):
            if self.fused.input_of(unit.eltwise, i) == unit.residual:
                return i
        raise AssertionError("residual not found")  # pragma: no cover
