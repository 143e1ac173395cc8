"""The per-layer table and the loop trace, as tabulate renders them."""

from __future__ import annotations

import math

from tabulate import tabulate

LAYER_HEADERS = ["layer", "type", "precision", "in", "out", "scale_in", "scale_out",
                 "weight scales", "estimator", "saturation fix", "sensitivity",
                 "cosine before", "cosine after", "bias shift", "action"]
TRACE_HEADERS = ["step", "action", "metric", "loss", "evals", "batches", "seconds",
                 "FP32 layers"]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _opt(value, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, fmt)


def layer_rows(fused, plan, sensitivity: dict, actions: dict,
               layerwise: dict | None = None) -> list[list]:
    """One row per fused unit; ``layerwise``: unit -> LayerReport of EasyQuant (cosine of the
    unit's INT8 output with FP32 before and after) and bias correction (largest shift,
    relative to the largest bias)."""
    rows = []
    layerwise = layerwise or {}
    for unit in fused.units:
        lq = plan.layers.get(unit.name)
        sens = sensitivity.get(unit.name)
        sens_text = f"{sens:.3g}" if sens is not None else ""
        report = layerwise.get(unit.name)
        extra = ([_opt(report.cosine_before, ".5f"), _opt(report.cosine_after, ".5f"),
                  _opt(report.bias_shift or None, ".3g")] if report is not None
                 else ["", "", ""])
        if lq is None or unit.name in plan.excluded:
            rows.append([unit.name, unit.layer.type, "fp32", "fp32", "fp32", "", "", "", "",
                         "", sens_text, *extra, actions.get(unit.name, "")])
            continue
        nonzero = [s for s in lq.scale_params if s > 0]
        weights = (f"{_fmt(min(nonzero))}..{_fmt(max(nonzero))}" if nonzero else "0")
        output = ("u8" if lq.output_unsigned else "s8") if lq.output_int8 else "fp32"
        rows.append([unit.name, unit.layer.type, f"int{lq.bits}",
                     "u8" if lq.input_unsigned else "s8", output, _fmt(lq.scale_in),
                     _fmt(lq.scale_out), weights, lq.estimator + (" /ch" if lq.per_channel
                                                                  else ""),
                     lq.saturation_fix or "", sens_text, *extra, actions.get(unit.name, "")])
    return rows


def layer_table(fused, plan, sensitivity: dict | None = None, actions: dict | None = None,
                layerwise: dict | None = None, fmt: str = "simple") -> str:
    rows = layer_rows(fused, plan, sensitivity or {}, actions or {}, layerwise)
    headers = list(LAYER_HEADERS)
    if not layerwise:   # no EasyQuant / bias correction ran: drop their empty columns
        drop = [headers.index(h) for h in ("cosine before", "cosine after", "bias shift")]
        headers = [h for i, h in enumerate(headers) if i not in drop]
        rows = [[c for i, c in enumerate(row) if i not in drop] for row in rows]
    return tabulate(rows, headers=headers, tablefmt=fmt)


def trace_rows(trace) -> list[list]:
    return [[s.step, s.action, f"{s.metric:.6g}" + (" (bound)" if s.partial else ""),
             f"{s.loss:+.4f}", s.evaluations,
             f"{s.batches} (stopped)" if s.partial else (s.batches or ""),
             f"{s.seconds:.1f}", s.fp32_layers] for s in trace]


def trace_table(trace, fmt: str = "simple") -> str:
    return tabulate(trace_rows(trace), headers=TRACE_HEADERS, tablefmt=fmt)
