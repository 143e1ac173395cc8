"""Targets: which integer arithmetic the INT8 simulation reproduces.

The simulation (``calibrator.quant.simulate``) quantizes each unit's input and weights and
then *accumulates* their products; only that accumulation differs between CPUs. A target
replaces ``_UnitKernel.accumulate``'s exact int32 convolution with what a family of real
kernels computes. Every target returns the integer accumulator (float64, integer-valued,
without the bias, which all kernels add exactly in int32).

``vnni`` (default: what Intel Caffe's writers assume)
    Exact int32 accumulation of u8 x s8 (or s8 x s8) products: ``VPDPBUSD`` (AVX512-VNNI,
    AVX-VNNI) adds four exact products into int32 (its ``S`` form saturates the int32
    accumulator only, which 8-bit convolutions never reach). Same as the simulation without
    a target.
``generic``
    The same exact int32 arithmetic, named for what it stands for: any kernel that widens
    the 8-bit operands to 16/32 bits before multiplying (reference C loops, OpenCV/ncnn
    generic paths, ARM ``SDOT``/``UDOT``, GPUs' ``dp4a``, oneDNN's depthwise kernels).
``avx2``, ``avx512bw``
    x86 without VNNI. ``VPMADDUBSW`` multiplies u8 by s8 and adds *adjacent pairs* of
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
``int7``
    ARM-style 7-bit operands (e.g. kernels that keep products of two 7-bit values in int16,
    or ``--bits 7`` runtimes): weights limited to [-64, 63] (the scales map max|W| to 63) and
    activations to u7 [0, 127] / s7 [-64, 63]; the accumulation itself is exact. A plan built
    with ``--bits 7`` is unchanged by it; an 8-bit plan shows what clamping to 7 bits costs.
``auto``
    The local CPU from /proc/cpuinfo: ``avx512_vnni`` or ``avx_vnni`` -> vnni, else
    ``avx512bw`` -> avx512bw, else ``avx2`` -> avx2, else generic.

Implementation: the saturating targets run the exact convolution and then add, for the
pairs that *can* saturate, ``clip(pair) - pair``. A pair (w0, w1) can saturate only if
``max(u) * (w0+ + w1+) > 32767`` or ``max(u) * (w0- + w1-) < -32768`` with u the (shifted)
input range of the batch; the others are exact, so with 7-bit weights, halved weight scales
or small inputs the cost is one ordinary convolution. The risky pairs are evaluated on the
unfolded input (``F.unfold`` in batch chunks, pairs in chunks) in float64, which is exact
for these integers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

INT16_MIN, INT16_MAX = -32768, 32767
#: Elements per temporary tensor in the pair evaluation (float64: 128 MiB).
CHUNK_ELEMENTS = 1 << 24

#: Counter-measures against pair saturation the search may choose per layer.
#: name -> (UnitChoice changes, what it does)
COUNTERMEASURES = {
    "w7": "7-bit weights: weight scales x 63/127, |q_w| <= 63, so 255*63*2 = 32130 never "
          "saturates (ONNX Runtime's reduce_range)",
    "half": "halved weight scales (Intel's -fu rule without -clx): |q_w| <= 64, "
            "255*64*2 = 32640 never saturates",
    "s8": "signed (s8) activations (scale 127/T): never saturates where s8 inputs halve the "
          "weights (oneDNN convolution, the *-onednn targets); on MLAS (avx2/avx512bw) s8 "
          "inputs are shifted by 128 and saturate more, not less",
}
WEIGHT_FACTORS = {"w7": 63.0 / 127.0, "half": 0.5}


# -- the targets ---------------------------------------------------------------------------

@dataclass
class Target:
    """How one family of kernels accumulates. ``accumulate(kernel, q_in)`` gets the
    simulator's ``_UnitKernel`` (quantized weights, its unit and LayerQuant) and the
    quantized input, and returns the accumulator without bias (float64)."""

    name: str
    description: str
    pair_saturation: bool = False     # VPMADDUBSW pairs saturating to int16
    s8_input: str = "shift"           # "shift" (MLAS, oneDNN GEMM) or "halve" (oneDNN conv)
    operand_bits: int | None = None   # int7: clamp operands to this width
    #: units accumulated exactly whatever the target (e.g. those a runtime runs in float)
    skip: frozenset = frozenset()
    #: when set, per-layer saturation counts are added here (see ``SaturationRecord``)
    record: dict | None = field(default=None, repr=False, compare=False)

    @property
    def exact(self) -> bool:
        return not self.pair_saturation and self.operand_bits is None

    def accumulate(self, kernel, q_in: torch.Tensor) -> torch.Tensor:
        if kernel.unit.name in self.skip:
            return kernel.exact_accumulate(q_in)
        if self.operand_bits is not None:
            return _accumulate_narrow(kernel, q_in, self.operand_bits)
        if not self.pair_saturation:
            return kernel.exact_accumulate(q_in)
        return _accumulate_pairs(self, kernel, q_in)

    def __str__(self) -> str:
        return self.name


TARGETS = {
    "vnni": Target("vnni", "exact int32 accumulation (AVX512-VNNI / AVX-VNNI VPDPBUSD; "
                           "Intel Caffe's assumption)"),
    "generic": Target("generic", "exact int32 accumulation (operands widened before "
                                 "multiplying: reference kernels, ARM dot products, GPUs)"),
    "avx2": Target("avx2", "AVX2 without VNNI, ONNX Runtime MLAS rules: u8 x s8 pairs "
                           "saturate to int16, s8 inputs shifted by 128", True, "shift"),
    "avx512bw": Target("avx512bw", "AVX-512BW without VNNI, MLAS rules (same arithmetic as "
                                   "avx2)", True, "shift"),
    "avx2-onednn": Target("avx2-onednn", "AVX2 without VNNI, oneDNN convolution rules: u8 "
                                         "pairs saturate, s8 inputs halve the weights",
                          True, "halve"),
    "avx512bw-onednn": Target("avx512bw-onednn", "AVX-512BW without VNNI, oneDNN "
                                                 "convolution rules", True, "halve"),
    "int7": Target("int7", "7-bit operands (weights [-64, 63], activations u7/s7), exact "
                           "accumulation", operand_bits=7),
}
DEFAULT_TARGET = "vnni"
TARGET_NAMES = tuple(TARGETS) + ("auto",)


def get_target(name: str | Target | None, cpuinfo: str | None = None) -> Target:
    """A fresh Target by name (``auto`` detects the local CPU); None gives the default."""
    if isinstance(name, Target):
        return name
    name = (name or DEFAULT_TARGET).lower()
    if name == "auto":
        name = detect_target(cpuinfo)
    if name not in TARGETS:
        raise ValueError(f"unknown target '{name}' (choose from {', '.join(TARGET_NAMES)})")
    base = TARGETS[name]
    return Target(base.name, base.description, base.pair_saturation, base.s8_input,
                  base.operand_bits)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The ``flags`` of the first processor in /proc/cpuinfo (or of the given text)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        match = re.match(r"\s*(flags|Features)\s*:\s*(.*)", line)
        if match:
            return set(match.group(2).split())
    return set()


def detect_target(cpuinfo: str | None = None) -> str:
    """The target name for a CPU's flags (the local one unless ``cpuinfo`` is given)."""
    flags = cpu_flags(cpuinfo)
    if {"avx512_vnni", "avx_vnni"} & flags:
        return "vnni"
    if "avx512bw" in flags:
        return "avx512bw"
    if "avx2" in flags:
        return "avx2"
    return "generic"


