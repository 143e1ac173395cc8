"""INT8 sections of ``make bench``: statistics pass, KL milliseconds per tensor, simulated
INT8 images/s against FP32 on the same batches, on the shared MobileNetV2 (the whole runs,
-q and -l 0.01, are the ``peers`` section)."""

from __future__ import annotations

import time

import torch

from calibrator.backends import make_backend
from calibrator.bench import Context, SectionResult, Table, peak_rss_mb, section
from calibrator.bench.fp32 import BATCHES, IMAGES_PER_BATCH, _files
from calibrator.model import load_model
from calibrator.quant.calibrate import calibrate
from calibrator.quant.estimators import threshold
from calibrator.quant.scales import QuantOptions
from calibrator.quant.simulate import FoldedFP32


@section("int8", "INT8 calibration and simulation, shared MobileNetV2")
def int8(ctx: Context) -> SectionResult:
    files = _files(ctx)
    model = load_model(files["test"], files["weights"], device=ctx.device)
    model.source.prefetch(BATCHES)
    ctx.log("statistics pass (one pass over 10 batches, every tracked tensor at once)")
    started = time.perf_counter()
    calibration = calibrate(model, QuantOptions(), BATCHES, quiet=True)
    ctx.sync()
    statistics_s = time.perf_counter() - started
    # the tensors histogrammed: outputs no plan reads have none (scales.histogram_keys)
    tensors = [stats for stats in calibration.stats.values() if stats.hist is not None]
    started = time.perf_counter()
    for stats in tensors:
        stats.thresholds.clear()
        threshold(stats, "KL")
    kl_ms = (time.perf_counter() - started) * 1000 / max(len(tensors), 1)
    plan = calibration.plan()
    overrides = make_backend().simulator(calibration.fused, plan).overrides
    folded = FoldedFP32(calibration.fused).overrides
    feeds = [{k: v.to(ctx.device) for k, v in model.source.batch(i).items()}
             for i in range(BATCHES)]
    times = {"fp32": 0.0, "int8": 0.0}
    with torch.no_grad():
        model.net(feeds[0], outputs=["fc7"], overrides=folded)  # warm-up
        model.net(feeds[0], outputs=["fc7"], overrides=overrides)
        for _ in range(ctx.repeat):
            for batch in feeds:  # interleaved: load from elsewhere hits both alike
                for kind, extra in (("fp32", {"overrides": folded}),
                                    ("int8", {"overrides": overrides})):
                    t0 = time.perf_counter()
                    model.net(batch, outputs=["fc7"], **extra)
                    ctx.sync()
                    times[kind] += time.perf_counter() - t0
    images = BATCHES * IMAGES_PER_BATCH * ctx.repeat
    fp32_ips, int8_ips = images / times["fp32"], images / times["int8"]
    rows = [["statistics pass (s)", f"{statistics_s:.1f}"],
            ["KL threshold per tensor (ms)", f"{kl_ms:.0f}"],
            ["tensors histogrammed (of all tracked)",
             f"{len(tensors)} of {len(calibration.stats)}"],
            ["FP32 forward (images/s)", f"{fp32_ips:.1f}"],
            ["simulated INT8 forward (images/s)", f"{int8_ips:.1f}"],
            ["INT8 / FP32 speed", f"{int8_ips / fp32_ips:.2f}"],
            ["peak resident memory (MB)", f"{peak_rss_mb():.0f}"]]
    data = {"statistics_seconds": statistics_s, "kl_ms_per_tensor": kl_ms,
            "tensors": len(tensors), "tracked": len(calibration.stats),
            "fp32_images_per_s": fp32_ips,
            "int8_images_per_s": int8_ips, "int8_over_fp32": int8_ips / fp32_ips,
            "peak_rss_mb": peak_rss_mb()}
    return SectionResult([Table(["figure", "value"], rows)], data)
