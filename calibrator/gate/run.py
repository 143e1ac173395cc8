"""Run the gate: per model, one FP32 pass and one simulated-INT8 pass per INT8 prototxt over
the same ``-i`` batches (the FP32 model's data source feeds both), every metric read in the
same pass, then the verdicts (threshold, and the baseline when one is given)."""

from __future__ import annotations

import json
import math
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from calibrator import __version__
from calibrator.backends import backend_for
from calibrator.errors import CalibratorError
from calibrator.fileio import read_bytes
from calibrator.gate.config import GateConfig, MetricSpec, ModelSpec
from calibrator.metrics import kind_of, loss, make_metric, measure
from calibrator.model import load_model, load_quantized
from calibrator.quant.fusion import analyze
from calibrator.quant.simulate import FoldedFP32

RESULTS_VERSION = 1
_EPS = 1e-6  # metric values are float32 sums: a drop equal to the threshold passes


@dataclass
class CaseResult:
    """One model x INT8 prototxt x metric: a JUnit testcase."""

    model: str
    candidate: str
    metric: str
    kind: str
    fp32: float
    int8: float
    drop: float                  # FP32 - INT8 (INT8 - FP32 when lower is better)
    loss: float                  # drop, or drop / |FP32| when relative
    threshold: float
    relative: bool
    passed: bool
    failures: list[str] = field(default_factory=list)
    baseline: float | None = None
    baseline_margin: float | None = None
    baseline_relative: bool = False

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.model, self.candidate, self.metric)


@dataclass
class CandidateResult:
    model: str
    name: str
    prototxt: str
    int8_layers: int
    seconds: float               # its INT8 pass
    cases: list[CaseResult]

    @property
    def failures(self) -> int:
        return sum(not c.passed for c in self.cases)


@dataclass
class ModelResult:
    name: str
    model: str
    weights: str
    iterations: int
    batch_size: int
    fp32_seconds: float
    fp32: dict[str, float]
    candidates: list[CandidateResult]


@dataclass
class GateResult:
    models: list[ModelResult]
    source: str
    timestamp: str = field(default_factory=lambda: datetime.now(timezone.utc)
                           .isoformat(timespec="seconds"))
    baseline: str | None = None

    @property
    def cases(self) -> list[CaseResult]:
        return [c for m in self.models for cand in m.candidates for c in cand.cases]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def to_json(self) -> dict:
        cases = self.cases
        return {"version": RESULTS_VERSION, "tool": f"calibrator {__version__}",
                "timestamp": self.timestamp, "hostname": socket.gethostname(),
                "config": self.source, "baseline": self.baseline, "passed": self.passed,
                "cases": len(cases), "failures": sum(not c.passed for c in cases),
                "models": [{"name": m.name, "model": m.model, "weights": m.weights,
                            "iterations": m.iterations, "batch_size": m.batch_size,
                            "fp32_seconds": round(m.fp32_seconds, 3), "fp32": m.fp32,
                            "int8": [{"name": c.name, "prototxt": c.prototxt,
                                      "int8_layers": c.int8_layers,
                                      "seconds": round(c.seconds, 3),
                                      "passed": c.failures == 0} for c in m.candidates]}
                           for m in self.models],
                "results": [asdict(c) for c in cases]}

    def history_record(self) -> dict:
        """The line appended to --history: deterministic fields and the timestamp."""
        return {"timestamp": self.timestamp, "passed": self.passed,
                "results": [{"model": c.model, "candidate": c.candidate, "metric": c.metric,
                             "fp32": c.fp32, "int8": c.int8, "loss": c.loss,
                             "threshold": c.threshold, "relative": c.relative,
                             "passed": c.passed} for c in self.cases]}


# -- metrics -------------------------------------------------------------------------------

