"""DetectionEvaluate and the mAP of ``caffe test -detection``: known answers computed by hand,
and on the shared res10 face detector against an independent VOC evaluation of OpenCV dnn's
detections."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from calibrator.caffe import caffe_pb2
from calibrator.detection.map import DetectionAccumulator, compute_ap, detection_map
from calibrator.detection.matching import EvaluateConfig, evaluate_batch
from calibrator.errors import CalibratorError, LayerError
from calibrator.graph.layer import layer_class

# --- a hand-built batch ---------------------------------------------------------------------
# Image 0: label 1 boxes A (plain) and B (difficult), label 2 box C.
# Image 1: label 1 box D, label 3 box E (a class that gets no detection).
A, B, C = [0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7], [0.2, 0.2, 0.6, 0.6]
D, E = [0.0, 0.0, 0.2, 0.2], [0.4, 0.4, 0.8, 0.8]
GT = np.array([
    [0, 1, 0, *A, 0],
    [0, 1, 1, *B, 1],
    [0, 2, 0, *C, 0],
    [1, 1, 0, *D, 0],
    [1, 3, 0, *E, 0],
], np.float32)
DET = np.array([
    [0, 1, 0.30, 0.8, 0.8, 0.9, 0.9],           # d4: overlaps nothing -> FP
    [0, 1, 0.90, *A],                           # d1: A -> TP
    [0, 1, 0.80, 0.1, 0.1, 0.3, 0.29],          # d2: A again (IoU 0.95) -> duplicate, FP
    [0, 1, 0.70, *B],                           # d3: the difficult box B
    [0, 2, 0.60, *C],                           # d5: C -> TP
    [1, 1, 0.85, 0.0, 0.0, 0.1, 0.1],           # d6: IoU 0.25 with D -> FP
    [1, 1, 0.50, *D],                           # d7: D -> TP
    [1, 2, 0.95, 0.1, 0.1, 0.2, 0.2],           # d8: no label-2 box in image 1 -> FP
    [2, 1, 0.40, 0.1, 0.1, 0.3, 0.3],           # d9: image 2 has no ground truth -> FP
    [3, -1, -1, -1, -1, -1, -1],                # "nothing found" row of image 3: no output
], np.float32)


def config(**kw):
    base = dict(num_classes=5, background_label_id=0, overlap_threshold=0.5,
                evaluate_difficult_gt=False)
    base.update(kw)
    return EvaluateConfig(**base)


def evaluate_layer(text: str, det, gt):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    shapes = [(1, 1, len(det), 7), (1, 1, len(gt), 8)]
    layer = layer_class("DetectionEvaluate")(param, shapes)
    with torch.no_grad():
        (out,) = layer(torch.from_numpy(det.reshape(shapes[0])),
                       torch.from_numpy(gt.reshape(shapes[1])))
    return layer, out.numpy()


def test_rows_follow_caffe_order_and_flags():
    rows, _ = evaluate_batch(DET, GT, config())
    header = [[-1, c, n, -1, -1] for c, n in ((1, 2), (2, 1), (3, 1), (4, 0))]
    body = [  # by image, label, then score descending where the image has boxes of the label
        [0, 1, 0.90, 1, 0], [0, 1, 0.80, 0, 1], [0, 1, 0.70, 0, 0], [0, 1, 0.30, 0, 1],
        [0, 2, 0.60, 1, 0],
        [1, 1, 0.85, 0, 1], [1, 1, 0.50, 1, 0],
        [1, 2, 0.95, 0, 1],
        [2, 1, 0.40, 0, 1],
    ]
    np.testing.assert_array_equal(rows, np.array(header + body, np.float32))


def test_layer_output_shape_and_difficult_evaluated():
    _, out = evaluate_layer("""name: "ev" type: "DetectionEvaluate" bottom: "d" bottom: "g"
        top: "e" detection_evaluate_param { num_classes: 4 evaluate_difficult_gt: true }""",
                            DET, GT)
    assert out.shape == (1, 1, 3 + 9, 5)  # num_classes - 1 headers + the 9 labelled rows
    rows = out.reshape(-1, 5)
    assert rows[0].tolist() == [-1, 1, 3, -1, -1]  # B counts now
    assert rows[5].tolist() == pytest.approx([0, 1, 0.7, 1, 0])  # and d3 finds it


def hand_ap_label1_difficult_ignored():
    # label 1 over both images, ignored d3 dropped: scores .9 .85 .8 .5 .4 .3 ->
    # TP FP FP TP FP FP, 2 positives; precision 1 1/2 1/3 1/2 2/5 1/3, recall .5 .5 .5 1 1 1
    eleven = (6 * 1.0 + 5 * 0.5) / 11  # recall >= 0..0.5: best precision 1; 0.6..1: 1/2
    max_integral = 0.5 * 1.0 + 0.5 * 0.5  # envelope 1 up to recall .5, then 1/2
    integral = 1.0 * 0.5 + 0.5 * 0.5  # precision where recall steps: 1 at .5, 1/2 at 1
    return {"11point": eleven, "MaxIntegral": max_integral, "Integral": integral}


@pytest.mark.parametrize("version", ["11point", "MaxIntegral", "Integral"])
def test_ap_known_answers(version):
    rows, _ = evaluate_batch(DET, GT, config())
    acc = DetectionAccumulator()
    acc.add(rows)
    aps = acc.average_precisions(version)
    # label 2: FP (.95) then TP (.6), one positive: precision 0 then 1/2, recall 0 then 1;
    # every version gives 1/2. Label 3 has a box but no detection, label 4 has neither.
    assert aps[1] == pytest.approx(hand_ap_label1_difficult_ignored()[version], abs=1e-6)
    assert aps[2] == pytest.approx(0.5, abs=1e-6)
    assert aps[3] == 0.0 and aps[4] == 0.0
    # Caffe divides by every non-background label (4); VOC-style by those with boxes (3)
    total = aps[1] + aps[2]
    assert acc.mean_ap(version) == pytest.approx(total / 4, abs=1e-6)
    assert acc.mean_ap(version, classes="with_gt") == pytest.approx(total / 3, abs=1e-6)


def test_difficult_evaluated_changes_ap_by_hand():
    rows, _ = evaluate_batch(DET, GT, config(evaluate_difficult_gt=True))
    acc = DetectionAccumulator()
    acc.add(rows)
    # TP FP FP TP TP FP FP against 3 positives: precision 1 .5 1/3 .5 .6 .5 3/7,
    # recall 1/3 1/3 1/3 2/3 1 1 1 -> best precision 1 for recall <= .3, then .6
    assert acc.average_precisions("11point")[1] == pytest.approx((4 + 7 * 0.6) / 11, abs=1e-6)


def test_accumulates_over_batches_and_sorts_scores_globally():
    # image 1 in a batch of its own (as item 0): same sums, and the scores of both batches
    # are sorted together, so every AP is the one of the single batch
    first = evaluate_batch(DET[DET[:, 0] != 1], GT[GT[:, 0] == 0], config())[0]
    det1, gt1 = DET[DET[:, 0] == 1].copy(), GT[GT[:, 0] == 1].copy()
    det1[:, 0] = gt1[:, 0] = 0
    second = evaluate_batch(det1, gt1, config())[0]
    acc = DetectionAccumulator()
    acc.add(first)
    acc.add(torch.from_numpy(second).view(1, 1, -1, 5))  # tensors are accepted too
    assert acc.num_pos == {1: 2, 2: 1, 3: 1, 4: 0}
    whole = evaluate_batch(DET, GT, config())[0]
    for version in ("11point", "MaxIntegral", "Integral"):
        assert acc.mean_ap(version) == detection_map([whole], version)
        assert acc.mean_ap(version) == detection_map([{"eval": first}, {"eval": second}],
                                                     version)


def test_caffe_float32_recall_quirk_in_11point():
    # 7 of 10 positives found: recall 7/10 is 0.69999999f in float32, below Caffe's double
    # threshold 0.7, so that threshold scores 0 (a float64 VOC evaluation gives 8/11)
    ap = compute_ap(np.linspace(0.9, 0.3, 7), np.ones(7), np.zeros(7), 10, "11point")
    assert ap == pytest.approx(7 / 11, abs=1e-6)


def test_pixel_mode_uses_sizes_plus_one_and_advances_per_image():
    # the same boxes in a 1000x1000 and a 10x10 image: normalised IoU 0.4 (FP), but with
    # Caffe's +1 pixel areas the 10x10 image gives (1.8*3)/(3*3) = 0.6 (TP)
    gt = np.array([[0, 1, 0, 0, 0, 0.2, 0.2, 0], [1, 1, 0, 0, 0, 0.2, 0.2, 0]], np.float32)
    det = np.array([[0, 1, 0.9, 0, 0, 0.08, 0.2], [1, 1, 0.9, 0, 0, 0.08, 0.2]], np.float32)
    sizes = [(1000, 1000), (10, 10)]
    rows, count = evaluate_batch(det, gt, config(num_classes=2, sizes=sizes))
    assert rows[1:, 3].tolist() == [0, 1]
    assert count == 0  # two images seen, wrapped around the two lines
    rows, _ = evaluate_batch(det, gt, config(num_classes=2))
    assert rows[1:, 3].tolist() == [0, 0]


def test_layer_reads_name_size_file_and_keeps_count(tmp_path):
    (tmp_path / "ns.txt").write_text("a 1000 1000\nb 10 10\n")
    gt = np.array([[0, 1, 0, 0, 0, 0.2, 0.2, 0]], np.float32)
    det = np.array([[0, 1, 0.9, 0, 0, 0.08, 0.2]], np.float32)
    text = f"""name: "ev" type: "DetectionEvaluate" bottom: "d" bottom: "g" top: "e"
        detection_evaluate_param {{ num_classes: 2 name_size_file: "{tmp_path / 'ns.txt'}" }}"""
    layer, first = evaluate_layer(text, det, gt)
    with torch.no_grad():
        (second,) = layer(torch.from_numpy(det.reshape(1, 1, 1, 7)),
                          torch.from_numpy(gt.reshape(1, 1, 1, 8)))
    assert first.reshape(-1, 5)[1, 3] == 0 and second.numpy().reshape(-1, 5)[1, 3] == 1
    layer.reset()
    with torch.no_grad():
        (again,) = layer(torch.from_numpy(det.reshape(1, 1, 1, 7)),
                         torch.from_numpy(gt.reshape(1, 1, 1, 8)))
    assert again.numpy().reshape(-1, 5)[1, 3] == 0
    layer.seek(3)  # the 4th image: line 2 of 2 again
    with torch.no_grad():
        (fourth,) = layer(torch.from_numpy(det.reshape(1, 1, 1, 7)),
                          torch.from_numpy(gt.reshape(1, 1, 1, 8)))
    assert fourth.numpy().reshape(-1, 5)[1, 3] == 1
    text = text.replace(str(tmp_path / "ns.txt"), str(tmp_path / "missing.txt"))
    with pytest.raises(LayerError, match="missing.txt not found"):
        evaluate_layer(text, det, gt)


def test_layer_rejects_bad_shapes_and_missing_num_classes():
    with pytest.raises(LayerError, match="num_classes"):
        evaluate_layer('name: "ev" type: "DetectionEvaluate" bottom: "d" bottom: "g" '
                       'top: "e"', DET, GT)
    param = text_format.Parse('name: "ev" type: "DetectionEvaluate" bottom: "d" bottom: "g" '
                              'top: "e" detection_evaluate_param { num_classes: 2 }',
                              caffe_pb2.LayerParameter())
    with pytest.raises(LayerError, match=r"\(1, 1, N, 8\)"):
        layer_class("DetectionEvaluate")(param, [(1, 1, 3, 7), (1, 1, 3, 7)])


def test_unknown_ap_version_is_an_error():
    with pytest.raises(CalibratorError, match="ap_version"):
        detection_map([], "VOC2010")


# --- the shared res10 face detector on faces-pseudo ------------------------------------------

def _voc_ap_11point(tp: np.ndarray, fp: np.ndarray, npos: int) -> float:
    """VOC2007 devkit (VOCevaldet.m): 11-point interpolated AP, float64."""
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = prec[rec >= t].max() if (rec >= t).any() else 0.0
        ap += p / 11
    return ap


def _voc_evaluate(detections: dict, truth: dict) -> float:
    """The VOC definition on pixel boxes: every detection of the class sorted by confidence,
    matched to the ground truth of its image with the largest overlap (areas with +1);
    overlap >= 0.5 and not yet detected: TP, difficult: ignored, otherwise FP."""
    items = [(score, name, box) for name, dets in detections.items() for score, box in dets]
    items.sort(key=lambda x: -x[0])
    npos = sum(int(not d) for boxes in truth.values() for _, d in boxes)
    used = {name: [False] * len(boxes) for name, boxes in truth.items()}
    tp, fp = np.zeros(len(items)), np.zeros(len(items))
    keep = np.ones(len(items), bool)
    for k, (_, name, bb) in enumerate(items):
        ovmax, jmax = -math.inf, -1
        for j, (g, _) in enumerate(truth.get(name, [])):
            iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
            ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
            if iw > 0 and ih > 0:
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                      + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - iw * ih)
                if iw * ih / ua > ovmax:
                    ovmax, jmax = iw * ih / ua, j
        if ovmax >= 0.5:
            if truth[name][jmax][1]:
                keep[k] = False  # difficult: neither TP nor FP
            elif not used[name][jmax]:
                tp[k], used[name][jmax] = 1, True
            else:
                fp[k] = 1
        else:
            fp[k] = 1
    return _voc_ap_11point(tp[keep], fp[keep], npos)


def _faces(shared):
    folder = shared / "data/faces-pseudo"
    entries = [line.split() for line in (folder / "list.txt").read_text().splitlines()
               if line.strip()]
    return folder, entries


@pytest.fixture(scope="session")
def opencv_voc_map(shared):
    """11-point VOC mAP of OpenCV dnn's FP32 res10 detections on faces-pseudo."""
    folder, entries = _faces(shared)
    model = shared / "models/res10_ssd"
    net = cv2.dnn.readNetFromCaffe(str(model / "deploy.prototxt"),
                                   str(model / "res10_300x300_ssd_iter_140000.caffemodel"))
    detections, truth = {}, {}
    for image, xml in entries:
        img = cv2.imread(str(folder / image))
        h, w = img.shape[:2]
        net.setInput(cv2.dnn.blobFromImage(img, 1.0, (300, 300), (104.0, 177.0, 123.0)))
        out = net.forward().reshape(-1, 7)
        rows = out[out[:, 1] == 1]
        boxes = np.clip(rows[:, 3:7].astype(np.float64), 0, 1) * [w, h, w, h]
        detections[image] = [(float(s), b) for s, b in zip(rows[:, 2], boxes)]
        root = ET.parse(folder / xml).getroot()
        truth[image] = [([int(o.find(f"bndbox/{t}").text) for t in ("xmin", "ymin", "xmax",
                                                                    "ymax")],
                         o.find("difficult").text.strip() == "1")
                        for o in root.findall("object")]
    return _voc_evaluate(detections, truth)


