"""Real INT8 kernels against the simulation: the exported ONNX model on ONNX Runtime's CPU
kernels, and the simulation under each target, on the same TEST batches.

The ONNX part of the net runs in ORT; whatever it leaves out (Accuracy, DetectionOutput, ...)
runs in our PyTorch graph on ORT's outputs, so ORT's metric is computed by the same layers as
the simulation's. For each target we report the metric, the agreement of the arg-max of the
score blob (the bottom of the Accuracy layer) with ORT's, and optionally per-layer output
differences (ORT's quantized unit outputs against the simulation's, in quanta)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from calibrator import ort_worker
from calibrator.backends import IntelBackend
from calibrator.backends.ort import OrtGraph, graph_simulator, read_ort_graph
from calibrator.data.feed import batches
from calibrator.errors import CalibratorError
from calibrator.export.qdq import ExportResult, build_onnx
from calibrator.metrics import primary_accuracy_layer
from calibrator.quant.targets import get_target


@dataclass
class LayerDiff:
    name: str
    elements: int
    differing: float       # fraction of outputs whose integer differs
    mean_quanta: float     # mean |ORT - simulation| in output quanta
    max_quanta: float


@dataclass
class VerifyResult:
    metrics: "OrderedDict[str, OrderedDict[str, float]]"   # run -> output blob -> mean
    agreement: dict[str, float]        # run -> arg-max agreement with ORT on the score blob
    score_diff: dict[str, float]       # run -> mean |score - ORT score|
    score_blob: str | None
    images: int
    layers: dict[str, list[LayerDiff]] = field(default_factory=dict)  # target -> worst first
    saturation: dict[str, dict] = field(default_factory=dict)  # target -> layer -> record
    speed: dict[str, float] = field(default_factory=dict)      # seconds per batch
    export: ExportResult | None = None
    ort_device: str = "this CPU"
    float_units: list[str] = field(default_factory=list)  # quantized, float convs in ORT
    notes: list[str] = field(default_factory=list)


def score_blob(test_param) -> str | None:
    """The first bottom of the Accuracy layer with the smallest top_k (the class scores)."""
    layer = primary_accuracy_layer(test_param.layer)
    return layer.bottom[0] if layer is not None else None


def _ort_outputs(model_bytes: bytes, feeds_list: list[dict], command: str | None,
                 repeat: int = 1, threads: int | None = None):
    """[(outputs, seconds)] per batch: in this process, or through ``command`` (a prefix
    such as ``qemu-x86_64 -cpu Haswell``) running calibrator.ort_worker."""
    if not command:
        try:
            session = ort_worker.make_session(model_bytes, threads)
        except ImportError:
            raise CalibratorError("calibrator verify needs onnxruntime: pip install "
                                  "onnxruntime") from None
        return ort_worker.run_batches(session, feeds_list, repeat)
    with tempfile.TemporaryDirectory(prefix="calibrator-ort-") as tmp:
        model_path = Path(tmp) / "model.onnx"
        model_path.write_bytes(model_bytes)
        arrays = {f"{i}/{k}": v for i, feeds in enumerate(feeds_list) for k, v in feeds.items()}
        np.savez(Path(tmp) / "in.npz", **arrays)
        argv = shlex.split(command) + [sys.executable, "-m", "calibrator.ort_worker",
                                       str(model_path), str(Path(tmp) / "in.npz"),
                                       str(Path(tmp) / "out.npz"), "--repeat", str(repeat)]
        if threads:
            argv += ["--threads", str(threads)]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise CalibratorError(f"--ort-command failed ({done.returncode}): "
                                  + " | ".join(tail))
        data = np.load(Path(tmp) / "out.npz")
        out = [dict() for _ in feeds_list]
        for key in data.files:
            if key == "seconds":
                continue
            batch, name = key.split("/", 1)
            out[int(batch)][name] = data[key]
        seconds = list(data["seconds"])
        return list(zip(out, seconds))


def _ort_overrides(export: ExportResult, values: dict):
    """CaffeNet overrides that make the exported nodes write ORT's outputs."""
    by_version = {version: name for name, version in export.outputs.items()}

    def override(node, blobs):
        tops = []
        for top in node.tops:
            name = by_version.get((node.index, top))
            tops.append(None if name is None else torch.from_numpy(np.asarray(values[name])))
        return tuple(tops)

    return {index: override for index in export.exported}