def default_metrics(net, spec: ModelSpec) -> list[MetricSpec]:
    """Every Accuracy top and DetectionEvaluate top of the TEST net."""
    found = []
    for node in net.nodes:
        if node.type in ("Accuracy", "DetectionEvaluate") and node.tops:
            found.append(MetricSpec(node.tops[0], spec.default_threshold,
                                    spec.default_relative))
    if not found:
        raise CalibratorError(f"{spec.model}: the TEST net has no Accuracy or "
                              "DetectionEvaluate layer: name the metric blobs (-n BLOB)")
    if spec.baseline_margin is not None:
        for m in found:
            m.baseline_margin, m.baseline_relative = spec.baseline_margin
    return found


def resolve_kind(net, metric: MetricSpec, spec: ModelSpec) -> str:
    """The gate's kind of a metric: ``mean`` (an Accuracy top or any blob, averaged as
    ``caffe test`` prints it), ``map`` or ``agreement``."""
    if metric.blob not in net.blob_shapes:
        raise CalibratorError(f"{spec.name}: metric '{metric.blob}': no such blob in the "
                              f"TEST net of {spec.model}")
    if metric.kind != "auto":
        if metric.kind == "map" and kind_of(net, metric.blob) != "map":
            raise CalibratorError(f"{spec.name}: metric '{metric.blob}' (kind map) is not a "
                                  "DetectionEvaluate top")
        return metric.kind
    kind = kind_of(net, metric.blob)
    return "mean" if kind == "accuracy" else kind


# -- verdicts ------------------------------------------------------------------------------

def judge(spec: ModelSpec, candidate: str, metric: MetricSpec, kind: str, fp32: float,
          int8: float, baseline: dict | None, default_margin: tuple[float, bool]
          ) -> CaseResult:
    drop = loss(fp32, int8, False, metric.lower_is_better)
    relative_loss = loss(fp32, int8, metric.relative, metric.lower_is_better)
    case = CaseResult(spec.name, candidate, metric.blob, kind, fp32, int8, drop, relative_loss,
                      metric.threshold, metric.relative, True)
    unit = "relative " if metric.relative else ""
    if not math.isfinite(int8):
        case.failures.append(f"INT8 {metric.blob} is {int8} (FP32 {fp32:.6g})")
    elif relative_loss > metric.threshold + _EPS:
        case.failures.append(
            f"{metric.blob} dropped by {unit}{_fmt_loss(relative_loss, metric.relative)} "
            f"(FP32 {fp32:.6g}, INT8 {int8:.6g}), more than the {unit}threshold "
            f"{metric.describe_threshold()}")
    if baseline is not None:
        previous = baseline.get(case.key)
        if previous is not None:
            margin, relative = ((metric.baseline_margin, metric.baseline_relative)
                                if metric.baseline_margin is not None else default_margin)
            allowed = margin * abs(previous) if relative else margin
            worse = (int8 - previous) if metric.lower_is_better else (previous - int8)
            case.baseline, case.baseline_margin = previous, margin
            case.baseline_relative = relative
            if not math.isfinite(int8) or worse > allowed + _EPS:
                case.failures.append(
                    f"{metric.blob} INT8 {int8:.6g} is worse than the baseline "
                    f"{previous:.6g} by {worse:.6g}, more than the margin "
                    f"{f'{margin * 100:g}%' if relative else f'{margin:g}'}")
    case.passed = not case.failures
    return case


def _fmt_loss(loss: float, relative: bool) -> str:
    return f"{loss * 100:.4g}%" if relative else f"{loss:.6g}"