def _our_map(prototxt, weights, iterations):
    from calibrator.data import batches
    from calibrator.graph.layers.detection_evaluate import evaluation_outputs, reset_state
    from calibrator.model import load_model

    model = load_model(prototxt, weights)
    (blob,) = evaluation_outputs(model.net)
    reset_state(model.net)
    outputs = []
    with torch.no_grad():
        for _, feeds in batches(model, iterations, quiet=True):
            outputs.append(model.net(feeds)[blob])
    return {v: detection_map(outputs, v) for v in ("11point", "MaxIntegral", "Integral")}


def _test_net(shared, tmp_path, batch_size, source=None):
    from calibrator.caffe.prototxt import read_net, write_net
    from calibrator.detection.deploy import add_detection_evaluation

    folder, _ = _faces(shared)
    model = shared / "models/res10_ssd"
    net = add_detection_evaluation(read_net(model / "deploy.prototxt"), folder / "list.txt",
                                   folder / "labelmap.prototxt", folder / "name_size.txt",
                                   (104, 177, 123), 1.0, (300, 300), batch_size=batch_size)
    if source is not None:
        net.layer[0].data_param.source = str(source)
        net.layer[0].data_param.backend = caffe_pb2.DataParameter.LMDB
    path = tmp_path / "test.prototxt"
    write_net(path, net)
    return path, model / "res10_300x300_ssd_iter_140000.caffemodel"


