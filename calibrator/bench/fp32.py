"""FP32 evaluation speed on the shared MobileNetV2: calibrator's CaffeNet against OpenCV dnn
on the same tensors, and the whole ``calibrator test -i 10`` process.

Forward passes only: the 500 dev images (10 batches of 50) are decoded and preprocessed
once, before timing, exactly as ``calibrator test`` feeds them (``test.prototxt``'s
ImageData layer); OpenCV runs ``deploy.prototxt`` (Input instead of ImageData, Softmax
instead of the two Accuracy layers) on the very same arrays. After one warm-up batch each,
every batch is run by every contender in turn (interleaved, so load from other processes
hits all of them alike), ``--repeat`` times; a pass is the sum over the 10 batches; the
figures are the median pass and "best" (each batch's fastest run, summed: the least disturbed
estimate when other processes share the CPUs). A per-layer-kind profile (one batch, per-node
timing; OpenCV's ``getPerfProfile``) says where the time goes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch

from calibrator.bench import REPO, Context, SectionResult, Table, section, timed
from calibrator.errors import CalibratorError
from calibrator.model import load_model
from calibrator.quant.fusion import analyze
from calibrator.quant.simulate import FoldedFP32

MODEL_DIR = "models/mobilenet_v2"
BATCHES = 10
IMAGES_PER_BATCH = 50
IMAGES = BATCHES * IMAGES_PER_BATCH


def _files(ctx: Context) -> dict[str, Path]:
    folder = ctx.shared / MODEL_DIR
    files = {"test": folder / "test.prototxt", "deploy": folder / "deploy.prototxt",
             "weights": folder / "mobilenet_v2.caffemodel"}
    for path in files.values():
        if not path.is_file():
            raise CalibratorError(f"{path}: not found (the fp32 benchmark needs the shared "
                                  "MobileNetV2)")
    return files


# --- contenders ------------------------------------------------------------------------------

def _opencv_net(files, ctx: Context, fusion: bool):
    """OpenCV dnn on deploy.prototxt; CUDA when --gpu and OpenCV was built with it."""
    if not hasattr(cv2.dnn, "readNetFromCaffe"):
        raise CalibratorError(f"OpenCV {cv2.__version__} has no Caffe importer (OpenCV 5 "
                              "dropped it): the fp32 benchmark's peer needs "
                              "opencv-python-headless<5, as calibrator's requirements say")
    net = cv2.dnn.readNetFromCaffe(str(files["deploy"]), str(files["weights"]))
    backend, target, where = cv2.dnn.DNN_BACKEND_OPENCV, cv2.dnn.DNN_TARGET_CPU, "cpu"
    if ctx.device.type == "cuda" and _opencv_cuda_devices() > 0:
        backend, target, where = cv2.dnn.DNN_BACKEND_CUDA, cv2.dnn.DNN_TARGET_CUDA, "cuda"
    net.setPreferableBackend(backend)
    net.setPreferableTarget(target)
    net.enableFusion(fusion)
    return net, where


def _opencv_cuda_devices() -> int:
    try:
        return int(cv2.cuda.getCudaEnabledDeviceCount())
    except (AttributeError, cv2.error):
        return 0


def _run_opencv(net, data: np.ndarray) -> np.ndarray:
    net.setInput(data)
    return net.forward()


def _run_ours(net, feeds, outputs, overrides=None) -> dict[str, torch.Tensor]:
    """Our FP32 forward as every pass runs it: each fused unit folded (FoldedFP32)."""
    with torch.no_grad():
        return net(feeds, outputs=outputs, overrides=overrides)


# --- profile ---------------------------------------------------------------------------------

def _kind(node) -> str:
    """Layer type, convolutions split into 1x1, depthwise and other kernels."""
    if node.type != "Convolution":
        return node.type
    module = node.module
    if module.group > 1 and module.group == node.bottom_shapes[0][1]:
        return "Convolution (depthwise)"
    return "Convolution (1x1)" if tuple(module.kernel) == (1, 1) else "Convolution (kxk)"


def _profile_ours(ctx: Context, net, feeds, outputs) -> dict[str, float]:
    """Seconds per layer for one forward pass (the time between successive hook calls). A
    folded unit runs as one convolution at whichever of its nodes the override computes
    it: its whole time is the conv layer's, as OpenCV's fused profile counts it."""
    fused = analyze(net)
    owner = {index: unit.layer.name for index, unit in fused.unit_of_node.items()}
    seconds: dict[str, float] = defaultdict(float)
    last = [0.0]

    def hook(node, tops):
        ctx.sync()
        now = time.perf_counter()
        seconds[owner.get(node.index, node.name)] += now - last[0]
        last[0] = now

    with torch.no_grad():
        ctx.sync()
        last[0] = time.perf_counter()
        net(feeds, outputs=outputs, hook=hook, overrides=FoldedFP32(fused).overrides)
    return dict(seconds)


def _profile_opencv(net, data: np.ndarray) -> dict[str, float]:
    _run_opencv(net, data)
    _, ticks = net.getPerfProfile()
    names = net.getLayerNames()
    return {name: float(t) / cv2.getTickFrequency()
            for name, t in zip(names, np.asarray(ticks).ravel())}


def _by_kind(per_layer: list[dict[str, float]], kinds: dict[str, str], types) -> dict:
    """Median over runs of each layer's time, summed by kind: kind -> (count, seconds)."""
    layers = per_layer[0].keys()
    out: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for name in layers:
        kind = kinds.get(name) or types(name)
        out[kind][0] += 1
        out[kind][1] += float(np.median([run[name] for run in per_layer]))
    return {k: tuple(v) for k, v in out.items()}


