"""Pairwise int16 saturation: ``avx2``, ``avx512bw`` and their ``-onednn`` forms (x86
without VNNI).

``VPMADDUBSW`` multiplies u8 by s8 and adds *adjacent pairs* of
products into int16 **with saturation** to [-32768, 32767]; ``VPMADDWD`` by 1 and
``VPADDD`` then accumulate those pair sums exactly in int32 (oneDNN, "Nuances of int8
Computations", section 1.1; MLAS ``QgemmU8S8KernelAvx2``, ``ConvSymKernelAvx2``). The
AVX-512BW kernels (Skylake-SP, Cascade Lake without DL Boost) use the same instruction
pair on zmm registers: identical results, the two names exist for reporting.

*Which products form a pair* is the kernels' packing of the reduction axis. We follow
ONNX Runtime's MLAS, checked bit-exactly against its AVX2 kernels: QLinearConv reorders
the filter OIHW -> HWIO (``ReorderFilter``), so within a group the reduction index is
``k = c + Cg * (kh * KW + kw)`` (input channel fastest, kernel position major); the
indirect/im2col input is NHWC with the same order. Pairs are ``(k, k+1)`` for even k:
MLAS packs K in blocks of 4 (``MlasConvSymPackW``: 4 input channels per kernel position;
QGEMM ``CopyPackB``: 4 consecutive K rows, zero-padded), so with Cg % 4 == 0 a pair is two
neighbouring channels at one kernel position, and with an odd Cg (a first conv on 3
channels, im2col + QGEMM) pairs straddle kernel positions. An odd K gets a zero weight
partner. InnerProduct/Gemm pairs neighbours of the flattened (C, H, W) input. oneDNN's
jit x8s8s32x convolutions pack 4 input channels per kernel position too, so the pairing
is the same whenever Cg is a multiple of 4.

Depthwise convolutions (one input and one output channel per group) never saturate:
MLAS (``MlasConvSymDepthwiseKernelAvx2``) and oneDNN's ``jit_uni_dw`` widen to 32 bits.

*Signed (s8) activations.* ``VPMADDUBSW`` needs an unsigned operand, so s8 inputs are
shifted: ``u = q + 128`` in [0, 255] goes through the pairs and ``128 * sum(w)`` is
subtracted exactly afterwards (the compensation). Zero padding enters as u = 128. This
is what MLAS does (an int8 QDQ tensor, or a uint8 one with zero point 128) and what
oneDNN's s8s8 GEMM / inner product do; it saturates *more* easily than u8, because even
small activations sit near 128. oneDNN's *convolution* instead halves the s8 weights at
reorder time (``round(W * scale / 2)``) and doubles the result: no saturation, one bit
of weight precision lost. ``avx2``/``avx512bw`` model the MLAS rule (``s8_input =
"shift"``); ``avx2-onednn``/``avx512bw-onednn`` model Intel Caffe's oneDNN convolutions
(``s8_input = "halve"``; inner products still shift).

Implementation: the saturating targets run the exact convolution and then add, for the
pairs that *can* saturate, ``clip(pair) - pair``. A pair (w0, w1) can saturate only if
``max(u) * (w0+ + w1+) > 32767`` or ``max(u) * (w0- + w1-) < -32768`` with u the (shifted)
input range of the batch; the others are exact, so with 7-bit weights, halved weight scales
or small inputs the cost is one ordinary convolution. The risky pairs are evaluated on the
unfolded input (``F.unfold`` in batch chunks, pairs in chunks) in float64, which is exact
for these integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calibrator.quant.folding import folded_weights
from calibrator.quant.targets.base import SaturationRecord, Target

INT16_MIN, INT16_MAX = -32768, 32767
#: Elements per temporary tensor in the pair evaluation (float64: 128 MiB).
CHUNK_ELEMENTS = 1 << 24


class PairSaturating(Target):
    """x86 without VNNI, MLAS's rules: u8 x s8 product pairs saturate to int16; s8 inputs
    are shifted by 128 (``s8_input = "shift"``)."""

    s8_input = "shift"
    countermeasures = ("w7", "half")

    @property
    def exact(self) -> bool:
        return False

    def signed_input(self, kernel) -> bool:
        return not kernel.quant.input_unsigned and not kernel.quant.force_u8_input

    def accumulate(self, kernel, q_in, record=None):
        return _accumulate_pairs(self, kernel, q_in, record)

    def can_saturate(self, kernel, input_max=None) -> bool:
        signed = self.signed_input(kernel)
        if signed and self.s8_input == "halve" and kernel.unit.kind == "conv":
            return False
        layout = pair_layout(kernel)
        if layout.depthwise:
            return False
        high = 255.0 if input_max is None else float(input_max) + (128.0 if signed else 0.0)
        return _risky_pairs(layout, 0.0, min(high, 255.0)) is not None


class OneDnnPairs(PairSaturating):
    """x86 without VNNI, oneDNN's convolution rules: u8 pairs saturate as in MLAS, but s8
    inputs halve the weights instead of being shifted (inner products still shift)."""

    s8_input = "halve"
    countermeasures = ("w7", "half", "s8")


@dataclass
class PairLayout:
    """The reduction axis of one unit as the kernels pack it, as pairs.

    ``rows0``/``rows1`` index the rows of ``unfold(x)`` (conv) or of the flattened input
    (fc) that pair p of group g multiplies; ``w0``/``w1`` (G, Og, P) are the integer weights
    of the pair (a padded partner has weight 0)."""

    groups: int
    out_per_group: int
    rows0: torch.Tensor   # (G, P) long
    rows1: torch.Tensor   # (G, P) long
    w0: torch.Tensor      # (G, Og, P) float64
    w1: torch.Tensor
    depthwise: bool


def pair_layout(kernel, weight: torch.Tensor | None = None) -> PairLayout:
    """Pairs of ``kernel``'s unit (weights: its q_weight unless given)."""
    unit = kernel.unit
    weight = kernel.q_weight if weight is None else weight
    weight = weight.double()
    out = weight.shape[0]
    if unit.kind == "conv":
        module = unit.layer.module
        groups = module.group
        cg = weight.shape[1]
        positions = weight.shape[2] * weight.shape[3]
        # MLAS order within a group: k = c + Cg * pos; unfold row = (g*Cg + c) * KK + pos
        w = weight.reshape(groups, out // groups, cg, positions).permute(0, 1, 3, 2)
        w = w.reshape(groups, out // groups, positions * cg)
        pos = torch.arange(positions).repeat_interleave(cg)
        chan = torch.arange(cg).repeat(positions)
        rows = (torch.arange(groups)[:, None] * cg + chan[None, :]) * positions + pos[None, :]
        depthwise = cg == 1 and out == groups
    else:
        groups, w = 1, weight.reshape(1, out, -1)
        rows = torch.arange(w.shape[-1])[None, :]
        depthwise = False
    k = w.shape[-1]
    if k % 2:
        w = F.pad(w, (0, 1))
        rows = torch.cat([rows, rows[:, :1]], dim=1)
    device = weight.device
    return PairLayout(groups, w.shape[1], rows[:, 0::2].to(device), rows[:, 1::2].to(device),
                      w[..., 0::2].contiguous(), w[..., 1::2].contiguous(), depthwise)


def _halved_weights(kernel) -> torch.Tensor:
    """oneDNN's s8-input weights: round(W' * scale / 2), saturated to the weight range."""
    cache = kernel.cache
    if "halved" not in cache:
        weight, _ = folded_weights(kernel.unit)
        scales = torch.tensor(kernel.quant.scale_params, dtype=torch.float64,
                              device=kernel.q_weight.device)
        limit = 2 ** (kernel.quant.bits - 1) - 1
        shape = (-1,) + (1,) * (weight.dim() - 1)
        cache["halved"] = torch.round(weight.double().to(scales.device) * 0.5
                                      * scales.reshape(shape)).clamp(-limit - 1, limit).float()
    return cache["halved"]


def _input_rows(kernel, x: torch.Tensor) -> torch.Tensor:
    """(N, K_total, L): the unfolded conv input or the flattened fc input (L = 1)."""
    unit = kernel.unit
    module = unit.layer.module
    if unit.kind == "conv":
        return F.unfold(x, module.kernel, dilation=module.dilation, padding=module.pad,
                        stride=module.stride)
    return x.flatten(module.axis).reshape(-1, module.num_inputs, 1)


def _accumulate_pairs(target: "PairSaturating", kernel, q_in: torch.Tensor,
                      record: dict | None) -> torch.Tensor:
    unit = kernel.unit
    signed = not kernel.quant.input_unsigned and not kernel.quant.force_u8_input
    if signed and target.s8_input == "halve" and unit.kind == "conv":
        # oneDNN: u = q + 128 with halved weights never saturates (255 * 64 * 2 < 32767)
        return 2.0 * kernel.exact_accumulate(q_in, _halved_weights(kernel))
    acc = kernel.exact_accumulate(q_in)
    cache = kernel.cache
    if "pairs" not in cache:
        cache["pairs"] = pair_layout(kernel)
    layout: PairLayout = cache["pairs"]
    if layout.depthwise:
        return acc
    shift = 128.0 if signed else 0.0
    high = float(q_in.max()) + shift
    low = float(q_in.min()) + shift
    if unit.kind == "conv" and any(unit.layer.module.pad):
        low, high = min(low, shift), max(high, shift)  # padding enters as u = shift
    low = max(low, 0.0)
    risky = _risky_pairs(layout, low, high)
    if risky is None:
        return acc
    correction = _pair_correction(kernel, layout, risky, q_in, shift, acc.shape)
    if record is not None:
        record.setdefault(unit.name, SaturationRecord()).add(correction, acc)
    return acc + correction


def _risky_pairs(layout: PairLayout, low: float, high: float):
    """(g, o, p) indices of the pairs whose sum can leave int16 for inputs in [low, high]."""
    w0, w1 = layout.w0, layout.w1
    top = torch.maximum(w0 * low, w0 * high) + torch.maximum(w1 * low, w1 * high)
    bottom = torch.minimum(w0 * low, w0 * high) + torch.minimum(w1 * low, w1 * high)
    mask = (top > INT16_MAX) | (bottom < INT16_MIN)
    if not bool(mask.any()):
        return None
    return mask.nonzero(as_tuple=True)


def _pair_correction(kernel, layout: PairLayout, risky, q_in: torch.Tensor, shift: float,
                     acc_shape) -> torch.Tensor:
    """sum over the risky pairs of clip(pair) - pair, shaped like the accumulator."""
    g, o, p = risky
    channel = g * layout.out_per_group + o
    rows0 = layout.rows0[g, p]
    rows1 = layout.rows1[g, p]
    w0 = layout.w0[g, o, p]
    w1 = layout.w1[g, o, p]
    out_channels = layout.groups * layout.out_per_group
    batch = q_in.shape[0] if kernel.unit.kind == "conv" else None
    correction = torch.zeros(acc_shape, dtype=torch.float64, device=q_in.device)
    flat = correction.reshape(acc_shape[0], out_channels, -1) if batch is not None else \
        correction.reshape(-1, out_channels, 1)
    total = flat.shape[0]
    # batch chunks bound the unfolded input; pair chunks bound the pair sums
    probe = _input_rows(kernel, q_in[:1]) if batch is not None else None
    per_item = probe.numel() if probe is not None else q_in[:1].numel()
    items = max(1, min(total, CHUNK_ELEMENTS // max(per_item, 1)))
    positions = flat.shape[2]
    for start in range(0, total, items):
        stop = min(total, start + items)
        if batch is not None:
            rows = _input_rows(kernel, q_in[start:stop]).double()
        else:
            rows = _input_rows(kernel, q_in).double()[start:stop]
        if shift:
            rows = rows + shift  # padded zeros become u = 128 too, as in the kernels
        n = stop - start
        step = max(1, CHUNK_ELEMENTS // max(n * positions, 1))
        for first in range(0, len(channel), step):
            last = min(len(channel), first + step)
            sums = (rows[:, rows0[first:last], :] * w0[first:last, None]
                    + rows[:, rows1[first:last], :] * w1[first:last, None])
            delta = sums.clamp(INT16_MIN, INT16_MAX) - sums
            flat[start:stop].index_add_(1, channel[first:last], delta)
    return correction