def apply_target(simulator, target: str | Target | None) -> Target:
    """Make every kernel of an ``Int8Simulator`` accumulate as ``target`` does."""
    target = get_target(target)
    for kernel in simulator.kernels.values():
        kernel.target = None if target.exact else target
    return target


# -- int7 ----------------------------------------------------------------------------------

def _accumulate_narrow(kernel, q_in: torch.Tensor, bits: int) -> torch.Tensor:
    lq = kernel.quant
    if lq.input_unsigned:
        q_in = q_in.clamp(0, 2 ** bits - 1)
    else:
        q_in = q_in.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    cache = _cache(kernel)
    if ("narrow", bits) not in cache:
        cache[("narrow", bits)] = kernel.q_weight.clamp(-(2 ** (bits - 1)),
                                                        2 ** (bits - 1) - 1)
    return kernel.exact_accumulate(q_in, cache[("narrow", bits)])


# -- pairwise int16 saturation -------------------------------------------------------------

def _cache(kernel) -> dict:
    cache = kernel.__dict__.get("_target_cache")
    if cache is None:
        cache = kernel.__dict__["_target_cache"] = {}
    return cache


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
    cache = _cache(kernel)
    if "halved" not in cache:
        from calibrator.quant.folding import folded_weights

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


def _accumulate_pairs(target: Target, kernel, q_in: torch.Tensor) -> torch.Tensor:
    unit = kernel.unit
    signed = not kernel.quant.input_unsigned and not kernel.quant.force_u8_input
    if signed and target.s8_input == "halve" and unit.kind == "conv":
        # oneDNN: u = q + 128 with halved weights never saturates (255 * 64 * 2 < 32767)
        return 2.0 * kernel.exact_accumulate(q_in, _halved_weights(kernel))
    acc = kernel.exact_accumulate(q_in)
    cache = _cache(kernel)
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
    if target.record is not None:
        _record(target.record, unit.name, correction, acc)
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


