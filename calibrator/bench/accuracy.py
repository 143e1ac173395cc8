"""Accuracy on images the calibration never saw (``make bench`` section ``accuracy``).

The 500 dev images of the shared MobileNetV2 are split in two halves: each setting is
calibrated (and, for ``-l``, searched) on the first 250 and judged on the other 250 — top-1
drop against FP32 and top-1 agreement with FP32 — and, beside it, on all 500 with the same
scales (the figure a calibrate-and-test-on-the-same-images run would report). The EasyQuant
settings run at several seeds, the headline one and the 7-bit one at eight, the headline
on the halves swapped too.
Wall time, INT8/FP32 layers and full evaluations come from the run itself. On 250 images a
figure is a handful of images: the table gives the agreement's 95% interval and the images
only FP32 and only INT8 get right, whose difference is the drop."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calibrator import pipeline
from calibrator.backends import backend_for
from calibrator.bench import Context, SectionResult, Table, score_figures, section
from calibrator.bench.fp32 import _files
from calibrator.bench.peers import run_nncf
from calibrator.caffe.prototxt import read_net, write_net
from calibrator.config import RunConfig
from calibrator.data.feed import batches
from calibrator.model import load_model, load_quantized
from calibrator.quant.fusion import analyze
from calibrator.quant.layerwise import LayerwiseSettings
from calibrator.quant.scales import QuantOptions
from calibrator.quant.simulate import FoldedFP32
from calibrator.search import SearchSettings

HALF = 5          # batches of 50: 250 images
CALIBRATION_IMAGES = 50 * HALF
SETTINGS = [
    ("-q (KL, per-tensor)", QuantOptions(), {}),
    ("-q -c multiple", QuantOptions(per_channel=True), {}),
    ("-q -c multiple --easyquant --weights-out", QuantOptions(per_channel=True),
     {"easyquant": True, "weights": True, "seeds": True}),
    ("-q -1st -c multiple --easyquant --weights-out",
     QuantOptions(per_channel=True, first_conv=True), {"easyquant": True, "weights": True}),
    ("-q --bits 7 -c multiple --easyquant --weights-out",
     QuantOptions(per_channel=True, bits=7), {"easyquant": True, "weights": True}),
    ("-q -c multiple --equalize --easyquant --weights-out", QuantOptions(per_channel=True),
     {"easyquant": True, "weights": True, "equalize": True, "seeds": True,
      "more_seeds": True, "headline": True}),
    # EasyQuant's positions drawn over every calibration image (not the default 50)
    (f"-q -c multiple --equalize --easyquant --easyquant-images {CALIBRATION_IMAGES} "
     "--weights-out", QuantOptions(per_channel=True),
     {"easyquant": True, "weights": True, "equalize": True,
      "easyquant_images": CALIBRATION_IMAGES, "seeds": True}),
    ("-q -1st -c multiple --equalize --easyquant --weights-out",
     QuantOptions(per_channel=True, first_conv=True),
     {"easyquant": True, "weights": True, "equalize": True}),
    ("-q --bits 7 -c multiple --equalize --easyquant --weights-out",
     QuantOptions(per_channel=True, bits=7),
     {"easyquant": True, "weights": True, "equalize": True, "seeds": True,
      "more_seeds": True}),
    ("-q -c multiple -a MSE --equalize --weights-out",
     QuantOptions(per_channel=True, estimator="MSE"), {"weights": True, "equalize": True}),
    ("-l 0.01 --weights-out", QuantOptions(), {"search": 0.01, "weights": True}),
    ("-l 0.002 --weights-out", QuantOptions(), {"search": 0.002, "weights": True}),
]
#: the settings run again with other EasyQuant seeds (the output positions it samples in
#: each layer; the settings marked "seeds"): how much of a figure is the sample's luck
SEED_SETTINGS = tuple(s for s in SETTINGS if s[2].get("seeds"))
SEEDS = (1, 2, 3)
#: the settings marked "more_seeds" (the most accurate EasyQuant setting, marked "headline",
#: and the 7-bit one, whose drop at one seed is as much the sample's luck as the agreement
#: is) are also run at these seeds, and the headline on the halves swapped (calibrated on
#: the second, judged on the first) at every seed: a figure on 250 images moves by a few
#: images with the sample, so the bench gives its distribution, not one draw
MORE_SEEDS = (4, 5, 6, 7)
MORE_SEED_SETTINGS = tuple(s for s in SETTINGS if s[2].get("more_seeds"))
HEADLINE = tuple(s for s in SETTINGS if s[2].get("headline"))


def _split(files, folder: Path) -> tuple[Path, Path, Path]:
    """Prototxts reading the first half, the second half and all of the image list."""
    net = read_net(files["test"])
    layer = next(x for x in net.layer if x.type == "ImageData")
    source = Path(layer.image_data_param.source)
    if not source.is_absolute():
        source = files["test"].parent / source
    root = Path(layer.image_data_param.root_folder)
    if not root.is_absolute():
        layer.image_data_param.root_folder = str(files["test"].parent / root) + "/"
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    size = layer.image_data_param.batch_size
    halves = {"calib": lines[:HALF * size], "judge": lines[HALF * size:2 * HALF * size],
              "all": lines[:2 * HALF * size]}
    out = []
    for name, part in halves.items():
        (folder / f"{name}.txt").write_text("\n".join(part) + "\n")
        layer.image_data_param.source = str(folder / f"{name}.txt")
        write_net(folder / f"{name}.prototxt", net)
        out.append(folder / f"{name}.prototxt")
    return tuple(out)


def _judge(prototxt: Path, weights: Path, quantized: Path, int8_weights: Path,
           iterations: int) -> dict:
    """Top-1 of FP32 and of the quantized net, their top-1 agreement and the divergence of
    the quantized net's class distribution from FP32's (:func:`score_figures`)."""
    fp32 = load_model(prototxt, weights)
    corrected = load_model(prototxt, int8_weights)
    q = load_quantized(corrected, quantized)
    simulator = backend_for(quantized).simulator(q.fused, q.plan)
    folded = FoldedFP32(analyze(fp32.net)).overrides
    labels, scores_fp32, scores_int8 = [], [], []
    with torch.no_grad():
        for _, feeds in batches(fp32, iterations, quiet=True):
            a = fp32.net(feeds, outputs=["fc7"], overrides=folded)["fc7"]
            b = q.net(feeds, outputs=["fc7"], overrides=simulator.overrides)["fc7"]
            scores_fp32.append(a.reshape(len(a), -1).numpy())
            scores_int8.append(b.reshape(len(b), -1).numpy())
            labels.append(feeds["label"].numpy().reshape(-1).astype(int))
    return score_figures(*(np.concatenate(v) for v in (labels, scores_fp32, scores_int8)))


@section("accuracy", "Accuracy on unseen images: calibrate on 250 dev images, judge on the "
                     "other 250, shared MobileNetV2")
def accuracy(ctx: Context) -> SectionResult:
    files = _files(ctx)
    rows, data = [], []
    with tempfile.TemporaryDirectory(prefix="calibrator-accuracy-") as tmp:
        tmp = Path(tmp)
        calib, judge, everything = _split(files, tmp)
        runs = [(label, label, options, extra, 0, False) for label, options, extra in SETTINGS]
        runs += [(f"{label} --easyquant-seed {seed}", label, options, extra, seed, False)
                 for label, options, extra in SEED_SETTINGS for seed in SEEDS]
        runs += [(f"{label} --easyquant-seed {seed}", label, options, extra, seed, False)
                 for label, options, extra in MORE_SEED_SETTINGS for seed in MORE_SEEDS]
        runs += [(f"{label} --easyquant-seed {seed}, halves swapped", label, options, extra,
                  seed, True)
                 for label, options, extra in HEADLINE for seed in (0,) + SEEDS + MORE_SEEDS]
        by_setting: dict[tuple[str, bool], list[dict]] = {}   # every seed's entries
        for label, setting, options, extra, seed, swapped in runs:
            first, second = (judge, calib) if swapped else (calib, judge)
            entry = _run(ctx, files, first, second, everything, tmp / str(len(data)), label,
                         options, extra, seed)
            entry["halves_swapped"] = swapped
            data.append(entry)
            by_setting.setdefault((setting, swapped), []).append(entry)
            unseen, seen = entry["unseen"], entry["all_dev"]
            rows.append([label, f"{unseen['drop_pt']:+.1f}", _agreement(unseen),
                         _divergence(unseen["kl_divergence"]), _discordant(unseen),
                         f"{seen['drop_pt']:+.1f}", entry["fp32_layers"],
                         entry["full_evaluations"] or "", f"{entry['wall_seconds']:.0f}"])
        spreads = {}
        for (label, swapped), entries in by_setting.items():
            if len(entries) < 2:
                continue
            spread = _seed_spread(entries)
            name = f"{label}, halves swapped" if swapped else label
            spreads[name] = spread
            rows.append([f"{name}, seeds {_seed_range(spread['seeds'])}: median (min..max), mean",
                         f"{spread['drop_pt']}, mean {spread['mean_drop_pt']:+.2f}",
                         f"{spread['agreement']}, mean {spread['mean_agreement']:.3f}",
                         spread["kl_divergence"], "", "", "", "", ""])
        ctx.log("NNCF quantize, the same halves, when installed")
        peer = _nncf_unseen(ctx, files, everything, tmp / "nncf")
    notes = []
    if peer is None:
        notes.append("NNCF is not installed (pip install nncf): no peer row")
    elif "error" in peer:
        notes.append(f"NNCF failed: {peer['error']}")
    else:
        unseen = peer["unseen"]
        rows.append([f"NNCF {peer['nncf']} quantize (ONNX Runtime, INT8)",
                     f"{unseen['drop_pt']:+.1f}", _agreement(unseen),
                     _divergence(unseen["kl_divergence"]), _discordant(unseen), "", 0, "",
                     f"{peer['quantize_seconds']:.0f}"])
    headers = ["setting", "unseen drop (pt)", "unseen agreement (95%)",
               "unseen KL from FP32 (1e-3 nats)", "unseen right: FP32 only / INT8 only",
               "all-dev drop (pt)", "FP32 convs", "full evaluations", "wall (s)"]
    notes.append("unseen: the half a setting was not calibrated on (the second; the first "
                 "for the runs marked halves swapped); the agreement with its 95% Wilson "
                 "interval; the drop is (FP32-only right - INT8-only right) / images; KL: "
                 "the mean over the images of KL(softmax(FP32 fc7) || softmax(INT8 fc7)), "
                 "which every image's scores move, not only the few near a tie")
    return SectionResult([Table(headers, rows)],
                         {"settings": data, "easyquant_seed_spread": spreads, "nncf": peer},
                         notes=notes)


def _run(ctx: Context, files, calib: Path, judge: Path, everything: Path, out: Path,
         label: str, options: QuantOptions, extra: dict, seed: int) -> dict:
    """One setting calibrated on the first half, judged on the second and on all."""
    outputs = {"prototxt": out / "q.prototxt", "json": out / "q.json"}
    if extra.get("weights"):
        outputs["weights"] = out / "q.caffemodel"
    search = extra.get("search")
    layerwise = LayerwiseSettings(
        seed=seed, images=extra.get("easyquant_images", LayerwiseSettings.images))
    config = RunConfig(
        calib, files["weights"], quant=options, iterations=HALF,
        sampling_iterations=HALF, quantize_only=search is None, outputs=outputs,
        easyquant=bool(extra.get("easyquant")), equalize=bool(extra.get("equalize")),
        quiet=True,
        search=SearchSettings(tolerance=search or 0.01,
                              bias_correction=bool(extra.get("weights")),
                              layerwise=layerwise))
    ctx.log(label)
    started = time.perf_counter()
    code = pipeline.run(config, say=lambda m: None)
    wall = time.perf_counter() - started
    record = json.loads((out / "q.json").read_text())
    summary = record.get("search", {})
    int8_weights = outputs.get("weights", files["weights"])
    unseen = _judge(judge, files["weights"], out / "q.prototxt", int8_weights, HALF)
    seen = _judge(everything, files["weights"], out / "q.prototxt", int8_weights, 2 * HALF)
    int8_layers = sum(layer["precision"].startswith("int") for layer in record["layers"])
    return {"setting": label, "seed": seed, "exit": code, "wall_seconds": wall,
            "unseen": unseen, "all_dev": seen, "int8_layers": int8_layers,
            "fp32_layers": len(record["layers"]) - int8_layers,
            "full_evaluations": summary.get("full_evaluations"),
            "met_on_calibration_half": summary.get("met")}


def _agreement(figures: dict) -> str:
    """The top-1 agreement and its 95% interval, as the table shows them."""
    low, high = figures["agreement_95"]
    return f"{figures['agreement']:.3f} ({low:.3f}..{high:.3f})"


def _divergence(kl: float) -> str:
    """The KL divergence from FP32 as the table shows it (1e-3 nats)."""
    return f"{1e3 * kl:.1f}"


def _discordant(figures: dict) -> str:
    """The images only FP32 gets right and only INT8 gets right, as the table shows them."""
    return f"{figures['fp32_only_right']} / {figures['int8_only_right']}"


def _seed_spread(entries: list[dict]) -> dict:
    """Median (min..max) of the unseen drop, agreement and KL divergence (1e-3 nats) over
    the seeds' runs, and the drop's and the agreement's means."""
    def spread(values, form):
        values = sorted(values)
        return (f"{form.format(float(np.median(values)))} "
                f"({form.format(values[0])}..{form.format(values[-1])})")
    agreements = [e["unseen"]["agreement"] for e in entries]
    drops = [e["unseen"]["drop_pt"] for e in entries]
    return {"seeds": [e["seed"] for e in entries],
            "drop_pt": spread(drops, "{:+.1f}"),
            "mean_drop_pt": round(float(np.mean(drops)), 2),
            "agreement": spread(agreements, "{:.3f}"),
            "mean_agreement": round(float(np.mean(agreements)), 4),
            "kl_divergence": spread([1e3 * e["unseen"]["kl_divergence"] for e in entries],
                                    "{:.1f}")}


def _seed_range(seeds: list[int]) -> str:
    """``0-7`` for consecutive seeds, else the list."""
    ordered = sorted(seeds)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ", ".join(map(str, ordered))


def _nncf_unseen(ctx: Context, files, everything: Path, tmp: Path) -> dict | None:
    """NNCF's ``quantize`` (its defaults: per-channel weights, fast bias correction, every
    conv INT8) calibrated on the first half and judged on the other, in ONNX Runtime."""
    tmp.mkdir()
    model = load_model(everything, files["weights"])
    return run_nncf(ctx, model, tmp, range(HALF), range(HALF, 2 * HALF))
