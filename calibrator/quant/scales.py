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
from calibrator.quant.compiled import (average_pooling_pairs, compiled_layers,
                                       force_fp32_outputs)
from calibrator.quant.estimators import HISTOGRAM
from calibrator.quant.folding import folded_once, folded_weights, while_unchanged
from calibrator.quant.fusion import FusedGraph, FusedUnit
from calibrator.quant.kl import release_layouts
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
    unify_concat_consumer: bool = False  # --unify-concat-consumer (with -f)
    force_fp32_rule: bool = True     # Intel's force_fp32_opt (off: -uff/--disable_force_fp32)
    cac_rule: bool = True            # Intel's cac_opt (off: -ucac/--disable_cac_unify)
    force_u8: bool = False           # -fu: after the plan, the first conv fed u8
    cascade_lake: bool = False       # -clx/--is_clx: -fu keeps full first-conv weight scales
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
    output_threshold: float | None = 0.0   # None: FP32 output, never measured
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


def all_as_stored(values, overflow: float) -> list[float]:
    """:func:`as_stored` of every value at once (the same float32 rounding)."""
    with np.errstate(over="ignore"):
        stored = np.asarray(values, dtype=np.float64).astype(np.float32)
    return np.where(np.isfinite(stored), stored.astype(np.float64), overflow).tolist()


def activation_scale(threshold: float, unsigned: bool, bits: int = 8) -> float:
    return as_stored(qmax(unsigned, bits) / threshold, 1.0) if threshold > 0 else 1.0


def activation_threshold(scale: float, unsigned: bool, bits: int = 8) -> float:
    """The threshold an :func:`activation_scale` stands for (0: no scale)."""
    return qmax(unsigned, bits) / scale if scale > 0 else 0.0


def weight_scales(weight: torch.Tensor, per_channel: bool, bits: int = 8,
                  factor: float = 1.0) -> list[float]:
    """qmax/max|W| per output channel (or once for the tensor, repeated); 0 for a zero one."""
    limit = 2 ** (bits - 1) - 1
    w = weight.detach().double().abs().reshape(weight.shape[0], -1)
    maxima = w.max(1).values if per_channel else w.max().expand(weight.shape[0])
    scales = torch.where(maxima > 0, limit / maxima.clamp(min=1e-300), torch.zeros_like(maxima))
    return all_as_stored(scales.cpu().numpy() * factor, 0.0)


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
    """The plan: every eligible unit the choices leave INT8, with Intel's scale rules, in
    the order Intel's ``calibrator.py`` applies them: scales (``transform_convolutions``,
    with ``-t``/``-f``), output precision (``force_fp32_opt``), then the AVE pooling scale
    rule (``cac_opt``).

    A conv that absorbed an Eltwise SUM writes its residual's data type in Intel's kernels,
    and runs entirely in FP32 when the residual is FP32 (``mkldnn_convolution_layer.cpp``
    :287-310): units Intel would run in FP32 anyway, or would clip, are listed in
    ``plan.excluded`` with the reason: the prototxt written for Intel leaves them FP32 and
    Intel's backend simulates them so; ONNX Runtime adds the residual in float and keeps
    them INT8 (its backend and the ONNX export use every layer of the plan)."""
    choices = dict(choices or {})
    layers = _build_layers(fused, stats, options, choices)
    release_layouts()     # the thresholds are kept with the statistics
    _decide_output_precision(fused, layers, options)
    excluded = _fp32_residual_units(fused, layers, _int8_into_batchnorm(fused, layers))
    _residual_data_types(fused, layers, options, excluded)
    if options.cac_rule:
        _average_pooling_rule(fused, layers, options, excluded)
    for name, why in excluded.items():
        layers[name].notes.append(f"FP32 in Intel Caffe: {why}")
    for lq in layers.values():
        if lq.output_int8 and lq.output_threshold is None:
            raise RuntimeError(f"'{lq.name}' writes INT8 but its output was not histogrammed "
                               "(histogram_keys judged it always FP32)")
    return QuantPlan(layers, options, choices, excluded)


