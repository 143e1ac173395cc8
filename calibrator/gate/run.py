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

import numpy as np
import torch

from calibrator.errors import CalibratorError
from calibrator.gate.config import DetectionSpec, GateConfig, MetricSpec, ModelSpec

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
        from calibrator import __version__

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


# -- loading -------------------------------------------------------------------------------

def _with_detection(net_param, spec: DetectionSpec):
    from calibrator.detection.deploy import add_detection_evaluation

    return add_detection_evaluation(net_param, spec.list, spec.labelmap, spec.name_size,
                                    spec.mean, spec.norm, spec.size, batch_size=spec.batch_size)


def _images_options(spec: ModelSpec):
    from calibrator.model import ImageFolderOptions

    if spec.images is None:
        return None
    i = spec.images
    return ImageFolderOptions(str(i.folder), tuple(i.mean), i.norm,
                              tuple(i.size) if i.size else None, i.batch_size)


def load_fp32(spec: ModelSpec, device):
    """The FP32 model (its data source feeds every pass of this model)."""
    from calibrator.caffe import caffe_pb2
    from calibrator.caffe.caffemodel import read_caffemodel
    from calibrator.caffe.netstate import filter_net
    from calibrator.caffe.prototxt import read_net
    from calibrator.graph.net import CaffeNet
    from calibrator.model import Model, build_source

    net_param = read_net(spec.model)
    if spec.detection is not None:
        net_param = _with_detection(net_param, spec.detection)
    test_param = filter_net(net_param, caffe_pb2.TEST)
    weights = read_caffemodel(spec.weights)
    source = build_source(test_param, spec.model.parent, _images_options(spec))
    if source is None:
        raise CalibratorError(f"{spec.model}: nothing feeds the net (no TEST data layer); "
                              "give the model \"images\" (a folder) or \"detection\"")
    net = CaffeNet(test_param, weights, source.top_shapes(), source=str(spec.model))
    net.to(device).eval()
    return Model(spec.model, spec.weights, net_param, test_param, weights, net, source, device)


def _signature(test_param) -> list[tuple]:
    from calibrator.graph.net import DATA_LAYER_TYPES

    return [(l.name, l.type, tuple(l.bottom), tuple(l.top)) for l in test_param.layer
            if l.type not in DATA_LAYER_TYPES]


def load_int8(fp32, spec: ModelSpec, prototxt: Path, device):
    """The INT8 prototxt's TEST net on the FP32 weights and inputs, and its simulator."""
    from calibrator.caffe import caffe_pb2
    from calibrator.caffe.netstate import filter_net
    from calibrator.caffe.prototxt import read_net
    from calibrator.graph.net import CaffeNet
    from calibrator.quant.fusion import analyze
    from calibrator.quant.params import from_proto, has_quantization
    from calibrator.quant.simulate import Int8Simulator

    net_param = read_net(prototxt)
    if not has_quantization(net_param):
        raise CalibratorError(f"{prototxt}: no layer carries quantization_param (not an "
                              "INT8 prototxt)")
    if spec.detection is not None:
        net_param = _with_detection(net_param, spec.detection)
    test_param = filter_net(net_param, caffe_pb2.TEST)
    ours, theirs = _signature(test_param), _signature(fp32.test_param)
    if ours != theirs:
        where = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                     min(len(ours), len(theirs)))
        what = (f"layer {where}: {ours[where][:2]} vs FP32 {theirs[where][:2]}"
                if where < min(len(ours), len(theirs))
                else f"{len(ours)} layers vs {len(theirs)} in the FP32 net")
        raise CalibratorError(f"{prototxt}: not the INT8 form of {spec.model} ({what})")
    net = CaffeNet(test_param, fp32.weights, fp32.source.top_shapes(), source=str(prototxt))
    net.to(device).eval()
    fused = analyze(net, quantize_fc=True)
    plan = from_proto(fused)
    return net, Int8Simulator(fused, plan, device), len(plan.layers)


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
    if metric.blob not in net.blob_shapes:
        raise CalibratorError(f"{spec.name}: metric '{metric.blob}': no such blob in the "
                              f"TEST net of {spec.model}")
    producers = [n for n in net.nodes if metric.blob in n.tops]
    if metric.kind != "auto":
        if metric.kind == "map" and (not producers or producers[-1].type
                                     != "DetectionEvaluate"):
            raise CalibratorError(f"{spec.name}: metric '{metric.blob}' (kind map) is not a "
                                  "DetectionEvaluate top")
        return metric.kind
    if producers and producers[-1].type == "DetectionEvaluate":
        return "map"
    return "mean"


