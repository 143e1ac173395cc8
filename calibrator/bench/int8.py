"""INT8 sections of ``make bench``: statistics pass, KL milliseconds per tensor, simulated
INT8 images/s against FP32 on the same batches, and the full search (-l 0.01) wall time,
full evaluations and peak memory, on the shared MobileNetV2."""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from calibrator.backends import make_backend
from calibrator.bench import Context, SectionResult, Table, section
from calibrator.bench.fp32 import BATCHES, IMAGES_PER_BATCH, _files
from calibrator.cli.main import main
from calibrator.model import load_model
from calibrator.quant.calibrate import calibrate
from calibrator.quant.estimators import threshold
from calibrator.quant.scales import QuantOptions


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@section("int8", "INT8 calibration and simulation, shared MobileNetV2")
def int8(ctx: Context) -> SectionResult:
    files = _files(ctx)
    model = load_model(files["test"], files["weights"], device=ctx.device)
    model.source.prefetch(BATCHES)
    ctx.log("statistics pass (2 x 10 batches, every tracked tensor at once)")
    started = time.perf_counter()
    calibration = calibrate(model, QuantOptions(), BATCHES, quiet=True)
    ctx.sync()
    statistics_s = time.perf_counter() - started
    tensors = list(calibration.stats.values())
    started = time.perf_counter()
    for stats in tensors:
        stats.thresholds.clear()
        threshold(stats, "KL")
    kl_ms = (time.perf_counter() - started) * 1000 / max(len(tensors), 1)
    plan = calibration.plan()
    overrides = make_backend().simulator(calibration.fused, plan).overrides
    feeds = [{k: v.to(ctx.device) for k, v in model.source.batch(i).items()}
             for i in range(BATCHES)]
    times = {"fp32": 0.0, "int8": 0.0}
    with torch.no_grad():
        model.net(feeds[0], outputs=["fc7"])  # warm-up
        model.net(feeds[0], outputs=["fc7"], overrides=overrides)
        for _ in range(ctx.repeat):
            for batch in feeds:  # interleaved: load from elsewhere hits both alike
                for kind, extra in (("fp32", {}), ("int8", {"overrides": overrides})):
                    t0 = time.perf_counter()
                    model.net(batch, outputs=["fc7"], **extra)
                    ctx.sync()
                    times[kind] += time.perf_counter() - t0
    images = BATCHES * IMAGES_PER_BATCH * ctx.repeat
    fp32_ips, int8_ips = images / times["fp32"], images / times["int8"]
    rows = [["statistics pass (s)", f"{statistics_s:.1f}"],
            ["KL threshold per tensor (ms)", f"{kl_ms:.0f}"],
            ["tensors calibrated", len(tensors)],
            ["FP32 forward (images/s)", f"{fp32_ips:.1f}"],
            ["simulated INT8 forward (images/s)", f"{int8_ips:.1f}"],
            ["INT8 / FP32 speed", f"{int8_ips / fp32_ips:.2f}"],
            ["peak resident memory (MB)", f"{_peak_rss_mb():.0f}"]]
    data = {"statistics_seconds": statistics_s, "kl_ms_per_tensor": kl_ms,
            "tensors": len(tensors), "fp32_images_per_s": fp32_ips,
            "int8_images_per_s": int8_ips, "int8_over_fp32": int8_ips / fp32_ips,
            "peak_rss_mb": _peak_rss_mb()}
    return SectionResult([Table(["figure", "value"], rows)], data)


@section("search", "Accuracy search, shared MobileNetV2, -i 10 -l 0.01")
def search(ctx: Context) -> SectionResult:
    files = _files(ctx)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        argv = ["-m", str(files["test"]), "-w", str(files["weights"]), "-i", "10",
                "-n", "accuracy-top1", "-l", "0.01", "--quiet",
                "--output", str(out / "q.prototxt"), "--json", str(out / "q.json")]
        if ctx.gpu is not None:
            argv += ["--gpu", str(ctx.gpu)]
        started = time.perf_counter()
        code = main(argv)
        wall = time.perf_counter() - started
        summary = json.loads((out / "q.json").read_text())["search"]
    rows = [["exit code", code], ["FP32 top-1", f"{summary['fp32']:.3f}"],
            ["INT8 top-1", f"{summary['int8']:.3f}"],
            ["layers reverted to FP32", len(summary["fp32_layers"])],
            ["full evaluations", summary["full_evaluations"]],
            ["wall time (s)", f"{wall:.0f}"],
            ["peak resident memory (MB)", f"{_peak_rss_mb():.0f}"]]
    return SectionResult([Table(["figure", "value"], rows)],
                         {**summary, "wall_seconds": wall, "peak_rss_mb": _peak_rss_mb()})
