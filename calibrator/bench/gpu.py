"""``make bench GPU=ID`` (``--gpu ID``): GPU against CPU throughput on the shared MobileNetV2,
FP32 forward and simulated INT8 forward, on the same decoded batches; and the statistics
pass on the GPU. Without ``--gpu`` the section says it was skipped.

The scales come from one calibration on the GPU; the CPU model runs the same plan (the
statistics are keyed by blob, so they fit the CPU model's fused view as well). Each batch
runs on the CPU and then on the GPU, FP32 then INT8 (interleaved, so load from other
processes hits both alike), ``--repeat`` times; GPU timings wait for the device
(``Context.sync``). The INT8 simulation runs its integer accumulations without cuDNN and
TF32 (``quant.simulate.exact_arithmetic``), which is what exactness costs on the GPU.
"""

from __future__ import annotations

import time

import torch

from calibrator.backends import make_backend
from calibrator.bench import Context, SectionResult, Table, section
from calibrator.bench.fp32 import BATCHES, IMAGES_PER_BATCH, _files
from calibrator.model import load_model
from calibrator.quant.calibrate import Calibration, calibrate
from calibrator.quant.fusion import analyze
from calibrator.quant.scales import QuantOptions

OUTPUT = "fc7"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(ctx: Context, files, devices: tuple[torch.device, torch.device],
               batches: int = BATCHES) -> dict:
    """Images per second of FP32 and simulated INT8 on ``devices`` (CPU, GPU), and the
    seconds of the statistics pass on the second device."""
    cpu_device, gpu_device = devices
    models = {"cpu": load_model(files["test"], files["weights"], device=cpu_device),
              "gpu": load_model(files["test"], files["weights"], device=gpu_device)}
    source = models["gpu"].source
    source.prefetch(batches)
    ctx.log(f"statistics pass on {gpu_device} ({batches} batches, one pass)")
    _sync(gpu_device)
    started = time.perf_counter()
    calibration = calibrate(models["gpu"], QuantOptions(), batches, quiet=True)
    _sync(gpu_device)
    statistics_s = time.perf_counter() - started
    backend = make_backend()
    overrides = {"gpu": backend.simulator(calibration.fused, calibration.plan()).overrides}
    fused_cpu = analyze(models["cpu"].net, quantize_fc=calibration.options.quantize_fc)
    plan_cpu = Calibration(fused_cpu, calibration.stats, calibration.options).plan()
    overrides["cpu"] = backend.simulator(fused_cpu, plan_cpu).overrides
    feeds = {name: [{k: v.to(models[name].device) for k, v in source.batch(i).items()}
                    for i in range(batches)] for name in models}
    times = {(name, kind): 0.0 for name in models for kind in ("fp32", "int8")}
    ctx.log(f"FP32 and simulated INT8 on {cpu_device} and {gpu_device}, "
            f"{ctx.repeat} x {batches} batches")
    with torch.no_grad():
        for name, model in models.items():  # warm-up (cuDNN and allocator set-up)
            model.net(feeds[name][0], outputs=[OUTPUT])
            model.net(feeds[name][0], outputs=[OUTPUT], overrides=overrides[name])
            _sync(model.device)
        for _ in range(ctx.repeat):
            for index in range(batches):
                for name, model in models.items():
                    for kind, extra in (("fp32", {}), ("int8", {"overrides": overrides[name]})):
                        started = time.perf_counter()
                        model.net(feeds[name][index], outputs=[OUTPUT], **extra)
                        _sync(model.device)
                        times[name, kind] += time.perf_counter() - started
    images = batches * IMAGES_PER_BATCH * ctx.repeat
    rate = {f"{name}_{kind}_images_per_s": images / seconds
            for (name, kind), seconds in times.items()}
    return {**rate, "gpu_statistics_seconds": statistics_s,
            "gpu_over_cpu_fp32": rate["gpu_fp32_images_per_s"] / rate["cpu_fp32_images_per_s"],
            "gpu_over_cpu_int8": rate["gpu_int8_images_per_s"] / rate["cpu_int8_images_per_s"],
            "cpu_device": str(cpu_device), "gpu_device": str(gpu_device)}


@section("gpu", "GPU against CPU throughput (--gpu), shared MobileNetV2")
def gpu(ctx: Context) -> SectionResult:
    if ctx.device.type != "cuda":
        return SectionResult([], {"skipped": "no --gpu"},
                             ["skipped: give --gpu ID (make bench GPU=ID) to compare a GPU "
                              "with the CPU"])
    data = throughput(ctx, _files(ctx), (torch.device("cpu"), ctx.device))
    rows = [[what, f"{data[f'cpu_{kind}_images_per_s']:.1f}",
             f"{data[f'gpu_{kind}_images_per_s']:.1f}", f"{data[f'gpu_over_cpu_{kind}']:.1f}x"]
            for what, kind in (("FP32 forward", "fp32"), ("simulated INT8 forward", "int8"))]
    name = torch.cuda.get_device_name(ctx.device)
    note = (f"statistics pass on the GPU ({BATCHES} batches of {IMAGES_PER_BATCH}): "
            f"{data['gpu_statistics_seconds']:.1f} s; GPU: {name}")
    return SectionResult([Table(["images/s", "CPU", "GPU", "GPU / CPU"], rows)], data, [note])
