"""Helpers for the per-layer tests: build one layer from prototxt text, run it, and run the
same layer through OpenCV dnn as an independent reference."""

from __future__ import annotations

import numpy as np
import torch
from google.protobuf import text_format

from calibrator.caffe import caffe_pb2
from calibrator.graph.layer import layer_class
from tests.opencv_ref import opencv_forward


def make_layer(text: str, bottom_shapes, blobs=None):
    """The layer described by ``text`` (a LayerParameter body), constructed, and loaded with
    ``blobs`` unless they are None."""
    param = text_format.Merge(text, caffe_pb2.LayerParameter())
    cls = layer_class(param.type)
    assert cls is not None, f"no layer registered for {param.type}"
    layer = cls(param, [tuple(s) for s in bottom_shapes])
    if blobs is not None:
        layer.load_blobs([np.asarray(b, dtype=np.float32) for b in blobs])
    return layer


def run(layer, *bottoms) -> tuple[np.ndarray, ...]:
    """Forward numpy bottoms through ``layer``; tops come back as numpy arrays."""
    with torch.no_grad():
        tops = layer(*(torch.as_tensor(np.asarray(b, dtype=np.float32)) for b in bottoms))
    assert isinstance(tops, tuple)
    return tuple(t.numpy() for t in tops)


def run1(layer, *bottoms) -> np.ndarray:
    (top,) = run(layer, *bottoms)
    return top


def _input_layer(name: str, shape) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'layer {{ name: "{name}" type: "Input" top: "{name}" '
            f'input_param {{ shape {{ {dims} }} }} }}\n')


def opencv_layer(layer_text: str, inputs: dict[str, np.ndarray], blobs=None) -> np.ndarray:
    """Top of the single layer ``layer_text`` (whose name and top are "out", bottoms named
    after ``inputs``) as computed by OpenCV dnn."""
    proto = 'name: "t"\n' + "".join(_input_layer(n, v.shape) for n, v in inputs.items())
    proto += f"layer {{ {layer_text} }}\n"
    result = opencv_forward(proto, {"out": blobs} if blobs else None, inputs, ["out"])
    return result["out"]


def compare_with_opencv(layer_text: str, inputs: dict[str, np.ndarray], blobs=None,
                        rel_tol: float = 1e-4) -> np.ndarray:
    """Run one layer here and in OpenCV; assert max |diff| <= rel_tol * max |reference|."""
    bottoms_text = "".join(f'bottom: "{n}" ' for n in inputs)
    text = f'name: "out" {bottoms_text} top: "out" {layer_text}'
    layer = make_layer(text, [v.shape for v in inputs.values()], blobs)
    ours = run1(layer, *inputs.values())
    reference = opencv_layer(text, inputs, blobs)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    scale = max(float(np.abs(reference).max()), 1e-30)
    diff = float(np.abs(ours - reference).max())
    assert diff <= rel_tol * scale, f"max |diff| {diff} vs max |ref| {scale}"
    return ours


def rand(*shape, seed: int = 0, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)
