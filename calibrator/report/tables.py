"""The per-layer table and the loop trace, as tabulate renders them."""

from __future__ import annotations

from tabulate import tabulate

LAYER_HEADERS = ["layer", "type", "precision", "in", "out", "scale_in", "scale_out",
                 "weight scales", "estimator", "saturation fix", "sensitivity", "action"]
TRACE_HEADERS = ["step", "action", "metric", "loss", "evals", "seconds", "FP32 layers"]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def layer_rows(fused, plan, sensitivity: dict, actions: dict) -> list[list]:
    rows = []
    for unit in fused.units:
        lq = plan.layers.get(unit.name)
        sens = sensitivity.get(unit.name)
        sens_text = f"{sens:.3g}" if sens is not None else ""
        if lq is None:
            rows.append([unit.name, unit.layer.type, "fp32", "fp32", "fp32", "", "", "", "",
                         "", sens_text, actions.get(unit.name, "")])
            continue
        nonzero = [s for s in lq.scale_params if s > 0]
        weights = (f"{_fmt(min(nonzero))}..{_fmt(max(nonzero))}" if nonzero else "0")
        output = ("u8" if lq.output_unsigned else "s8") if lq.output_int8 else "fp32"
        rows.append([unit.name, unit.layer.type, f"int{lq.bits}",
                     "u8" if lq.input_unsigned else "s8", output, _fmt(lq.scale_in),
                     _fmt(lq.scale_out), weights, lq.estimator + (" /ch" if lq.per_channel
                                                                  else ""),
                     lq.saturation_fix or "", sens_text, actions.get(unit.name, "")])
    return rows


def layer_table(fused, plan, sensitivity: dict | None = None, actions: dict | None = None,
                fmt: str = "simple") -> str:
    return tabulate(layer_rows(fused, plan, sensitivity or {}, actions or {}),
                    headers=LAYER_HEADERS, tablefmt=fmt)


def trace_rows(trace) -> list[list]:
    return [[s.step, s.action, f"{s.metric:.6g}", f"{s.loss:+.4f}", s.evaluations,
             f"{s.seconds:.1f}", s.fp32_layers] for s in trace]


def trace_table(trace, fmt: str = "simple") -> str:
    return tabulate(trace_rows(trace), headers=TRACE_HEADERS, tablefmt=fmt)
