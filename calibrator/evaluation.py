"""The ``caffe test`` equivalent: run N TEST batches and average every output blob."""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from calibrator.errors import CalibratorError
from calibrator.fileio import atomic_write
from calibrator.progress import progress_bar


def batches(model, iterations: int, *, desc: str = "batches", quiet: bool = False
            ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(index, feeds on the model's device) for TEST batches 0..iterations-1."""
    if iterations < 1:
        raise CalibratorError(f"-i/--iterations must be at least 1, got {iterations}")
    if model.source is None:
        raise CalibratorError(f"{model.prototxt}: nothing feeds the net (no data layer; "
                              "give --images for a deploy net)")
    model.source.prefetch(iterations)  # a bad image fails here, before any output is written
    for index in progress_bar(range(iterations), desc=desc, quiet=quiet):
        feeds = model.source.batch(index)
        yield index, {k: v.to(model.device, non_blocking=True) for k, v in feeds.items()}


@dataclass
class TestResult:
    scores: "OrderedDict[str, np.ndarray]"  # output blob -> mean over the iterations
    iterations: int

    def lines(self) -> list[str]:
        """``name = value`` lines as ``caffe test`` prints them (%g, 6 significant digits)."""
        out = []
        for name, value in self.scores.items():
            flat = np.asarray(value).ravel()
            if flat.size <= 16:
                out.extend(f"{name} = {v:.6g}" for v in flat)
            else:
                out.append(f"{name} = <{flat.size} values, mean {flat.mean():.6g}; "
                           "use --dump to save them>")
        return out


def _file_stem(blob: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", blob)


def run_test(model, iterations: int, *, dump_dir: str | Path | None = None,
             hook: Callable | None = None, overrides: dict | None = None,
             quiet: bool = False) -> TestResult:
    """Average each net output over ``iterations`` batches (Caffe's ``caffe test``)."""
    from calibrator.detection.map import DetectionAccumulator
    from calibrator.graph.layers.detection_evaluate import evaluation_outputs, reset_state

    sums: OrderedDict[str, np.ndarray] = OrderedDict()
    net = model.net
    detections = {name: DetectionAccumulator() for name in evaluation_outputs(net)}
    reset_state(net)
    with torch.no_grad():
        for index, feeds in batches(model, iterations, desc="test", quiet=quiet):
            outputs = net(feeds, hook=hook, overrides=overrides)
            for name in net.output_names:
                value = outputs[name].detach().float().cpu().numpy()
                if dump_dir is not None:
                    path = Path(dump_dir) / f"{_file_stem(name)}_{index}.npy"
                    _save_npy(path, value)
                if name in detections:  # mAP over all iterations, as caffe test -detection
                    detections[name].add(value)
                    continue
                if name in sums and sums[name] is not None and sums[name].shape != value.shape:
                    sums[name] = None  # varying shape (e.g. detections): no mean
                elif name not in sums:
                    sums[name] = value.astype(np.float64)
                elif sums[name] is not None:
                    sums[name] += value
    scores = OrderedDict((k, v / iterations) for k, v in sums.items() if v is not None)
    for name, accumulator in detections.items():
        scores[name] = np.array(accumulator.mean_ap(_ap_version(net, name)))
    return TestResult(scores, iterations)


def _ap_version(net, blob: str) -> str:
    for node in net.nodes:
        if node.type == "DetectionEvaluate" and blob in node.tops:
            param = node.param.detection_evaluate_param
            if "ap_version" in param.DESCRIPTOR.fields_by_name and param.HasField("ap_version"):
                return param.ap_version
    return "11point"


def _save_npy(path: Path, value: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, value)
    atomic_write(path, buffer.getvalue())