@pytest.fixture(scope="session")
def list_source_map(shared, tmp_path_factory):
    """Our mAP through the list source, all 71 images in one batch (71 is prime: a smaller
    batch would wrap around and count an image twice)."""
    proto, weights = _test_net(shared, tmp_path_factory.mktemp("list"), 71)
    return _our_map(proto, weights, 1)


@pytest.fixture(scope="session")
def lmdb_source_map(shared, tmp_path_factory):
    """Our mAP through an LMDB written by make-annoset, all 71 images in one batch."""
    from calibrator.detection.annoset import write_annoset

    folder, _ = _faces(shared)
    tmp = tmp_path_factory.mktemp("lmdb")
    write_annoset(folder / "list.txt", tmp / "faces_lmdb", folder / "labelmap.prototxt")
    proto, weights = _test_net(shared, tmp, 71, source=tmp / "faces_lmdb")
    return _our_map(proto, weights, 1)


@pytest.mark.slow
def test_res10_map_through_list_source_equals_voc_on_opencv(opencv_voc_map, list_source_map):
    # the labels are the detector's own boxes: high, but not 1 (off-image boxes were
    # dropped from the labels and count as false positives)
    assert 0.8 < opencv_voc_map < 1.0
    assert list_source_map["11point"] == pytest.approx(opencv_voc_map, abs=1e-6)


