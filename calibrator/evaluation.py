"""The ``caffe test`` equivalent: run N TEST batches and report every output blob over them
(the mean, as ``caffe test`` prints it; the mAP for a DetectionEvaluate top), through the
metrics package (:mod:`calibrator.metrics`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibrator.fileio import atomic_write, staged_folder
from calibrator.metrics import make_metric, measure


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
    """A file-name-safe stem for a blob name; a long one keeps its start and a hash."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", blob)
    if len(stem) > 120:
        stem = stem[:100] + "-" + hashlib.sha1(blob.encode("utf-8", "surrogatepass"))\
            .hexdigest()[:12]
    return stem


def dump_names(blobs, iterations: int):
    """Whether ``--dump`` writes a file of a given name: ``<blob>_<batch>.npy`` (any blob
    while ``blobs`` is None, before the net is known)."""
    stems = None if blobs is None else {_file_stem(b) for b in blobs}

    def writes(name: str) -> bool:
        match = re.fullmatch(r"(.*)_(\d+)\.npy", name)
        return (bool(match) and (stems is None or match.group(1) in stems)
                and int(match.group(2)) < iterations)

    return writes


def run_test(model, iterations: int, *, net=None, dump_dir: str | Path | None = None,
             overrides: dict | None = None, quiet: bool = False,
             ap_version: str | None = None, fp32: bool | None = None) -> TestResult:
    """Every output of ``net`` (default the model's) over ``iterations`` batches, run with
    ``overrides`` (``fp32``: they compute FP32, the reference of metrics relative to it;
    default: when there are none)."""
    fp32 = overrides is None if fp32 is None else fp32
    net = model.net if net is None else net
    metrics = [make_metric(net, name, ap_version=ap_version) for name in net.output_names]

    def dump(index, outputs):
        for name in net.output_names:
            value = outputs[name].detach().float().cpu().numpy()
            buffer = io.BytesIO()
            np.save(buffer, value)
            atomic_write(Path(dump_dir) / f"{_file_stem(name)}_{index}.npy", buffer.getvalue())

    with (staged_folder(dump_dir) if dump_dir is not None
          else contextlib.nullcontext()) as staged:
        if dump_dir is not None:
            dump_dir = staged  # the files appear in --dump only if every batch ran
        outcomes = measure(model, metrics, iterations, net=net, overrides=overrides,
                           reference=fp32, desc="test", quiet=quiet,
                           on_batch=dump if dump_dir is not None else None)
    scores = OrderedDict()
    for metric, batches in zip(metrics, outcomes):
        value = metric.summary(batches)
        if value is not None:  # a blob whose shape varies (e.g. detections) has no mean
            scores[metric.blob] = value
    return TestResult(scores, iterations)
