"""Layer-wise scale search (EasyQuant), with the quantized network upstream of each layer,
and bias correction of each layer's own error.

EasyQuant (Wu et al., "EasyQuant: Post-training Quantization via Scale Optimization",
2020): every quantized unit in network order, its input taken from the already quantized
network before it (not the FP32 input), alternately the per-channel weight scales and the
activation (input) scale are searched over [alpha S, beta S] (the paper: alpha = 0.5,
beta = 2, 100 steps) to maximise the cosine similarity of the unit's INT8 output with its
FP32 output, on a calibration subset (the paper: 50 images). Each output channel's cosine
depends only on its own weight scale, so the weight step picks every channel's best factor
at once; the activation step scores the whole output. Both steps evaluate every candidate
in a few batched matrix products (the candidates stacked, in chunks bounded in memory) on
a fixed random sample of the unit's output positions: int8 x int8 -> int32 products for a
one-group layer on the CPU (exact), the input step of a many-group layer a few groups at a
time, in cache (a depthwise layer's tap by tap, :meth:`_Unit._tap_sums`); where the unit's
output is affine in its weights (no ReLU, no residual) the weight step scores the candidates
from moments of the patches instead (:class:`_WeightMoments`). The cosines' float64 sums read
the candidates' float32 outputs once (:func:`calibrator.quant.native.dot_square` and
``column_dot_square``; where the kernels are not built, float64 copies of the outputs: the
same choices, another summation order; MobileNetV2's ``-q -c multiple --easyquant`` 29.4 ->
24.9 s with the same files). Where they are built, no tensor of candidates' outputs is made:
a depthwise layer's input step makes, requantizes and sums them in cache
(:func:`~calibrator.quant.native.depthwise_sums`); a dense layer's int8 patches are written
once (``quantized_rows``) and its int32 accumulators requantized and summed in one read, per
candidate in the input step and per channel in the weight step (``integer_sums``): the same
cosines bit for bit (``-q -c multiple --easyquant`` on 4 batches 20.6 -> 12.4 s, the same
files).

Bias correction (Nagel et al. 2019; NNCF's "fast bias correction"): per output channel, the
mean error of the unit's INT8 output (before its ReLU and residual add) against FP32 over
the calibration images is subtracted from the bias. The error is the unit's own: its
deployed quantization (EasyQuant's scales where it ran) applied to the unit's FP32 input, as
NNCF's fast bias correction measures it. Measured with the quantized network upstream
instead, each unit's shift also absorbs the mean of the errors upstream, which depend on the
image; on MobileNetV2 that made the network's output worse than no correction at all (the
mean KL divergence of fc7 from FP32 on unseen images 0.083 -> 0.27 with per-channel KL
scales, 0.029 -> 0.098 with the 99.99th percentile), where the unit's own error improves it
(0.029 -> 0.025). A unit's correction is kept only where it brings the unit's output, after
its activation and with the quantized network upstream, closer to FP32 (in squared error
over the calibration images) than its bias without the correction: after EasyQuant, whose
scales already fit the quantized upstream, correcting every unit made the output worse
(KL 0.030 -> 0.033 at 8 bits, 0.054 -> 0.124 at 7 bits; with the check 0.030 and 0.061).

During the pass a quantized unit whose output feeds one quantized unit alone writes it
unrounded (FP32), so that input is rounded once, at the input scale being searched;
afterwards the unit takes that consumer's input threshold as its output threshold (one
rounding in the final plan too). An INT8 output that more than one layer reads (a residual
stream: the next block's expansion, and the residual add fused into that block's
projection) is written by the runtime once, at the unit's scale_out, and every reader reads
those integers (``simulate``: the next layer reads ``q_out / scale_out``, a fused Eltwise
reads ``q_residual``; ``mkldnn_convolution_layer.cpp`` :287-310). The pass rounds it there,
and a unit that reads it keeps the tensor's calibrated scale as its input scale (EasyQuant
searches its weight scales only): a searched input scale would requantize integers already
rounded at scale_out, a second rounding the cosine of the unrounded input does not see. On
MobileNetV2 (seeds 0-7 of the accuracy bench, both halves) this lowered the unseen
divergence from FP32 at 8 and 7 bits, and the 7-bit drop (BENCHMARKS.md). A unit's input
that nothing after it reads is dropped once used (its quantized copy quantized in place),
so the pass holds about one layer's activations of each net at a time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import cache, partial

import numpy as np
import torch

from calibrator.data.feed import batches
from calibrator.quant import native
from calibrator.quant.folding import folded_weights
from calibrator.quant.fusion import FusedGraph, FusedUnit
from calibrator.quant.scales import (QuantOptions, UnitChoice, activation_threshold,
                                     build_plan, qmax)
from calibrator.quant.simulate import FoldedFP32, intel_bias, intel_constants, quantize
from calibrator.quant.targets import WEIGHT_FACTORS

#: elements per temporary tensor of the candidate evaluation (float32: 64 MiB)
CHUNK_ELEMENTS = 1 << 24
#: quantized patches per group slice of the input step (float32: 8 MiB; a depthwise
#: layer's per-tap values, a ninth of it: in the core's cache)
SLICE_ELEMENTS = 1 << 21
#: the output positions sampled per unit by default, by bit width. On the shared MobileNetV2
#: (BENCHMARKS.md, "A larger sample at 7 bits") 4,096 positions instead of 1,024 lower the
#: divergence from FP32 on both halves at 8 bits and at 7; at 7 bits they also lower the top-1
#: drop on unseen images (mean over eight seeds 0.95 -> 0.45 and 0.15 -> 0.05 pt), where at 8
#: bits they do not raise the agreement: the larger sample is the default where it pays (a
#: 7-bit run took about 1.5 times as long as an 8-bit one there)
POSITIONS = {7: 4096, 8: 1024}

#: cosines closer than this are a tie (candidates with the same integers give the same
#: cosine up to the summation order): the first candidate keeps it
TIE = 1e-12


@dataclass(frozen=True)
class LayerwiseSettings:
    easyquant: bool = True
    bias_correction: bool = True
    images: int = 50              # the calibration subset
    steps: int = 100              # candidates per scale over [low, high] x S
    low: float = 0.5
    high: float = 2.0
    rounds: int = 2               # weight step then activation step, this many times
    positions: int | None = None  # sampled output positions per unit (None: POSITIONS)
    seed: int = 0

    def positions_at(self, bits: int) -> int:
        """The output positions a unit of ``bits`` samples: ``positions`` where given,
        else :data:`POSITIONS` for that width."""
        return self.positions if self.positions is not None else POSITIONS.get(bits,
                                                                                 POSITIONS[8])


@dataclass
class LayerReport:
    """What the pass did to one unit (for the per-layer table and the report)."""

    name: str
    cosine_before: float
    cosine_after: float
    bias_shift: float = 0.0       # max |shift| / max |bias| over the channels (0: none)


def factors(settings: LayerwiseSettings) -> torch.Tensor:
    """The candidate multipliers of a scale: ``steps`` values over [low, high] and 1.0."""
    grid = np.linspace(settings.low, settings.high, settings.steps)
    return torch.tensor(np.unique(np.append(grid, 1.0)), dtype=torch.float32)


# -- patches at sampled output positions ------------------------------------------------------

def _sample_positions(unit: FusedUnit, shape, count: int, seed: int):
    """(n, row, col) of ``count`` output positions drawn without replacement (all when
    fewer), in a fixed order."""
    n, _, h, w = shape if len(shape) == 4 else (shape[0], 1, 1, 1)
    total = n * h * w
    generator = torch.Generator().manual_seed(seed + len(unit.name))
    chosen = (torch.randperm(total, generator=generator)[:count] if total > count
              else torch.arange(total))
    chosen = chosen.sort().values
    return chosen // (h * w), (chosen // w) % h, chosen % w


def _patches(unit: FusedUnit, x: torch.Tensor, where) -> torch.Tensor:
    """(P, G, Cg * kh * kw) input patches of the unit's convolution at the sampled output
    positions (fc: the flattened inputs of the sampled samples, G = 1)."""
    module = unit.layer.module
    n_idx, r_idx, c_idx = where
    if unit.kind == "fc":
        return x.flatten(module.axis)[n_idx].reshape(len(n_idx), 1, -1)
    kh, kw = module.kernel
    ph, pw = module.pad
    sh, sw = module.stride
    dh, dw = module.dilation
    height, width = x.shape[2:]
    rows = r_idx[:, None] * sh - ph + torch.arange(kh)[None, :] * dh     # (P, kh)
    cols = c_idx[:, None] * sw - pw + torch.arange(kw)[None, :] * dw     # (P, kw)
    # the zero padding where a tap falls outside (no padded copy of the whole input)
    inside = (((rows >= 0) & (rows < height))[:, :, None, None]
              & ((cols >= 0) & (cols < width))[:, None, :, None])       # (P, kh, kw, 1)
    # each tap's channels gathered as one row (of the channels-last blob: contiguous)
    patches = x.permute(0, 2, 3, 1)[n_idx[:, None, None], rows.clamp(0, height - 1)[:, :, None],
                                    cols.clamp(0, width - 1)[:, None, :]]   # (P, kh, kw, C)
    patches = torch.where(inside.to(patches.device), patches, patches.new_zeros(()))
    return patches.permute(0, 3, 1, 2).reshape(len(n_idx), module.group, -1)


def _at(tensor: torch.Tensor, where) -> torch.Tensor:
    """(P, O) values of an (N, O, H, W) or (N, O) tensor at the sampled positions."""
    n_idx, r_idx, c_idx = where
    if tensor.dim() == 2:
        return tensor[n_idx]
    return tensor[n_idx, :, r_idx, c_idx]


# -- one unit ----------------------------------------------------------------------------------

@cache
def int8_products_work() -> bool:
    """Whether int8 x int8 -> int32 matrix products (``torch._int_mm``) run here, exactly."""
    try:
        a = torch.ones(17, 8, dtype=torch.int8)
        return bool(torch._int_mm(a, a.t().contiguous()).eq(8).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _best_seconds(product, a, b, repeat: int = 3) -> float:
    product(a, b)                                   # warm-up (first-call allocations)
    best = math.inf
    for _ in range(repeat):
        started = time.perf_counter()
        product(a, b)
        best = min(best, time.perf_counter() - started)
    return best


@cache
def int8_products_pay() -> bool:
    """Whether the int8 products beat the float32 ones on this CPU, timed once on a product
    of the pass's size. With int8 dot-product instructions (AVX-512 VNNI, AMX) they are
    several times faster; without them (an AVX2-only CPU) PyTorch runs a reference loop
    about 50x slower than the float32 product, which made the EasyQuant pass 25x slower.
    Both are exact on these operands, so the choice never changes a result."""
    if not int8_products_work():
        return False
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (256, 512), dtype=torch.int8, generator=generator)
    b = torch.randint(-128, 128, (512, 256), dtype=torch.int8, generator=generator)
    return (_best_seconds(torch._int_mm, a, b)
            < _best_seconds(torch.mm, a.float(), b.float()))


#: int8 products for the dense layers on the CPU: None decides by :func:`int8_products_pay`
#: (tests set True or False)
INT8_PRODUCTS: bool | None = None


def _use_int8_products() -> bool:
    return int8_products_pay() if INT8_PRODUCTS is None else INT8_PRODUCTS


class _IntegerProduct:
    """``q_in @ q_w`` for integer-valued float32 operands, by int8 x int8 -> int32 products:
    an unsigned input in [0, 255] is shifted into int8 range, ``(q_in - 128) @ q_w``, and
    ``128 x`` the column sums of ``q_w`` added back in int32. The accumulation is exact in
    int32; the float32 result is the exact sum correctly rounded (the float32 product is
    the same value wherever its partial sums stay below 2^24, as the simulation's bound
    keeps them)."""

    def __init__(self, qmax_in: int):
        self.offset = 128 if qmax_in > 127 else 0

    def input(self, q_in: torch.Tensor) -> torch.Tensor:
        """(M, C) integer-valued floats as the int8 left operand (consumes ``q_in``)."""
        if self.offset:
            q_in = q_in.sub_(self.offset)
        return q_in.to(torch.int8)

    def __call__(self, a8: torch.Tensor, q_w8: torch.Tensor) -> torch.Tensor:
        """(M, N) float32 product of an :meth:`input` (M, C) and int8 weights (C, N)."""
        acc, shift = self.unshifted(a8, q_w8)
        if shift is not None:
            acc += shift
        return acc.float()

    def unshifted(self, a8: torch.Tensor, q_w8: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the (M, N) int32 product of an :meth:`input` and int8 weights (C, N), the (N,)
        int32 shift that takes it to ``q_in @ q_w``: the offset times the weights' column
        sums, None without an offset), for a caller that adds the shift on its own pass."""
        shift = self.offset * q_w8.sum(0, dtype=torch.int32) if self.offset else None
        return torch._int_mm(a8, q_w8), shift


