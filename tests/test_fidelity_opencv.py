"""FP32 fidelity against OpenCV dnn (an independent Caffe runtime): every layer's output on
the real shared models and on every zoo prototxt with random weights written by our own
caffemodel writer. Tolerance: max |diff| <= 1e-4 * max |reference| per blob.

Where OpenCV departs from Caffe-SSD, the comparison allows for it (and only for that):

- ``detection_out``: OpenCV pads the blob to N * keep_top_k rows of zeros and, when
  keep_top_k cuts, lists an image's rows by score instead of by label; so both sides are
  compared as their rows with score > 0, sorted by (image, label, -score), and the number of
  such rows must agree.
- OpenCV's PriorBox ignores ``img_size``/``img_h``/``img_w`` and its DetectionOutput ignores
  the NMS ``eta``: a net compared here must not set them (``_opencv_comparable`` checks).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from calibrator.caffe.caffemodel import read_caffemodel, write_caffemodel
from calibrator.caffe.netstate import filter_net
from calibrator.caffe.prototxt import net_to_text, read_net
from calibrator.graph.net import CaffeNet
from tests.netutil import (capture_layers, deployable, opencv_layers, random_weights,
                           relative_error)

TOL = 1e-4


def _opencv_comparable(net_param) -> None:
    """Fail if the net uses a parameter OpenCV ignores (the comparison would be meaningless)."""
    for layer in net_param.layer:
        if layer.type == "PriorBox":
            p = layer.prior_box_param
            used = [f for f in ("img_size", "img_h", "img_w") if p.HasField(f)]
            assert not used, f"{layer.name}: OpenCV's PriorBox ignores {used}"
        if layer.type == "DetectionOutput":
            nms = layer.detection_output_param.nms_param
            assert not nms.HasField("eta") or nms.eta == 1.0, \
                f"{layer.name}: OpenCV's DetectionOutput ignores eta"


def _detection_rows(blob: np.ndarray) -> np.ndarray:
    """A detection_out blob as comparable rows: those with score > 0 (OpenCV's zero padding
    and Caffe-SSD's -1 "no detection" rows dropped), sorted by (image, label, -score)."""
    rows = np.asarray(blob, dtype=np.float64).reshape(-1, 7)
    rows = rows[rows[:, 2] > 0]
    return rows[np.lexsort((-rows[:, 2], rows[:, 1], rows[:, 0]))]


def _detection_error(ours: np.ndarray, ref: np.ndarray, name: str) -> float:
    """max |diff| / max |ref| over the comparable rows; the row counts must agree and the
    image and label columns must be equal."""
    mine, theirs = _detection_rows(ours), _detection_rows(ref)
    assert mine.shape == theirs.shape, \
        f"{name}: {mine.shape[0]} detections with score > 0, OpenCV {theirs.shape[0]}"
    if not theirs.size:
        return 0.0
    assert np.array_equal(mine[:, :2], theirs[:, :2]), f"{name}: image/label columns differ"
    return relative_error(mine, theirs)


def _compare_all_layers(net, proto_path, model_path, feeds):
    _opencv_comparable(net.net_param)
    ours = capture_layers(net, {k: torch.from_numpy(v) for k, v in feeds.items()})
    names = [n.name for n in net.nodes]
    detection = {n.name for n in net.nodes if n.type == "DetectionOutput"}
    ref = opencv_layers(str(proto_path), str(model_path), feeds, names)
    assert len(ref) >= 0.9 * len(names), "OpenCV returned too few layers to compare"
    worst = {}
    for name, expected in ref.items():
        if name not in ours:
            continue
        if name in detection:
            worst[name] = _detection_error(ours[name], expected, name)
            continue
        if ours[name].size != expected.size:
            pytest.fail(f"{name}: shape {ours[name].shape} vs OpenCV {expected.shape}")
        worst[name] = relative_error(ours[name], expected)
    bad = {k: v for k, v in worst.items() if v > TOL}
    assert not bad, f"layers beyond tolerance: {bad}"
    return worst, ours


def _real_images(shared: Path, count: int, size: tuple[int, int], mean, scale=1.0, crop=None):
    names = sorted((shared / "data/imagenet-sample/images").iterdir())[:count]
    batch = []
    for path in names:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR).astype(np.float32)
        if crop:
            h, w = img.shape[:2]
            top, left = (h - crop) // 2, (w - crop) // 2
            img = img[top:top + crop, left:left + crop]
        else:
            img = cv2.resize(img, (size[1], size[0]))
        batch.append(((img - np.array(mean, np.float32)) * scale).transpose(2, 0, 1))
    return np.stack(batch)


