"""Scales by Intel Caffe's rules, from the fused view and the tensor statistics.

Convention: integer = round(float * scale). Activations: 255/T for u8, 127/T for s8;
weights: 127/max|W| per output channel (``-c multiple``) or per tensor (``-c single``) of the
*folded* weights, a zero channel gets 0. A threshold T of 0 (an all-zero tensor) gives scale
1, so no scale is ever inf or NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from calibrator.errors import LayerError
from calibrator.quant import estimators
from calibrator.quant.folding import folded_weights
from calibrator.quant.fusion import FusedGraph, FusedUnit
from calibrator.quant.targets import COUNTERMEASURES as SATURATION_FIXES
from calibrator.quant.targets import WEIGHT_FACTORS


@dataclass(frozen=True)
class QuantOptions:
    """Intel calibrator flags that decide scales (the CLI maps its options onto these)."""

    estimator: str = "KL"            # -a
    per_channel: bool = False        # -c multiple
    first_conv: bool = False         # -1st
    quantize_fc: bool = False        # -fc
    unsigned_range: bool = False     # -u: s8 outputs scaled by 255 as well
    concat_fp32: bool = False        # -t
    unify_concat: bool = False       # -f
    unify_concat_consumer: bool = False  # -ucac (with -f)
    force_u8: bool = False           # -fu (first conv fed u8)
    bits: int = 8                    # --bits


@dataclass(frozen=True)
class UnitChoice:
    """Per-layer decisions the accuracy search may change."""

    fp32: bool = False
    estimator: str | None = None        # None: the global one
    per_channel: bool | None = None
    input_threshold: float | None = None    # explicit thresholds (EasyQuant-style search)
    output_threshold: float | None = None
    weight_scale_factor: float = 1.0
    weight_scales: tuple[float, ...] | None = None  # explicit per-channel scales
    #: a counter-measure against int16 pair saturation (calibrator.quant.targets): "w7"
    #: (7-bit weights), "half" (halved weight scales) or "s8" (signed input)
    saturation_fix: str | None = None
    #: per output channel, added to the (folded) bias of the INT8 layer (bias correction)
    bias_shift: tuple[float, ...] | None = None


@dataclass
class LayerQuant:
    """Everything written into one layer's quantization_param, plus why."""

    name: str
    scale_in: float
    scale_out: float
    scale_params: list[float]
    input_unsigned: bool
    output_unsigned: bool
    output_int8: bool
    force_u8_input: bool = False
    bits: int = 8
    estimator: str = "KL"
    per_channel: bool = False
    input_threshold: float = 0.0
    output_threshold: float = 0.0
    saturation_fix: str | None = None   # see UnitChoice
    bias_shift: list[float] | None = None   # see UnitChoice
    notes: list[str] = field(default_factory=list)

    @property
    def is_negative_input(self) -> bool:
        return not self.input_unsigned

    @property
    def bw_layer_out(self) -> int:
        return self.bits if self.output_int8 else 32


def qmax(unsigned: bool, bits: int = 8) -> int:
    return 2 ** bits - 1 if unsigned else 2 ** (bits - 1) - 1


def as_stored(value: float, overflow: float) -> float:
    """``value`` as the prototxt stores it (a float32), so that the in-memory simulation runs
    exactly what is written; a value too large for float32 becomes ``overflow``."""
    with np.errstate(over="ignore"):
        stored = np.float32(value)
    return float(stored) if np.isfinite(stored) else overflow


def activation_scale(threshold: float, unsigned: bool, bits: int = 8) -> float:
    return as_stored(qmax(unsigned, bits) / threshold, 1.0) if threshold > 0 else 1.0


