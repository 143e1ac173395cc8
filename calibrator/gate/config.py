"""What the gate checks: models (an FP32 prototxt + weights and the INT8 prototxts to judge)
and, per model, metrics with their thresholds. Built from the command line or read from a
JSON (or, with PyYAML installed, YAML) file.

Config file (paths relative to the file's folder; ``${NAME}`` and ``${NAME:-default}`` are
replaced by environment variables)::

    {
      "iterations": 10,                 # defaults for every model (all optional)
      "threshold": 0.01, "relative": false, "baseline_margin": 0.0,
      "models": [
        {"name": "mobilenet_v2",
         "model": "test.prototxt", "weights": "w.caffemodel",
         "int8": ["q.prototxt", {"name": "kl", "prototxt": "q_kl.prototxt"}],
         "iterations": 4,
         "metrics": ["accuracy-top1",
                     {"blob": "accuracy-top5", "threshold": 0.5, "relative": true},
                     {"blob": "fc7", "kind": "agreement", "threshold": 0.05}],
         "images": {"folder": "imgs", "mean": [104, 117, 123], "norm": 1.0,
                    "size": [224, 224], "batch_size": 8},
         "detection": {"list": "list.txt", "labelmap": "labelmap.prototxt",
                       "name_size": "name_size.txt", "mean": [104, 177, 123],
                       "size": [300, 300], "batch_size": 8}}
      ]
    }

Runtime and arithmetic: each INT8 prototxt runs as the backend it records (``calibrator``
writes a ``# calibrator: runtime R target T`` line when not the default) unless the
command line gives ``--runtime``/``--target``.

``images`` feeds a deploy net's Input from a folder (as ``--images``); ``detection`` turns a
deploy SSD net (FP32 and INT8 alike) into a TEST net with an AnnotatedData layer reading the
``IMAGE XML`` list and a DetectionEvaluate layer whose mAP (top ``detection_eval``) is the
default metric. Metric kinds: ``mean`` (the blob's mean over the batches, as ``caffe test``
prints it: Accuracy tops, losses, any scalar), ``map`` (a DetectionEvaluate top: the mAP over
all batches, ``ap_version`` 11point unless given, as ``caffe test``), ``agreement`` (a scores blob: share of
samples whose INT8 top-1 equals FP32's). The kind follows the layer producing the blob
unless given. ``threshold`` is the tolerated drop (FP32 - INT8; INT8 - FP32 with
``"lower_is_better": true``), relative to |FP32| with ``relative``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from calibrator.data.options import DetectionListOptions, ImageFolderOptions
from calibrator.data.paths import resolve_path
from calibrator.detection.map import AP_VERSIONS
from calibrator.errors import CalibratorError, shorten
from calibrator.fileio import read_bytes

KINDS = ("auto", "mean", "map", "agreement")
DEFAULT_ITERATIONS = 10
DEFAULT_THRESHOLD = 0.01
_MODEL_KEYS = {"name", "model", "weights", "int8", "iterations", "metrics", "images",
               "detection", "threshold", "relative", "baseline_margin"}
_TOP_KEYS = {"models", "iterations", "threshold", "relative", "baseline_margin"}
_METRIC_KEYS = {"blob", "kind", "threshold", "relative", "lower_is_better", "ap_version",
                "baseline_margin"}


@dataclass
class MetricSpec:
    blob: str
    threshold: float = DEFAULT_THRESHOLD
    relative: bool = False
    kind: str = "auto"
    lower_is_better: bool = False
    ap_version: str | None = None             # None: the run's --ap-version, else 11point
    baseline_margin: float | None = None      # None: the run's --baseline-margin
    baseline_relative: bool = False

    def describe_threshold(self) -> str:
        return f"{self.threshold * 100:g}%" if self.relative else f"{self.threshold:g}"


@dataclass
class Candidate:
    """One INT8 prototxt judged against its model's FP32 run."""

    name: str
    prototxt: Path


@dataclass
class ModelSpec:
    name: str
    model: Path
    weights: Path
    candidates: list[Candidate]
    iterations: int = DEFAULT_ITERATIONS
    metrics: list[MetricSpec] = field(default_factory=list)  # empty: the net's defaults
    default_threshold: float = DEFAULT_THRESHOLD
    default_relative: bool = False
    images: ImageFolderOptions | None = None
    detection: DetectionListOptions | None = None
    baseline_margin: tuple[float, bool] | None = None  # for metrics that set none


@dataclass
class GateConfig:
    models: list[ModelSpec]
    source: str = "command line"


# -- thresholds written as text: "0.01", "1%" ----------------------------------------------

def parse_threshold(text: str, what: str, relative: bool = False) -> tuple[float, bool]:
    """``"0.02"`` -> (0.02, relative); ``"1.5%"`` -> (0.015, True)."""
    text = str(text).strip()
    percent = text.endswith("%")
    try:
        value = float(text[:-1] if percent else text)
    except ValueError:
        raise CalibratorError(f"{what}: '{text}' is not a number (e.g. 0.01 or 1%)") from None
    if not value >= 0 or value == float("inf"):
        raise CalibratorError(f"{what}: must be a finite number >= 0, got '{text}'")
    return (value / 100.0, True) if percent else (value, relative)


