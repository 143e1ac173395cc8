"""Simulated INT8 inference: what Intel Caffe's MKL-DNN INT8 kernels compute, integer for
integer, on the fused graph.

Per quantized unit (Intel Caffe 1.1.6, ``src/caffe/layers/mkldnn_convolution_layer.cpp``
``InitConvolutionFwd`` and MKL-DNN v0.18 ``jit_avx512_core_x8s8s32x_conv_kernel.cpp``
``store_output``; the inner product is the same, ``gemm_x8s8s32x_inner_product.cpp``):

  q_in  = sat(rne(f32(x) * f32(scale_in)))            u8 [0, 255] or s8 [-128, 127]
          from INT8 data at scale s: sat(rne(q * f32(scale_in / s))), q itself when the
          data type and scale agree (the extprv reorder, ``mkldnn_memory.cpp`` :122-139);
          with force_u8_input the reorder scale is 1.0: sat_u8(rne(x)) of the data
          layer's values (``mkldnn_convolution_layer.cpp`` :485-490)
  q_w   = sat_s8(rne(f32(W') * f32(scale_params[o])))  W' the folded weights
  q_b   = sat_s32(rne(f32(b') * f32(scale_in * scale_params[o])))
  acc   = conv(q_in, q_w)                              exact int32 accumulation
  m[o]  = f32(f32(scale_out / f32(scale_in * scale_params[o])) * c1)   (scale_out * c1 for
          a zero scale; c1 = coeff(1) of an absorbed Eltwise, else 1)
  y     = (f32(acc) + f32(q_b)) * m[o]                 float32, in this order
  y     = fma(f32(f32(scale_out / scale_residual) * c0), f32(q_residual), y)   absorbed Eltwise
  y     = ReLU(y) (slope s: y < 0 -> y * s); u8 output: max(y, 0)
  q_out = sat(rne(y))                                   INT8 output; FP32 output keeps y
and the next layer reads ``f32(q_out) * f32(1 / scale_out)``. Rounding is half-to-even
(``torch.round``, as ``vcvtps2dq {rn-sae}`` and ``nearbyintf``). The simulation hands the
next unit ``q_out`` itself (:class:`StoredIntegers`), which it would get back from those
values by ``sat(rne(. * f32(scale)))`` wherever :func:`round_trip_exact` holds (every scale
but those near float32's smallest), and gives every other reader the values.

Intel's kernel rules that differ from ideal fake-quant (``IntelFormats`` tracks the data type
and scale of every tensor between the INT8 layers, as Intel's MKL-DNN memory descriptors do):

* a conv with a fused Eltwise SUM writes its residual's data type (u8 or s8, whatever its
  own ReLU), at its own scale_out (``mkldnn_convolution_layer.cpp`` :287-310); with an FP32
  residual Intel runs the whole conv in FP32 and ignores its quantization_param;
* Concat of INT8 inputs of one data type requantizes each input to the smallest input scale,
  ``q' = sat(rne(q * f32(s_min / s_i)))`` (an input whose scale is exactly 1.0 counts as
  unscaled and is only relabelled); mixed u8/s8 inputs make it FP32
  (``mkldnn_concat_layer.cpp`` ``InitConcatFwd`` :140-289);
* AVE pooling of INT8 values rounds the mean back to the INT8 grid,
  ``sat(rne(f32(sum) * f32(1 / n)))`` (``jit_uni_i8i8_pooling.cpp``);
* an Eltwise no conv absorbed, with INT8 inputs of one data type, reorders each input to
  scale 1.0, ``q' = sat(rne(q * f32(1 / s_i)))``, adds ``coeff_i * q'`` and saturates: its
  output is INT8 at scale 1.0, integer real values (``mkldnn_eltwise_layer.cpp``
  ``InitEltwiseFwd`` :122-237; the inputs' MKLDNNData keep the default scale 1.0);
* an InnerProduct with a fused ReLU of any slope writes u8 (``mkldnn_inner_product_layer.cpp``
  :190-192).

A runtime that requantizes in float32 its own way (ONNX Runtime's MLAS), and that has no fused
conv + sum (it rounds the conv output before a separate QLinearAdd), is reproduced integer
for integer by ``requant`` (unit -> ``RuntimeRequant``, read off the runtime's graph by
``calibrator.backends.ort``).

The accumulation is exact: products and partial sums are integers, and float32 holds every
integer below 2^24. When a layer's worst case (largest input x the largest per-channel sum of
|integer weights|) could pass 2^24 the input is split into digits (4-bit halves, or narrower),
each convolved exactly, and recombined in float64; when even 1-bit digits could pass it, the
layer runs in float64. Everything after the accumulation is float32, as in the kernels.
Where the bias too keeps every partial sum below 2^24 (``UnitKernel.bias_folds``), it goes
into the convolution itself: f32(acc + q_b) is then exact, the same value as
f32(acc) + f32(q_b) above, one elementwise pass less.

The elementwise work after each accumulation (multiplier, residual sum, saturation,
rounding) and each quantization of FP32 data runs in one pass over memory through
:mod:`calibrator.quant.native` where its kernel is built (the same bits as the tensor
operations, which run where it is not); a unit's FP32 output then leaves its multiplier to
the unit that quantizes it (:class:`PendingMultiplier`).

Exactness is the simulator's own business: every accumulation runs inside
:func:`exact_arithmetic`, which turns CUDA's TF32 and cuDNN off for its duration (TF32
convolutions round the 8-bit operands' products, cuDNN's Winograd/FFT algorithms are not
exact on integers; the caller's settings are restored afterwards).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from calibrator.graph.layers.pooling import caffe_ave_pool_parts
from calibrator.graph.net import Blobs, Encoded
from calibrator.quant import native
from calibrator.quant.folding import folded_once, folded_weights
from calibrator.quant.fusion import FusedGraph, FusedUnit
from calibrator.quant.scales import LayerQuant, QuantPlan
from calibrator.quant.targets import Target, get_target

EXACT_LIMIT = 2 ** 24


@contextlib.contextmanager
def exact_arithmetic():
    """No TF32 and no cuDNN on CUDA while the block runs (restored afterwards): float32
    convolutions of integers below 2^24 are then exact, which the integer simulation relies
    on. cuDNN may pick Winograd or FFT algorithms (deterministic, but not exact on
    integers); without it PyTorch's own CUDA kernels (im2col + cuBLAS GEMM, direct
    depthwise sums) add the integer products in float32 exactly, in any order."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    cudnn_enabled = torch.backends.cudnn.enabled
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cudnn.enabled = cudnn_enabled


