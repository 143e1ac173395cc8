"""The three calibration outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from calibrator.caffe.prototxt import net_to_text
from calibrator.fileio import atomic_write
from calibrator.quant.params import annotate
from calibrator.quant.scales import QuantPlan


def quantized_prototxt_path(model: str | Path, suffix: str = "_quantized") -> Path:
    """``<model>_quantized.prototxt`` beside the model: only the file's last extension is
    replaced, so dots in folder names (or in the file name) are kept."""
    model = Path(model)
    stem = model.name[:-len(model.suffix)] if model.suffix else model.name
    return model.with_name(f"{stem}{suffix}.prototxt")


def write_quantized_prototxt(path: str | Path, net_param, plan: QuantPlan) -> Path:
    """The whole net in protobuf's canonical text format with quantization_param."""
    return atomic_write(path, net_to_text(annotate(net_param, plan)))


def _number(value: float) -> str:
    return f"{value:.9g}"


def write_table(path: str | Path, plan: QuantPlan, fused) -> Path:
    """ncnn / caffe-int8-convert-tools calibration table: weight lines
    ``<layer>_param_0 s0 s1 ...`` (one scale per output channel), then blob lines
    ``<layer> s_in`` keyed by the consuming layer. ncnn runs signed INT8, so the blob scale
    is 127/T of the layer's input threshold."""
    order = [u.name for u in fused.units if u.name in plan.layers]
    lines = []
    for name in order:
        lq = plan.layers[name]
        lines.append(f"{name}_param_0 " + " ".join(_number(s) for s in lq.scale_params))
    for name in order:
        lq = plan.layers[name]
        limit = 2 ** (lq.bits - 1) - 1
        scale = limit / lq.input_threshold if lq.input_threshold > 0 else 1.0
        if lq.force_u8_input:
            scale = 1.0
        lines.append(f"{name} {_number(scale)}")
    return atomic_write(path, "\n".join(lines) + "\n")


def _clean(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def plan_record(plan: QuantPlan, fused, stats: dict | None) -> dict:
    layers = []
    for unit in fused.units:
        entry = {"name": unit.name, "type": unit.layer.type,
                 "fused": [n.name for n in unit.nodes[1:]]}
        lq = plan.layers.get(unit.name)
        if lq is None:
            entry["precision"] = "fp32"
        else:
            entry.update({
                "precision": f"int{lq.bits}",
                "input": "u8" if lq.input_unsigned else "s8",
                "output": ("u8" if lq.output_unsigned else "s8") if lq.output_int8 else "fp32",
                "scale_in": lq.scale_in, "scale_out": lq.scale_out,
                "scale_params": lq.scale_params, "estimator": lq.estimator,
                "per_channel": lq.per_channel, "input_threshold": lq.input_threshold,
                "output_threshold": lq.output_threshold, "force_u8_input": lq.force_u8_input,
                "notes": lq.notes})
        if stats is not None:
            for side, ref in (("input_stats", unit.input), ("output_stats", unit.output)):
                if ref is not None and ref.key in stats:
                    entry[side] = stats[ref.key].to_json()
        layers.append(entry)
    options = plan.options
    return {"options": {k: getattr(options, k) for k in options.__dataclass_fields__},
            "layers": layers}


def write_json(path: str | Path, record: dict) -> Path:
    return atomic_write(path, json.dumps(_clean(record), indent=2, sort_keys=False) + "\n")
