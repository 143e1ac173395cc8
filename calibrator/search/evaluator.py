"""Full evaluations: the metric over ``-i`` batches for one configuration.

Every result is stored under a fingerprint of the exact scales it ran with, and the store is
saved beside the output after each evaluation. ``--resume`` reloads it: the search is
deterministic, so a resumed run replays the same decisions and finds each evaluation it
already paid for in the store instead of running it again.

An evaluation asked only for a verdict (``decide``) stops as soon as the batches left cannot
change it: a metric with per-sample outcomes (accuracy, agreement) bounds its final value
exactly (``Metric.bounds``), so the verdict is the complete evaluation's. Such a *partial*
result carries the decisive bound as its metric; ``complete`` reads the remaining batches
when the exact value is wanted (the configuration the search writes).

Under torchrun every rank runs the same search: each evaluation's batches are sharded
(:func:`calibrator.metrics.measure`; an evaluation that may stop early reads a round of one
batch per rank at a time and stops at the batch one process stops at), its value is rank
0's on every rank, and rank 0 alone writes the store (and reads it back on ``--resume``,
for every rank: see the pipeline)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from calibrator import distributed
from calibrator.errors import CalibratorError
from calibrator.fileio import atomic_write, read_bytes
from calibrator.metrics import BatchOutcome, Metric, measure

STATE_VERSION = 1


def plan_fingerprint(plan, keep: Callable[[str], bool] = lambda name: True,
                     salt=None) -> str:
    """Identifies a configuration by what the simulation computes with; "fp32" for none.
    ``keep(name)``: only those layers' entries (with ``salt`` beside them)."""
    if plan is None:
        return "fp32"
    items = []
    for name in sorted(plan.layers):
        if not keep(name):
            continue
        lq = plan.layers[name]
        items.append([name, lq.scale_in, lq.scale_out, lq.scale_params, lq.input_unsigned,
                      lq.output_unsigned, lq.output_int8, lq.force_u8_input, lq.bits,
                      lq.bias_shift, name in plan.excluded])
    text = json.dumps(items if salt is None else [salt, items], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class EvalResult:
    metric: float                     # the value; for a partial result the decisive bound
    per_sample: np.ndarray | None
    seconds: float
    cached: bool = False
    batches: int = 0                  # batches read
    partial: bool = False             # stopped early: the verdict is known, not the value
    outcomes: list = field(default_factory=list, repr=False)


@dataclass
class SearchState:
    """What survives an interruption: the inputs it belongs to and every evaluation."""

    path: Path | None
    inputs: dict
    evaluations: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, inputs: dict) -> "SearchState":
        try:
            data = json.loads(read_bytes(path, "search state"))
        except (ValueError, RecursionError) as exc:
            raise CalibratorError(f"{path}: cannot resume from this state file "
                                  f"({type(exc).__name__})") from None
        if not isinstance(data, dict) or not isinstance(data.get("evaluations", {}), dict):
            raise CalibratorError(f"{path}: not a search state file; run without --resume "
                                  "to start afresh")
        if data.get("version") != STATE_VERSION or data.get("inputs") != inputs:
            raise CalibratorError(f"{path}: the saved search belongs to other inputs or "
                                  "options; run without --resume to start afresh")
        evaluations = data.get("evaluations", {})
        for key, stored in evaluations.items():
            if not _valid_evaluation(stored):
                raise CalibratorError(f"{path}: evaluation {key!r} is damaged; run without "
                                      "--resume to start afresh")
        return cls(path, inputs, evaluations)

    def save(self) -> None:
        if self.path is None or not distributed.is_main():
            return
        data = {"version": STATE_VERSION, "inputs": self.inputs,
                "evaluations": self.evaluations}
        atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")

    def discard(self) -> None:
        if self.path is not None and distributed.is_main() and self.path.exists():
            self.path.unlink()