def read_baseline(path: str | Path) -> dict[tuple[str, str, str], float]:
    """(model, INT8 name, metric) -> INT8 value from an earlier run's --json file."""
    path = Path(path)
    try:
        data = json.loads(read_bytes(path, "baseline").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibratorError(f"{path}: cannot read the baseline ({exc})") from None
    except RecursionError:
        raise CalibratorError(f"{path}: the baseline is nested too deeply") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise CalibratorError(f"{path}: not a `calibrator gate --json` file (no \"results\")")
    out = {}
    for index, item in enumerate(results):
        try:
            key = (str(item["model"]), str(item["candidate"]), str(item["metric"]))
            out[key] = float(item["int8"])
        except (TypeError, KeyError, ValueError):
            raise CalibratorError(f"{path}: results[{index}] lacks model/candidate/metric/"
                                  "int8") from None
    return out


# -- the run -------------------------------------------------------------------------------

def run_gate(config: GateConfig, *, device=None, baseline: str | Path | None = None,
             baseline_margin: tuple[float, bool] = (0.0, False), quiet: bool = False,
             runtime: str | None = None, target: str | None = None,
             ap_version: str | None = None, say=lambda message: None,
             on_load=None) -> GateResult:
    """Judge every INT8 prototxt of ``config``. Each runs as the backend ``runtime`` and
    ``target`` name, or else as the one the prototxt records (see calibrator.backends).
    ``on_load(model)`` sees each FP32 model as soon as it is loaded (the CLI checks its
    outputs against the files the model reads)."""
    device = device or torch.device("cpu")
    previous = read_baseline(baseline) if baseline is not None else None
    models = []
    for spec in config.models:
        fp32 = load_model(spec.model, spec.weights, images=spec.images,
                          detection_list=spec.detection, device=device)
        if on_load is not None:
            on_load(fp32)
        if fp32.source is None:
            raise CalibratorError(f"{spec.model}: nothing feeds the net (no TEST data layer); "
                                  "give the model \"images\" (a folder) or \"detection\"")
        metrics = spec.metrics or default_metrics(fp32.net, spec)
        kinds = [(m, resolve_kind(fp32.net, m, spec)) for m in metrics]
        readers = [make_metric(fp32.net, m.blob, "blob" if kind == "mean" else kind,
                               ap_version=m.ap_version or ap_version) for m, kind in kinds]
        say(f"{spec.name}: FP32, {spec.iterations} batches of {fp32.batch_size}")
        fp32_values, fp32_seconds = _measure(
            fp32, readers, spec.iterations, quiet=quiet, desc=f"{spec.name} FP32",
            overrides=FoldedFP32(analyze(fp32.net, quantize_fc=True)).overrides)
        candidates = []
        for candidate in spec.candidates:
            quantized = load_quantized(fp32, candidate.prototxt, spec.detection)
            backend = backend_for(candidate.prototxt, runtime, target)
            simulator = backend.simulator(quantized.fused, quantized.plan)
            count = len(quantized.plan.layers)
            say(f"{spec.name}: INT8 {candidate.name} ({count} INT8 layers, "
                f"{backend.name}/{backend.target.name})")
            values, seconds = _measure(fp32, readers, spec.iterations, net=quantized.net,
                                       overrides=simulator.overrides, quiet=quiet,
                                       desc=f"{spec.name} {candidate.name}")
            cases = [judge(spec, candidate.name, m, kind, fp32_values[m.blob],
                           values[m.blob], previous, baseline_margin) for m, kind in kinds]
            candidates.append(CandidateResult(spec.name, candidate.name,
                                              str(candidate.prototxt), count, seconds, cases))
        models.append(ModelResult(spec.name, str(spec.model), str(spec.weights),
                                  spec.iterations, fp32.batch_size, fp32_seconds, fp32_values,
                                  candidates))
    return GateResult(models, config.source, baseline=str(baseline) if baseline else None)


def _measure(model, readers, iterations: int, *, net=None, overrides=None, quiet: bool,
             desc: str) -> tuple[dict[str, float], float]:
    """Every metric over ``iterations`` batches in one pass; (blob -> value, seconds). The
    pass on the model's own net is FP32 (the reference of relative metrics)."""
    started = time.time()
    outcomes = measure(model, readers, iterations, net=net, overrides=overrides,
                       reference=net is None, desc=desc, quiet=quiet)
    return ({metric.blob: metric.combine(batches) for metric, batches in zip(readers, outcomes)},
            time.time() - started)