def histogram_keys(fused: FusedGraph, options: QuantOptions) -> set[str]:
    """The tracked tensors whose histogram some plan may read: every unit input and residual,
    and the outputs of eligible units, less those Intel's ``force_fp32_opt`` always leaves
    FP32 (an in-place ReLU6 reads it, no INT8 reader, the last conv). The rule looks at the
    readers' types only, so a unit it forces with every layer INT8 is forced in every plan
    of these ``options``; a unit with a fused sum (its residual's type decides) or one a
    Concat reads (the Concat rules see its scale before the rule runs) keeps its histogram.
    On MobileNetV2 this leaves 34 of 51 unit outputs unhistogrammed: the histogram is most
    of the statistics pass."""
    keys = {ref.key for unit in fused.units for ref in (unit.input, unit.residual)
            if ref is not None}
    eligible = eligible_units(fused, options, include_kept=True)
    forced: dict[str, str] = {}
    if options.force_fp32_rule:
        layers = compiled_layers(fused)
        concat_bottoms = {b for layer in layers if layer.type == "Concat"
                          for b in layer.bottoms}
        by_name = {u.name: u for u in eligible}
        forced = {name: why for name, why in force_fp32_outputs(
            layers, set(by_name), options.quantize_fc).items()
            if by_name[name].residual is None
            and by_name[name].output.name not in concat_bottoms}
    keys.update(u.output.key for u in eligible if u.name not in forced)
    return keys


def _measured(stats, estimator: str) -> bool:
    """Whether ``estimator`` can read ``stats`` (a tensor :func:`histogram_keys` left
    without a histogram cannot give a histogram estimator's threshold)."""
    return stats.hist is not None or HISTOGRAM not in estimators.statistics_needed([estimator])


def _int8_into_batchnorm(fused: FusedGraph, layers: dict) -> dict[str, str]:
    """Keep INT8 data away from a BatchNorm no conv folds (pre-activation ResNets: the sum
    feeds BatchNorm + Scale + ReLU). Intel's MKLDNN BatchNorm takes its input's memory
    descriptor as is (``mkldnn_batch_norm_layer.cpp`` :202-221): INT8 data is reordered to
    scale 1.0 (integer real values), normalized as integers and written back at scale 1.0
    (measured: ``make intel-check``, sum_conv_*). A plain unit there writes FP32 instead; a
    conv with a fused sum cannot (it writes its residual's type), so it is returned to run
    FP32 entirely (and with it its residual's producers, see _fp32_residual_units)."""
    found = {}
    for node in fused.net.nodes:
        if node.type != "BatchNorm" or node.index in fused.unit_of_node:
            continue
        for unit in fused.upstream_units(fused.input_of(node))[0]:
            lq = layers.get(unit.name)   # a sum conv writes INT8 whatever its bw_layer_out
            if lq is None or not (lq.output_int8 or unit.residual is not None):
                continue
            why = (f"feeds the BatchNorm '{node.name}', which Intel runs on INT8 data as "
                   "integers at scale 1.0")
            if unit.residual is not None:
                found[unit.name] = why
            else:
                _to_fp32(lq, why)
    return found


def _fp32_residual_units(fused: FusedGraph, layers: dict,
                         seed: dict[str, str] | None = None) -> dict[str, str]:
    """Quantized units Intel Caffe must run in FP32 around its fused sums, and why.

    * A conv + sum runs FP32 when its residual is not INT8 of one data type
      (``mkldnn_convolution_layer.cpp`` :287-310), and we keep it FP32 when the residual is
      u8 without a ReLU after the sum (Intel would write u8 and clip negative sums).
    * Real Intel Caffe aborts on an FP32 conv + sum whose residual is INT8 (``Check failed:
      convFwd_pd``, :452: the output takes the residual's data type while the conv is f32),
      so the producers of such a residual run FP32 too, which may cascade up a chain of
      residual blocks.
    * It computes garbage (NaN, 1e33) in a conv + sum whose residual an INT8 conv wrote as
      FP32, while an FP32 conv's output works, so such a producer runs FP32 entirely.
    (Both measured by ``make intel-check``, cases fp32_residual_* and fp32_sum_conv_*.)"""
    found: dict[str, str] = dict(seed or {})

    def fp32(name: str) -> bool:
        return name not in layers or name in found

    changed = True
    while changed:
        changed = False
        for unit in fused.units:
            if unit.residual is None:
                continue
            producers, others = fused.upstream_units(unit.residual)
            int8 = [p for p in producers if not fp32(p.name) and layers[p.name].output_int8]
            if not fp32(unit.name):
                why = None
                if others or not producers or len(int8) < len(producers):
                    why = "its residual is FP32: Intel runs the fused conv + sum in FP32"
                elif len({layers[p.name].output_unsigned for p in producers}) > 1:
                    why = "its residual mixes u8 and s8 data: Intel makes it FP32"
                elif layers[producers[0].name].output_unsigned and unit.relu_slope is None:
                    why = ("its residual is u8 and no ReLU follows the sum: Intel would write "
                           "u8 and clip every negative sum to 0")
                if why is not None:
                    found[unit.name], changed = why, True
            for producer in producers:
                if fp32(producer.name):
                    continue
                if not layers[producer.name].output_int8:
                    found[producer.name] = (
                        f"its FP32 output is the residual of '{unit.name}': Intel's fused sum "
                        "reads an INT8 conv's FP32 output as garbage")
                    changed = True
                elif fp32(unit.name):
                    found[producer.name] = (
                        f"its output is the residual of '{unit.name}', which runs FP32: Intel "
                        "Caffe aborts on an FP32 conv + sum with an INT8 residual")
                    changed = True
    return found


