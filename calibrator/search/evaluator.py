"""Full evaluations: the metric over ``-i`` batches for one configuration.

Every result is stored under a fingerprint of the exact scales it ran with, and the store is
saved beside the output after each evaluation. ``--resume`` reloads it: the search is
deterministic, so a resumed run replays the same decisions and finds each evaluation it
already paid for in the store instead of running it again."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibrator.errors import CalibratorError
from calibrator.fileio import atomic_write
from calibrator.metrics import Metric, measure

STATE_VERSION = 1


def plan_fingerprint(plan) -> str:
    """Identifies a configuration by what the simulation computes with; "fp32" for none."""
    if plan is None:
        return "fp32"
    items = []
    for name in sorted(plan.layers):
        lq = plan.layers[name]
        items.append([name, lq.scale_in, lq.scale_out, lq.scale_params, lq.input_unsigned,
                      lq.output_unsigned, lq.output_int8, lq.force_u8_input, lq.bits])
    text = json.dumps(items, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class EvalResult:
    metric: float
    per_sample: np.ndarray | None
    seconds: float
    cached: bool = False


@dataclass
class SearchState:
    """What survives an interruption: the inputs it belongs to and every evaluation."""

    path: Path | None
    inputs: dict
    evaluations: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, inputs: dict) -> "SearchState":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CalibratorError(f"{path}: cannot resume from this state file ({exc})") from None
        if data.get("version") != STATE_VERSION or data.get("inputs") != inputs:
            raise CalibratorError(f"{path}: the saved search belongs to other inputs or "
                                  "options; run without --resume to start afresh")
        return cls(path, inputs, data.get("evaluations", {}))

    def save(self) -> None:
        if self.path is None:
            return
        data = {"version": STATE_VERSION, "inputs": self.inputs,
                "evaluations": self.evaluations}
        atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")

    def discard(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


class Evaluator:
    """Runs (or recalls) full evaluations and counts the ones the search asked for."""

    def __init__(self, model, metric: Metric, iterations: int, state: SearchState, *,
                 quiet: bool = False):
        self.model = model
        self.metric = metric
        self.iterations = iterations
        self.state = state
        self.quiet = quiet
        self.used = 0          # full evaluations the search asked for (run or recalled)
        self.ran = 0           # of which actually run in this process

    def evaluate(self, plan, overrides, *, desc: str = "evaluate",
                 measured: tuple[list, float] | None = None) -> EvalResult:
        """The metric of ``plan`` (None: FP32) run with ``overrides``, recalled from the state
        when it was run before; ``measured`` = (outcomes, seconds) of a pass that already
        read these batches (the statistics pass measures FP32 on the way)."""
        key = plan_fingerprint(plan)
        self.used += 1
        stored = self.state.evaluations.get(key)
        if stored is not None:
            per_sample = (np.array(stored["per_sample"], dtype=bool)
                          if stored.get("per_sample") is not None else None)
            return EvalResult(stored["metric"], per_sample, stored["seconds"], cached=True)
        started = time.time()
        if measured is not None:
            outcomes, seconds = measured
        else:
            outcomes = measure(self.model, [self.metric], self.iterations, overrides=overrides,
                               reference=plan is None, desc=desc, quiet=self.quiet)[0]
            seconds = time.time() - started
        value = self.metric.combine(outcomes)
        per_sample = None
        if outcomes and all(o.per_sample is not None for o in outcomes):
            per_sample = np.concatenate([o.per_sample for o in outcomes])
        self.ran += 1
        self.state.evaluations[key] = {
            "metric": value, "seconds": seconds,
            "per_sample": per_sample.astype(int).tolist() if per_sample is not None else None}
        self.state.save()
        return EvalResult(value, per_sample, seconds)