@pytest.mark.slow
def test_res10_map_through_make_annoset_lmdb_equals_list(list_source_map, lmdb_source_map,
                                                         opencv_voc_map):
    assert lmdb_source_map["11point"] == pytest.approx(opencv_voc_map, abs=1e-6)
    for version, value in list_source_map.items():
        assert lmdb_source_map[version] == pytest.approx(value, abs=1e-7)


def test_add_detection_evaluation_wires_a_test_net(shared, tmp_path):
    from calibrator.caffe.prototxt import read_net
    from calibrator.detection.deploy import add_detection_evaluation

    folder, _ = _faces(shared)
    deploy = read_net(shared / "models/res10_ssd/deploy.prototxt")
    net = add_detection_evaluation(deploy, folder / "list.txt", folder / "labelmap.prototxt",
                                   folder / "name_size.txt", (104, 177, 123), 0.5, (200, 300))
    data, evaluate = net.layer[0], net.layer[-1]
    assert data.type == "AnnotatedData" and list(data.top) == ["data", "label"]
    assert list(data.transform_param.mean_value) == [104, 177, 123]
    assert data.transform_param.scale == 0.5
    resize = data.transform_param.resize_param
    assert (resize.height, resize.width, resize.resize_mode) == (200, 300, 1)
    assert data.data_param.batch_size == 1  # the Input's batch
    assert data.data_param.source == str((folder / "list.txt").resolve())
    assert evaluate.type == "DetectionEvaluate"
    assert list(evaluate.bottom) == ["detection_out", "label"]
    p = evaluate.detection_evaluate_param
    assert (p.num_classes, p.background_label_id, p.overlap_threshold,
            p.evaluate_difficult_gt) == (2, 0, pytest.approx(0.5), False)
    assert p.name_size_file == str((folder / "name_size.txt").resolve())
    assert [l.type for l in net.layer].count("Input") == 0
    del deploy.layer[-1]  # no DetectionOutput left
    with pytest.raises(CalibratorError, match="DetectionOutput"):
        add_detection_evaluation(deploy, folder / "list.txt", folder / "labelmap.prototxt")