class _Reader:
    """Accumulates one metric over the batches of one pass."""

    def __init__(self, metric: MetricSpec, kind: str, agreement=None):
        self.metric, self.kind, self.agreement = metric, kind, agreement
        self.values: list[float] = []
        self.outcomes = []
        self.accumulator = None
        if kind == "map":
            from calibrator.detection.map import DetectionAccumulator

            self.accumulator = DetectionAccumulator()

    def outputs(self) -> list[str]:
        if self.kind == "agreement":
            return self.agreement.outputs()
        return [self.metric.blob]

    def add(self, outputs, fp32: bool) -> None:
        if self.kind == "map":
            self.accumulator.add(outputs[self.metric.blob])
        elif self.kind == "agreement":
            if fp32:
                self.agreement.remember(outputs)
            self.outcomes.append(self.agreement.read(outputs))
        else:
            self.values.append(float(outputs[self.metric.blob].double().mean()))

    def value(self) -> float:
        if self.kind == "map":
            return self.accumulator.mean_ap(self.metric.ap_version)
        if self.kind == "agreement":
            return self.agreement.combine(self.outcomes)
        return float(np.mean(self.values))


def _reset_detection_counters(net) -> None:
    try:
        from calibrator.graph.layers.detection_evaluate import reset_state
    except ImportError:  # pragma: no cover - detection layers not present
        return
    reset_state(net)


def measure(model, net, metrics: list[tuple[MetricSpec, str]], iterations: int, *,
            overrides=None, agreement: dict | None = None, quiet: bool = False,
            desc: str = "gate") -> tuple[dict[str, float], float]:
    """Every metric over ``iterations`` batches in one pass; (values, seconds)."""
    from calibrator.evaluation import batches

    readers = [_Reader(m, kind, (agreement or {}).get(m.blob)) for m, kind in metrics]
    wanted = sorted({blob for r in readers for blob in r.outputs()})
    _reset_detection_counters(net)
    started = time.time()
    with torch.no_grad():
        for _, feeds in batches(model, iterations, desc=desc, quiet=quiet):
            outputs = net(feeds, outputs=wanted, overrides=overrides)
            for reader in readers:
                reader.add(outputs, fp32=overrides is None)
    return {r.metric.blob: r.value() for r in readers}, time.time() - started


# -- verdicts ------------------------------------------------------------------------------

def judge(spec: ModelSpec, candidate: str, metric: MetricSpec, kind: str, fp32: float,
          int8: float, baseline: dict | None, default_margin: tuple[float, bool]
          ) -> CaseResult:
    drop = (int8 - fp32) if metric.lower_is_better else (fp32 - int8)
    loss = drop / abs(fp32) if metric.relative and fp32 else drop
    case = CaseResult(spec.name, candidate, metric.blob, kind, fp32, int8, drop, loss,
                      metric.threshold, metric.relative, True)
    unit = "relative " if metric.relative else ""
    if not math.isfinite(int8):
        case.failures.append(f"INT8 {metric.blob} is {int8} (FP32 {fp32:.6g})")
    elif loss > metric.threshold + _EPS:
        case.failures.append(
            f"{metric.blob} dropped by {unit}{_fmt_loss(loss, metric.relative)} "
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
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibratorError(f"{path}: baseline not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibratorError(f"{path}: cannot read the baseline ({exc})") from None
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
             say=lambda message: None) -> GateResult:
    from calibrator.search.agreement import AgreementMetric

    device = device or torch.device("cpu")
    previous = read_baseline(baseline) if baseline is not None else None
    models = []
    for spec in config.models:
        fp32 = load_fp32(spec, device)
        metrics = spec.metrics or default_metrics(fp32.net, spec)
        kinds = [(m, resolve_kind(fp32.net, m, spec)) for m in metrics]
        agreement = {m.blob: AgreementMetric(fp32.net, m.blob) for m, k in kinds
                     if k == "agreement"}
        say(f"{spec.name}: FP32, {spec.iterations} batches of {fp32.batch_size}")
        fp32_values, fp32_seconds = measure(fp32, fp32.net, kinds, spec.iterations,
                                            agreement=agreement, quiet=quiet,
                                            desc=f"{spec.name} FP32")
        candidates = []
        for candidate in spec.candidates:
            net, simulator, count = load_int8(fp32, spec, candidate.prototxt, device)
            say(f"{spec.name}: INT8 {candidate.name} ({count} INT8 layers)")
            values, seconds = measure(fp32, net, kinds, spec.iterations,
                                      overrides=simulator.overrides, agreement=agreement,
                                      quiet=quiet, desc=f"{spec.name} {candidate.name}")
            cases = [judge(spec, candidate.name, m, kind, fp32_values[m.blob],
                           values[m.blob], previous, baseline_margin) for m, kind in kinds]
            candidates.append(CandidateResult(spec.name, candidate.name,
                                              str(candidate.prototxt), count, seconds, cases))
        models.append(ModelResult(spec.name, str(spec.model), str(spec.weights),
                                  spec.iterations, fp32.batch_size, fp32_seconds, fp32_values,
                                  candidates))
    return GateResult(models, config.source, baseline=str(baseline) if baseline else None)