class _Means:
    def __init__(self):
        self.sums: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self.count = 0

    def add(self, outputs: dict, names):
        self.count += 1
        for name in names:
            value = outputs.get(name)
            if value is None:
                continue
            value = value.detach().double().cpu().numpy() if torch.is_tensor(value) else \
                np.asarray(value, np.float64)
            if value.size > 16:
                continue
            if name not in self.sums:
                self.sums[name] = value.copy()
            elif self.sums[name] is not None and self.sums[name].shape == value.shape:
                self.sums[name] += value
            else:
                self.sums[name] = None

    def means(self) -> "OrderedDict[str, float]":
        return OrderedDict((k, float(np.mean(v)) / self.count) for k, v in self.sums.items()
                           if v is not None)


def _scores(tensor) -> np.ndarray:
    value = tensor.detach().float().cpu().numpy() if torch.is_tensor(tensor) else tensor
    return value.reshape(value.shape[0], -1)


def _simulator(fused, plan, target_name: str, graph: OrtGraph, as_exported: bool,
               saturation: dict | None = None):
    """(simulator, Target) of ``target_name``: of the graph ORT runs (``as_exported``,
    see ``calibrator.backends.ort.graph_simulator``), else of Intel's fused kernels."""
    target = get_target(target_name)
    if as_exported:
        return graph_simulator(fused, plan, graph, target, saturation), target
    return IntelBackend(target).simulator(fused, plan, saturation=saturation), target