@pytest.mark.slow
def test_mobilenet_v2_every_layer_matches_opencv(shared):
    folder = shared / "models/mobilenet_v2"
    net_param = filter_net(read_net(folder / "deploy.prototxt"))
    weights = read_caffemodel(folder / "mobilenet_v2.caffemodel")
    feeds = {"data": _real_images(shared, 4, (224, 224), (103.53, 116.28, 123.675), 0.017,
                                  crop=224)}
    net = CaffeNet(net_param, weights, {"data": feeds["data"].shape})
    worst, _ = _compare_all_layers(net, folder / "deploy.prototxt",
                                   folder / "mobilenet_v2.caffemodel", feeds)
    assert "fc7" in worst and "prob" in worst


@pytest.mark.slow
def test_res10_ssd_every_blob_and_detections_match_opencv(shared):
    folder = shared / "models/res10_ssd"
    net_param = filter_net(read_net(folder / "deploy.prototxt"))
    model = folder / "res10_300x300_ssd_iter_140000.caffemodel"
    weights = read_caffemodel(model)
    feeds = {"data": _real_images(shared, 3, (300, 300), (104.0, 177.0, 123.0))}
    net = CaffeNet(net_param, weights, {"data": feeds["data"].shape})
    worst, ours = _compare_all_layers(net, folder / "deploy.prototxt", model, feeds)
    assert len(worst) > 50 and "detection_out" in worst
    # the images give detections (many: confidence_threshold is 0.01), and our blob holds
    # exactly the rows with score > 0, in Caffe-SSD's order (image, label, -score)
    rows = ours["detection_out"].reshape(-1, 7)
    assert rows.shape[0] > 0 and (rows[:, 2] > 0).all()
    assert np.array_equal(rows, _detection_rows(rows).astype(np.float32))


ZOO = ["squeezenet_v1.0/deploy.prototxt", "squeezenet_v1.0/train_val.prototxt",
       "squeezenet_v1.1/deploy.prototxt", "squeezenet_v1.1/train_val.prototxt",
       "shicai_mobilenet_v1/mobilenet_deploy.prototxt",
       "shicai_mobilenet_v2/mobilenet_v2_deploy.prototxt",
       "chuanqi305_mobilenet_ssd/deploy.prototxt",
       "chuanqi305_mobilenet_ssd/MobileNetSSD_test.prototxt"]


@pytest.mark.parametrize("relpath", ZOO)
def test_zoo_prototxt_matches_opencv_with_random_weights(shared, tmp_path, relpath):
    source = read_net(shared / "models/zoo" / relpath)
    test = filter_net(source)
    first = test.layer[0]
    if first.type == "Input":
        shape = tuple(int(d) for d in first.input_param.shape[0].dim)
    else:  # a data layer: the crop or resize size of its transform, 3 channels
        side = first.transform_param.crop_size or 300
        shape = (1, 3, side, side)
    shape = (2,) + shape[1:]
    deploy = deployable(source, {first.top[0]: shape})
    weights = random_weights(deploy, {first.top[0]: shape}, seed=len(relpath))
    model_path = write_caffemodel(tmp_path / "random.caffemodel", weights, deploy)
    proto_path = tmp_path / "deploy.prototxt"
    proto_path.write_text(net_to_text(deploy))
    reread = read_caffemodel(model_path)  # the reader gives back what the writer wrote
    assert all(np.array_equal(reread[k][i], weights[k][i])
               for k in weights for i in range(len(weights[k])))
    net = CaffeNet(deploy, reread, {first.top[0]: shape})
    rng = np.random.default_rng(1)
    feeds = {first.top[0]: rng.uniform(-1, 1, shape).astype(np.float32)}
    _compare_all_layers(net, proto_path, model_path, feeds)
