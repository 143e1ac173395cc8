"""``json``: every scale, estimator, threshold and tensor statistic, and the search summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

from calibrator.fileio import atomic_write
from calibrator.writers.base import OutputContext, Writer


def _clean(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def plan_record(plan, fused, stats: dict | None) -> dict:
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


class JsonWriter(Writer):
    name = "json"
    option = "--json"
    help = "also write every scale, threshold and statistic, and the search summary"

    def write(self, path: Path, context: OutputContext) -> Path:
        record = plan_record(context.plan, context.fused, context.stats)
        record.update(context.record)
        return write_json(path, record)