def parse_metric_arg(text: str, default: float, relative: bool,
                     kind: str = "auto") -> MetricSpec:
    """``-n BLOB[=LOSS[%]]`` (and ``--agreement BLOB[=LOSS[%]]`` with kind agreement)."""
    blob, sep, loss = text.rpartition("=") if "=" in text else (text, "", "")
    blob = blob.strip()
    if not blob:
        raise CalibratorError(f"-n '{text}': empty blob name (use -n BLOB or -n BLOB=LOSS)")
    threshold, rel = (parse_threshold(loss, f"-n {text}", relative) if sep
                      else (default, relative))
    return MetricSpec(blob, threshold, rel, kind)


# -- config files --------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(text: str, where: str) -> str:
    """``${NAME}`` / ``${NAME:-default}`` from the environment; an unset NAME without a
    default is an error (the config cannot mean an empty path)."""
    def substitute(match):
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise CalibratorError(f"{where}: environment variable {name} is not set")

    return _VAR.sub(substitute, os.path.expanduser(text))


def load_config_data(path: Path):
    try:
        text = read_bytes(path, "gate config").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibratorError(f"{shorten(path)}: cannot read the gate config ({exc})") \
            from None
    try:
        return _parse_config_text(text, path)
    except RecursionError:
        raise CalibratorError(f"{shorten(path)}: the gate config is nested too deeply") \
            from None


def _parse_config_text(text: str, path: Path):
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # optional (the yaml extra): only YAML configs need it
        except ImportError:
            raise CalibratorError(f"{path}: YAML configs need PyYAML (pip install pyyaml); "
                                  "or write the config as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            first = str(exc).replace("\n", " ")
            raise CalibratorError(f"{shorten(path)}: not valid YAML: {shorten(first)}") \
                from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibratorError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} "
                              f"column {exc.colno}") from None


class _Reader:
    """Typed access to one mapping of the config, errors naming the file and the key."""

    def __init__(self, data, where: str, base: Path, allowed: set[str]):
        if not isinstance(data, dict):
            raise CalibratorError(f"{where}: expected a mapping (JSON object), got "
                                  f"{type(data).__name__}")
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise CalibratorError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                                  f"(known: {', '.join(sorted(allowed))})")
        self.data, self.where, self.base = data, where, base

    def at(self, key) -> str:
        return f"{self.where}.{key}"

    def get(self, key, kind, default=None, required=False):
        if key not in self.data or self.data[key] is None:
            if required:
                raise CalibratorError(f"{self.where}: missing required key '{key}'")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is bool and isinstance(value, bool):
            return value
        if kind is str and isinstance(value, str) and value:
            return value
        if kind is list and isinstance(value, list):
            return value
        if kind is dict and isinstance(value, dict):
            return value
        raise CalibratorError(f"{self.at(key)}: expected {kind.__name__}, got {value!r}")

    def path(self, key, required=True, must_exist=True, what="file") -> Path | None:
        value = self.get(key, str, required=required)
        if value is None:
            return None
        return config_path(value, self.base, self.at(key), must_exist, what)

    def numbers(self, key, count, kind=float, default=None):
        value = self.get(key, list, default=None)
        if value is None:
            return default
        if len(value) != count or not all(isinstance(v, (int, float))
                                          and not isinstance(v, bool) for v in value):
            raise CalibratorError(f"{self.at(key)}: expected {count} numbers, got {value!r}")
        return tuple(kind(v) for v in value)


def config_path(value: str, base: Path, where: str, must_exist: bool = True,
                what: str = "file") -> Path:
    """A path in the config: ``${NAME}`` expanded, then resolved as prototxt paths are
    (the config's folder first, then the working directory)."""
    text = expand(value, where)
    found = resolve_path(text, base)
    if found is None:
        if must_exist:
            raise CalibratorError(f"{where}: {what} not found: {base / text}")
        return base / text
    return found


def _metric(data, where: str, base: Path, default: float, relative: bool) -> MetricSpec:
    if isinstance(data, str):
        return parse_metric_arg(data, default, relative)
    r = _Reader(data, where, base, _METRIC_KEYS)
    kind = r.get("kind", str, "auto")
    if kind not in KINDS:
        raise CalibratorError(f"{r.at('kind')}: '{kind}' is not one of {', '.join(KINDS)}")
    rel = r.get("relative", bool, None)
    threshold = None
    if isinstance(r.data.get("threshold"), str):  # "1%" (or "0.01")
        threshold, rel = parse_threshold(r.data["threshold"], r.at("threshold"),
                                         relative if rel is None else rel)
    elif r.get("threshold", float, None) is not None:
        threshold, _ = parse_threshold(str(r.data["threshold"]), r.at("threshold"))
    margin, margin_rel = None, False
    if "baseline_margin" in r.data:
        margin, margin_rel = parse_threshold(str(r.data["baseline_margin"]),
                                             r.at("baseline_margin"))
    ap_version = r.get("ap_version", str, None)
    if ap_version is not None and ap_version not in AP_VERSIONS:
        raise CalibratorError(f"{r.at('ap_version')}: '{ap_version}' is not one of "
                              f"{', '.join(AP_VERSIONS)}")
    return MetricSpec(r.get("blob", str, required=True),
                      default if threshold is None else threshold,
                      relative if rel is None else rel, kind,
                      r.get("lower_is_better", bool, False), ap_version, margin, margin_rel)


