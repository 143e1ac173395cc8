"""``--report DIR``: report.md, report.json and PNG plots (sensitivity per layer,
activation histograms with the chosen thresholds for the worst layers, metric against the
number of FP32 layers)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from calibrator.fileio import atomic_write
from calibrator.report.tables import layer_table, trace_table

WORST_HISTOGRAMS = 4
#: every file --report DIR may write
REPORT_FILES = frozenset({"report.md", "report.json", "sensitivity.png", "histograms.png",
                          "cosine.png", "metric_vs_fp32_layers.png"})


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


def _plots(folder: Path, fused, plan, stats, result, cosines: dict) -> list[str]:
    import matplotlib  # heavy, and only for --report: imported when plots are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if result.sensitivity:
        names = list(result.sensitivity)
        fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.18), 4))
        ax.bar(range(len(names)), [result.sensitivity[n] for n in names],
               color=["tab:red" if n in result.reverted else "tab:blue" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel("output divergence, this layer alone INT8")
        ax.set_title("Sensitivity per layer (red: kept FP32)")
        fig.tight_layout()
        atomic_write(folder / "sensitivity.png", _png(fig))
        plt.close(fig)
        written.append("sensitivity.png")
    worst = sorted(result.sensitivity, key=lambda n: -result.sensitivity[n])[:WORST_HISTOGRAMS]
    if worst and stats:
        fig, axes = plt.subplots(len(worst), 1, figsize=(7, 2.2 * len(worst)))
        axes = np.atleast_1d(axes)
        for ax, name in zip(axes, worst):
            unit = fused.by_name[name]
            st = stats.get(unit.input.key)
            if st is None or st.hist is None or st.absmax <= 0:
                continue
            edges = np.linspace(0, st.absmax, len(st.hist) + 1)
            ax.stairs(np.maximum(st.hist, 0.5), edges)
            ax.set_yscale("log")
            lq = plan.layers.get(name)
            if lq is not None:
                ax.axvline(lq.input_threshold, color="tab:red",
                           label=f"threshold {lq.input_threshold:.3g} ({lq.estimator})")
                ax.legend(fontsize=7)
            ax.set_title(f"{name}: |input| histogram", fontsize=8)
        fig.tight_layout()
        atomic_write(folder / "histograms.png", _png(fig))
        plt.close(fig)
        written.append("histograms.png")
    if cosines:
        names = [u.name for u in fused.units if u.name in cosines]
        fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.18), 4))
        ax.plot(range(len(names)), [cosines[n] for n in names], "o-", markersize=3)
        for i, name in enumerate(names):
            if name not in plan.layers or name in plan.excluded:
                ax.plot(i, cosines[name], "o", color="tab:red", markersize=4)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_ylabel("cosine of the INT8 output with FP32")
        ax.set_title("Per-layer cosine of the final plan (red: FP32 layers)")
        fig.tight_layout()
        atomic_write(folder / "cosine.png", _png(fig))
        plt.close(fig)
        written.append("cosine.png")
    points = [(s.fp32_layers, s.metric) for s in result.trace if s.step > 0]
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, "o")
        ax.axhline(result.fp32_metric, color="gray", linestyle="--", label="FP32")
        ax.set_xlabel("FP32 layers")
        ax.set_ylabel("metric")
        ax.legend()
        fig.tight_layout()
        atomic_write(folder / "metric_vs_fp32_layers.png", _png(fig))
        plt.close(fig)
        written.append("metric_vs_fp32_layers.png")
    return written


def write_report(folder: str | Path, *, fused, plan, stats, result, summary: dict,
                 actions: dict, cosines: dict | None = None) -> list[str]:
    """``cosines``: unit -> cosine of its output in the final plan with FP32 (plotted)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = _plots(folder, fused, plan, stats, result, cosines or {})
    lines = ["# Calibration report", ""]
    lines += [f"- {key}: {value}" for key, value in summary.items()]
    lines += ["", "## Layers", "", layer_table(fused, plan, result.sensitivity, actions,
                                                result.layerwise, fmt="github"), ""]
    if result.trace:        # -q has none
        lines += ["## Search trace", "", trace_table(result.trace, fmt="github"), ""]
    lines += [f"![{p}]({p})" for p in plots]
    atomic_write(folder / "report.md", "\n".join(lines) + "\n")
    record = {"summary": summary,
              "trace": [s.__dict__ for s in result.trace],
              "sensitivity": result.sensitivity,
              "adjustments": [{"layer": a.layer, "action": a.action, "before": a.before,
                               "after": a.after} for a in result.adjustments],
              "fp32_layers": result.reverted,
              "cosine": cosines or {},
              "layerwise": {name: vars(r) for name, r in result.layerwise.items()}}
    atomic_write(folder / "report.json", json.dumps(record, indent=2) + "\n")
    return ["report.md", "report.json"] + plots