def verify(model, fused, plan, *, iterations: int, target_names=("vnni", "avx2"),
           ort_command: str | None = None, layer_images: int = 0, speed: bool = False,
           residual: str = "requant", fp32: bool = True, threads: int | None = None,
           record_saturation: bool = True, quiet: bool = False, say=None,
           export: ExportResult | None = None, as_exported: bool = True) -> VerifyResult:
    """Run ORT and the simulation (one per target) on ``iterations`` TEST batches.

    With ``as_exported`` each target simulates the graph ORT runs (see ``_simulator``);
    without, it simulates Intel's fused kernels (every quantized unit INT8, residual added
    before the one rounding)."""
    say = say or (lambda message: None)
    net = model.net
    if export is None:
        export = build_onnx(net, fused, plan, residual=residual)
    model_bytes = export.model.SerializeToString()
    graph = read_ort_graph(export, model_bytes)
    float_units = graph.float_units
    blob = score_blob(model.test_param)
    output_names = list(net.output_names)
    wanted = output_names + ([blob] if blob and blob not in output_names else [])
    feeds_cpu = []
    for _, feeds in batches(model, iterations, desc="data", quiet=quiet):
        feeds_cpu.append({k: v.detach().cpu() for k, v in feeds.items()})
    onnx_feeds = [{name: f[name].numpy().astype(np.float32) for name in export.inputs}
                  for f in feeds_cpu]
    say(f"ONNX Runtime: {len(onnx_feeds)} batches"
        + (f" through '{ort_command}'" if ort_command else ""))
    ort_results = _ort_outputs(model_bytes, onnx_feeds, ort_command, threads=threads)

    runs: OrderedDict[str, _Means] = OrderedDict()
    scores: dict[str, list[np.ndarray]] = {}
    simulators = OrderedDict()
    saturation = {}
    for name in target_names:
        target = get_target(name)
        records = {} if record_saturation and target.pair_saturation else None
        sim, target = _simulator(fused, plan, name, graph, as_exported, records)
        simulators[f"sim:{target.name}"] = (sim, target)
        if records is not None:
            saturation[target.name] = records
    run_names = (["fp32"] if fp32 else []) + list(simulators) + ["ort"]
    for name in run_names:
        runs[name] = _Means()
        scores[name] = []
    images = 0
    with torch.no_grad():
        for index, feeds in enumerate(feeds_cpu):
            feeds = {k: v.to(model.device) for k, v in feeds.items()}
            images += next(iter(feeds.values())).shape[0]
            ort_values = ort_results[index][0]
            outs = {"ort": net(feeds, outputs=wanted,
                               overrides=_ort_overrides(export, ort_values))}
            if fp32:
                outs["fp32"] = net(feeds, outputs=wanted)
            for name, (sim, _) in simulators.items():
                outs[name] = net(feeds, outputs=wanted, overrides=sim.overrides)
            for name, values in outs.items():
                runs[name].add(values, output_names)
                if blob and blob in values:
                    scores[name].append(_scores(values[blob]))
            say(f"batch {index + 1}/{len(feeds_cpu)}")
    agreement, score_diff = {}, {}
    if blob and scores["ort"]:
        ort_scores = np.concatenate(scores["ort"])
        for name in run_names:
            mine = np.concatenate(scores[name])
            agreement[name] = float(np.mean(mine.argmax(1) == ort_scores.argmax(1)))
            score_diff[name] = float(np.mean(np.abs(mine - ort_scores)))
    result = VerifyResult(OrderedDict((k, v.means()) for k, v in runs.items()), agreement,
                          score_diff, blob, images, export=export,
                          ort_device=ort_command or "this CPU")
    result.notes.extend(export.notes)
    result.float_units = sorted(float_units)
    if float_units:
        result.notes.append(f"{len(float_units)} quantized layers run as float convs in ORT "
                            f"(no INT8 kernel: {', '.join(sorted(float_units)[:4])}"
                            f"{', ...' if len(float_units) > 4 else ''})"
                            + ("; the targets simulate them exactly" if as_exported else ""))
    if as_exported:
        result.notes.append(f"the targets simulate ORT's graph: its float32 requantization of "
                            f"{len(graph.requant)} INT8 kernels"
                            + (f", {len(export.mid_scales)} residual convs rounded before a "
                               "QLinearAdd" if export.mid_scales else ""))
    result.saturation = {name: records for name, records in saturation.items() if records}
    if layer_images:
        result.layers = layer_differences(model, fused, plan, feeds_cpu[0], layer_images,
                                          [t for _, t in simulators.values()], residual,
                                          ort_command, threads, as_exported)
    if speed:
        result.speed = measure_speed(net, fused, model_bytes, onnx_feeds[0], ort_command,
                                     threads)
    return result


def layer_differences(model, fused, plan, feeds, images: int, target_list, residual,
                      ort_command, threads, as_exported: bool = True
                      ) -> dict[str, list[LayerDiff]]:
    """Per quantized unit with INT8 output: ORT's integers against each target's simulation
    on the first ``images`` images of one batch, worst (most differing) first."""
    net = model.net
    export = build_onnx(net, fused, plan, residual=residual, unit_outputs=True)
    feeds = {k: v[:images] for k, v in feeds.items()}
    onnx_feeds = {name: feeds[name].numpy().astype(np.float32) for name in export.inputs}
    values, _ = _ort_outputs(export.model.SerializeToString(), [onnx_feeds], ort_command,
                             threads=threads)[0]
    last_of = {fused.by_name[name].last.index: name for name in export.unit_outputs}
    graph = read_ort_graph(export)
    out = {}
    for target in target_list:
        sim, _ = _simulator(fused, plan, target.name, graph, as_exported)
        captured = {}

        def hook(node, tops):
            name = last_of.get(node.index)
            if name is not None:
                captured[name] = tops[0].detach().double().cpu().numpy()
            return None

        with torch.no_grad():
            net({k: v.to(model.device) for k, v in feeds.items()}, overrides=sim.overrides,
                hook=hook, outputs=[])
        diffs = []
        for name, (onnx_name, scale_out, zp, _) in export.unit_outputs.items():
            if name not in captured or onnx_name not in values:
                continue
            ort_q = values[onnx_name].astype(np.float64) - zp
            sim_q = np.round(captured[name] * scale_out)
            delta = np.abs(ort_q - sim_q)
            diffs.append(LayerDiff(name, int(delta.size), float(np.mean(delta > 0)),
                                   float(delta.mean()), float(delta.max())))
        diffs.sort(key=lambda d: (d.differing, d.mean_quanta), reverse=True)
        out[target.name] = diffs
    return out