def _residual_data_types(fused: FusedGraph, layers: dict, options: QuantOptions,
                         excluded: dict) -> None:
    """A fused sum writes its residual's data type (``mkldnn_convolution_layer.cpp``
    :287-310, whatever ``bw_layer_out`` says): with an s8 residual the output is s8 even
    after a ReLU, so it is scaled by 127/T (Intel's own calibrator keeps 255/T and so clips at
    T/2), and an FP32 output (``bw_layer_out: 32``, scale 1.0, which force_fp32_opt gives a
    sum read by a standalone BatchNorm, as in pre-activation ResNets) would be that type at
    scale 1.0, integers clipped at 127: such a unit keeps an INT8 output."""
    for unit in fused.units:
        lq = layers.get(unit.name)
        if lq is None or unit.residual is None or unit.name in excluded:
            continue
        producers, _ = fused.upstream_units(unit.residual)
        unsigned = layers[producers[0].name].output_unsigned
        if not lq.output_int8:
            lq.output_int8 = True
            lq.output_unsigned = not unsigned  # recomputed just below
            lq.notes.append("INT8 output after all: an FP32 output of a conv with a fused sum "
                            "is its residual's INT8 type at scale 1.0 in Intel's kernel")
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
        if unit is first:
            unsigned = False  # Intel: the first conv takes s8 input (-fu changes it later)
        fix = choice.saturation_fix
        if fix is not None and fix not in SATURATION_FIXES:
            raise ValueError(f"unknown saturation counter-measure '{fix}'")
        weight_factor = choice.weight_scale_factor * WEIGHT_FACTORS.get(fix, 1.0)
        if fix == "s8":
            unsigned = False
        t_in = choice.input_threshold
        if t_in is None:
            t_in = estimators.threshold(stats[unit.input.key], estimator, options.bits)
        t_out = choice.output_threshold
        if t_out is None and _measured(stats[unit.output.key], estimator):
            t_out = estimators.threshold(stats[unit.output.key], estimator, options.bits)
        lq = LayerQuant(
            name=unit.name,
            scale_in=activation_scale(t_in, unsigned, options.bits),
            scale_out=(1.0 if t_out is None else activation_scale(
                t_out, unit.output_unsigned or options.unsigned_range, options.bits)),
            scale_params=(all_as_stored(np.asarray(choice.weight_scales, np.float64)
                                        * WEIGHT_FACTORS.get(fix, 1.0), 0.0)
                          if choice.weight_scales is not None
                          else _unit_weight_scales(fused, unit, per_channel, options.bits,
                                                   weight_factor)),
            input_unsigned=unsigned, output_unsigned=unit.output_unsigned,
            output_int8=True, bits=options.bits,
            estimator=estimator, per_channel=per_channel, input_threshold=t_in,
            output_threshold=t_out, saturation_fix=fix,
            bias_shift=list(choice.bias_shift) if choice.bias_shift is not None else None)
        if fix is not None:
            lq.notes.append(f"saturation counter-measure: {fix} ({SATURATION_FIXES[fix]})")
        layers[unit.name] = lq
    return layers


def _unit_weight_scales(fused: FusedGraph, unit: FusedUnit, per_channel: bool, bits: int,
                        factor: float) -> list[float]:
    """:func:`weight_scales` of the unit's folded weights, computed once per fused graph and
    setting while the weights stay the same (the search builds many plans)."""
    return list(while_unchanged(
        fused.weight_scales, (unit.name, per_channel, bits, factor), unit,
        lambda: weight_scales(folded_once(fused, unit)[0], per_channel, bits, factor)))


