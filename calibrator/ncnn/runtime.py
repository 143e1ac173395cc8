"""Run a written ncnn model with ncnn's own kernels through the ``ncnn`` Python package
(an optional dependency: ``pip install ncnn``; imported only here, inside the functions).

Options: ncnn's defaults (``Option::Option``, src/option.cpp) except fp16/bf16 storage and
arithmetic, which are switched off so that float layers run in float32 on every CPU; int8
inference, packing layout, Winograd and sgemm stay on, as deployed.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

#: option -> value set on ``ncnn.Net().opt`` before loading
DEFAULT_OPTIONS = {
    "use_fp16_storage": False, "use_fp16_packed": False, "use_fp16_arithmetic": False,
    "use_bf16_storage": False, "use_vulkan_compute": False, "use_int8_inference": True,
    "use_packing_layout": True,
}


def ncnn_available() -> bool:
    try:
        import ncnn  # noqa: F401  (optional dependency)
    except ImportError:
        return False
    return True


def _net(options: Mapping[str, object] | None, num_threads: int | None):
    import ncnn  # optional dependency: only the real-kernel runs need it

    net = ncnn.Net()
    for key, value in {**DEFAULT_OPTIONS, **dict(options or {})}.items():
        setattr(net.opt, key, value)
    if num_threads is not None:
        net.opt.num_threads = num_threads
    return net


def load_net(param_path: str | Path, bin_path: str | Path, *,
             options: Mapping[str, object] | None = None, num_threads: int | None = None):
    """An ``ncnn.Net`` with the model loaded (raises RuntimeError if ncnn refuses it)."""
    net = _net(options, num_threads)
    if net.load_param(str(param_path)) != 0:
        raise RuntimeError(f"ncnn could not load {param_path}")
    if net.load_model(str(bin_path)) != 0:
        raise RuntimeError(f"ncnn could not load {bin_path}")
    return net


def run_net(net, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
            ) -> dict[str, np.ndarray | list]:
    """Run every sample of the batched ``feeds`` (ncnn blob name -> (N, C, H, W) or (N, K)
    float32) through ``net``; each output comes back as (N, *ncnn shape), or as a list of
    per-sample arrays where the shape varies (DetectionOutput rows)."""
    import ncnn  # optional dependency

    outputs = list(outputs) if outputs is not None else list(net.output_names())
    batch = {len(v) for v in feeds.values()}
    if len(batch) != 1:
        raise ValueError("every feed needs the same batch size")
    results: dict[str, list] = {name: [] for name in outputs}
    for i in range(batch.pop()):
        ex = net.create_extractor()
        if len(outputs) > 1:
            ex.set_light_mode(False)  # keep every blob: light mode frees them once read
        # ncnn.Mat(array) wraps the array's memory without a reference count: an in-place
        # layer on the input would write into the caller's array, or crash dereferencing
        # the missing count (src/net.cpp forward_layer). Feed an ncnn-owned clone.
        for name, value in feeds.items():
            sample = np.ascontiguousarray(value[i], dtype=np.float32)
            ex.input(name, ncnn.Mat(sample).clone())
        for name in outputs:
            ret, mat = ex.extract(name)
            if ret != 0:
                raise RuntimeError(f"ncnn failed to compute blob '{name}' (error {ret})")
            results[name].append(np.array(mat, copy=True))
    out = {}
    for name, values in results.items():
        shapes = {v.shape for v in values}
        out[name] = np.stack(values) if len(shapes) == 1 else values
    return out


def run_ncnn(param_path: str | Path, bin_path: str | Path, feeds: Mapping[str, np.ndarray],
             outputs: Sequence[str] | None = None, *,
             options: Mapping[str, object] | None = None, num_threads: int | None = None
             ) -> dict[str, np.ndarray | list]:
    """ncnn's real kernels on a written model: see :func:`run_net` for feeds and outputs
    (default: the blobs no layer reads)."""
    return run_net(load_net(param_path, bin_path, options=options, num_threads=num_threads),
                   feeds, outputs)


def probe_reciprocal(values: np.ndarray) -> np.ndarray:
    """``_mm_rcp_ps(values)`` as this CPU computes it, read off ncnn itself.

    ConvolutionDepthWise_x86's packed int8 path (src/layer/x86/convolutiondepthwise_x86.cpp
    ``forward_int8_x86``, elempack 8) dequantizes with the *approximate* reciprocal
    ``_mm_rcp_ps(bottom_scale * weight_scale)`` (12 bits, implementation-specific). A 1x1
    int8 depthwise convolution with weights 1, input 1, bottom scale 1 and weight scales
    ``values`` outputs exactly 1 * rcp(value) per channel."""
    values = np.asarray(values, np.float32).reshape(-1)
    n = len(values)
    channels = max(8, -(-n // 8) * 8)
    scales = np.ones(channels, np.float32)
    scales[:n] = values
    param = ("7767517\n2 2\n"
             f"Input in 0 1 in 0=1 1=1 2={channels}\n"
             f"ConvolutionDepthWise dw 1 1 in out 0={channels} 1=1 6={channels} "
             f"7={channels} 8=1\n")
    model = (struct.pack("<i", 0x000D4B38) + bytes([1] * channels) + scales.tobytes()
             + np.float32([1.0]).tobytes())
    net = _net(None, 1)
    net.load_param_mem(param)
    net.load_model_mem(model)
    out = run_net(net, {"in": np.ones((1, channels, 1, 1), np.float32)}, ["out"])["out"]
    return np.asarray(out, np.float32).reshape(-1)[:n]
