"""ONNX Runtime section of ``make bench``: the exported INT8 QDQ model of the shared
MobileNetV2 (Intel's default plan: KL, per-tensor weights, first conv FP32) on ORT's CPU
kernels against the FP32 ONNX model of the same net, batch by batch, interleaved."""

from __future__ import annotations

import time

import numpy as np

from calibrator.backends.ort import read_ort_graph
from calibrator.bench import Context, SectionResult, Table, section
from calibrator.bench.fp32 import BATCHES, IMAGES_PER_BATCH, _files
from calibrator.export.qdq import build_onnx
from calibrator.model import load_model
from calibrator.ort_worker import make_session
from calibrator.quant.calibrate import calibrate
from calibrator.quant.scales import QuantOptions

#: Statistics batches for the plan (the speed does not depend on the scales' quality).
PLAN_BATCHES = 2


@section("ort", "ONNX Runtime INT8 (exported QDQ model) vs FP32, shared MobileNetV2")
def ort_speed(ctx: Context) -> SectionResult:
    try:
        import onnxruntime  # noqa: F401  (optional: the section is skipped without it)
    except ImportError:
        return SectionResult([], {"skipped": "onnxruntime is not installed"},
                             ["skipped: onnxruntime is not installed"])
    files = _files(ctx)
    model = load_model(files["test"], files["weights"])
    ctx.log(f"plan from {PLAN_BATCHES} statistics batches, ONNX export")
    calibration = calibrate(model, QuantOptions(), PLAN_BATCHES, quiet=True)
    plan = calibration.plan()
    int8 = build_onnx(model.net, calibration.fused, plan)
    fp32 = build_onnx(model.net, calibration.fused, None)
    graph = read_ort_graph(int8)
    sessions = {"fp32": make_session(fp32.model.SerializeToString(), ctx.threads),
                "int8": make_session(int8.model.SerializeToString(), ctx.threads)}
    name = int8.inputs[0]
    feeds = [{name: model.source.batch(i)[name].numpy().astype(np.float32)}
             for i in range(BATCHES)]
    for session in sessions.values():  # warm-up
        session.run(None, feeds[0])
    times = {"fp32": 0.0, "int8": 0.0}
    for _ in range(ctx.repeat):
        for batch in feeds:  # interleaved: load from elsewhere hits both alike
            for kind, session in sessions.items():
                t0 = time.perf_counter()
                session.run(None, batch)
                times[kind] += time.perf_counter() - t0
    images = BATCHES * IMAGES_PER_BATCH * ctx.repeat
    fp32_ips, int8_ips = images / times["fp32"], images / times["int8"]
    rows = [["ORT FP32 (images/s)", f"{fp32_ips:.1f}"],
            ["ORT INT8 (images/s)", f"{int8_ips:.1f}"],
            ["INT8 / FP32 speed", f"{int8_ips / fp32_ips:.2f}x"],
            ["INT8 kernels (QLinearConv)", graph.int8_kernels],
            ["quantized convs left in float by ORT", len(graph.float_units)]]
    data = {"fp32_images_per_s": fp32_ips, "int8_images_per_s": int8_ips,
            "speedup": int8_ips / fp32_ips, "int8_kernels": graph.int8_kernels,
            "float_units": sorted(graph.float_units), "images": images}
    return SectionResult([Table(["measure", "value"], rows)], data)
