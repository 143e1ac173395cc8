"""Run an ONNX model with ONNX Runtime's CPU kernels on saved inputs; numpy + onnxruntime only.

    python -m calibrator.ort_worker MODEL.onnx INPUTS.npz OUTPUTS.npz [--threads N]
        [--repeat R]

INPUTS.npz holds ``<batch>/<input name>`` arrays; OUTPUTS.npz gets ``<batch>/<output name>``
for every graph output, plus ``seconds`` (the median run time of each batch over R runs).
``calibrator verify --ort-command`` runs it through a prefix such as
``qemu-x86_64 -cpu Haswell`` to get the kernels of another CPU (MLAS picks its kernels from
CPUID at start-up)."""

from __future__ import annotations

import argparse
import time

import numpy as np


def make_session(model, threads: int | None = None, optimized_path: str | None = None,
                 layout: bool = True):
    """An ORT CPU session with every graph optimization (``layout=False``: all but the
    CPU-specific layout ones, for a portable optimized graph to inspect)."""
    import onnxruntime as ort  # optional (the verify extra)

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if layout
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_batches(session, batches, repeat: int = 1):
    """[(outputs dict, median seconds)] for a list of feed dicts."""
    names = [o.name for o in session.get_outputs()]
    results = []
    for feeds in batches:
        times, values = [], None
        for _ in range(max(1, repeat)):
            start = time.perf_counter()
            values = session.run(names, feeds)
            times.append(time.perf_counter() - start)
        times.sort()
        results.append((dict(zip(names, values)), times[len(times) // 2]))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="calibrator.ort_worker")
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("outputs")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    data = np.load(args.inputs)
    batches: dict[int, dict] = {}
    for key in data.files:
        batch, name = key.split("/", 1)
        batches.setdefault(int(batch), {})[name] = data[key]
    session = make_session(args.model, args.threads or None)
    order = sorted(batches)
    out = {}
    seconds = []
    for index, (values, elapsed) in zip(order, run_batches(session, [batches[i] for i in order],
                                                           args.repeat)):
        for name, value in values.items():
            out[f"{index}/{name}"] = value
        seconds.append(elapsed)
    out["seconds"] = np.array(seconds)
    np.savez(args.outputs, **out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