def _grouped(values: torch.Tensor, groups: int) -> torch.Tensor:
    """(P, O) values as (G, P, Og), the layout the grouped products write."""
    count, out = values.shape
    return values.float().reshape(count, groups, out // groups).transpose(0, 1).contiguous()


class _Unit:
    """One unit's FP32 weights and its INT8 output at the sampled positions for candidate
    scales (Intel's arithmetic, the output left unrounded).

    Everything is held group-major, (G, P, ...), so each candidate batch is one batched
    matrix product per group whose result is used where it lands (no transposed copies):
    the weight step writes (G, P, K, Og), the input step (G, K, P, Og)."""

    def __init__(self, unit: FusedUnit, lq, patches: torch.Tensor, reference: torch.Tensor,
                 residual: torch.Tensor | None):
        weight, bias = folded_weights(unit)
        self.unit, self.lq = unit, lq
        groups = patches.shape[1]
        out = weight.shape[0]
        self.groups = groups
        self.weight = weight.reshape(groups, out // groups, -1).float()     # (G, Og, C)
        self.bias = bias.float()
        patches = patches.float().transpose(0, 1)                           # (G, P, C)
        # a depthwise layer (one output per group) holds its patches tap-major, (G, C, P):
        # its input step sums tap by tap (``_tap_sums``); ``patches`` is a view of them
        self.taps = (patches.transpose(1, 2).contiguous() if groups > 1 and out == groups
                     else None)
        self.patches = patches.contiguous() if self.taps is None else self.taps.transpose(1, 2)
        self.extremes = torch.stack(torch.aminmax(self.patches))   # (one read)
        self.residual = None if residual is None else _grouped(residual, groups)
        self.limit = 2 ** (lq.bits - 1) - 1
        self.qmax_in = qmax(lq.input_unsigned, lq.bits)
        #: the quantized input's integer range
        self.bounds = (0.0 if lq.input_unsigned else -(self.qmax_in + 1), self.qmax_in)
        # one group on the CPU (the dense layers, where the products are the work): int8
        self.integer = (_IntegerProduct(self.qmax_in) if groups == 1 and lq.bits <= 8
                        and self.patches.device.type == "cpu" and _use_int8_products()
                        else None)
        reference = _grouped(reference, groups).double()
        self.reference64 = reference                                        # (G, P, Og)
        self.reference_norms = (reference * reference).sum(1)               # (G, Og)
        self.reference_norm = float(self.reference_norms.sum())

    def _q_in(self, s_in: torch.Tensor, groups: slice = slice(None)) -> torch.Tensor:
        """(G, K, P, C) quantized patches (of the ``groups`` given) for K input scales (the
        clamp skipped where the extreme patches, multiplied and rounded as every element
        is, already lie in range)."""
        q = (self.patches[groups, None] * s_in[None, :, None, None]).round_()
        if (clamp := self._clamp(s_in)) is not None:
            first, bounds = clamp
            q[:, first:].clamp_(*bounds)
        return q

    def _clamp(self, s_in: torch.Tensor) -> tuple[int, tuple[float, int]] | None:
        """(the first of the K input scales at which some patch leaves the integer range,
        that range), or None: none does (the extreme patches, multiplied and rounded as
        every element is, tell). The candidates from the first on are clamped: in range,
        a clamp changes nothing, so the others need none (ascending scales: only those
        beyond it leave the range)."""
        low, high = self.bounds
        extremes = torch.round(self.extremes[:, None] * s_in[None, :])
        out = ((extremes[0] < low) | (extremes[1] > high)).nonzero()
        if len(out) == 0:
            return None
        return int(out[0, 0]), self.bounds

    def _tap_sums(self, s_in: torch.Tensor, q_w: torch.Tensor, groups: slice) -> torch.Tensor:
        """(g, K, P, 1) accumulators of a depthwise layer for K input scales, one tap at a
        time: each tap's (g, K, P) quantized values are made and added while in cache (a
        batched matrix-vector product per group is three times slower). Exact: integers
        below 2^24, so every order of summation gives the same float32."""
        taps, q_w = self.taps[groups], q_w[groups]                           # (g, C, P), (g, C, 1)
        clamp = self._clamp(s_in)
        acc = taps.new_zeros(taps.shape[0], len(s_in), taps.shape[2])
        for j in range(taps.shape[1]):
            q = (taps[:, j, None, :] * s_in[None, :, None]).round_()
            if clamp is not None:
                q[:, clamp[0]:].clamp_(*clamp[1])
            acc.addcmul_(q, q_w[:, j, None])
        return acc[..., None]

    def _q_w(self, s_w: torch.Tensor) -> torch.Tensor:
        """(K, G, Og, C) quantized weights for K rows of weight scales."""
        groups, og, _ = self.weight.shape
        w = self.weight[None] * s_w.reshape(-1, groups, og, 1)
        return torch.round(w).clamp_(-self.limit - 1, self.limit)

    def weight_input(self, s_in: torch.Tensor) -> torch.Tensor:
        """The quantized patches at one input scale (1,), as :meth:`weight_outputs` takes
        them: (G, P, C), or (P, C) int8 for the integer products."""
        q_in = self._q_in(s_in.to(self.patches.device))[:, 0]
        if self.integer is not None:
            return self.integer.input(q_in[0])
        return q_in

    def weight_outputs(self, q_in: torch.Tensor, s_in: torch.Tensor, s_w: torch.Tensor
                       ) -> torch.Tensor:
        """(G, P, K, Og) outputs for K rows of weight scales (K, O) at one input scale (1,)
        whose quantized patches ``q_in`` (:meth:`weight_input`) are given."""
        s_in, s_w = s_in.to(q_in.device), s_w.to(q_in.device)
        q_w = self._q_w(s_w)                                                   # (K, G, Og, C)
        count, groups, og, channels = q_w.shape
        if self.integer is not None:   # q_in: (P, C) int8 (see weight_input)
            acc = self.integer(q_in, q_w.to(torch.int8).reshape(count * og, channels).t())
            acc = acc.reshape(1, -1, count, og)
        else:
            acc = torch.bmm(q_in, q_w.permute(1, 3, 0, 2).reshape(groups, channels,
                                                                  count * og))
            acc = acc.reshape(groups, q_in.shape[1], count, og)
        residual = None if self.residual is None else self.residual[:, :, None]
        q_b, divisor = self._bias_terms(s_in[:, None] * s_w)                 # (G, K, Og)
        return self._requantized(acc, q_b[:, None], divisor[:, None], residual)

    def input_outputs(self, s_in: torch.Tensor, q_w: torch.Tensor, terms,
                      groups: slice = slice(None)) -> torch.Tensor:
        """(G, K, P, Og) outputs for K input scales (K,) at one row of weight scales,
        whose quantized weights ``q_w`` (G, C, Og) and bias terms (:meth:`_bias_terms`) are
        given, for the ``groups`` given (all candidates on the model's device)."""
        if self.taps is not None:
            acc = self._tap_sums(s_in, q_w, groups)
        else:
            q_in = self._q_in(s_in, groups)                                    # (G, K, P, C)
            part, count, positions, channels = q_in.shape
            q_w = q_w[groups]
            if self.integer is not None:
                a8 = self.integer.input(q_in.reshape(count * positions, channels))
                acc = self.integer(a8, q_w[0].to(torch.int8))
            else:
                acc = torch.bmm(q_in.reshape(part, count * positions, channels), q_w)
            acc = acc.reshape(part, count, positions, -1)
        residual = None if self.residual is None else self.residual[groups, None]
        q_b, divisor = terms
        return self._requantized(acc, q_b[groups, :, None], divisor[groups, :, None], residual)

    def input_cosines(self, s_in: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
        """(K,) cosine of each input scale's whole output with the reference (the
        candidates' outputs evaluated a few groups at a time, ``SLICE_ELEMENTS`` of
        quantized patches each, so that a depthwise layer's candidates are quantized,
        multiplied and scored while they are in cache; one group: all at once)."""
        groups, positions, channels = self.patches.shape
        device = self.patches.device  # candidates live on the CPU, the data on the model's
        s_in, s_w = s_in.to(device), s_w.to(device)
        q_w = self._q_w(s_w[None])[0].transpose(1, 2)                         # (G, C, Og)
        terms = self._bias_terms(s_in[:, None] * s_w[None])                  # once, sliced
        step = max(1, SLICE_ELEMENTS // (len(s_in) * positions * channels))
        num = torch.zeros(len(s_in), dtype=torch.float64, device=device)
        norms = torch.zeros_like(num)
        # every group's sums in one call, the outputs made and summed in cache
        whole = self._depthwise_sums(s_in, q_w, terms) or self._integer_sums(s_in, q_w, terms)
        if whole is not None and step <= 2:   # the loop below's sums, without its loop
            num, norms = (torch.from_numpy(_in_order(t.numpy(), step)) for t in whole)
            return num / torch.sqrt(norms * self.reference_norm)
        for start in range(0, groups, step):
            part = slice(start, start + step)
            if whole is not None:
                sums = whole[0][part], whole[1][part]
            else:
                y = self.input_outputs(s_in, q_w, terms, part)                 # (g, K, P, Og)
                y = y.reshape(y.shape[0], y.shape[1], -1)
                reference = self.reference64[part].reshape(y.shape[0], -1)
                sums = native.dot_square(y, reference)    # one read of y, no float64 copy
            if sums is not None:
                num += sums[0].sum(0)
                norms += sums[1].sum(0)
                continue
            y = y.double()
            num += torch.bmm(y, reference[..., None]).sum(0)[:, 0]
            norms += (y * y).sum((0, 2))
        return num / torch.sqrt(norms * self.reference_norm)

    def _depthwise_sums(self, s_in: torch.Tensor, q_w: torch.Tensor, terms
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A depthwise layer's (dot, square) sums of every group, each (G, K), for K input
        scales, by the kernel that makes, requantizes and sums each candidate's outputs in
        cache (:func:`~calibrator.quant.native.depthwise_sums`: the bits that
        :meth:`input_outputs` and :func:`~calibrator.quant.native.dot_square` give); None
        for any other layer or where the kernel does not run."""
        if self.taps is None:
            return None
        groups = self.taps.shape[0]
        q_b, divisor = (t.reshape(groups, -1) for t in terms)
        residual = None if self.residual is None else self.residual.reshape(groups, -1)
        return native.depthwise_sums(self.taps, s_in.contiguous(), q_w.reshape(groups, -1),
                                     q_b.contiguous(), divisor.contiguous(), residual,
                                     self.unit.relu_slope, self.bounds,
                                     self.reference64.reshape(groups, -1))

    def _integer_sums(self, s_in: torch.Tensor, q_w: torch.Tensor, terms
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A dense layer's (dot, square) sums, each (1, K), for K input scales by int8
        products, the quantized patches made as int8 in one write
        (:func:`~calibrator.quant.native.quantized_rows`) and the accumulators requantized
        and summed one candidate at a time, without a tensor of their float32 outputs
        (:func:`~calibrator.quant.native.integer_sums`): the bits that
        :meth:`input_outputs` and :func:`~calibrator.quant.native.dot_square` give; None
        for any other layer or where the kernels do not run."""
        if self.integer is None or self.taps is not None:
            return None
        a8 = native.quantized_rows(self.patches[0], s_in.contiguous(), self.bounds,
                                   self.integer.offset)
        if a8 is None:
            return None
        acc, shift = self.integer.unshifted(a8, q_w[0].to(torch.int8))
        acc = acc.reshape(len(s_in), self.patches.shape[1], -1)                # (K, P, O)
        q_b, divisor = (t[0].contiguous() for t in terms)
        sums = native.integer_sums(acc, shift, q_b, divisor,
                                   None if self.residual is None else self.residual[0],
                                   self.unit.relu_slope, self.reference64[0])
        return None if sums is None else (sums[0][None], sums[1][None])

    def _bias_terms(self, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_b, divisor), each (G, K, Og), for the (K, O) scales ``s_in x s_w``: Intel's
        bias reorder and a zero scale as Intel treats it (``simulate.intel_bias``)."""
        q_b, divisor = intel_bias(self.bias[None], scale)
        count = scale.shape[0]
        return tuple(v.reshape(count, self.groups, -1).permute(1, 0, 2) for v in (q_b, divisor))

    def _requantized(self, acc: torch.Tensor, q_b: torch.Tensor, divisor: torch.Tensor,
                     residual) -> torch.Tensor:
        """(acc + q_b) / divisor (the bias terms laid out to broadcast with ``acc``), then
        the residual and the ReLU, in place on ``acc``."""
        return _finish(self.unit, acc.add_(q_b).div_(divisor), residual, in_place=True)

    def chunk(self, per_candidate: int, groups: int | None = None) -> int:
        """Candidates per batch when each needs ``per_candidate`` elements of its own (its
        quantized weights or patches) beside its (P, O) output and that output in float64,
        all of them or (``groups``) that many of the G groups at a time."""
        per = per_candidate + 3 * self.reference64.numel()
        if groups is not None:
            per = -(-per * groups // self.groups)
        return max(1, CHUNK_ELEMENTS // per)

    def channel_cosines(self, y: torch.Tensor) -> torch.Tensor:
        """(K, O) cosine of each output channel with the reference, from (G, P, K, Og);
        NaN where either is all zeros (a dead channel: no candidate beats another, so the
        searches keep its scale)."""
        sums = native.column_dot_square(y, self.reference64)   # one read, no float64 copy
        if sums is None:
            y = y.double()
            sums = (y * self.reference64[:, :, None]).sum(1), (y * y).sum(1)  # (G, K, Og)
        return self._column_cosines(*sums)

    def _column_cosines(self, num: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
        """(K, O) cosines from the (G, K, Og) sums of :meth:`channel_cosines`."""
        cos = num / torch.sqrt(squares * self.reference_norms[:, None])
        return cos.permute(1, 0, 2).reshape(num.shape[1], -1)

    def integer_channel_cosines(self, q_in: torch.Tensor, s_in: torch.Tensor,
                                s_w: torch.Tensor) -> torch.Tensor | None:
        """:meth:`channel_cosines` of :meth:`weight_outputs` for a dense layer by int8
        products, the accumulators requantized and summed per column in one read
        (:func:`~calibrator.quant.native.integer_sums`), no tensor of outputs made: the same
        bits; None for any other layer or where the kernel does not run."""
        if self.integer is None:
            return None
        q_w = self._q_w(s_w)                                                   # (K, 1, O, C)
        count, _, og, channels = q_w.shape
        acc, shift = self.integer.unshifted(
            q_in, q_w.to(torch.int8).reshape(count * og, channels).t())
        acc = acc.reshape(-1, count, og)                                        # (P, K, O)
        shift = None if shift is None else shift.reshape(count, og)
        q_b, divisor = (t[0].contiguous() for t in self._bias_terms(s_in[:, None] * s_w))
        sums = native.integer_sums(acc, shift, q_b, divisor,
                                   None if self.residual is None else self.residual[0],
                                   self.unit.relu_slope, self.reference64[0], columns=True)
        return None if sums is None else self._column_cosines(sums[0][None], sums[1][None])


def _in_order(sums: np.ndarray, step: int) -> np.ndarray:
    """What ``num += sums[start:start + step].sum(0)`` over the slices of (G, K) ``sums``
    adds up to, for ``step`` 1 or 2 (a slice's sum of one or two rows is exact: ``a + b``
    in either order), as one sequential accumulation (``np.add.accumulate`` adds row after
    row): the same float64 value (a zero total may differ in its sign)."""
    if step == 2:
        pairs = sums[0::2].copy()
        pairs[:len(sums) // 2] += sums[1::2]
        sums = pairs
    return np.add.accumulate(sums, axis=0)[-1]


class _WeightProducts:
    """The weight step's channel cosines from the candidates' outputs at the sampled
    positions (matrix products), at one input scale (1,)."""

    def __init__(self, layer: _Unit, s_in: torch.Tensor):
        self.layer, self.s_in = layer, s_in
        self.q_in = layer.weight_input(s_in)                    # one input scale: once

    def chunk(self) -> int:
        return self.layer.chunk(self.layer.weight.numel())

    def channel_cosines(self, s_w: torch.Tensor) -> torch.Tensor:
        """(K, O) cosines for K rows of weight scales (K, O)."""
        layer = self.layer
        cos = layer.integer_channel_cosines(self.q_in, self.s_in, s_w)
        if cos is None:
            cos = layer.channel_cosines(layer.weight_outputs(self.q_in, self.s_in, s_w))
        return cos


class _WeightMoments:
    """The weight step's channel cosines from moments of the quantized patches, for a unit
    whose output is affine in its integer weights (no ReLU, no residual). With x_p the
    patch at position p, a a channel's integer weights, b its int32 bias and d its divisor
    (``simulate.intel_bias``), y_p = (a.x_p + b) / d, so

        sum_p y_p r_p = (a.V + b R) / d        sum_p y_p^2 = (a'Ma + 2b a.S + P b^2) / d^2

    with M = sum_p x_p x_p', S = sum_p x_p, V = sum_p x_p r_p, R = sum_p r_p taken once per
    input scale: a candidate costs C^2 products instead of P x C (a depthwise 3x3: 81
    against 9216). Everything is float64 from integers, so a candidate's cosine is the exact
    one up to float64 rounding (the products' way rounds each output to float32 first)."""

    def __init__(self, layer: _Unit, s_in: torch.Tensor):
        self.layer, self.s_in = layer, s_in.to(layer.weight.device)
        x = layer._q_in(s_in.to(layer.patches.device))[:, 0].double()       # (G, P, C)
        self.positions = x.shape[1]
        self.m = torch.bmm(x.transpose(1, 2), x)                            # (G, C, C)
        self.s = x.sum(1)                                                   # (G, C)
        self.v = torch.bmm(layer.reference64.transpose(1, 2), x)            # (G, Og, C)
        self.r = layer.reference64.sum(1)                                   # (G, Og)

    @staticmethod
    def applies(layer: _Unit) -> bool:
        """Affine output, and patches short enough for C^2 to beat P x C."""
        groups, positions, channels = layer.patches.shape
        return (layer.unit.relu_slope is None and layer.residual is None
                and 8 * channels <= positions)

    def chunk(self) -> int:
        return max(1, CHUNK_ELEMENTS // (4 * self.layer.weight.numel()))

    def channel_cosines(self, s_w: torch.Tensor) -> torch.Tensor:
        """(K, O) cosines for K rows of weight scales (K, O)."""
        layer, s_in = self.layer, self.s_in
        s_w = s_w.to(layer.weight.device)  # candidates live on the CPU, the data on the model's
        count = s_w.shape[0]
        groups, og, _ = layer.weight.shape
        a = layer._q_w(s_w).double()                                          # (K, G, Og, C)
        q_b, divisor = intel_bias(layer.bias[None], s_in[:, None] * s_w)
        b = q_b.double().reshape(count, groups, og)
        d = divisor.double().reshape(count, groups, og)
        ama = (a * torch.einsum("gcd,kgod->kgoc", self.m, a)).sum(-1)          # (K, G, Og)
        num = ((a * self.v[None]).sum(-1) + b * self.r[None]) / d
        squares = (ama + 2 * b * (a * self.s[None, :, None]).sum(-1)
                   + self.positions * b * b) / (d * d)
        cos = num / torch.sqrt(squares * layer.reference_norms[None])
        return cos.reshape(count, -1)


def search_weight_scales(layer: _Unit, s_in: float, s_w: torch.Tensor,
                         grid: torch.Tensor) -> torch.Tensor:
    """Every channel's best weight scale in s_w x grid (its own cosine; ties: the first;
    a channel whose cosine is undefined, NaN, keeps its scale)."""
    best = torch.full(s_w.shape, -math.inf, dtype=torch.float64)
    chosen = s_w.clone()
    scale = torch.tensor([s_in], dtype=torch.float32)
    scorer = (_WeightMoments if _WeightMoments.applies(layer) else _WeightProducts)(layer,
                                                                                     scale)
    step = scorer.chunk()
    for start in range(0, len(grid), step):
        part = grid[start:start + step]
        candidates = s_w[None] * part[:, None]                                # (k, O)
        cos = scorer.channel_cosines(candidates).cpu()                        # (k, O)
        for k in range(len(part)):
            better = cos[k] > best + TIE
            best = torch.where(better, cos[k], best)
            chosen = torch.where(better, candidates[k], chosen)
    return chosen


def search_input_scale(layer: _Unit, s_in: float, s_w: torch.Tensor,
                       grid: torch.Tensor) -> float:
    """The best input scale in s_in x grid by the cosine of the whole output (kept when
    that cosine is undefined: an all-zero reference)."""
    best, chosen = -math.inf, s_in
    step = layer.chunk(layer.patches.numel(), groups=1)   # input_cosines: groups in slices
    for start in range(0, len(grid), step):
        part = grid[start:start + step]
        candidates = s_in * part
        cos = layer.input_cosines(candidates, s_w).cpu()
        for k in range(len(part)):
            if float(cos[k]) > best + TIE:
                best, chosen = float(cos[k]), float(candidates[k])
    return chosen


def easyquant_unit(layer: _Unit, settings: LayerwiseSettings, search_input: bool = True
                   ) -> tuple[float, torch.Tensor]:
    """(input scale, weight scales) after ``settings.rounds`` alternations; without
    ``search_input`` the weight step alone (the input scale is the tensor's own, shared
    with its other readers)."""
    grid = factors(settings)
    s_in = float(layer.lq.scale_in)
    s_w = torch.tensor(layer.lq.scale_params, dtype=torch.float32)
    for _ in range(settings.rounds):
        s_w = search_weight_scales(layer, s_in, s_w, grid)
        if search_input:
            s_in = search_input_scale(layer, s_in, s_w, grid)
    return s_in, s_w


def cosine_of(layer: _Unit, s_in: float, s_w: torch.Tensor) -> float:
    return float(layer.input_cosines(torch.tensor([s_in], dtype=torch.float32), s_w)[0])


def calibration_subset(model, images: int) -> dict:
    """The first ``images`` samples of the calibration batches, as one batch of feeds."""
    parts: dict[str, list] = {}
    count = 0
    batch_size = max(model.batch_size, 1)
    for _, feeds in batches(model, -(-images // batch_size), desc="subset", quiet=True):
        for name, value in feeds.items():
            parts.setdefault(name, []).append(value)
        count += next(iter(feeds.values())).shape[0]
        if count >= images:
            break
    out = {}
    for name, values in parts.items():
        if all(v.shape[1:] == values[0].shape[1:] and v.dim() > 0 for v in values):
            out[name] = torch.cat(values)[:images]
        else:  # not one sample per row (SSD's ground-truth rows): the first batch's
            out[name] = values[0]
    return out


# -- the pass ----------------------------------------------------------------------------------

def _quantized_input(lq, x: torch.Tensor, in_place: bool) -> torch.Tensor:
    """The unit's input quantized at ``lq`` (``in_place``: on ``x``, which nobody reads
    after)."""
    return quantize(x.float(), lq.scale_in, lq.input_unsigned, lq.bits, in_place=in_place)


def _constants(unit: FusedUnit, lq) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(integer weights, Intel's int32 bias at ``lq``'s bias shift, the divisor that takes
    ``acc + bias`` back to real units) of a unit quantized at ``lq``."""
    weight, bias = folded_weights(unit, lq.bias_shift)
    q_w, q_b, _ = intel_constants(weight, bias, lq, weight.device)
    scales = torch.tensor(np.asarray(lq.scale_params, np.float32), device=weight.device)
    _, divisor = intel_bias(bias.float(), np.float32(lq.scale_in) * scales)
    return q_w, q_b, divisor


def _dequantized(unit: FusedUnit, constants, q_in: torch.Tensor) -> torch.Tensor:
    """The unit's output before the ReLU and residual from its quantized input: the integer
    accumulator, Intel's int32 bias added, divided by the scales, unrounded (what bias
    correction compares); ``constants``: :func:`_constants`."""
    q_w, q_b, divisor = constants
    return _biased(unit.layer.module.run_with(q_in, q_w, None), q_b, divisor, in_place=True)


def _biased(acc: torch.Tensor, q_b: torch.Tensor, divisor: torch.Tensor, in_place: bool
            ) -> torch.Tensor:
    """``(acc + q_b) / divisor`` per output channel (dim 1); ``in_place``: in ``acc``."""
    per = (1, -1) + (1,) * (acc.dim() - 2)
    out = acc.add_(q_b.reshape(per)) if in_place else acc + q_b.reshape(per)
    return out.div_(divisor.reshape(per))


def _sample_slices(*tensors: torch.Tensor):
    """The tensors (the same number of samples, dim 0) a few samples at a time, so that a
    slice's float64 temporaries stay small: a float64 copy of the whole would be the pass's
    largest temporary at a 112x112 layer (480 MB for 50 samples of 96 channels)."""
    step = max(1, CHUNK_ELEMENTS // max(1, tensors[0][0].numel()))
    return zip(*(t.split(step) for t in tensors))


def _channel_sums(values: torch.Tensor) -> torch.Tensor:
    """The float64 sum of each channel (dim 1) of a float32 tensor (:func:`_sample_slices`,
    where ``sum(dtype=float64)`` of the whole would copy it to float64)."""
    dims = [d for d in range(values.dim()) if d != 1]
    return sum(part.sum(dims, dtype=torch.float64) for (part,) in _sample_slices(values))


def _fp32_unit(unit: FusedUnit, x: torch.Tensor) -> torch.Tensor:
    weight, bias = folded_weights(unit)
    return unit.layer.module.run_with(x.float(), weight.float(), bias.float())


def _finish(unit: FusedUnit, y: torch.Tensor, residual, in_place: bool = False
            ) -> torch.Tensor:
    """The unit's residual add (``residual`` laid out to broadcast) and its ReLU after the
    accumulation; ``in_place``: on ``y`` itself (a fresh buffer nobody else reads)."""
    if residual is not None:
        y = y.add_(residual) if in_place else y + residual
    slope = unit.relu_slope
    if slope is not None:
        if slope:
            y = torch.where(y > 0, y, y * slope)
        else:
            y = y.clamp_(min=0) if in_place else y.clamp(min=0)
    return y


def _residual_name(unit: FusedUnit, fused: FusedGraph) -> str | None:
    if unit.residual is None:
        return None
    for i, name in enumerate(unit.eltwise.bottoms):
        if fused.input_of(unit.eltwise, i) == unit.residual:
            return name
    return None


def layerwise(net, fused: FusedGraph, stats: dict, options: QuantOptions, choices: dict,
              feeds: dict, settings: LayerwiseSettings, say=lambda message: None
              ) -> tuple[dict, dict[str, LayerReport]]:
    """EasyQuant and/or bias correction of every quantized unit on ``feeds`` (the calibration
    subset); the new choices (explicit thresholds, weight scales, bias shifts) and a report
    per unit."""
    choices = dict(choices)
    plan = build_plan(fused, stats, options, choices)
    units = [u for u in fused.units if u.name in plan.layers and u.name not in plan.excluded]
    folded = FoldedFP32(fused).overrides
    shared = _shared_outputs(fused, plan, units)
    reports: dict[str, LayerReport] = {}
    fp_blobs, q_blobs, position = dict(feeds), dict(feeds), 0

    def still_read(name, stop):  # whether a node at or after ``stop`` reads blob ``name``
        return net.last_read(name) >= stop

    def advance(blobs, stop):  # consumes ``blobs``: the activations run in place on them
        out = net(blobs, start=position, stop=stop, overrides=folded, keep_all=True,
                  consume=True)
        return {name: value for name, value in out.items() if still_read(name, stop)}

    with torch.no_grad():
        for index, unit in enumerate(units):
            span = sorted(n.index for n in unit.nodes)
            if span != list(range(unit.layer.index, unit.last.index + 1)):
                continue  # other layers run inside the unit: left as calibrated
            fp_blobs = advance(fp_blobs, unit.layer.index)
            q_blobs = advance(q_blobs, unit.layer.index)
            stop = unit.last.index + 1
            bottom = unit.layer.bottoms[0]
            # the unit's input is the pass's to drop (or overwrite) when nothing after the
            # unit reads it and the caller did not give it (a feed)
            owned = bottom not in feeds and not still_read(bottom, stop)

            y_fp, y_q, change, reports[unit.name] = _through_unit(
                unit, fused, fp_blobs, q_blobs, owned,
                partial(_deployed, fused, stats, options, choices, unit.name), settings,
                keep_input=_reads_shared(unit, fused, shared),
                shared_output=unit.name in shared)
            if change:
                choices[unit.name] = replace(choices.get(unit.name, UnitChoice()), **change)
            fp_blobs = {k: v for k, v in fp_blobs.items() if still_read(k, stop)}
            q_blobs = {k: v for k, v in q_blobs.items() if still_read(k, stop)}
            fp_blobs[unit.output.name], q_blobs[unit.output.name] = y_fp, y_q
            del y_fp, y_q  # the blobs hold what the next units read
            position = stop
            report = reports[unit.name]
            say(f"  {unit.name} ({index + 1}/{len(units)}): cosine "
                f"{report.cosine_before:.5f} -> {report.cosine_after:.5f}")
    return _single_rounding(fused, stats, options, choices), reports


def _sole_writer(fused: FusedGraph, unit: FusedUnit) -> FusedUnit | None:
    """The one quantized unit that writes ``unit``'s input (through INT8 pass-through
    layers, nothing else upstream), else None."""
    producers, others = fused.upstream_units(unit.input)
    return producers[0] if len(producers) == 1 and not others else None


def _sole_reader(fused: FusedGraph, unit: FusedUnit) -> str | None:
    """The name of the one quantized unit that reads ``unit``'s output (nothing else
    downstream), else None."""
    consumers, others = fused.downstream(unit.output)
    names = {c.name for c in consumers}
    return next(iter(names)) if len(names) == 1 and not others else None


def _shared_outputs(fused: FusedGraph, plan, units: list[FusedUnit]) -> set[str]:
    """The units whose INT8 output is not read by one quantized unit alone (a residual
    stream: the next block's expansion and the residual add fused into that block's
    projection), which the runtime writes once, rounded at the unit's scale_out, for all
    its readers."""
    return {unit.name for unit in units
            if plan.layers[unit.name].output_int8 and _sole_reader(fused, unit) is None}


def _reads_shared(unit: FusedUnit, fused: FusedGraph, shared: set[str]) -> bool:
    """Whether ``unit``'s input is, as written, a shared output (:func:`_shared_outputs`)."""
    writer = _sole_writer(fused, unit)
    return writer is not None and writer.name in shared and writer.output == unit.input


def _deployed(fused: FusedGraph, stats: dict, options: QuantOptions, choices: dict, name: str,
              change: dict):
    """Unit ``name``'s LayerQuant in the plan of ``choices`` with ``change`` to its choice."""
    if change:
        choices = {**choices, name: replace(choices.get(name, UnitChoice()), **change)}
    return build_plan(fused, stats, options, choices).layers[name]


def _through_unit(unit: FusedUnit, fused: FusedGraph, fp_blobs: dict, q_blobs: dict,
                  owned: bool, deployed, settings: LayerwiseSettings, keep_input: bool = False,
                  shared_output: bool = False):
    """EasyQuant and bias correction of one unit; (its FP32 output, its quantized output,
    the change to its choice, its report). ``owned``: the unit's input is taken out of the
    blobs (its FP32 copy freed once used, its quantized copy quantized in place);
    ``deployed(change)``: the unit's LayerQuant in the plan with ``change``;
    ``keep_input``: EasyQuant leaves the input scale as calibrated (a shared tensor's);
    ``shared_output``: the output is rounded at its scale_out, as the runtime writes it for
    all its readers (else left unrounded for its one reader to round)."""
    lq = deployed({})
    bottom = unit.layer.bottoms[0]
    residual_name = _residual_name(unit, fused)
    owned = owned and residual_name != bottom   # (x + f(x): x is the residual too)
    take = dict.pop if owned else dict.get
    r_fp = fp_blobs.get(residual_name) if residual_name else None
    r_q = q_blobs.get(residual_name) if residual_name else None
    x_fp = take(fp_blobs, bottom)
    conv_fp = _fp32_unit(unit, x_fp)
    y_fp = _finish(unit, conv_fp, r_fp)
    if not settings.bias_correction:
        del x_fp
    x_q = take(q_blobs, bottom)
    change = {}
    report = LayerReport(unit.name, float("nan"), float("nan"))
    if settings.easyquant:
        where = _sample_positions(unit, tuple(y_fp.shape), settings.positions_at(lq.bits),
                                   settings.seed)
        layer = _Unit(unit, lq, _patches(unit, x_q, where), _at(y_fp, where),
                      None if r_q is None else _at(r_q, where))
        s_w0 = torch.tensor(lq.scale_params, dtype=torch.float32)
        report.cosine_before = cosine_of(layer, lq.scale_in, s_w0)
        # a saturation counter-measure bounds the weights: never scale them up
        factor = WEIGHT_FACTORS.get(lq.saturation_fix, 1.0)
        unit_settings = (replace(settings, high=min(settings.high, 1.0))
                         if lq.saturation_fix in WEIGHT_FACTORS else settings)
        s_in, s_w = easyquant_unit(layer, unit_settings, search_input=not keep_input)
        report.cosine_after = cosine_of(layer, s_in, s_w)
        del layer
        change["weight_scales"] = tuple(float(v) / factor for v in s_w)
        if not keep_input:
            change["input_threshold"] = activation_threshold(s_in, lq.input_unsigned,
                                                             lq.bits)
    # what the plan deploys: EasyQuant's scales as the thresholds give them back
    final = deployed(change) if change else lq
    q_final = _quantized_input(final, x_q, in_place=owned)
    del x_q
    if settings.bias_correction:
        # the unit's own error: its deployed quantization on the FP32 input
        conv_q = _dequantized(unit, _constants(unit, final),
                              _quantized_input(final, x_fp, in_place=owned))
        del x_fp
        # the mean error per channel, the float32 differences summed in float64
        error = _channel_sums(conv_q.sub_(conv_fp)) / (conv_q.numel() // conv_q.shape[1])
        del conv_q
        # an all-zero channel (weight scale 0) outputs rne(bias) in Intel's kernel: a shift
        # cannot correct it by less than a whole step, so it is left as it is
        error[torch.tensor(final.scale_params, device=error.device) == 0] = 0.0
        before = np.zeros(len(error)) if final.bias_shift is None else np.asarray(
            final.bias_shift, np.float64)
        shift = tuple(float(v) for v in before - error.cpu().numpy())
        change["bias_shift"] = shift
        final = replace(final, bias_shift=list(shift))
        _, bias = folded_weights(unit)
        report.bias_shift = float(error.abs().max() / max(float(bias.abs().max()), 1e-12))
    del conv_fp
    # through the unit: the quantized net's output at the deployed quantization, and where
    # a correction was made, without it (the same accumulator, the other int32 bias)
    q_w, q_b, divisor = _constants(unit, final)
    acc = unit.layer.module.run_with(q_final, q_w, None)
    del q_final
    y_plain = None
    if settings.bias_correction:
        plain = deployed({k: v for k, v in change.items() if k != "bias_shift"})
        y_plain = _finish(unit, _biased(acc, _constants(unit, plain)[1], divisor, False), r_q,
                          in_place=True)
    y_q = _finish(unit, _biased(acc, q_b, divisor, in_place=True), r_q, in_place=True)
    del acc
    if y_plain is not None:
        # kept only where it brings the unit's output (after its activation, the quantized
        # network upstream) closer to FP32 than the bias without this correction
        bounds = _activation_after(unit, fused)
        if _squared_error(y_plain, y_fp, bounds) <= _squared_error(y_q, y_fp, bounds):
            y_q = y_plain
            if plain.bias_shift is None:
                change.pop("bias_shift")
            else:
                change["bias_shift"] = tuple(plain.bias_shift)
            report.bias_shift = 0.0
        del y_plain
    if shared_output:   # (the correction changes the bias alone, not scale_out)
        y_q = quantize(y_q, final.scale_out, final.output_unsigned, final.bits,
                       in_place=True).div_(final.scale_out)
    return y_fp, y_q, change, report


def _activation_after(unit: FusedUnit, fused: FusedGraph):
    """(low, high) of a ReLU6 reading the unit's output, else None."""
    for node in fused.consumers(unit.output):
        if node.type == "ReLU6":
            return (0.0, 6.0)
    return None


def _squared_error(y: torch.Tensor, reference: torch.Tensor, bounds) -> float:
    """sum((y - reference)^2) in float64 (:func:`_sample_slices`), both clamped to
    ``bounds`` (the activation that reads them) when given."""
    total = 0.0
    for a, b in _sample_slices(y, reference):
        if bounds is not None:
            a, b = a.clamp(*bounds), b.clamp(*bounds)
        total += float((a - b).pow_(2).sum(dtype=torch.float64))
    return total


def _single_rounding(fused: FusedGraph, stats: dict, options: QuantOptions,
                     choices: dict) -> dict:
    """A unit whose INT8 output feeds a single quantized unit writes it at that unit's
    (searched) input threshold, so the value is rounded once."""
    plan = build_plan(fused, stats, options, choices)
    for unit in fused.units:
        choice = choices.get(unit.name)
        if choice is None or choice.input_threshold is None or unit.name not in plan.layers:
            continue
        producer = _sole_writer(fused, unit)
        if producer is None:
            continue
        lq = plan.layers.get(producer.name)
        if lq is None or not lq.output_int8 or _sole_reader(fused, producer) != unit.name:
            continue
        if lq.output_unsigned != plan.layers[unit.name].input_unsigned:
            continue
        choices[producer.name] = replace(choices.get(producer.name, UnitChoice()),
                                         output_threshold=choice.input_threshold)
    return choices
