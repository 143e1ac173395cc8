"""Test helpers: random weights for any net, per-layer capture, and comparison with OpenCV."""

from __future__ import annotations

import numpy as np
import torch
from google.protobuf import text_format

from calibrator.caffe import caffe_pb2
from calibrator.caffe.netstate import filter_net
from calibrator.graph.net import CaffeNet


def parse_net(text: str) -> caffe_pb2.NetParameter:
    from calibrator.caffe.upgrade import upgrade_net

    return upgrade_net(text_format.Merge(text, caffe_pb2.NetParameter()))


def random_weights(net_param, input_shapes=None, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Plausible random blobs for every layer that takes any (He-scaled convolutions,
    positive BatchNorm variances, factor 1), so deep nets keep sane activations."""
    rng = np.random.default_rng(seed)
    skeleton = CaffeNet(net_param, {}, input_shapes, require_weights=False)
    weights = {}
    for node in skeleton.nodes:
        shapes = node.module.blob_shapes()
        if not shapes:
            continue
        blobs = []
        for i, shape in enumerate(shapes):
            if node.type == "BatchNorm":
                value = [rng.normal(0, 0.2, shape), rng.uniform(0.5, 1.5, shape),
                         np.ones(shape)][i]
            elif node.type in ("Scale", "Normalize", "PReLU") and i == 0:
                value = rng.uniform(0.5, 1.5, shape)
            elif i == 0 and len(shape) >= 2:
                fan_in = int(np.prod(shape[1:]))
                if node.type == "Deconvolution":
                    fan_in = int(np.prod(shape[2:])) * shape[0]
                value = rng.normal(0, np.sqrt(2.0 / max(fan_in, 1)), shape)
            else:
                value = rng.normal(0, 0.1, shape)
            blobs.append(np.asarray(value, dtype=np.float32))
        weights[node.name] = blobs
    return weights


def capture_layers(net: CaffeNet, feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """First top of every node, keyed by layer name (OpenCV names outputs by layer)."""
    seen = {}

    def hook(node, tops):
        if tops:
            seen[node.name] = tops[0].detach().cpu().numpy().copy()

    with torch.no_grad():
        net(feeds, hook=hook)
    return seen


def opencv_layers(proto_path: str, model_path: str, inputs: dict[str, np.ndarray],
                  names: list[str]) -> dict[str, np.ndarray]:
    """Outputs of the named layers from OpenCV dnn with fusion disabled."""
    import cv2

    net = cv2.dnn.readNetFromCaffe(proto_path, model_path)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    net.enableFusion(False)
    for name, value in inputs.items():
        net.setInput(np.ascontiguousarray(value, dtype=np.float32), name)
    known = set(net.getLayerNames())
    names = [n for n in names if n in known]
    outs = net.forward(names)
    return {n: np.array(o) for n, o in zip(names, outs)}


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    ours = np.asarray(ours, dtype=np.float64).reshape(ref.shape)
    scale = max(float(np.abs(ref).max()), 1e-12)
    return float(np.abs(ours - ref).max()) / scale


def deployable(net_param, input_shapes: dict[str, tuple], drop_types=()) -> caffe_pb2.NetParameter:
    """The TEST net with its data layers replaced by one Input layer (for OpenCV), and
    layers OpenCV cannot run (Accuracy, losses, evaluation) removed."""
    test = filter_net(net_param)
    out = caffe_pb2.NetParameter(name=test.name)
    data_tops = list(input_shapes)
    layer = out.layer.add(name="data_input", type="Input")
    layer.top.extend(data_tops)
    for top in data_tops:
        layer.input_param.shape.add().dim.extend(input_shapes[top])
    drop = {"Data", "ImageData", "AnnotatedData", "Input", "Accuracy", "SoftmaxWithLoss",
            "DetectionEvaluate", "Silence", *drop_types}
    for src in test.layer:
        if src.type in drop:
            continue
        out.layer.add().CopyFrom(src)
    return out


def tinted_image_net(folder, rng, count: int, size: int, net_template: str, name: str):
    """``count`` size x size PNGs in ``folder/img``, each a distinct random tint plus noise
    (so a tiny classifier's FP32 predictions vary), an ImageData list ``folder/list.txt``
    labelled 0, and ``net_template`` (with {source} and {root}) written as
    ``folder/<name>.prototxt``. Returns (prototxt path, image names)."""
    import cv2

    (folder / "img").mkdir()
    names = []
    for i in range(count):
        color = rng.integers(0, 256, 3)
        image = np.clip(color + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        names.append(f"{i:03d}.png")
        cv2.imwrite(str(folder / "img" / names[-1]), image)
    (folder / "list.txt").write_text("".join(f"{n} 0\n" for n in names))
    prototxt = folder / f"{name}.prototxt"
    prototxt.write_text(net_template.format(source=folder / "list.txt", root=folder / "img"))
    return prototxt, names