def _rounded(x: torch.Tensor, scale, in_place: bool) -> torch.Tensor:
    """rne(x * scale), a new tensor or (``in_place``) ``x`` itself."""
    return (x.mul_(scale) if in_place else x * scale).round_()


def quantize(x: torch.Tensor, scale: float, unsigned: bool, bits: int = 8,
             in_place: bool = False) -> torch.Tensor:
    """Integer values (as float tensors) of x at ``scale`` (``in_place``: in ``x``); in one
    pass where :mod:`calibrator.quant.native` can (the same bits)."""
    low, high = Format("u8" if unsigned else "s8").bounds(bits)
    if isinstance(scale, (int, float)):   # (a tensor of scales broadcasts its own way)
        fused = native.requantize(x, float(scale), low, high, out=x if in_place else None)
        if fused is not None:
            return fused
    return _rounded(x, scale, in_place).clamp_(low, high)


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


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape((1, -1) + (1,) * (like.dim() - 2))


@dataclass
class UnitKernel:
    """Precomputed integer weights and requantization constants of one unit, and how it
    accumulates (``target``; targets keep derived weights in ``cache``)."""

    unit: FusedUnit
    quant: LayerQuant
    q_weight: torch.Tensor        # float32, integer-valued
    q_bias: torch.Tensor          # float32, integer-valued (Intel's s32 bias)
    multiplier: torch.Tensor      # float32 m[o] (see the module docstring)
    split: int | None             # bits per input digit (0: float64), None: one pass
    target: Target | None = None  # None: exact int32
    cache: dict = field(default_factory=dict, repr=False)
    #: the int32 bias goes into the float32 convolution itself: exact int32 accumulation in
    #: one pass with every partial sum, bias included, below 2^24 (see :meth:`biased`);
    #: False where a runtime's requantization adds the bias its own way
    bias_folds: bool = False

    def accumulate(self, q_in: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        """The integer accumulator without bias: float32 when exact in one pass (the common
        case), else float64 (digits, or a target's correction), integer-valued either way."""
        with exact_arithmetic():
            if self.target is None and self.split is None:
                return self.unit.layer.module.run_with(q_in, self.q_weight, None)
            if self.target is None:
                return self.exact_accumulate(q_in)
            return self.target.accumulate(self, q_in, record)

    def biased(self, q_in: torch.Tensor) -> torch.Tensor:
        """The accumulator with the int32 bias added, in one float32 convolution (only when
        ``bias_folds``: every partial sum is an integer below 2^24, so the sum is exact in
        any order and equals the accumulator plus the bias added afterwards, bit for bit)."""
        with exact_arithmetic():
            return self.unit.layer.module.run_with(q_in, self.q_weight, self.q_bias)

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

    def runtime_bias(self) -> torch.Tensor:
        """The int32 bias of the ONNX export (``calibrator.export.qdq``): Intel's, with 0 for a
        zero weight scale."""
        if "runtime_bias" not in self.cache:
            zero = torch.tensor(self.quant.scale_params, device=self.q_bias.device) <= 0
            self.cache["runtime_bias"] = torch.where(zero, torch.zeros_like(self.q_bias),
                                                     self.q_bias).double()
        return self.cache["runtime_bias"]


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


def intel_bias(bias: torch.Tensor, product: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_bias, divisor) for the float32 products ``f32(s_in * s_w)`` (any shape that
    broadcasts with ``bias``): Intel's int32 bias ``sat_s32(rne(b * product))``, and the
    divisor that takes ``acc + q_bias`` back to real units; both use 1 where a weight scale is
    zero (an all-zero channel: its bias is reordered unscaled, so the channel outputs
    rne(b), ``mkldnn_convolution_layer.cpp`` :537-554)."""
    divisor = torch.where(product == 0, torch.ones_like(product), product)
    q_bias = torch.round(bias * divisor).clamp_(-2.0 ** 31, 2.0 ** 31 - 1)
    return q_bias, divisor


def intel_constants(weight: torch.Tensor, bias: torch.Tensor, lq: LayerQuant, device,
                    coeff: float = 1.0):
    """(q_weight, q_bias, multiplier) as Intel Caffe computes them, float32 arithmetic:
    weight reorder ``sat_s8(rne(w * s_w))``, bias reorder ``rne(b * f32(s_in * s_w))`` (scale
    1 for a zero weight scale), output scales ``s_out / f32(s_in * s_w) * coeff`` (``s_out *
    coeff`` for a zero weight scale; ``coeff`` = coeff(1) of an absorbed Eltwise);
    ``mkldnn_convolution_layer.cpp`` :347-370 and :537-554."""
    scales = torch.tensor(np.asarray(lq.scale_params, np.float32), device=device)
    s_in = _f32(lq.scale_in).to(device)
    s_out = _f32(lq.scale_out).to(device)
    limit = 2 ** (lq.bits - 1) - 1
    shape = (-1,) + (1,) * (weight.dim() - 1)
    q_weight = torch.round(weight.float().to(device) * scales.reshape(shape)).clamp_(
        -limit - 1, limit)
    product = s_in * scales                                  # f32(s_in * s_w)
    q_bias, divisor = intel_bias(bias.float().to(device), product)
    multiplier = torch.where(scales == 0, s_out.expand_as(product), s_out / divisor)
    if coeff != 1.0:
        multiplier = multiplier * _f32(coeff).to(device)
    return q_weight, q_bias, multiplier


def build_kernel(unit: FusedUnit, lq: LayerQuant, device,
                 target: Target | None = None) -> UnitKernel:
    weight, bias = folded_weights(unit, lq.bias_shift)
    coeff = unit.sum_coefficients[1] if unit.eltwise is not None else 1.0
    q_weight, q_bias, multiplier = intel_constants(weight, bias, lq, device, coeff)
    channel_l1 = q_weight.abs().reshape(q_weight.shape[0], -1).sum(1)
    qmax_in = 2 ** lq.bits - 1 if lq.input_unsigned else 2 ** (lq.bits - 1)
    split = _digit_bits(float(channel_l1.max()), qmax_in)
    bias_folds = (target is None and split is None
                  and float((q_bias.abs() + qmax_in * channel_l1).max()) < EXACT_LIMIT)
    return UnitKernel(unit, lq, q_weight, q_bias, multiplier, split, target,
                      bias_folds=bias_folds)


# -- data types between the INT8 layers -----------------------------------------------------

@dataclass(frozen=True)
class Format:
    """How Intel's runtime holds a tensor: ``f32``, or ``u8``/``s8`` at ``scale``."""

    dtype: str = "f32"
    scale: float = 1.0

    @property
    def int8(self) -> bool:
        return self.dtype != "f32"

    def bounds(self, bits: int = 8) -> tuple[int, int]:
        return (0, 2 ** bits - 1) if self.dtype == "u8" else (-(2 ** (bits - 1)),
                                                               2 ** (bits - 1) - 1)


F32 = Format()


def _unit_format(unit: FusedUnit, lq: LayerQuant, residual: Format | None) -> Format | None:
    """The unit's output format; None when Intel runs it in FP32 (an FP32 residual)."""
    if unit.residual is not None:
        if residual is None or not residual.int8:
            return None          # Intel: need_quantize_ = false, the whole conv in FP32
        return Format(residual.dtype, lq.scale_out)  # top_dt = the residual's dtype
    if not lq.output_int8:
        return F32
    if unit.kind == "fc":
        return Format("u8" if unit.relu_slope is not None else "s8", lq.scale_out)
    return Format("u8" if lq.output_unsigned else "s8", lq.scale_out)


def _concat_format(inputs: list[Format]) -> Format:
    """Intel's Concat: one INT8 data type in, the smallest scale out (1.0 = unset)."""
    if not inputs or any(not f.int8 for f in inputs) or len({f.dtype for f in inputs}) > 1:
        return F32
    scales = [f.scale for f in inputs if f.scale != 1.0]
    return Format(inputs[0].dtype, min(scales) if scales else 1.0)


def _eltwise_format(inputs: list[Format]) -> Format:
    """Intel's standalone Eltwise: one INT8 data type in, that type at scale 1.0 out."""
    if inputs and all(f.int8 for f in inputs) and len({f.dtype for f in inputs}) == 1:
        return Format(inputs[0].dtype, 1.0)
    return F32


PASS_THROUGH_SAME = ("ReLU", "Split", "Pooling")


def intel_formats(fused: FusedGraph, plan: QuantPlan) -> tuple[dict, set]:
    """(formats, fp32_units): the Format of every blob version (``BlobRef.key``) Intel's
    runtime holds between the layers for ``plan``, and the planned units it runs in FP32."""
    net = fused.net
    formats: dict[str, Format] = {}
    fp32_units: set[str] = set(plan.excluded)

    def of(node, i=0) -> Format:
        return formats.get(fused.input_of(node, i).key, F32)

    for node in net.nodes:
        unit = fused.unit_of_node.get(node.index)
        if unit is not None:
            if node is not unit.last:
                continue
            lq = plan.layers.get(unit.name)
            out = F32
            if lq is not None and unit.name not in fp32_units:
                residual = formats.get(unit.residual.key, F32) if unit.residual else None
                out = _unit_format(unit, lq, residual)
                if out is None:
                    fp32_units.add(unit.name)
                    out = F32
            formats[unit.output.key] = out
            continue
        if node.type in PASS_THROUGH_SAME and node.bottoms:
            out = of(node)
            if node.type == "ReLU" and out.int8 and node.param.relu_param.negative_slope:
                out = F32    # a leaky ReLU on INT8 data: not simulated as INT8
        elif node.type == "Concat":
            out = _concat_format([of(node, i) for i in range(len(node.bottoms))])
        elif node.type == "Eltwise":
            out = _eltwise_format([of(node, i) for i in range(len(node.bottoms))])
        else:
            out = F32
        for top in node.tops:
            formats[f"{node.index}:{top}"] = out
    return formats, fp32_units


def _reorder(x: torch.Tensor, source: Format, lq: LayerQuant, in_place: bool = False,
             stored: bool = False) -> torch.Tensor:
    """INT8 data at ``source`` into a conv's input: the stored integers, reordered by
    ``f32(scale_in / s)`` when the scale or the data type differs (``mkldnn_memory.cpp``
    :122-139; an s8 source read as u8 at the same scale is taken as is); ``in_place``:
    in ``x``; ``stored``: ``x`` holds the stored integers themselves (:class:`StoredIntegers`),
    returned as they are when nothing changes them."""
    fresh = in_place or not stored     # whether ``q`` may be changed in place
    q = x if stored else _rounded(x, _f32(source.scale).to(x.device), in_place)
    dtype = "u8" if lq.input_unsigned else "s8"
    bounds = Format(dtype).bounds(lq.bits)
    if np.float32(source.scale) == np.float32(lq.scale_in) and (
            dtype == source.dtype or dtype == "u8"):
        if dtype == source.dtype:
            return q
        return q.clamp_(*bounds) if fresh else q.clamp(*bounds)
    factor = _f32(np.float32(lq.scale_in) / np.float32(source.scale)).to(x.device)
    q = q.mul_(factor) if fresh else q * factor
    return q.round_().clamp_(*bounds)


def _to_float(q: torch.Tensor, scale: float) -> torch.Tensor:
    """What Caffe reads from INT8 memory: f32(q) * f32(1 / scale)."""
    return q.mul_(_f32(np.float32(1.0) / np.float32(scale)).to(q.device))


@dataclass(frozen=True)
class StoredIntegers:
    """The code of a blob the simulation holds as the integers of INT8 memory at ``scale``
    (``graph.net.Encoded``): the next unit reads them as they are instead of multiplying
    what Caffe reads, ``f32(q) * f32(1 / scale)``, back by ``f32(scale)`` and rounding (three
    elementwise passes fewer), where :func:`round_trip_exact` proves that gives the same
    integers; any other reader gets the values (``decode``: :func:`_to_float`, in place)."""

    scale: float

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        return _to_float(q, self.scale)

    def reads_as(self, form: Format) -> bool:
        """Whether a reader of INT8 memory at ``form`` may take the stored integers."""
        return (form.int8 and np.float32(form.scale) == np.float32(self.scale)
                and round_trip_exact(self.scale))


@functools.lru_cache(maxsize=4096)
def round_trip_exact(scale: float) -> bool:
    """Whether ``rne(f32(f32(q) * f32(1 / scale)) * f32(scale)) == q`` for every integer
    q an INT8 (or narrower) memory holds, [-256, 255]: then reading the stored integers
    equals reading what Caffe reads and rounding it back (checked with the same float32
    operations, so it is exact, not estimated; it fails only at scales near the float32
    range's ends)."""
    q = torch.arange(-256, 256, dtype=torch.float32)
    with np.errstate(over="ignore"):       # 1 / scale beyond float32: infinite, not exact
        back = _rounded(_to_float(q.clone(), scale), _f32(scale), in_place=True)
    return bool(torch.equal(back, q))


@dataclass(frozen=True, eq=False)
class PendingMultiplier:
    """The code of a unit's FP32 output whose last operation, the multiply by its per-channel
    requantization multiplier (``y * m[o]`` in Intel's epilogue), is left to the unit that
    quantizes it: its quantization computes ``f32(f32(y * m[o]) * s)`` in the same pass
    (:func:`calibrator.quant.native.requantize`'s second factor), the same two float32
    products, one elementwise pass fewer. Every other reader gets the values (``decode``:
    the multiply, in place). Made only where the kernel runs."""

    multiplier: torch.Tensor

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(_per_channel(self.multiplier, x))

    @staticmethod
    def quantizes_at(lq: LayerQuant) -> bool:
        return True

    def quantize(self, x: torch.Tensor, lq: LayerQuant, in_place: bool) -> torch.Tensor:
        """:func:`quantize` of the values at ``lq``'s input scale (``in_place``: in ``x``)."""
        low, high = Format("u8" if lq.input_unsigned else "s8").bounds(lq.bits)
        fused = native.requantize(x, self.multiplier, low, high, then=lq.scale_in,
                                  out=x if in_place else None)
        if fused is not None:
            return fused
        values = self.decode(x if in_place else x.clone())
        return quantize(values, lq.scale_in, lq.input_unsigned, lq.bits, in_place=True)


@dataclass(frozen=True, eq=False)
class PendingReLU6:
    """The code of an FP32 blob whose ReLU6 (``graph.layers.activations.ReLU6``, in place)
    is left to the unit that quantizes it: ``sat(rne(f32(min(max(x, 0), 6)) * s))`` equals
    ``rne(clamp(f32(x * s), 0, min(f32(6 s), qmax)))`` for a scale s > 0 (multiplying by s
    is monotone, so clamping before it or after it at the multiplied bounds is the same;
    rounding is monotone with integers fixed, so the saturation may come before it), one
    elementwise pass fewer than the ReLU6 and the quantization; zeros keep their sign either
    way (the same clamps at 0). Every other reader gets the ReLU6's output (``decode``, in
    place, the layer's own operation)."""

    #: a :class:`PendingMultiplier`'s multiplier still to apply before the ReLU6, or None
    multiplier: torch.Tensor | None = None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.multiplier is not None:
            x = PendingMultiplier(self.multiplier).decode(x)
        return x.clamp_(0.0, 6.0)

    @staticmethod
    def quantizes_at(lq: LayerQuant) -> bool:
        scale = np.float32(lq.scale_in)
        return bool(np.isfinite(scale) and scale > 0)

    def quantize(self, x: torch.Tensor, lq: LayerQuant, in_place: bool) -> torch.Tensor:
        """:func:`quantize` of the ReLU6 of ``x`` (multiplied first, with a multiplier) at
        ``lq``'s input scale (``in_place``: in ``x``)."""
        _, high = Format("u8" if lq.input_unsigned else "s8").bounds(lq.bits)
        top = min(float(np.float32(6.0) * np.float32(lq.scale_in)), float(high))
        factor = 1.0 if self.multiplier is None else self.multiplier
        fused = native.requantize(x, factor, 0.0, top, then=lq.scale_in,
                                  out=x if in_place else None)
        if fused is not None:
            return fused
        if self.multiplier is not None:
            x = PendingMultiplier(self.multiplier).decode(x if in_place else x.clone())
            in_place = True
        y = x.mul_(lq.scale_in) if in_place else x * lq.scale_in    # as quantize() does
        return y.clamp_(0.0, top).round_()


def _skip(node, blobs):
    """A fused unit's inner node: the unit's layer and last nodes compute it."""
    return None


_skip.reads_codes = True      # it reads nothing: the forward need not decode its bottoms


def _pending_relu6(node, blobs):
    """A ReLU6 left to the unit that quantizes its output (:class:`PendingReLU6`, with the
    multiplier of a :class:`PendingMultiplier` bottom) where it may run in place; elsewhere
    the layer itself on the bottom's values."""
    bottom = node.bottoms[0]
    code = blobs.codes.get(bottom)
    if blobs.owned == bottom and (code is None or isinstance(code, PendingMultiplier)):
        return (Encoded(blobs[bottom], PendingReLU6(getattr(code, "multiplier", None))),)
    return node.module(blobs.decoded(bottom))


_pending_relu6.reads_codes = True


def _stored_or_values(blobs: Blobs, name: str, form: Format | None
                      ) -> tuple[torch.Tensor, bool]:
    """(blob ``name``, True) where it holds the stored integers of INT8 memory at ``form``
    (:class:`StoredIntegers`, read as they are, not changed); else (its values, False),
    decoded first if it is held in any other way."""
    code = blobs.codes.get(name)
    if form is not None and isinstance(code, StoredIntegers) and code.reads_as(form):
        return blobs[name], True
    return blobs.decoded(name), False


class FoldedFP32:
    """Overrides for ``CaffeNet.forward`` that run every fused unit in FP32 as the runtimes
    do: BatchNorm/Scale folded into the convolution's weights and bias (one convolution),
    the absorbed residual add and ReLU applied to its output (Intel Caffe's ``CompileNet``,
    OpenCV's fusion). Equal to the layer-by-layer graph up to float32 rounding.

    The unit's layer node computes (``_start``, its value kept under an internal key), its
    folded/fused nodes are skipped, its last node finishes (``_finish``); subclasses install
    other starts and finishes per unit (:class:`Int8Simulator`)."""

    def __init__(self, fused: FusedGraph, units=None):
        """``units`` None: every unit whose fusion computes what the net's layers compute
        (a unit Intel's fusion changes, ``FusedUnit.differs_from_net``, runs layer by layer:
        the FP32 reference is the net's); given: those units, as Intel's FP32 kernels run
        them (sum post-op with scale 1.0 and the ReLU after it, ``mkldnn_convolution_layer.cpp``
        :385-399)."""
        self.fused = fused
        self.overrides: dict = {}
        self._weights: dict[str, tuple] = {}
        if units is None:
            units = [u for u in fused.units if not u.differs_from_net]
        for unit in units:
            self._install(unit, self._fp32_start, self._fp32_finish)

    def _install(self, unit: FusedUnit, start, finish, reads=None) -> None:
        """``start(unit, x, owned, code) -> value`` at the layer node (``owned``: nobody
        reads ``x`` after it, ``graph.net.Blobs.owned``; ``code``: the code ``x`` is held in,
        given only to a start whose ``reads(code)`` accepts it, else None and ``x`` the
        blob's values),
        ``finish(unit, value, blobs) -> output`` at the last node (its residual read by
        :meth:`_residual`)."""
        key = f"\0acc:{unit.name}"
        single = unit.last is unit.layer
        for node in unit.nodes:
            self.overrides[node.index] = _skip
        if unit.eltwise is not None and unit.eltwise is not unit.last:
            self.overrides[unit.eltwise.index] = self._make_stash(unit)

        def on_layer(node, blobs):
            bottom = node.bottoms[0]
            code = blobs.codes.get(bottom)
            if code is not None and (reads is None or not reads(code)):
                blobs.decoded(bottom)
                code = None
            value = start(unit, blobs[bottom], blobs.owned == bottom, code)
            if single:
                return (finish(unit, value, blobs),)
            blobs[key] = value
            return None

        def on_last(node, blobs):
            return (finish(unit, blobs.pop(key), blobs),)

        on_layer.reads_codes = on_last.reads_codes = True
        self.overrides[unit.layer.index] = on_layer
        if not single:
            self.overrides[unit.last.index] = on_last

    def _make_stash(self, unit: FusedUnit):
        """Keep the residual before the add's node frees it (a fused ReLU follows)."""
        def stash(node, blobs):
            blobs[f"\0res:{unit.name}"] = self._residual(unit, blobs)[0]
            return None

        return stash

    def _residual(self, unit: FusedUnit, blobs, form: Format | None = None
                  ) -> tuple[torch.Tensor, bool]:
        """(the unit's residual, whether it is the stored integers of INT8 memory at
        ``form``: given only to a reader that takes them; else its values)."""
        stashed = blobs.pop(f"\0res:{unit.name}", None)
        if stashed is not None:
            return stashed, False
        return _stored_or_values(blobs, unit.eltwise.bottoms[self._residual_position(unit)],
                                 form)

    def _residual_position(self, unit: FusedUnit) -> int:
        bottoms = unit.eltwise.bottoms
        for i, name in enumerate(bottoms):
            if self.fused.input_of(unit.eltwise, i) == unit.residual:
                return i
        raise AssertionError("residual not found")  # pragma: no cover

    def _fp32_start(self, unit: FusedUnit, x: torch.Tensor, owned: bool, code=None
                    ) -> torch.Tensor:
        if unit.name not in self._weights:
            weight, bias = folded_once(self.fused, unit)
            self._weights[unit.name] = (weight.to(x.device), bias.to(x.device))
        weight, bias = self._weights[unit.name]
        return unit.layer.module.run_with(x, weight, bias)

    def _fp32_finish(self, unit: FusedUnit, y: torch.Tensor, blobs) -> torch.Tensor:
        if unit.residual is not None:
            y = y.add_(self._residual(unit, blobs)[0])
        slope = unit.relu_slope
        if slope is not None:
            y = torch.where(y > 0, y, y * slope) if slope else y.clamp_(min=0)
        return y


class Int8Simulator(FoldedFP32):
    """Overrides for ``CaffeNet.forward`` that run each quantized unit as INT8 would, and the
    other fused units folded in FP32.

    The unit's layer node computes the integer accumulation; its folded/fused nodes are
    skipped; its last node applies residual, ReLU and output requantization. Concat and AVE
    pooling nodes between INT8 layers run Intel's integer rules.

    ``target`` (a Target or its name; None: exact int32) is how the INT8 kernels
    accumulate; units in ``exact_units`` accumulate exactly whatever the target (those a
    runtime runs as float convolutions). Given a dict ``saturation``, the per-layer
    saturation of the target's kernels is collected there (layer -> SaturationRecord)."""

    def __init__(self, fused: FusedGraph, plan: QuantPlan, device=None,
                 requant: dict[str, RuntimeRequant] | None = None,
                 target: Target | str | None = None, exact_units=(),
                 saturation: dict | None = None):
        self.plan = plan
        self.requant = dict(requant or {})
        self.target = None if target is None else get_target(target)
        self.saturation = saturation
        device = device or fused.net.device
        exact_units = frozenset(exact_units)
        kernel_target = None if self.target is None or self.target.exact else self.target
        self.formats, self.fp32_units = ({}, set()) if self.requant else intel_formats(fused,
                                                                                      plan)
        self.kernels = {name: build_kernel(fused.by_name[name], lq, device,
                                           None if name in exact_units else kernel_target)
                        for name, lq in plan.layers.items() if name not in self.fp32_units}
        for name in self.requant:     # a runtime's own epilogue adds its own bias
            if name in self.kernels:
                self.kernels[name].bias_folds = False
        super().__init__(fused, [u for u in fused.units if u.name not in self.kernels])
        for kernel in self.kernels.values():
            self._install(kernel.unit, self._make_int8_start(kernel),
                          self._make_int8_finish(kernel), self._stored_reader(kernel))
        for node in fused.net.nodes:
            if node.index in self.overrides or node.index in fused.unit_of_node:
                continue
            if node.type == "Concat":
                inputs = [self.formats.get(fused.input_of(node, i).key, F32)
                          for i in range(len(node.bottoms))]
                out = self.formats.get(f"{node.index}:{node.tops[0]}", F32)
                if out.int8 and any(f.scale != out.scale for f in inputs):
                    self.overrides[node.index] = self._make_concat(inputs, out)
            elif node.type == "Pooling" and node.module.method == node.module.AVE:
                form = self.formats.get(f"{node.index}:{node.tops[0]}", F32)
                if form.int8:
                    self.overrides[node.index] = self._make_ave_pool(form)
            elif node.type == "Eltwise":
                form = self.formats.get(f"{node.index}:{node.tops[0]}", F32)
                if form.int8:
                    inputs = [self.formats[fused.input_of(node, i).key]
                              for i in range(len(node.bottoms))]
                    self.overrides[node.index] = self._make_eltwise(inputs, form)
            elif node.type == "ReLU6":
                self.overrides[node.index] = _pending_relu6

    # -- pass-through layers on INT8 data ----------------------------------------------------
    @staticmethod
    def _make_concat(inputs: list[Format], out: Format):
        """``mkldnn_concat_layer.cpp``: each input reordered to the smallest scale."""
        def concat(node, blobs):
            parts = []
            for name, form in zip(node.bottoms, inputs):
                x = blobs[name]
                if form.scale != out.scale:
                    q = torch.round(x * _f32(form.scale).to(x.device))   # the stored integers
                    if form.scale != 1.0:   # 1.0 = unscaled: relabelled, not reordered
                        factor = _f32(np.float32(out.scale) / np.float32(form.scale))
                        low, high = form.bounds()
                        q = torch.round(q * factor.to(x.device)).clamp_(low, high)
                    x = _to_float(q, out.scale)
                parts.append(x)
            return node.module(*parts)

        return concat

    @staticmethod
    def _make_ave_pool(form: Format):
        """``jit_uni_i8i8_pooling.cpp``: the window sum of the integers times f32(1/n),
        rounded half to even and saturated, same data type and scale."""
        def ave_pool(node, blobs):
            x, stored = _stored_or_values(blobs, node.bottoms[0], form)
            q = x if stored else torch.round(x * _f32(form.scale).to(x.device))
            module = node.module
            kernel = module.kernel or tuple(q.shape[2:])
            window_sum, divisor = caffe_ave_pool_parts(q, kernel, module.pad, module.stride,
                                                       module._pooled(q.shape[2:]))
            inverse = torch.ones_like(divisor) / divisor                 # f32(1/n)
            low, high = form.bounds()
            out = torch.round(window_sum * inverse).clamp_(low, high)
            return (Encoded(out, StoredIntegers(form.scale)),)

        ave_pool.reads_codes = True
        return ave_pool

    @staticmethod
    def _make_eltwise(inputs: list[Format], out: Format):
        """``mkldnn_eltwise_layer.cpp``: each INT8 input reordered to scale 1.0, then MKL-DNN's
        ``ref_sum`` (one reorder per input, the later ones with a sum post-op):
        ``d = sat(rne(c_0 q_0'))``, ``d = sat(rne(c_i q_i' + d))``, in the inputs' data type,
        labelled scale 1.0 (``ref_sum.hpp``, ``simple_q10n.hpp``)."""
        def eltwise(node, blobs):
            coeffs = list(node.param.eltwise_param.coeff) or [1.0] * len(node.bottoms)
            low, high = out.bounds()
            total = None
            for name, form, coeff in zip(node.bottoms, inputs, coeffs):
                x = blobs[name]
                q = torch.round(x * _f32(form.scale).to(x.device))
                factor = _f32(np.float32(1.0) / np.float32(form.scale)).to(x.device)
                q = torch.round(q * factor).clamp_(low, high)
                term = q * _f32(coeff).to(x.device) if coeff != 1.0 else q
                total = term if total is None else term + total
                total = total.round_().clamp_(low, high)
            return (total,)

        return eltwise

    # -- the units ---------------------------------------------------------------------------
    def _stored_reader(self, kernel: UnitKernel):
        """Whether the unit's start takes its input as held in a code: INT8 memory's stored
        integers, or FP32 data with a ReLU6 still to apply (:class:`PendingReLU6`); None:
        neither (a runtime's rule, a forced u8 input)."""
        if kernel.unit.name in self.requant or kernel.quant.force_u8_input:
            return None
        source = self.formats.get(kernel.unit.input.key, F32)
        if source.int8:
            return lambda code: isinstance(code, StoredIntegers) and code.reads_as(source)
        lq = kernel.quant
        return lambda code: (isinstance(code, (PendingReLU6, PendingMultiplier))
                              and code.quantizes_at(lq))

    def _make_int8_start(self, kernel: UnitKernel):
        rule = self.requant.get(kernel.unit.name)
        lq = kernel.quant
        source = self.formats.get(kernel.unit.input.key, F32)

        def start(unit, x, owned, code=None):  # owned: quantized in place
            if rule is not None:
                q_in = runtime_quantize(x, rule)
            elif lq.force_u8_input:       # reorder scale 1.0: the data are u8 values already
                q_in = quantize(x, 1.0, True, lq.bits, in_place=owned)
            elif source.int8:
                q_in = _reorder(x, source, lq, in_place=owned, stored=code is not None)
            elif code is not None:        # a ReLU6 left to this quantization
                q_in = code.quantize(x, lq, in_place=owned)
            else:
                q_in = quantize(x, lq.scale_in, lq.input_unsigned, lq.bits, in_place=owned)
            if kernel.bias_folds:
                return kernel.biased(q_in)
            return kernel.accumulate(q_in, self.saturation)

        return start

    def _make_int8_finish(self, kernel: UnitKernel):
        rule = self.requant.get(kernel.unit.name)

        def finish(unit, acc, blobs):
            if rule is not None:
                return self._runtime_finish(kernel, rule, acc, blobs)
            return self._intel_finish(kernel, acc, blobs)

        return finish

    def _intel_finish(self, kernel: UnitKernel, acc, blobs):
        """Intel's epilogue, float32, in the kernel's order (acc is this unit's buffer)."""
        unit, lq = kernel.unit, kernel.quant
        y = acc if acc.dtype == torch.float32 else acc.float()
        if not kernel.bias_folds:                 # else the start's convolution added it
            y.add_(_per_channel(kernel.q_bias, y))
        form = self.formats.get(unit.output.key, F32)
        q_res, sum_scale = None, 0.0
        if unit.residual is not None:
            res_form = self.formats.get(unit.residual.key, F32)
            residual, stored = self._residual(unit, blobs, res_form)
            # fma(f32(s_out / s_res), f32(q_res), y): exact product and sum in float64, one
            # rounding to float32 (vfmadd231ps)
            q_res = residual if stored else torch.round(
                residual * _f32(res_form.scale).to(residual.device))
            sum_scale = float(np.float32(np.float32(lq.scale_out) / np.float32(res_form.scale))
                              * np.float32(unit.sum_coefficients[0]))
        slope = unit.relu_slope
        low, high = form.bounds(lq.bits)
        if form.int8 and not slope:
            # all of it in one pass where the kernel runs (a ReLU: the saturation from 0)
            fused = native.requantize(y, kernel.multiplier, max(low, 0) if slope == 0 else low,
                                      high, residual=q_res, residual_scale=sum_scale, out=y)
            if fused is not None:
                return Encoded(fused, StoredIntegers(form.scale))
        if (not form.int8 and q_res is None and slope is None and y.device.type == "cpu"
                and native.available()):
            return Encoded(y, PendingMultiplier(kernel.multiplier))  # to the quantization
        y.mul_(_per_channel(kernel.multiplier, y))
        if q_res is not None:
            y = y.double().add_(q_res.double(), alpha=sum_scale).float()
        if form.int8 and slope == 0 and low >= 0:
            # the ReLU is the saturation's lower bound: sat(rne(max(y, 0))) = rne(sat(y)),
            # rounding being monotone with integers fixed (zeros come out +0 either way)
            return Encoded(y.clamp_(low, high).round_(), StoredIntegers(form.scale))
        if slope is not None:
            y = torch.where(y > 0, y, y * _f32(slope).to(y.device)) if slope else y.clamp_(min=0)
        if not form.int8:
            return y
        return Encoded(y.round_().clamp_(low, high), StoredIntegers(form.scale))

    def _runtime_finish(self, kernel: UnitKernel, rule: RuntimeRequant, acc, blobs):
        """A unit as ``rule``'s runtime runs it: an INT8 kernel requantizing its way, or
        (no multiplier) a float conv on the quantized input and weights, dequantized in
        float64, whose output the next Q rounds."""
        unit, lq = kernel.unit, kernel.quant
        residual = self._residual(unit, blobs)[0] if unit.residual is not None else None
        acc = acc.double().add_(_per_channel(kernel.runtime_bias(), acc))
        if rule.multiplier is not None:
            return runtime_requantize(acc, rule, residual, unit.relu_slope)
        scales = torch.tensor(lq.scale_params, dtype=torch.float64, device=acc.device)
        denominator = lq.scale_in * scales
        dequant = torch.where(denominator > 0, 1.0 / denominator.clamp(min=1e-300),
                              torch.zeros_like(denominator))
        y = acc.mul_(_per_channel(dequant, acc))
        if residual is not None:
            y.add_(residual)
        slope = unit.relu_slope
        if slope is not None:
            y = torch.where(y > 0, y, y * slope) if slope else y.clamp_(min=0)
        if lq.output_int8:
            y = quantize(y, lq.scale_out, lq.output_unsigned, lq.bits).div_(lq.scale_out)
        return y.float()