def weight_scales(weight: torch.Tensor, per_channel: bool, bits: int = 8,
                  factor: float = 1.0) -> list[float]:
    """qmax/max|W| per output channel (or once for the tensor, repeated); 0 for a zero one."""
    limit = 2 ** (bits - 1) - 1
    w = weight.detach().double().abs().reshape(weight.shape[0], -1)
    maxima = w.max(1).values if per_channel else w.max().expand(weight.shape[0])
    scales = torch.where(maxima > 0, limit / maxima.clamp(min=1e-300), torch.zeros_like(maxima))
    return [as_stored(float(s) * factor, 0.0) for s in scales]


@dataclass
class QuantPlan:
    """The quantized layers of one configuration, in layer order; ``excluded``: eligible
    units a runtime rule keeps FP32, and why."""

    layers: dict[str, LayerQuant]
    options: QuantOptions
    choices: dict[str, UnitChoice]
    excluded: dict[str, str] = field(default_factory=dict)

    def fp32_layers(self, fused: FusedGraph) -> list[str]:
        return [u.name for u in fused.units if u.name not in self.layers]


def kept_fp32(fused: FusedGraph) -> dict[str, str]:
    """Units that stay FP32 whatever the options, and why: a layer whose (folded) weights
    are all zero has nothing to quantize (its weight scale would be 0). Computed once per
    fused graph; folded weights that are not finite (a BatchNorm/Scale that overflows
    float32 when folded) are a LayerError."""
    if fused.kept_fp32 is None:
        kept = {}
        for unit in fused.units:
            weight, bias = folded_weights(unit)
            if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
                folded = ", ".join(f"'{n.name}'" for n in unit.folded) or "nothing"
                raise LayerError(unit.layer.name, unit.layer.type,
                                 f"its weights are not finite after folding ({folded} folded "
                                 "in): they overflow float32")
            if not bool((weight != 0).any()):
                kept[unit.name] = "all its weights are zero: nothing to quantize"
        fused.kept_fp32 = kept
    return fused.kept_fp32


def eligible_units(fused: FusedGraph, options: QuantOptions, *,
                   include_kept: bool = False) -> list[FusedUnit]:
    """Units Intel would quantize: every conv but the first (unless -1st); fc with -fc;
    never one of :func:`kept_fp32` (unless ``include_kept``)."""
    units = [u for u in fused.units if u.kind == "conv" or options.quantize_fc]
    convs = [u for u in units if u.kind == "conv"]
    if convs and not (options.first_conv or options.force_u8):
        units = [u for u in units if u is not convs[0]]
    if include_kept:
        return units
    kept = kept_fp32(fused)
    return [u for u in units if u.name not in kept]


def first_conv(fused: FusedGraph) -> FusedUnit | None:
    convs = [u for u in fused.units if u.kind == "conv"]
    return convs[0] if convs else None


def build_plan(fused: FusedGraph, stats: dict, options: QuantOptions,
               choices: dict[str, UnitChoice] | None = None) -> QuantPlan:
    """The plan: every eligible unit the choices leave INT8, with Intel's scale rules.

    A conv that absorbed an Eltwise SUM writes its residual's data type in Intel's kernels,
    and runs entirely in FP32 when the residual is FP32 (``mkldnn_convolution_layer.cpp``
    :287-310): units Intel would run in FP32 anyway, or would clip, are listed in
    ``plan.excluded`` with the reason: the prototxt written for Intel leaves them FP32 and
    Intel's backend simulates them so; ONNX Runtime adds the residual in float and keeps
    them INT8 (its backend and the ONNX export use every layer of the plan)."""
    choices = dict(choices or {})
    layers = _build_layers(fused, stats, options, choices)
    excluded = _fp32_residual_units(fused, layers)
    _residual_data_types(fused, layers, options, excluded)
    for name, why in excluded.items():
        layers[name].notes.append(f"FP32 in Intel Caffe: {why}")
    return QuantPlan(layers, options, choices, excluded)