@pytest.mark.slow
def test_gate_map_follows_ap_version(shared, tmp_path, list_source_map):
    """The gate scores mAP as --ap-version says (caffe test's -ap_version; 11point by
    default), for FP32 and INT8 alike: its FP32 value is the mAP of that version."""
    from calibrator.cli.main import main

    folder, _ = _faces(shared)
    model = shared / "models/res10_ssd"
    weights = model / "res10_300x300_ssd_iter_140000.caffemodel"
    quantized = tmp_path / "res10_q.prototxt"
    assert main(["-m", str(model / "deploy.prototxt"), "-w", str(weights), "-q", "-s", "1",
                 "--images", str(folder / "images"), "--mean", "104", "177", "123",
                 "--batch-size", "8", "--quiet", "--output", str(quantized)]) == 0
    values = {}
    for version in (None, "MaxIntegral"):
        out = tmp_path / f"{version}.json"
        argv = ["gate", "-m", str(model / "deploy.prototxt"), "-w", str(weights),
                str(quantized), "--det-list", str(folder / "list.txt"), "--labelmap",
                str(folder / "labelmap.prototxt"), "--name-size",
                str(folder / "name_size.txt"), "--mean", "104", "177", "123", "--size",
                "300", "300", "--batch-size", "71", "-i", "1", "-l", "1", "--quiet",
                "--json", str(out)] + (["--ap-version", version] if version else [])
        assert main(argv) == 0
        (result,) = json.loads(out.read_text())["results"]
        values[version] = result["fp32"]
    assert values[None] == pytest.approx(list_source_map["11point"], abs=1e-6)
    assert values["MaxIntegral"] == pytest.approx(list_source_map["MaxIntegral"], abs=1e-6)
    assert abs(values["MaxIntegral"] - values[None]) > 1e-3