def _valid_evaluation(stored) -> bool:
    """What :meth:`Evaluator._recall` reads back: a finite metric and seconds, per-sample
    outcomes as a list of 0/1 or null, batch values as numbers or null, a batch count and
    a partial flag."""
    if not isinstance(stored, dict):
        return False
    numbers = [stored.get("metric"), stored.get("seconds")]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in numbers):
        return False
    per_sample = stored.get("per_sample")
    if per_sample is not None and not (isinstance(per_sample, list)
                                       and all(v in (0, 1) for v in per_sample)):
        return False
    values = stored.get("batch_values")
    if values is not None and not (isinstance(values, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        return False
    batches = stored.get("batches", 0)
    return (isinstance(batches, int) and not isinstance(batches, bool) and batches >= 0
            and isinstance(stored.get("partial", False), bool))


class Evaluator:
    """Runs (or recalls) full evaluations and counts the ones the search asked for."""

    def __init__(self, model, metric: Metric, iterations: int, state: SearchState, *,
                 quiet: bool = False, reuse=None):
        self.model = model
        self.metric = metric
        self.iterations = iterations
        self.state = state
        self.quiet = quiet
        self.reuse = reuse     # a search.reuse.PrefixReuse, or None: every pass runs whole
        self.used = 0          # full evaluations the search asked for (run or recalled)
        self.ran = 0           # of which actually run in this process

    def evaluate(self, plan, overrides, *, desc: str = "evaluate",
                 measured: tuple[list, float] | None = None,
                 decide: Callable[[float, float], bool | None] | None = None) -> EvalResult:
        """The metric of ``plan`` (None: FP32) run with ``overrides``, recalled from the state
        when it was run before; ``measured`` = (outcomes, seconds) of a pass that already
        read these batches (the statistics pass measures FP32 on the way). ``decide(low,
        high)`` -> True/False once the bounds settle the verdict, None while they do not:
        the evaluation stops there."""
        key = plan_fingerprint(plan)
        self.used += 1
        stored = self.state.evaluations.get(key)
        if stored is not None:
            return self._recall(stored)
        started = time.time()
        if measured is not None:
            outcomes, seconds = measured
            partial = False
        else:
            outcomes, partial = self._measure(overrides, desc, plan is None, decide,
                                              self._runner(plan, overrides))
            seconds = time.time() - started
        self.ran += 1
        return self._store(key, outcomes, seconds, partial)

    def complete(self, plan, overrides, result: EvalResult, *,
                 desc: str = "complete") -> EvalResult:
        """``result`` (of ``plan``) with its remaining batches read: the exact value."""
        if not result.partial:
            return result
        started = time.time()
        runner = self._runner(plan, overrides)
        rest = measure(self.model, [self.metric], self.iterations, overrides=overrides,
                       desc=desc, quiet=self.quiet, first=result.batches, start=False,
                       reference=plan is None, runner=runner)[0] \
            if len(result.outcomes) == result.batches else None
        if rest is None:  # recalled from a state file without the per-batch outcomes
            outcomes, _ = self._measure(overrides, desc, plan is None, None, runner)
        else:
            outcomes = list(result.outcomes) + rest
        return self._store(plan_fingerprint(plan), outcomes,
                           result.seconds + time.time() - started, False)

    def _runner(self, plan, overrides):
        """The pass that resumes from blobs stored by earlier evaluations (INT8 plans)."""
        return None if plan is None or self.reuse is None else \
            self.reuse.runner(plan, overrides)

    def _measure(self, overrides, desc: str, fp32: bool, decide, runner=None
                 ) -> tuple[list, bool]:
        verdict = {}

        def stop(outcomes):
            if decide is None:
                return False
            bounds = self.metric.bounds(outcomes[0], self.iterations)
            if bounds is None or len(outcomes[0]) >= self.iterations:
                return False
            decided = decide(*bounds)
            if decided is None:
                return False
            verdict["bound"] = bounds[0] if decided else bounds[1]
            return True

        outcomes = measure(self.model, [self.metric], self.iterations, overrides=overrides,
                           reference=fp32, desc=desc, quiet=self.quiet, stop=stop,
                           runner=runner)[0]
        if "bound" in verdict:
            outcomes = _Partial(outcomes, verdict["bound"])
        return outcomes, "bound" in verdict

    def _store(self, key: str, outcomes, seconds: float, partial: bool) -> EvalResult:
        value = outcomes.bound if partial else self.metric.combine(outcomes)
        per_sample = None
        if outcomes and all(o.per_sample is not None for o in outcomes):
            per_sample = np.concatenate([o.per_sample for o in outcomes])
        value, per_sample = distributed.agree((value, per_sample))  # the same on every rank
        self.state.evaluations[key] = {
            "metric": value, "seconds": seconds, "batches": len(outcomes),
            "partial": partial,
            "batch_values": [o.value for o in outcomes] if per_sample is not None else None,
            "per_sample": per_sample.astype(int).tolist() if per_sample is not None else None}
        self.state.save()
        return EvalResult(value, per_sample, seconds, batches=len(outcomes), partial=partial,
                          outcomes=list(outcomes))

    def _recall(self, stored: dict) -> EvalResult:
        per_sample = (np.array(stored["per_sample"], dtype=bool)
                      if stored.get("per_sample") is not None else None)
        outcomes = []
        values = stored.get("batch_values")
        if per_sample is not None and values:
            for value, part in zip(values, np.array_split(per_sample, len(values))):
                outcomes.append(BatchOutcome(value, part))
        return EvalResult(stored["metric"], per_sample, stored["seconds"], cached=True,
                          batches=stored.get("batches", self.iterations),
                          partial=stored.get("partial", False), outcomes=outcomes)


class _Partial(list):
    """The outcomes of an evaluation stopped early, and the bound that decided it."""

    def __init__(self, outcomes, bound: float):
        super().__init__(outcomes)
        self.bound = bound
