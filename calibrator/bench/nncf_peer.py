"""NNCF's post-training quantization of the same FP32 ONNX model on the same images: the
peer ``make bench`` compares with (run in its own process, so its time and memory are its
own). NNCF is optional (``pip install nncf``): this module is imported only to run it.

    python -m calibrator.bench.nncf_peer MODEL.onnx DATA.npz OUT.json [--threads N]
        [--judge OTHER.npz]

With ``--judge``, only ``quantize`` runs (calibrated on DATA) and its result is judged on
the other images (the ``accuracy`` section's protocol). DATA.npz holds ``images``
(batches x N x C x H x W, float32, preprocessed as the Caffe net reads them) and
``labels``; the metric is top-1 of the model's first output."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from calibrator.bench import peak_rss_mb, score_figures


def _session(model, threads):
    import onnxruntime as ort  # optional (the verify extra)

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _scores(model, images, threads) -> np.ndarray:
    """Every image's class scores (the model's first output, images x classes)."""
    session = _session(model, threads)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: batch})[0].reshape(len(batch), -1)
                           for batch in images])


def _predictions(model, images, threads) -> np.ndarray:
    """The top-1 class of every image (the argmax of the model's first output)."""
    return _scores(model, images, threads).argmax(1)


def _top1(model, images, labels, threads) -> float:
    """Top-1 over ``images``, batch by batch against the same number of label batches (NNCF's
    accuracy control also calls the validation on the first items alone)."""
    labels = labels[:len(images)].reshape(-1)
    return float((_predictions(model, images, threads) == labels).mean())


def _unseen(model, quantized, path, threads) -> dict:
    """Top-1 of FP32 and INT8, their agreement and the divergence of INT8's class
    distribution from FP32's on images the calibration did not see."""
    data = np.load(path)
    return score_figures(data["labels"], _scores(model, data["images"], threads),
                         _scores(quantized, data["images"], threads))


def main(argv=None) -> int:
    import nncf  # optional: the bench's peer
    import onnx  # optional (the verify extra)

    parser = argparse.ArgumentParser(prog="calibrator.bench.nncf_peer")
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--judge", help="NPZ of other images: quantize only, then judge "
                                        "the result there (top-1 drop, agreement)")
    args = parser.parse_args(argv)
    data = np.load(args.data)
    images, labels = data["images"], data["labels"]
    model = onnx.load(args.model)
    name = model.graph.input[0].name
    dataset = nncf.Dataset(list(images), lambda batch: {name: batch})
    record = {"nncf": nncf.__version__, "images": int(labels.size)}
    record["fp32_top1"] = _top1(model, images, labels, args.threads)

    started = time.perf_counter()
    quantized = nncf.quantize(model, dataset, subset_size=int(labels.size))
    record["quantize_seconds"] = time.perf_counter() - started
    record["quantize_top1"] = _top1(quantized, images, labels, args.threads)
    if args.judge:
        record["unseen"] = _unseen(model, quantized, args.judge, args.threads)
        record["peak_rss_mb"] = peak_rss_mb()
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        return 0

    def validate(candidate, items) -> float:
        return _top1(candidate, np.stack(list(items)), labels, args.threads)

    started = time.perf_counter()
    controlled = nncf.quantize_with_accuracy_control(
        model, dataset, nncf.Dataset(list(images)), validate, max_drop=args.max_drop,
        drop_type=nncf.DropType.ABSOLUTE, subset_size=int(labels.size))
    record["accuracy_control_seconds"] = time.perf_counter() - started
    record["accuracy_control_top1"] = _top1(controlled, images, labels, args.threads)
    record["peak_rss_mb"] = peak_rss_mb()
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
