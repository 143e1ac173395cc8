"""Benchmarks: ``python -m calibrator.bench`` (``make bench``) runs the registered sections,
prints a table per section and writes every figure to ``bench.json``.

Performance claims live here, never in timed unit tests. A section is a function
``(Context) -> SectionResult`` registered with :func:`section` in a module listed in
:data:`SECTION_MODULES`; adding one (INT8 simulation speed, statistics pass, KL ms per
tensor, search...) is a new function in a new module and one line in that tuple.

Timings on a shared machine are noisy: sections time each step several times (``--repeat``)
and interleave the things they compare batch by batch, so that load from other processes hits
both sides alike; the JSON records the machine and its load average.
"""

from __future__ import annotations

import importlib
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from calibrator.errors import CalibratorError

#: Modules whose import registers sections, in the order they run.
SECTION_MODULES = ("calibrator.bench.fp32", "calibrator.bench.int8", "calibrator.bench.ort",
                   "calibrator.bench.peers", "calibrator.bench.accuracy",
                   "calibrator.bench.gpu")

REPO = Path(__file__).resolve().parents[2]


#: the standard normal quantile of a two-sided 95% interval
Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (Wilson 1927): the p whose score test
    ``|successes/trials - p| <= z sqrt(p (1 - p) / trials)`` accepts, in closed form. Unlike
    the normal approximation it stays inside [0, 1] and is not empty at 0 or ``trials``
    successes, where a top-1 agreement of a few hundred images often is."""
    if trials <= 0:
        return (0.0, 1.0)
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    # at 0 or ``trials`` successes the bound is exactly p (the closed form rounds near it)
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= trials else min(1.0, centre + half)
    return (low, high)


def top1_figures(labels, top_fp32, top_int8) -> dict:
    """Top-1 of FP32 and of INT8, the drop (points) and their top-1 agreement, from the
    labels and each one's predicted classes (numpy arrays of one length); with how much the
    images say: their count, the agreement's 95% interval (:func:`wilson_interval`) and the
    images only FP32 gets right and only INT8 gets right (the drop is their difference over
    the count: on a few hundred images a handful of images either way)."""
    right_fp32, right_int8 = top_fp32 == labels, top_int8 == labels
    fp32, int8 = float(right_fp32.mean()), float(right_int8.mean())
    agree = int((top_fp32 == top_int8).sum())
    images = int(len(labels))
    return {"fp32": fp32, "int8": int8, "drop_pt": 100 * (fp32 - int8),
            "agreement": agree / images if images else float("nan"),
            "images": images, "agreement_95": list(wilson_interval(agree, images)),
            "fp32_only_right": int((right_fp32 & ~right_int8).sum()),
            "int8_only_right": int((right_int8 & ~right_fp32).sum())}


def output_divergence(scores_fp32, scores_int8) -> float:
    """The mean over the images of KL(softmax(FP32 scores) || softmax(INT8 scores)), in
    nats (float64): how far the INT8 net's class distribution is from FP32's, a figure that
    moves with every image's scores where the top-1 agreement moves only with the few
    images whose two best classes are close."""
    def log_softmax(scores):
        x = np.asarray(scores, np.float64).reshape(len(scores), -1)
        top = x.max(axis=1, keepdims=True)
        return x - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True))
    p, q = log_softmax(scores_fp32), log_softmax(scores_int8)
    return float((np.exp(p) * (p - q)).sum(axis=1).mean())


def score_figures(labels, scores_fp32, scores_int8) -> dict:
    """:func:`top1_figures` from each image's class scores (images x classes), with
    :func:`output_divergence` as ``kl_divergence``."""
    a = np.asarray(scores_fp32).reshape(len(scores_fp32), -1)
    b = np.asarray(scores_int8).reshape(len(scores_int8), -1)
    figures = top1_figures(np.asarray(labels).reshape(-1), a.argmax(1), b.argmax(1))
    figures["kl_divergence"] = output_divergence(a, b)
    return figures


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): the high-water mark of its own address
    space (Linux ``VmHWM``). ``getrusage(RUSAGE_SELF).ru_maxrss`` is not that in a process
    the bench starts: Linux keeps the larger of the old and new address spaces' marks
    across exec, and the child of a ``subprocess`` call runs on its parent's memory until
    exec (vfork), so a child of a 3 GB bench process reported 3 GB whatever it used."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Context:
    """What every section gets: where the shared models are, the device, the options."""

    shared: Path
    device: torch.device
    gpu: int | None = None
    repeat: int = 3
    quiet: bool = False
    threads: int | None = None  # --threads: CPU threads for every library (None: defaults)

    def log(self, message: str) -> None:
        if not self.quiet:
            print(f"[bench] {message}", flush=True)

    def sync(self) -> None:
        """Wait for queued GPU work, so a timer around it measures it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Table:
    headers: list[str]
    rows: list[list]
    title: str = ""


@dataclass
class SectionResult:
    """Tables to print and the figures for bench.json (JSON-serialisable)."""

    tables: list[Table]
    data: dict
    notes: list[str] = field(default_factory=list)


@dataclass
class Section:
    name: str
    title: str
    run: Callable[[Context], SectionResult]


SECTIONS: dict[str, Section] = {}


def section(name: str, title: str):
    """Decorator registering ``fn(ctx) -> SectionResult`` as the benchmark section ``name``."""
    def register(fn):
        SECTIONS[name] = Section(name, title, fn)
        return fn
    return register


def load_sections() -> dict[str, Section]:
    for module in SECTION_MODULES:
        importlib.import_module(module)
    return SECTIONS


def find_shared(explicit: str | None = None) -> Path:
    """``--shared``, else ``$CALIBRATOR_SHARED``, else ``../shared`` beside the repository
    or beside the working directory."""
    candidates = [explicit] if explicit else [os.environ.get("CALIBRATOR_SHARED"),
                                              REPO.parent / "shared", Path.cwd().parent / "shared"]
    for candidate in filter(None, candidates):
        if Path(candidate).is_dir():
            return Path(candidate)
    raise CalibratorError("shared models not found: give --shared DIR or set "
                          "CALIBRATOR_SHARED (the folder holding models/ and data/)")


def timed(ctx: Context, fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, GPU work included."""
    ctx.sync()
    start = time.perf_counter()
    result = fn()
    ctx.sync()
    return time.perf_counter() - start, result