def _fp32_residual_units(fused: FusedGraph, layers: dict) -> dict[str, str]:
    """Quantized units with a fused sum whose residual is not INT8 of one data type."""
    found = {}
    for unit in fused.units:
        if unit.name not in layers or unit.residual is None:
            continue
        producers, others = fused.upstream_units(unit.residual)
        quant = [layers.get(p.name) for p in producers]
        if others or not producers or any(lq is None or not lq.output_int8 for lq in quant):
            found[unit.name] = "its residual is FP32: Intel runs the fused conv + sum in FP32"
        elif len({layers[p.name].output_unsigned for p in producers}) > 1:
            found[unit.name] = "its residual mixes u8 and s8 data: Intel makes it FP32"
        elif layers[producers[0].name].output_unsigned and unit.relu_slope is None:
            found[unit.name] = ("its residual is u8 and no ReLU follows the sum: Intel would "
                                "write u8 and clip every negative sum to 0")
    return found


def _residual_data_types(fused: FusedGraph, layers: dict, options: QuantOptions,
                         excluded: dict) -> None:
    """A fused sum writes its residual's data type: with an s8 residual the output is s8
    even after a ReLU, so it is scaled by 127/T (Intel's own calibrator keeps 255/T and so
    clips at T/2)."""
    for unit in fused.units:
        lq = layers.get(unit.name)
        if lq is None or unit.residual is None or not lq.output_int8 or unit.name in excluded:
            continue
        producers, _ = fused.upstream_units(unit.residual)
        unsigned = layers[producers[0].name].output_unsigned
        if unsigned == lq.output_unsigned:
            continue
        lq.output_unsigned = unsigned
        lq.scale_out = activation_scale(lq.output_threshold, unsigned or options.unsigned_range,
                                        options.bits)
        lq.notes.append(f"output {'u8' if unsigned else 's8'}: the fused sum writes its "
                        "residual's data type")


def _build_layers(fused: FusedGraph, stats: dict, options: QuantOptions,
                  choices: dict[str, UnitChoice]) -> dict:
    units = [u for u in eligible_units(fused, options)
             if not choices.get(u.name, UnitChoice()).fp32]
    first = first_conv(fused)
    layers: dict[str, LayerQuant] = {}
    for unit in units:
        choice = choices.get(unit.name, UnitChoice())
        estimator = choice.estimator or options.estimator
        per_channel = options.per_channel if choice.per_channel is None else choice.per_channel
        # input sign (Intel's is_convolution_input_u8): every conv reached upstream, INT8 or
        # FP32 (the first conv, a search fallback), must end with a ReLU of slope 0; a tensor
        # that comes from another FP32 layer is u8 only if it was never negative.
        producers, others = fused.upstream_units(unit.input)
        unsigned = all(p.output_unsigned for p in producers)
        # an FP32 tensor on the way (data, a standalone BatchNorm...): judge the input itself
        unsigned = unsigned and (not others or stats[unit.input.key].unsigned)
        force_u8 = options.force_u8 and unit is first
        if unit is first and options.first_conv and not force_u8:
            unsigned = False  # Intel: the first conv takes s8 input
        fix = choice.saturation_fix
        if fix is not None and fix not in SATURATION_FIXES:
            raise ValueError(f"unknown saturation counter-measure '{fix}'")
        weight_factor = choice.weight_scale_factor * WEIGHT_FACTORS.get(fix, 1.0)
        if fix == "s8" and not force_u8:
            unsigned = False
        t_in = choice.input_threshold
        if t_in is None:
            t_in = estimators.threshold(stats[unit.input.key], estimator, options.bits)
        t_out = choice.output_threshold
        if t_out is None:
            t_out = estimators.threshold(stats[unit.output.key], estimator, options.bits)
        weight, _ = folded_weights(unit)
        lq = LayerQuant(
            name=unit.name,
            scale_in=1.0 if force_u8 else activation_scale(t_in, unsigned, options.bits),
            scale_out=activation_scale(
                t_out, unit.output_unsigned or options.unsigned_range, options.bits),
            scale_params=([as_stored(v * WEIGHT_FACTORS.get(fix, 1.0), 0.0)
                           for v in choice.weight_scales]
                          if choice.weight_scales is not None
                          else weight_scales(weight, per_channel, options.bits, weight_factor)),
            input_unsigned=unsigned or force_u8, output_unsigned=unit.output_unsigned,
            output_int8=True, force_u8_input=force_u8, bits=options.bits,
            estimator=estimator, per_channel=per_channel, input_threshold=t_in,
            output_threshold=t_out, saturation_fix=fix,
            bias_shift=list(choice.bias_shift) if choice.bias_shift is not None else None)
        if fix is not None:
            lq.notes.append(f"saturation counter-measure: {fix} ({SATURATION_FIXES[fix]})")
        layers[unit.name] = lq
    _decide_output_precision(fused, layers, options)
    _average_pooling_rule(fused, layers)
    return layers


