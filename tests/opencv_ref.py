"""OpenCV dnn as an independent Caffe runtime for the tests (test-only dependency)."""

from __future__ import annotations

import os
import tempfile

import numpy as np


def write_caffemodel_bytes(prototxt_text: str, blobs: dict[str, list[np.ndarray]]) -> bytes:
    """A binary NetParameter holding ``blobs`` for the named layers of ``prototxt_text``."""
    from google.protobuf import text_format

    from calibrator.caffe import caffe_pb2

    net = caffe_pb2.NetParameter()
    text_format.Merge(prototxt_text, net)
    out = caffe_pb2.NetParameter(name=net.name)
    for layer in net.layer:
        if layer.name not in blobs:
            continue
        dst = out.layer.add(name=layer.name, type=layer.type)
        for array in blobs[layer.name]:
            array = np.asarray(array, dtype=np.float32)
            blob = dst.blobs.add()
            blob.shape.dim.extend(array.shape)
            blob.data.extend(array.ravel().tolist())
    return out.SerializeToString()


def opencv_forward(prototxt_text: str, blobs: dict[str, list[np.ndarray]] | None,
                   inputs: dict[str, np.ndarray], outputs: list[str],
                   fusion: bool = True) -> dict[str, np.ndarray]:
    """Run ``prototxt_text`` (a deploy net) with OpenCV dnn and return the named blobs
    (``fusion=False``: OpenCV's layer fusion off, so a BatchNorm's or Scale's own output
    can be read)."""
    import cv2

    with tempfile.TemporaryDirectory() as tmp:
        proto_path = os.path.join(tmp, "net.prototxt")
        with open(proto_path, "w") as f:
            f.write(prototxt_text)
        if blobs:
            model_path = os.path.join(tmp, "net.caffemodel")
            with open(model_path, "wb") as f:
                f.write(write_caffemodel_bytes(prototxt_text, blobs))
            net = cv2.dnn.readNetFromCaffe(proto_path, model_path)
        else:
            net = cv2.dnn.readNetFromCaffe(proto_path)
    net.enableFusion(fusion)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    for name, value in inputs.items():
        net.setInput(np.ascontiguousarray(value, dtype=np.float32), name)
    results = net.forward(outputs)
    return {name: np.array(r) for name, r in zip(outputs, results)}
