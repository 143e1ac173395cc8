"""The whole-run section of ``make bench``: ``calibrator -q`` and ``calibrator -l 0.01`` on the
shared MobileNetV2 (500 dev images), each in its own process (wall time, peak memory),
against our FP32 pass over the same images and, when NNCF is installed, NNCF's ``quantize``
and ``quantize_with_accuracy_control`` on the same FP32 ONNX export and images
(``calibrator.bench.nncf_peer``), side by side in one run, as ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calibrator.bench import REPO, Context, SectionResult, Table, section
from calibrator.bench.fp32 import BATCHES, IMAGES, _files
from calibrator.export.qdq import export_onnx
from calibrator.model import load_model
from calibrator.quant.fusion import analyze
from calibrator.quant.simulate import FoldedFP32

#: runs the CLI as the ``calibrator`` script does (its imports through the entry point and
#: its process exit included) and records its own peak resident memory (MB) as the process
#: ends (``calibrator.bench``, which imports torch, only then: before the entry point, its
#: import would run without the entry point's paused garbage collector)
_CHILD = ("import atexit, json, pathlib, sys; from calibrator.cli.entry import entry; "
          "out = pathlib.Path(sys.argv[1]); atexit.register(lambda: out.write_text(json.dumps("
          "{'peak_rss_mb': __import__('calibrator.bench').bench.peak_rss_mb()}))); "
          "sys.argv = ['calibrator', *sys.argv[2:]]; raise SystemExit(entry())")


def _env(ctx: Context) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    if ctx.threads:
        env["OMP_NUM_THREADS"] = str(ctx.threads)
    return env


def _ours(ctx: Context, files, out: Path, *extra: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    argv = ["-m", str(files["test"]), "-w", str(files["weights"]), "-i", str(BATCHES),
            "-s", str(BATCHES), "--quiet", "--output", str(out / "q.prototxt"),
            "--json", str(out / "q.json"), *extra]
    if ctx.gpu is not None:
        argv += ["--gpu", str(ctx.gpu)]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(out / "rss.json"), *argv],
                          env=_env(ctx), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(f"calibrator {' '.join(extra)} failed: {done.stderr[-500:]}")
    record = json.loads((out / "q.json").read_text())
    return {"wall_seconds": wall, "code": done.returncode,
            **json.loads((out / "rss.json").read_text()), "search": record.get("search")}


def _fp32_pass(ctx: Context, model) -> float:
    """Seconds of our FP32 forward over the 500 images (the best of --repeat passes, after a
    first batch that warms the kernels up)."""
    folded = FoldedFP32(analyze(model.net)).overrides
    feeds = [{k: v.to(ctx.device) for k, v in model.source.batch(i).items()}
             for i in range(BATCHES)]
    best = float("inf")
    with torch.no_grad():
        model.net(feeds[0], outputs=["fc7"], overrides=folded)
        for _ in range(ctx.repeat):
            started = time.perf_counter()
            for batch in feeds:
                model.net(batch, outputs=["fc7"], overrides=folded)
            ctx.sync()
            best = min(best, time.perf_counter() - started)
    return best


def _save_batches(model, batches: range, path: Path) -> None:
    feeds = [model.source.batch(i) for i in batches]     # each batch read once
    images = np.stack([feed["data"].numpy() for feed in feeds])
    labels = np.stack([feed["label"].numpy().reshape(-1).astype(np.int64) for feed in feeds])
    np.savez(path, images=images.astype(np.float32), labels=labels)


def run_nncf(ctx: Context, model, tmp: Path, calibration: range = range(BATCHES),
             judge: range | None = None) -> dict | None:
    """NNCF on our FP32 ONNX export (``calibrator.bench.nncf_peer``, a process of its own),
    calibrated on ``calibration``'s batches of ``model``'s source; with ``judge``, only
    ``quantize``, judged on those batches. None where NNCF is not installed."""
    try:
        import nncf  # noqa: F401  (optional peer: the section skips it when absent)
    except ImportError:
        return None
    fused = analyze(model.net)
    export_onnx(model, fused, None, tmp / "fp32.onnx")
    _save_batches(model, calibration, tmp / "data.npz")
    argv = [sys.executable, "-m", "calibrator.bench.nncf_peer", str(tmp / "fp32.onnx"),
            str(tmp / "data.npz"), str(tmp / "nncf.json")]
    if judge is not None:
        _save_batches(model, judge, tmp / "judge.npz")
        argv += ["--judge", str(tmp / "judge.npz")]
    if ctx.threads:
        argv += ["--threads", str(ctx.threads)]
    done = subprocess.run(argv, env=_env(ctx), capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads((tmp / "nncf.json").read_text())


@section("peers", "Whole runs, shared MobileNetV2, 500 images: -q and -l 0.01 vs FP32 "
                  "and NNCF")
def peers(ctx: Context) -> SectionResult:
    """``--repeat`` rounds, each running our FP32 pass, our -q, our -l 0.01 and NNCF one
    after the other (a slow spell of the machine falls on every contender of a round); each
    figure as the min and the median over the rounds, each ratio from the medians."""
    files = _files(ctx)
    model = load_model(files["test"], files["weights"], device=ctx.device)
    model.source.prefetch(BATCHES)
    runs: dict[str, list] = {"fp32": [], "quantize": [], "search": [], "nncf": []}
    with tempfile.TemporaryDirectory(prefix="calibrator-bench-") as tmp:
        tmp = Path(tmp)
        for turn in range(ctx.repeat):
            ctx.log(f"round {turn + 1}/{ctx.repeat}: our FP32 pass over the 500 images, "
                    "calibrator -q, calibrator -l 0.01 (each a process of its own), NNCF "
                    "when installed")
            runs["fp32"].append({"seconds": _fp32_pass(ctx, model)})
            runs["quantize"].append(_ours(ctx, files, tmp / f"q{turn}", "-q"))
            runs["search"].append(_ours(ctx, files, tmp / f"l{turn}", "-l", "0.01", "-n",
                                        "accuracy-top1"))
            (tmp / f"n{turn}").mkdir()
            runs["nncf"].append(run_nncf(ctx, model, tmp / f"n{turn}"))
    quantize, search = runs["quantize"], runs["search"]
    summary = search[0]["search"]
    q_s, l_s = _spread(quantize, "wall_seconds"), _spread(search, "wall_seconds")
    fp32 = _spread(runs["fp32"], "seconds")
    fp32_s = fp32[1]
    evaluations = sorted({run["search"]["full_evaluations"] for run in search})
    rows = [["our FP32 pass, 500 images (s)", _shown(fp32, "{:.2f}"), ""],
            ["calibrator -q (s)", _shown(q_s, "{:.1f}"),
             f"{q_s[1] / fp32_s:.2f} FP32 passes"],
            ["calibrator -q peak memory (MB)",
             _shown(_spread(quantize, "peak_rss_mb"), "{:.0f}"), ""],
            ["calibrator -l 0.01 (s)", _shown(l_s, "{:.1f}"),
             f"{'/'.join(map(str, evaluations))} full evaluations"],
            ["calibrator -l 0.01 top-1 FP32 -> INT8",
             f"{summary['fp32']:.3f} -> {summary['int8']:.3f}",
             f"{len(summary['fp32_layers'])} FP32 layers"],
            ["calibrator -l 0.01 peak memory (MB)",
             _shown(_spread(search, "peak_rss_mb"), "{:.0f}"), ""]]
    data = {"images": IMAGES, "rounds": ctx.repeat, "fp32_pass_seconds": fp32_s,
            "fp32_pass_runs": [run["seconds"] for run in runs["fp32"]],
            "quantize": quantize, "search": search,
            "quantize_over_fp32_passes": q_s[1] / fp32_s}
    notes = [f"min / median of {ctx.repeat} rounds; ratios from the medians"]
    nncf = runs["nncf"]
    if nncf[0] is None:
        notes.append("NNCF is not installed (pip install nncf): no peer figures")
    elif any("error" in run for run in nncf):
        notes.append(f"NNCF failed: {next(r['error'] for r in nncf if 'error' in r)}")
        data["nncf"] = nncf
    else:
        data["nncf"] = nncf
        n_q, n_ac = _spread(nncf, "quantize_seconds"), _spread(nncf, "accuracy_control_seconds")
        data["search_over_nncf_accuracy_control"] = l_s[1] / n_ac[1]
        data["quantize_over_nncf_quantize"] = q_s[1] / n_q[1]
        rows += [[f"NNCF {nncf[0]['nncf']} quantize (s)", _shown(n_q, "{:.1f}"),
                  f"ours -q: {data['quantize_over_nncf_quantize']:.2f}x its time"],
                 ["NNCF quantize top-1 FP32 -> INT8",
                  f"{nncf[0]['fp32_top1']:.3f} -> {nncf[0]['quantize_top1']:.3f}", ""],
                 ["NNCF quantize_with_accuracy_control (s)", _shown(n_ac, "{:.1f}"),
                  f"ours -l 0.01: {data['search_over_nncf_accuracy_control']:.2f}x its time"],
                 ["NNCF accuracy control top-1",
                  f"{nncf[0]['accuracy_control_top1']:.3f}", ""],
                 ["NNCF peak memory (MB)", _shown(_spread(nncf, "peak_rss_mb"), "{:.0f}"),
                  ""]]
    return SectionResult([Table(["figure", "value (min / median)", "ratio"], rows)], data,
                         notes)


def _spread(runs: list[dict], key: str) -> tuple[float, float]:
    """(min, median) of ``key`` over the runs."""
    values = [run[key] for run in runs]
    return min(values), float(np.median(values))


def _shown(spread: tuple[float, float], form: str) -> str:
    return " / ".join(form.format(v) for v in spread)
