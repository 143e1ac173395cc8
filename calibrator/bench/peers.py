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

#: runs the CLI as the ``calibrator`` script does (its process exit included) and records
#: its own peak resident memory (MB) as the process ends
_CHILD = ("import atexit, json, pathlib, sys; from calibrator.bench import peak_rss_mb; "
          "from calibrator.cli.entry import entry; out = pathlib.Path(sys.argv[1]); "
          "atexit.register(lambda: out.write_text(json.dumps({'peak_rss_mb': peak_rss_mb()}))); "
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
    """Seconds of our FP32 forward over the 500 images (the best of --repeat passes)."""
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
    files = _files(ctx)
    model = load_model(files["test"], files["weights"], device=ctx.device)
    model.source.prefetch(BATCHES)
    ctx.log("our FP32 pass over the 500 images")
    fp32_s = _fp32_pass(ctx, model)
    with tempfile.TemporaryDirectory(prefix="calibrator-bench-") as tmp:
        tmp = Path(tmp)
        ctx.log("calibrator -q (a process of its own)")
        quantize = _ours(ctx, files, tmp / "q", "-q")
        ctx.log("calibrator -l 0.01 (a process of its own)")
        search = _ours(ctx, files, tmp / "l", "-l", "0.01", "-n", "accuracy-top1")
        ctx.log("NNCF quantize and quantize_with_accuracy_control, when installed")
        nncf = run_nncf(ctx, model, tmp)
    summary = search["search"]
    rows = [["our FP32 pass, 500 images (s)", f"{fp32_s:.1f}", ""],
            ["calibrator -q (s)", f"{quantize['wall_seconds']:.1f}",
             f"{quantize['wall_seconds'] / fp32_s:.2f} FP32 passes"],
            ["calibrator -q peak memory (MB)", f"{quantize['peak_rss_mb']:.0f}", ""],
            ["calibrator -l 0.01 (s)", f"{search['wall_seconds']:.1f}",
             f"{summary['full_evaluations']} full evaluations"],
            ["calibrator -l 0.01 top-1 FP32 -> INT8",
             f"{summary['fp32']:.3f} -> {summary['int8']:.3f}",
             f"{len(summary['fp32_layers'])} FP32 layers"],
            ["calibrator -l 0.01 peak memory (MB)", f"{search['peak_rss_mb']:.0f}", ""]]
    data = {"images": IMAGES, "fp32_pass_seconds": fp32_s, "quantize": quantize,
            "search": search, "quantize_over_fp32_passes": quantize["wall_seconds"] / fp32_s}
    notes = []
    if nncf is None:
        notes.append("NNCF is not installed (pip install nncf): no peer figures")
    elif "error" in nncf:
        notes.append(f"NNCF failed: {nncf['error']}")
        data["nncf"] = nncf
    else:
        data["nncf"] = nncf
        data["search_over_nncf_accuracy_control"] = (search["wall_seconds"]
                                                     / nncf["accuracy_control_seconds"])
        data["quantize_over_nncf_quantize"] = (quantize["wall_seconds"]
                                               / nncf["quantize_seconds"])
        rows += [[f"NNCF {nncf['nncf']} quantize (s)", f"{nncf['quantize_seconds']:.1f}",
                  f"ours -q: {data['quantize_over_nncf_quantize']:.2f}x its time"],
                 ["NNCF quantize top-1 FP32 -> INT8",
                  f"{nncf['fp32_top1']:.3f} -> {nncf['quantize_top1']:.3f}", ""],
                 ["NNCF quantize_with_accuracy_control (s)",
                  f"{nncf['accuracy_control_seconds']:.1f}",
                  f"ours -l 0.01: {data['search_over_nncf_accuracy_control']:.2f}x its time"],
                 ["NNCF accuracy control top-1",
                  f"{nncf['accuracy_control_top1']:.3f}", ""],
                 ["NNCF peak memory (MB)", f"{nncf['peak_rss_mb']:.0f}", ""]]
    return SectionResult([Table(["figure", "value", "ratio"], rows)], data, notes)
