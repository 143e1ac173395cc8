"""The three calibration outputs."""

from __future__ import annotations

import json
import math
import os
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


#: Path fields of data and evaluation layers that Caffe resolves relative to where it runs.
PATH_FIELDS = (("image_data_param", "source"), ("image_data_param", "root_folder"),
               ("data_param", "source"), ("transform_param", "mean_file"),
               ("annotated_data_param", "label_map_file"),
               ("detection_evaluate_param", "name_size_file"))


def rebase_paths(net_param, source_dir: Path, target_dir: Path) -> None:
    """Rewrite relative data paths that resolve beside the source prototxt so that they
    resolve beside the written one (an --output in another folder keeps working)."""
    if source_dir.resolve() == target_dir.resolve():
        return
    for layer in net_param.layer:
        for message_name, field in PATH_FIELDS:
            if message_name not in layer.DESCRIPTOR.fields_by_name \
                    or not layer.HasField(message_name):
                continue
            message = getattr(layer, message_name)
            value = getattr(message, field, "")
            if not value or Path(value).is_absolute():
                continue
            original = source_dir / value
            if not original.exists():
                continue
            rebased = os.path.relpath(original.resolve(), target_dir.resolve())
            if value.endswith("/") and not rebased.endswith("/"):
                rebased += "/"
            setattr(message, field, rebased)


def write_quantized_prototxt(path: str | Path, net_param, plan: QuantPlan,
                             source_dir: Path | None = None) -> Path:
    """The whole net in protobuf's canonical text format with quantization_param."""
    net = annotate(net_param, plan)
    if source_dir is not None:
        rebase_paths(net, Path(source_dir), Path(path).parent)
    return atomic_write(path, net_to_text(net))


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
                "saturation_fix": lq.saturation_fix, "notes": lq.notes})
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
