"""``--history FILE.jsonl``: one JSON line per gate run, and ``--plot FILE.png``: the trend
of every model x INT8 prototxt x metric over those runs (matplotlib, Agg backend).

A line holds the run's timestamp, its verdict and per case the deterministic fields (FP32
and INT8 values, loss, threshold, verdict): no durations or host names, so two runs on the
same inputs differ only in the timestamp."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from calibrator.errors import CalibratorError
from calibrator.fileio import atomic_write, exists, read_bytes


def append_history(path: str | os.PathLike, record: dict) -> Path:
    """Append ``record`` as one line (the file is created if missing). The line is written
    with a single ``write`` on a file opened for appending, so concurrent runs do not
    interleave within a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    prefix = ""
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # an interrupted earlier write: start a fresh line
                prefix = "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(prefix + line)
    return path


def read_history(path: str | os.PathLike) -> list[dict]:
    """Every run recorded in ``path`` (oldest first). A line that is not JSON is an error
    naming it, except a torn last line (an interrupted write), which is skipped."""
    path = Path(path)
    if not exists(path):
        return []
    try:
        lines = read_bytes(path, "history").decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise CalibratorError(f"{path}: cannot read the history ({exc})") from None
    runs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if number == len(lines):
                continue
            raise CalibratorError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(record, dict) or not isinstance(record.get("results"), list):
            raise CalibratorError(f"{path}:{number}: not a gate history record")
        runs.append(record)
    return runs


def series(runs: list[dict]) -> dict[str, dict[str, list]]:
    """``"model/int8: metric"`` -> {"run": [run numbers, 1-based], "timestamp": [...],
    "int8": [...], "fp32": [...], "threshold_value": [...], "passed": [...]}; a case absent
    from a run simply has no point there. ``threshold_value`` is the lowest INT8 value the
    threshold allowed (for metrics where higher is better)."""
    out: dict[str, dict[str, list]] = {}
    for number, run in enumerate(runs, 1):
        for case in run["results"]:
            try:
                label = f"{case['model']}/{case['candidate']}: {case['metric']}"
                fp32, int8 = float(case["fp32"]), float(case["int8"])
                threshold = float(case.get("threshold", 0.0))
            except (KeyError, TypeError, ValueError):
                raise CalibratorError(f"history run {number}: a result lacks "
                                      "model/candidate/metric/fp32/int8") from None
            floor = fp32 - (threshold * abs(fp32) if case.get("relative") else threshold)
            entry = out.setdefault(label, {"run": [], "timestamp": [], "int8": [], "fp32": [],
                                           "threshold_value": [], "passed": []})
            entry["run"].append(number)
            entry["timestamp"].append(run.get("timestamp", ""))
            entry["int8"].append(int8)
            entry["fp32"].append(fp32)
            entry["threshold_value"].append(floor)
            entry["passed"].append(bool(case.get("passed", True)))
    return out


def plot_history(runs: list[dict], path: str | os.PathLike) -> dict[str, dict[str, list]]:
    """Draw the trend PNG; returns the plotted series (see :func:`series`)."""
    import matplotlib  # heavy, and only for --plot: imported when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(runs) + 4) + 4.0, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for index, (label, s) in enumerate(sorted(data.items())):
        color = colors[index % len(colors)]
        ax.plot(s["run"], s["int8"], marker="o", color=color, label=f"{label} INT8")
        ax.plot(s["run"], s["fp32"], linestyle="--", color=color, alpha=0.6,
                label=f"{label} FP32")
        failed = [(r, v) for r, v, ok in zip(s["run"], s["int8"], s["passed"]) if not ok]
        if failed:
            ax.scatter(*zip(*failed), marker="x", s=80, color="tab:red", zorder=3)
    ax.set_xlabel("gate run")
    ax.set_ylabel("metric value")
    ax.set_title(f"calibrator gate history ({len(runs)} runs; red x: failed)")
    if runs:
        ticks = list(range(1, len(runs) + 1))
        step = max(1, len(ticks) // 12)
        ax.set_xticks(ticks[::step], [f"{t}\n{str(runs[t - 1].get('timestamp', ''))[:10]}"
                                      for t in ticks[::step]], fontsize=7)
    if data:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return data