def measure_speed(net, fused, int8_bytes: bytes, feeds: dict, ort_command, threads,
                  repeat: int = 5) -> dict[str, float]:
    """Median seconds per batch of the INT8 and the FP32 ONNX models."""
    fp32 = build_onnx(net, fused, None)
    int8_time = _ort_outputs(int8_bytes, [feeds], ort_command, repeat, threads)[0][1]
    fp32_time = _ort_outputs(fp32.model.SerializeToString(), [feeds], ort_command, repeat,
                             threads)[0][1]
    return {"int8": float(int8_time), "fp32": float(fp32_time),
            "speedup": float(fp32_time / int8_time) if int8_time else 0.0}


def format_report(result: VerifyResult) -> str:
    """The side-by-side tables ``calibrator verify`` prints."""
    lines = []
    metrics = list(next(iter(result.metrics.values())).keys()) if result.metrics else []
    header = ["run"] + metrics + ([f"top-1 agreement with ORT ({result.score_blob})",
                                   "mean |score diff|"] if result.agreement else [])
    rows = []
    for run, values in result.metrics.items():
        label = "ORT real kernels (" + result.ort_device + ")" if run == "ort" else run
        row = [label] + [f"{values.get(m, float('nan')):.4f}" for m in metrics]
        if result.agreement:
            row += [f"{result.agreement.get(run, float('nan')):.4f}",
                    f"{result.score_diff.get(run, float('nan')):.4g}"]
        rows.append(row)
    lines.append(_table(header, rows))
    lines.append(f"{result.images} images; ONNX part: {len(result.export.exported)} layers"
                 + (f"; run in PyTorch after it: {len(result.export.left_out)}"
                    if result.export.left_out else ""))
    for target, records in result.saturation.items():
        worst = sorted(records.items(), key=lambda kv: kv[1].relative_error, reverse=True)
        if worst:
            lines.append(f"\n{target}: layers where pairs saturated (worst 8 of {len(worst)}):")
            lines.append(_table(["layer", "outputs changed", "relative |error|"],
                                [[n, f"{r.changed_fraction:.2e}", f"{r.relative_error:.3g}"]
                                 for n, r in worst[:8]]))
    for target, diffs in result.layers.items():
        lines.append(f"\nper-layer INT8 outputs, ORT vs simulation ({target}), worst 8:")
        lines.append(_table(["layer", "elements", "differing", "mean quanta", "max quanta"],
                            [[d.name, d.elements, f"{d.differing:.4f}",
                              f"{d.mean_quanta:.4f}", f"{d.max_quanta:g}"] for d in diffs[:8]]))
    if result.speed:
        lines.append(f"\nORT speed per batch: INT8 {result.speed['int8'] * 1000:.1f} ms, "
                     f"FP32 {result.speed['fp32'] * 1000:.1f} ms "
                     f"(x{result.speed['speedup']:.2f})")
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _table(header, rows) -> str:
    return tabulate(rows, headers=header, tablefmt="github")


def result_record(result: VerifyResult) -> dict:
    """JSON-ready form of a VerifyResult."""
    return {
        "metrics": result.metrics, "agreement": result.agreement,
        "score_diff": result.score_diff, "score_blob": result.score_blob,
        "images": result.images, "ort_device": result.ort_device, "speed": result.speed,
        "saturation": {t: {n: vars(r) for n, r in recs.items()}
                       for t, recs in result.saturation.items()},
        "layers": {t: [vars(d) for d in diffs] for t, diffs in result.layers.items()},
        "left_out": result.export.left_out if result.export else [],
        "float_units": result.float_units,
        "notes": result.notes,
    }