# --- accuracy cross-check --------------------------------------------------------------------

def _topk(prob: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Caffe's rule: correct when fewer than k other classes score >= the label's score."""
    label_scores = prob[np.arange(len(labels)), labels]
    return float(np.mean((prob >= label_scores[:, None]).sum(axis=1) - 1 < k))


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --- the whole command -----------------------------------------------------------------------

def _cli_wall_time(ctx: Context, files) -> dict:
    """``python -m calibrator test -i 10`` in a fresh process: interpreter start, imports,
    model load, decoding the 500 images and the forward passes."""
    command = [sys.executable, "-m", "calibrator", "test", "-m", str(files["test"]),
               "-w", str(files["weights"]), "-i", str(BATCHES), "--quiet"]
    if ctx.gpu is not None:
        command += ["--gpu", str(ctx.gpu)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if ctx.threads is not None:
        env["OMP_NUM_THREADS"] = str(ctx.threads)  # torch's intra-op threads
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise CalibratorError(f"calibrator test failed (exit {proc.returncode}): "
                              f"{proc.stderr.strip().splitlines()[-1:] or ''}")
    return {"seconds": wall, "stdout": proc.stdout.splitlines(),
            "command": " ".join(command[1:])}


# --- the section -----------------------------------------------------------------------------

@section("fp32", f"FP32 evaluation, shared MobileNetV2, {BATCHES} batches of "
                 f"{IMAGES_PER_BATCH} (forward passes only)")
def fp32(ctx: Context) -> SectionResult:

    files = _files(ctx)
    ctx.log("loading test.prototxt + caffemodel")
    load_s, model = timed(ctx, lambda: load_model(files["test"], files["weights"],
                                                  device=ctx.device))
    if model.batch_size != IMAGES_PER_BATCH:
        raise CalibratorError(f"{files['test']}: batch size {model.batch_size}, expected "
                              f"{IMAGES_PER_BATCH}")
    ctx.log(f"decoding {IMAGES} images")
    decode_s, _ = timed(ctx, lambda: model.source.prefetch(BATCHES))
    batches = [model.source.batch(i) for i in range(BATCHES)]
    feeds = [{k: v.to(ctx.device) for k, v in b.items()} for b in batches]
    arrays = [np.ascontiguousarray(b["data"].numpy(), dtype=np.float32) for b in batches]
    labels = np.concatenate([b["label"].numpy() for b in batches]).astype(np.int64)
    net = model.net
    outputs = list(dict.fromkeys([*net.output_names, "fc7"]))

    cv_fused, cv_where = _opencv_net(files, ctx, fusion=True)
    cv_plain, _ = _opencv_net(files, ctx, fusion=False)
    folded = FoldedFP32(analyze(net)).overrides
    contenders = {
        "ours": lambda i: _run_ours(net, feeds[i], outputs, folded),
        "opencv": lambda i: _run_opencv(cv_fused, arrays[i]),
        "opencv_nofusion": lambda i: _run_opencv(cv_plain, arrays[i]),
    }
    ctx.log("warm-up: one batch each")
    for run in contenders.values():
        timed(ctx, lambda: run(0))

    seconds = {name: np.zeros((ctx.repeat, BATCHES)) for name in contenders}
    ours_scores, ours_fc7, cv_prob = defaultdict(list), [], []
    for r in range(ctx.repeat):
        ctx.log(f"pass {r + 1}/{ctx.repeat}: {BATCHES} batches x {len(contenders)} "
                "contenders, interleaved")
        for i in range(BATCHES):
            for name, run in contenders.items():
                seconds[name][r, i], out = timed(ctx, lambda: run(i))
                if r == 0 and name == "ours":
                    for blob in net.output_names:
                        ours_scores[blob].append(float(out[blob].float().mean()))
                    ours_fc7.append(out["fc7"].float().cpu().numpy())
                elif r == 0 and name == "opencv":
                    cv_prob.append(np.asarray(out).reshape(IMAGES_PER_BATCH, -1))

    ctx.log("per-layer profile (one batch each)")
    kinds = {node.name: _kind(node) for node in net.nodes}
    ours_profile = [_profile_ours(ctx, net, feeds[1], outputs) for _ in range(ctx.repeat)]
    cv_types = {n: cv_fused.getLayer(n).type for n in cv_fused.getLayerNames()}
    cv_profile = [_profile_opencv(cv_fused, arrays[1]) for _ in range(ctx.repeat)]
    cv_plain_profile = [_profile_opencv(cv_plain, arrays[1]) for _ in range(ctx.repeat)]

    ctx.log(f"calibrator test -i {BATCHES} in a fresh process")
    cli = _cli_wall_time(ctx, files)

    # --- figures ---------------------------------------------------------------------------
    passes = {name: s.sum(axis=1) for name, s in seconds.items()}
    median = {name: float(np.median(p)) for name, p in passes.items()}
    # the least disturbed estimate on a busy machine: each batch's fastest run, summed
    best = {name: float(s.min(axis=0).sum()) for name, s in seconds.items()}
    rate = {name: IMAGES / median[name] for name in passes}
    ratio = rate["ours"] / rate["opencv"]
    cli_rate = IMAGES / cli["seconds"]

    fc7 = np.concatenate(ours_fc7)
    cv_prob_all = np.concatenate(cv_prob)
    our_prob = _softmax(fc7.astype(np.float64))
    ours_top = {blob: float(np.mean(v)) for blob, v in ours_scores.items()}
    cv_top = {"accuracy-top1": _topk(cv_prob_all, labels, 1),
              "accuracy-top5": _topk(cv_prob_all, labels, 5)}
    agreement = {
        "max_abs_prob_diff": float(np.abs(our_prob - cv_prob_all).max()),
        "top1_prediction_agreement": float(np.mean(our_prob.argmax(1) == cv_prob_all.argmax(1))),
        "ours": ours_top, "opencv": cv_top,
    }

    ours_kinds = _by_kind(ours_profile, kinds, lambda n: "?")
    cv_kinds = _by_kind(cv_profile, kinds, lambda n: cv_types.get(n, "?"))
    cv_plain_kinds = _by_kind(cv_plain_profile, kinds, lambda n: cv_types.get(n, "?"))
    profile_total = sum(s for _, s in ours_kinds.values())
    all_kinds = sorted(set(ours_kinds) | set(cv_kinds),
                       key=lambda k: -ours_kinds.get(k, (0, 0.0))[1])

    def ms(table, kind):
        return round(1000 * table[kind][1], 1) if kind in table else None

    profile_rows = [[kind, ours_kinds.get(kind, cv_kinds.get(kind, (0,)))[0], ms(ours_kinds, kind),
                     (round(100 * ours_kinds[kind][1] / profile_total, 1)
                      if kind in ours_kinds else None),
                     ms(cv_kinds, kind), ms(cv_plain_kinds, kind)] for kind in all_kinds]
    profile_rows.append(["total", sum(c for c, _ in ours_kinds.values()),
                         round(1000 * profile_total, 1), 100.0,
                         round(1000 * sum(s for _, s in cv_kinds.values()), 1),
                         round(1000 * sum(s for _, s in cv_plain_kinds.values()), 1)])

    device = str(ctx.device)
    rows = [
        ["calibrator CaffeNet forward (test.prototxt)", device, median["ours"], best["ours"],
         rate["ours"], ratio],
        ["OpenCV dnn forward (deploy.prototxt; default: BN/Scale/ReLU fused)", cv_where,
         median["opencv"], best["opencv"], rate["opencv"], 1.0],
        ["OpenCV dnn forward, fusion off (layer by layer, like ours)", cv_where,
         median["opencv_nofusion"], best["opencv_nofusion"], rate["opencv_nofusion"],
         rate["opencv_nofusion"] / rate["opencv"]],
        [f"calibrator test -i {BATCHES}: whole process (start, load, decode, forward)",
         device, cli["seconds"], None, cli_rate, cli_rate / rate["opencv"]],
    ]
    rows = [[r[0], r[1], *(None if v is None else round(v, 3) for v in r[2:])] for r in rows]

    notes = [
        f"ours / OpenCV throughput: {ratio:.2f}x "
        f"({'slower' if ratio < 1 else 'faster'}; the goal is at least 1.0x)",
        f"model load {load_s:.2f} s, decoding {IMAGES} images {decode_s:.2f} s (once; cached)",
        f"top-1/top-5 ours {ours_top.get('accuracy-top1', float('nan')):.4g}/"
        f"{ours_top.get('accuracy-top5', float('nan')):.4g}, OpenCV "
        f"{cv_top['accuracy-top1']:.4g}/{cv_top['accuracy-top5']:.4g}; max |prob diff| "
        f"{agreement['max_abs_prob_diff']:.2g}",
        f"threads: torch {torch.get_num_threads()}, OpenCV {cv2.getNumThreads()}",
    ]
    if ratio < 1.0:
        top = sorted(ours_kinds.items(), key=lambda kv: -kv[1][1])[:3]
        notes.append("slower than OpenCV; most time in: " + ", ".join(
            f"{k} {100 * s / profile_total:.0f}%" for k, (_, s) in top))

    data = {
        "images": IMAGES, "batches": BATCHES, "batch_size": IMAGES_PER_BATCH,
        "repeat": ctx.repeat, "device": device, "opencv_device": cv_where,
        "model_load_s": load_s, "decode_s": decode_s,
        "pass_seconds": {name: p.tolist() for name, p in passes.items()},
        "batch_seconds": {name: s.tolist() for name, s in seconds.items()},
        "median_pass_s": median, "best_s": best, "images_per_s": rate,
        "ours_vs_opencv": ratio,
        "cli_test": {**cli, "images_per_s": cli_rate},
        "agreement": agreement,
        "profile_ms_per_batch": {
            "ours": {k: {"count": c, "ms": 1000 * s} for k, (c, s) in ours_kinds.items()},
            "opencv": {k: {"count": c, "ms": 1000 * s} for k, (c, s) in cv_kinds.items()},
            "opencv_nofusion": {k: {"count": c, "ms": 1000 * s}
                                for k, (c, s) in cv_plain_kinds.items()},
        },
    }
    return SectionResult(
        tables=[Table(["run", "device", f"s / {IMAGES} img (median)", "best", "images/s",
                       "vs OpenCV"], rows),
                Table(["layer kind", "count", "ours ms/batch", "ours %", "OpenCV ms/batch",
                       "OpenCV unfused ms/batch"], profile_rows,
                      title=f"where the time goes (one batch of {IMAGES_PER_BATCH}, median of "
                            f"{ctx.repeat}; OpenCV's fused layers show 0)")],
        data=data, notes=notes)