def _decide_output_precision(fused: FusedGraph, layers: dict[str, LayerQuant],
                             options: QuantOptions) -> None:
    """-t / -f for the units feeding a Concat (Intel's ``transform_convolutions``), then
    Intel's ``force_fp32_opt`` (:mod:`calibrator.quant.compiled`; not with -uff), then our
    own guard against Intel's standalone INT8 Eltwise (:func:`_standalone_eltwise_inputs`).

    Intel's rule keeps an INT8 output for a conv read by a Concat, a Pooling or a ReLU even
    when no INT8 layer follows: an FP32 conv output in ``nhwc`` feeding a Concat is what
    MKL-DNN's in-place Concat corrupts at batch 1 (``mkldnn_concat_layer.cpp`` :252-277)."""
    if options.concat_fp32 or options.unify_concat:
        _concat_rules(fused, layers, options)
    if options.force_fp32_rule:
        int8_out = {name for name, lq in layers.items() if lq.output_int8}
        for name, why in force_fp32_outputs(compiled_layers(fused), int8_out,
                                            options.quantize_fc).items():
            _to_fp32(layers[name], why)
    for name, why in _standalone_eltwise_inputs(fused, layers).items():
        _to_fp32(layers[name], why)


def _standalone_eltwise_inputs(fused: FusedGraph, layers: dict) -> dict[str, str]:
    """Units whose INT8 outputs would all reach an Eltwise no conv absorbed, in one data
    type: Intel's standalone Eltwise reorders each input to scale 1.0 (integer real values)
    and adds those (``mkldnn_eltwise_layer.cpp`` :122-237). An FP32 input makes it add in
    FP32, so these units write FP32."""
    found = {}
    for node in fused.net.nodes:
        if node.type != "Eltwise" or node.index in fused.unit_of_node:
            continue
        producers, unsigned, others = [], set(), False
        for i in range(len(node.bottoms)):
            units, rest = fused.upstream_units(fused.input_of(node, i))
            others = others or bool(rest) or not units
            for unit in units:
                lq = layers.get(unit.name)
                if lq is None or not lq.output_int8:
                    others = True
                else:
                    producers.append(unit.name)
                    unsigned.add(lq.output_unsigned)
        if producers and not others and len(unsigned) == 1:
            for name in producers:
                found[name] = (f"feeds the Eltwise '{node.name}' no conv absorbs: Intel adds "
                               "INT8 inputs there at scale 1.0")
    return found


def _concat_rules(fused: FusedGraph, layers: dict[str, LayerQuant],
                  options: QuantOptions) -> None:
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
    """--unify-concat-consumer: convs reading the Concat directly take its unified scale as
    scale_in."""
    for unit in fused.units:
        lq = layers.get(unit.name)
        if lq is not None and unit.input.producer == concat.index:
            lq.scale_in = scale
            lq.notes.append(f"scale_in = unified scale of Concat '{concat.name}' (--unify-concat-consumer)")


def _to_fp32(lq: LayerQuant, why: str) -> None:
    if lq.output_int8:
        lq.output_int8 = False
        lq.scale_out = 1.0
        lq.notes.append(f"FP32 output: {why}")


def _average_pooling_rule(fused: FusedGraph, layers: dict[str, LayerQuant],
                          options: QuantOptions, excluded: dict) -> None:
    """Intel's ``cac_opt`` (:func:`calibrator.quant.compiled.average_pooling_pairs`): across
    an AVE pooling, the quantized layer below takes the scale of the one above as its
    scale_in, so the pooled INT8 values need no requantization."""
    int8_in = {name for name in layers if name not in excluded}
    int8_out = {name for name in int8_in if layers[name].output_int8}
    pairs = average_pooling_pairs(compiled_layers(fused), int8_in, int8_out,
                                  options.quantize_fc)
    for up, down, through_concat, pool in pairs:
        lq = layers[down]
        if through_concat:
            lq.scale_in = layers[up].scale_in
            lq.notes.append(f"scale_in = scale_in of '{up}' (AVE pooling '{pool}' after the "
                            "Concat it reads)")
        else:
            lq.scale_in = layers[up].scale_out
            lq.notes.append(f"scale_in = scale_out of '{up}' (AVE pooling '{pool}' between)")


def with_choice(choices: dict[str, UnitChoice], name: str, **changes) -> dict[str, UnitChoice]:
    """A copy of ``choices`` with one unit's choice changed."""
    out = dict(choices)
    out[name] = replace(out.get(name, UnitChoice()), **changes)
    return out