def _record(record: dict, name: str, correction: torch.Tensor, acc: torch.Tensor) -> None:
    entry = record.setdefault(name, SaturationRecord())
    changed = correction != 0
    entry.outputs += correction.numel()
    entry.changed += int(changed.sum())
    entry.abs_error += float(correction.abs().sum())
    entry.abs_acc += float(acc.abs().sum())


@dataclass
class SaturationRecord:
    """Per layer, over the batches simulated with ``target.record`` set: accumulator
    outputs, how many a saturated pair changed, and the summed |error| and |accumulator|."""

    outputs: int = 0
    changed: int = 0
    abs_error: float = 0.0
    abs_acc: float = 0.0

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.outputs if self.outputs else 0.0

    @property
    def relative_error(self) -> float:
        return self.abs_error / self.abs_acc if self.abs_acc else 0.0


# -- static analysis and counter-measures ---------------------------------------------------

def can_saturate(kernel, target: str | Target, input_max: float | None = None) -> bool:
    """Whether any pair of this unit can saturate on ``target`` for inputs up to
    ``input_max`` (default: the full u8 range, or the shifted s8 range)."""
    target = get_target(target)
    if not target.pair_saturation:
        return False
    signed = not kernel.quant.input_unsigned and not kernel.quant.force_u8_input
    if signed and target.s8_input == "halve" and kernel.unit.kind == "conv":
        return False
    layout = pair_layout(kernel)
    if layout.depthwise:
        return False
    high = 255.0 if input_max is None else float(input_max) + (128.0 if signed else 0.0)
    return _risky_pairs(layout, 0.0, min(high, 255.0)) is not None


def saturating_layers(simulator, target: str | Target) -> list[str]:
    """Quantized units of an ``Int8Simulator`` whose pairs can saturate on ``target``."""
    return [name for name, kernel in simulator.kernels.items()
            if can_saturate(kernel, target)]


def countermeasure_changes(fix: str) -> dict:
    """The ``UnitChoice`` change that applies counter-measure ``fix`` (see COUNTERMEASURES),
    for ``scales.with_choice``: ``build_plan`` then scales the weights (w7, half) or makes
    the input s8 (s8) and records the fix for the per-layer table."""
    if fix not in COUNTERMEASURES:
        raise ValueError(f"unknown counter-measure '{fix}' (choose from "
                         f"{', '.join(COUNTERMEASURES)})")
    return {"saturation_fix": fix}


def countermeasure_helps(fix: str, target: str | Target) -> bool:
    """Whether ``fix`` removes pair saturation on ``target``."""
    target = get_target(target)
    if not target.pair_saturation:
        return False
    return fix in WEIGHT_FACTORS or target.s8_input == "halve"


def apply_countermeasure(lq, fix: str) -> None:
    """Apply ``fix`` to a built ``LayerQuant`` in place (for plans that already exist, e.g.
    read from a prototxt; a search should go through ``countermeasure_changes`` so the
    scales are rebuilt). ``s8`` rescales the input from 255/T to 127/T."""
    if fix in WEIGHT_FACTORS:
        lq.scale_params = [s * WEIGHT_FACTORS[fix] for s in lq.scale_params]
    elif fix == "s8":
        if lq.input_unsigned and not lq.force_u8_input:
            lq.scale_in = lq.scale_in * (2 ** (lq.bits - 1) - 1) / (2 ** lq.bits - 1)
            lq.input_unsigned = False
    else:
        raise ValueError(f"unknown counter-measure '{fix}'")
    lq.notes.append(f"saturation counter-measure: {fix}")
    lq.saturation_fix = fix


def pair_bound(lq, weight_max: int = 127) -> int:
    """The largest |pair sum| a layer can produce: qmax_in * 2 * weight_max (u8 input or
    shifted s8). <= 32767 means the layer never saturates on any target."""
    qmax_in = 2 ** lq.bits - 1
    return int(qmax_in * 2 * weight_max)


__all__ = ["Target", "TARGETS", "TARGET_NAMES", "DEFAULT_TARGET", "get_target",
           "detect_target", "cpu_flags", "apply_target", "pair_layout", "can_saturate",
           "saturating_layers", "countermeasure_changes", "countermeasure_helps",
           "apply_countermeasure", "COUNTERMEASURES", "SaturationRecord", "pair_bound"]