def _decide_output_precision(fused: FusedGraph, layers: dict[str, LayerQuant],
                             options: QuantOptions) -> None:
    """FP32 output for a unit with no INT8 consumer and for the last quantized unit;
    -t / -f for the units feeding a Concat."""
    order = [u for u in fused.units if u.name in layers]
    for unit in order:
        reached, _ = fused.downstream(unit.output)
        if not any(r.name in layers and r is not unit for r in reached):
            _to_fp32(layers[unit.name], "no INT8 consumer")
    if order:
        _to_fp32(layers[order[-1].name], "last quantized layer")
    if not (options.concat_fp32 or options.unify_concat):
        return
    for node in fused.net.nodes:
        if node.type != "Concat":
            continue
        feeding = []
        for i in range(len(node.bottoms)):
            producers, _ = fused.upstream_units(fused.input_of(node, i))
            feeding.extend(p for p in producers if p.name in layers)
        if not feeding:
            continue
        if options.unify_concat:
            int8 = [layers[p.name] for p in feeding if layers[p.name].output_int8]
            if int8:
                smallest = min(l.scale_out for l in int8)
                for lq in int8:
                    lq.scale_out = smallest
                    lq.notes.append(f"scale_out unified over Concat '{node.name}'")
                if options.unify_concat_consumer:
                    _concat_consumers_take(fused, layers, node, smallest)
        else:
            for p in feeding:
                _to_fp32(layers[p.name], f"feeds Concat '{node.name}' (-t)")


def _concat_consumers_take(fused: FusedGraph, layers, concat, scale: float) -> None:
    """-ucac: convs reading the Concat directly take its unified scale as scale_in."""
    for unit in fused.units:
        lq = layers.get(unit.name)
        if lq is not None and unit.input.producer == concat.index:
            lq.scale_in = scale
            lq.notes.append(f"scale_in = unified scale of Concat '{concat.name}' (-ucac)")


def _to_fp32(lq: LayerQuant, why: str) -> None:
    if lq.output_int8:
        lq.output_int8 = False
        lq.scale_out = 1.0
        lq.notes.append(f"FP32 output: {why}")


def _average_pooling_rule(fused: FusedGraph, layers: dict[str, LayerQuant]) -> None:
    """An AVE pooling between two quantized convs keeps the producer's scale: the consumer's
    scale_in becomes the producer's scale_out."""
    for unit in fused.units:
        lq = layers.get(unit.name)
        if lq is None or unit.input.producer < 0:
            continue
        node = fused.net.nodes[unit.input.producer]
        if node.type != "Pooling" or node.param.pooling_param.pool != \
                type(node.param.pooling_param).AVE:
            continue
        source = fused.unit_by_output.get(fused.input_of(node).key)
        if source is not None and source.name in layers and layers[source.name].output_int8:
            lq.scale_in = layers[source.name].scale_out
            lq.notes.append(f"scale_in = scale_out of '{source.name}' (AVE pooling between)")


def with_choice(choices: dict[str, UnitChoice], name: str, **changes) -> dict[str, UnitChoice]:
    """A copy of ``choices`` with one unit's choice changed."""
    out = dict(choices)
    out[name] = replace(out.get(name, UnitChoice()), **changes)
    return out
