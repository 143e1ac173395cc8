"""``calibrator verify --runtime ncnn``: the INT8 ncnn model on ncnn's real kernels (the
optional ``ncnn`` package), side by side with the ``--runtime ncnn`` simulation and FP32 on
the same TEST batches: the metric of the score blob, top-1 agreement, per-layer differences
of the worst layers, and images per second."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from calibrator.data.feed import batches
from calibrator.errors import CalibratorError
from calibrator.ncnn import NcnnSimulator, write_ncnn_model
from calibrator.ncnn.runtime import load_net, run_net
from calibrator.quant.simulate import FoldedFP32


@dataclass
class NcnnLayerDiff:
    name: str
    kind: str
    elements: int
    differing: float        # share of elements that differ
    max_abs: float          # max |ncnn - simulation|


@dataclass
class NcnnVerifyResult:
    score_blob: str
    images: int
    top1: dict[str, float]                  # run -> top-1 against the labels (if any)
    agreement: dict[str, float]             # run -> top-1 agreement with ncnn
    score_diff: dict[str, float]            # run -> mean |score - ncnn score|
    images_per_second: dict[str, float]
    layers: list[NcnnLayerDiff] = field(default_factory=list)
    model_files: list[str] = field(default_factory=list)


def verify_ncnn(model, fused, plan, score_blob: str, *, iterations: int, layer_images: int = 0,
                prefix: str | Path | None = None, quiet: bool = False,
                say=lambda message: None) -> NcnnVerifyResult:
    """ncnn's real kernels against the simulation on ``iterations`` batches."""
    with tempfile.TemporaryDirectory(prefix="calibrator-ncnn-") as tmp:
        target = Path(prefix) if prefix is not None else Path(tmp) / "model"
        written = write_ncnn_model(model.net, plan, target)
        if score_blob not in written.outputs and score_blob not in written.graph.outputs:
            raise CalibratorError(f"verify --runtime ncnn: the ncnn model has no output for "
                                  f"'{score_blob}' (outputs: {', '.join(written.outputs)})")
        ncnn_net = load_net(written.param_path, written.bin_path)
        simulator = NcnnSimulator(fused, plan, graph=written.graph)
        folded = FoldedFP32(fused).overrides
        name = written.outputs[score_blob]
        inputs = written.inputs
        scores = {"fp32": [], "simulation": [], "ncnn": []}
        seconds = {"simulation": 0.0, "ncnn": 0.0}
        labels = []
        first = None
        with torch.no_grad():
            for index, feeds in batches(model, iterations, desc="ncnn", quiet=quiet):
                first = first or feeds
                started = time.perf_counter()
                real = run_net(ncnn_net, {inputs[k]: feeds[k].cpu().numpy() for k in inputs},
                               [name])[name]
                seconds["ncnn"] += time.perf_counter() - started
                scores["ncnn"].append(np.asarray(real).reshape(len(real), -1))
                started = time.perf_counter()
                sim = model.net(feeds, outputs=[score_blob], overrides=simulator.overrides)
                seconds["simulation"] += time.perf_counter() - started
                scores["simulation"].append(sim[score_blob].cpu().numpy().reshape(len(real), -1))
                fp32 = model.net(feeds, outputs=[score_blob], overrides=folded)[score_blob]
                scores["fp32"].append(fp32.cpu().numpy().reshape(len(real), -1))
                if "label" in feeds:
                    labels.append(feeds["label"].cpu().numpy().reshape(-1).astype(int))
                say(f"batch {index + 1}/{iterations}")
        result_scores = {k: np.concatenate(v) for k, v in scores.items()}
        images = len(result_scores["ncnn"])
        top = {k: v.argmax(1) for k, v in result_scores.items()}
        truth = np.concatenate(labels) if labels else None
        result = NcnnVerifyResult(
            score_blob, images,
            top1={k: float((v == truth).mean()) for k, v in top.items()} if truth is not None
            else {},
            agreement={k: float((v == top["ncnn"]).mean()) for k, v in top.items()},
            score_diff={k: float(np.abs(v - result_scores["ncnn"]).mean())
                        for k, v in result_scores.items()},
            images_per_second={k: images / s for k, s in seconds.items() if s > 0},
            model_files=[str(written.param_path), str(written.bin_path)]
            if prefix is not None else [])
        if layer_images and first is not None:
            result.layers = _layer_differences(model, written, simulator, first, layer_images,
                                               ncnn_net)
    return result


def _layer_differences(model, written, simulator, feeds, images: int, ncnn_net
                       ) -> list[NcnnLayerDiff]:
    """Per ncnn layer, its real output against the simulation's on ``images`` images (the
    simulated value the Caffe node that ends the layer writes), worst first."""
    feeds = {k: v[:images] for k, v in feeds.items()}
    layers = [l for l in written.graph.live() if l.type not in ("Input", "Split") and l.nodes]
    ends = {max(l.nodes): l for l in layers}
    captured = {}

    def hook(node, tops):
        layer = ends.get(node.index)
        if layer is not None:
            captured[layer.name] = tops[0].detach().cpu().numpy()
        return None

    with torch.no_grad():
        model.net(feeds, overrides=simulator.overrides, hook=hook, outputs=[])
    inputs = written.inputs
    real = run_net(ncnn_net, {inputs[k]: feeds[k].cpu().numpy() for k in inputs},
                   [l.tops[0] for l in layers])
    out = []
    for layer in layers:
        ref = captured.get(layer.name)
        if ref is None:
            continue
        got = np.asarray(real[layer.tops[0]])
        if got.size != ref.size:
            continue
        got = got.reshape(ref.shape)
        kind = "int8" if layer.int8 is not None else "float"
        out.append(NcnnLayerDiff(layer.name, kind, int(ref.size), float(np.mean(got != ref)),
                                 float(np.abs(got - ref).max())))
    out.sort(key=lambda d: (d.differing, d.max_abs), reverse=True)
    return out


def format_ncnn_report(result: NcnnVerifyResult) -> str:
    runs = ["fp32", "simulation", "ncnn"]
    rows = [[run, f"{result.top1[run]:.4f}" if result.top1 else "",
             f"{result.agreement[run]:.4f}", f"{result.score_diff[run]:.4g}",
             f"{result.images_per_second[run]:.1f}" if run in result.images_per_second
             else ""] for run in runs]
    lines = [tabulate(rows, headers=["run", "top-1", f"top-1 agreement with ncnn "
                                                     f"({result.score_blob})",
                                     "mean |score diff|", "images/s"], tablefmt="github"),
             f"{result.images} images"]
    if result.layers:
        lines.append("\nper-layer outputs, ncnn vs simulation, worst 8:")
        lines.append(tabulate([[d.name, d.kind, d.elements, f"{d.differing:.4f}",
                                f"{d.max_abs:.3g}"] for d in result.layers[:8]],
                              headers=["layer", "kind", "elements", "differing", "max |diff|"],
                              tablefmt="github"))
        exact = sum(d.differing == 0 for d in result.layers)
        lines.append(f"{exact} of {len(result.layers)} layers bit-exact")
    return "\n".join(lines)