def _images(data, where: str, base: Path) -> ImageFolderOptions:
    r = _Reader(data, where, base, {"folder", "mean", "norm", "size", "batch_size"})
    return ImageFolderOptions(r.path("folder", what="image folder"), r.numbers("mean", 3,
                                                                       default=(0., 0., 0.)),
                      r.get("norm", float, 1.0), r.numbers("size", 2, int),
                      r.get("batch_size", int))


def _detection(data, where: str, base: Path) -> DetectionListOptions:
    r = _Reader(data, where, base, {"list", "labelmap", "name_size", "mean", "norm", "size",
                                    "batch_size"})
    return DetectionListOptions(r.path("list", what="image/XML list"),
                         r.path("labelmap", what="label map"),
                         r.path("name_size", required=False, what="name/size file"),
                         r.numbers("mean", 3, default=(0., 0., 0.)), r.get("norm", float, 1.0),
                         r.numbers("size", 2, int), r.get("batch_size", int))


def _int8(item, where: str, base: Path) -> Candidate:
    if isinstance(item, str):
        path = config_path(item, base, where, what="INT8 prototxt")
        return Candidate(candidate_name(path), path)
    r = _Reader(item, where, base, {"name", "prototxt"})
    path = r.path("prototxt", what="INT8 prototxt")
    return Candidate(r.get("name", str, candidate_name(path)), path)


def candidate_name(path: Path) -> str:
    return path.name[:-len(path.suffix)] if path.suffix else path.name


def parse_config(data, source: str, base: Path, *, iterations: int | None = None
                 ) -> GateConfig:
    top = _Reader(data, source, base, _TOP_KEYS)
    default_iterations = top.get("iterations", int, DEFAULT_ITERATIONS)
    default_threshold, default_relative = DEFAULT_THRESHOLD, top.get("relative", bool, False)
    if "threshold" in top.data:
        default_threshold, default_relative = parse_threshold(
            str(top.data["threshold"]), top.at("threshold"), default_relative)
    top_margin = top.data.get("baseline_margin")
    entries = top.get("models", list, required=True)
    if not entries:
        raise CalibratorError(f"{top.at('models')}: lists no model")
    models, names = [], set()
    for index, entry in enumerate(entries):
        where = f"{source}: models[{index}]"
        r = _Reader(entry, where, base, _MODEL_KEYS)
        model = r.path("model", what="FP32 prototxt")
        name = r.get("name", str, candidate_name(model))
        if name in names:
            raise CalibratorError(f"{where}: a model named '{name}' is already listed")
        names.add(name)
        threshold, relative = default_threshold, r.get("relative", bool, default_relative)
        if "threshold" in r.data:
            threshold, relative = parse_threshold(str(r.data["threshold"]), r.at("threshold"),
                                                  relative)
        int8 = r.data.get("int8")
        if isinstance(int8, (str, dict)):
            int8 = [int8]
        if not isinstance(int8, list) or not int8:
            raise CalibratorError(f"{where}: 'int8' must list at least one INT8 prototxt")
        candidates = [_int8(item, f"{r.at('int8')}[{i}]", base) for i, item in enumerate(int8)]
        if len({c.name for c in candidates}) != len(candidates):
            raise CalibratorError(f"{r.at('int8')}: two INT8 prototxts share a name; give "
                                  "each a \"name\"")
        metrics = [_metric(m, f"{r.at('metrics')}[{i}]", base, threshold, relative)
                   for i, m in enumerate(r.get("metrics", list, []))]
        spec = ModelSpec(name, model, r.path("weights", what="weights"), candidates,
                         iterations or r.get("iterations", int, default_iterations), metrics,
                         threshold, relative)
        margin = r.data.get("baseline_margin", top_margin)
        if margin is not None:
            spec.baseline_margin = parse_threshold(str(margin), r.at("baseline_margin"))
            for m in metrics:
                if m.baseline_margin is None:
                    m.baseline_margin, m.baseline_relative = spec.baseline_margin
        if "images" in r.data:
            spec.images = _images(r.data["images"], r.at("images"), base)
        if "detection" in r.data:
            spec.detection = _detection(r.data["detection"], r.at("detection"), base)
        if spec.images and spec.detection:
            raise CalibratorError(f"{where}: give 'images' or 'detection', not both")
        if spec.iterations < 1:
            raise CalibratorError(f"{r.at('iterations')}: must be at least 1")
        models.append(spec)
    return GateConfig(models, source)


def read_config(path: str | os.PathLike, *, iterations: int | None = None) -> GateConfig:
    path = Path(path)
    data = load_config_data(path)
    return parse_config(data, str(path), path.resolve().parent, iterations=iterations)
