"""SSD layers and box utilities against hand-computed values and OpenCV dnn (an independent
Caffe-SSD runtime)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from calibrator.caffe import caffe_pb2
from calibrator.errors import LayerError
from calibrator.detection import boxes as bx
from calibrator.graph.layer import layer_class
from tests.opencv_ref import opencv_forward


def make_layer(text: str, bottom_shapes, blobs=None):
    param = caffe_pb2.LayerParameter()
    text_format.Merge(text, param)
    layer = layer_class(param.type)(param, bottom_shapes)
    layer.load_blobs([np.asarray(b, dtype=np.float32) for b in (blobs or [])])
    return layer


def run(layer, *inputs):
    with torch.no_grad():
        outs = layer(*[torch.as_tensor(np.asarray(x, dtype=np.float32)) for x in inputs])
    assert isinstance(outs, tuple)
    return [o.numpy() for o in outs]


def input_layers(shapes: dict) -> str:
    return "".join(
        f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ '
        + " ".join(f"dim: {d}" for d in shape) + " } } }\n"
        for name, shape in shapes.items())


def assert_close(ours, ref, rel=1e-4):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=rel * max(np.abs(ref).max(), 1e-30))


# -- boxes -----------------------------------------------------------------------------------

def test_jaccard_by_hand():
    a = torch.tensor([0.0, 0.0, 0.4, 0.4])
    cases = [
        ([0.2, 0.2, 0.6, 0.6], 0.04 / 0.28),   # partial overlap
        ([0.0, 0.0, 0.4, 0.4], 1.0),           # identical
        ([0.4, 0.0, 0.8, 0.4], 0.0),           # touching edge
        ([0.5, 0.5, 0.9, 0.9], 0.0),           # disjoint
        ([0.1, 0.1, 0.3, 0.3], 0.04 / 0.16),   # contained
        ([0.3, 0.3, 0.1, 0.1], 0.0),           # inverted box: area 0, no intersection
    ]
    b = torch.tensor([c[0] for c in cases])
    got = bx.iou_matrix(a[None], b)[0]
    np.testing.assert_allclose(got.numpy(), [c[1] for c in cases], rtol=1e-6)
    # batched and symmetric
    m = bx.iou_matrix(b[None].expand(2, -1, -1), b[None].expand(2, -1, -1))
    assert m.shape == (2, 6, 6) and torch.equal(m, m.transpose(1, 2))


# Four boxes, listed in score order: A, B, D, C with
#   IoU(A,B) = 0.12/0.16 = 0.75, IoU(A,C) = 0.12/0.20 = 0.6, IoU(B,C) = 0.08/0.20 = 0.4,
#   D disjoint from all.
NMS_BOXES = torch.tensor([[0.0, 0.0, 0.4, 0.4],    # A 0.9
                          [0.0, 0.0, 0.4, 0.3],    # B 0.85
                          [0.5, 0.5, 0.9, 0.9],    # D 0.8
                          [0.0, 0.1, 0.4, 0.5]])   # C 0.7
NMS_SCORES = torch.tensor([0.9, 0.85, 0.8, 0.7])


@pytest.mark.parametrize("kwargs, expected", [
    # A kept, B suppressed (0.75 > 0.7), D kept, C kept (0.6 <= 0.7, 0 with D)
    (dict(nms_threshold=0.7), [0, 2, 3]),
    # A kept, B and C suppressed (0.75, 0.6 > 0.5), D kept
    (dict(nms_threshold=0.5), [0, 2]),
    # adaptive: 0.7 -> 0.63 after A (B 0.75 out), -> 0.567 after D, so C (0.6) out although
    # it was within the threshold in force when A was kept
    (dict(nms_threshold=0.7, eta=0.9), [0, 2]),
    # eta only shrinks while the threshold is above 0.5: 0.52 -> 0.26 after A, then stays;
    # B, C out (0.75, 0.6), D in
    (dict(nms_threshold=0.52, eta=0.5), [0, 2]),
    # top_k bounds the candidates before NMS, not the kept boxes: A, B -> A only
    (dict(nms_threshold=0.7, top_k=2), [0]),
    (dict(nms_threshold=0.7, top_k=0), []),
    # the confidence filter is strict: D (0.8) is not > 0.8
    (dict(nms_threshold=0.7, score_threshold=0.8), [0]),
])
def test_nms_by_hand(kwargs, expected):
    kwargs = dict(dict(score_threshold=0.0), **kwargs)
    # shuffle the input so that the result does not depend on input order
    perm = torch.tensor([3, 1, 0, 2])
    kept = bx.nms_fast(NMS_BOXES[perm], NMS_SCORES[perm], **kwargs)
    assert perm[kept].tolist() == expected


def test_nms_ties_keep_lower_index_and_zero_threshold():
    b = torch.tensor([[0.1, 0.1, 0.3, 0.3]] * 3 + [[0.5, 0.5, 0.6, 0.6]])
    s = torch.tensor([0.5, 0.7, 0.7, 0.6])
    assert bx.nms_fast(b, s, 0.0, 0.5).tolist() == [1, 3]  # stable sort: 1 before 2
    # threshold 0 keeps only boxes that do not overlap any kept one
    assert bx.nms_fast(b, s, 0.0, 0.0).tolist() == [1, 3]


def apply_nms_fast_loop(boxes, scores, score_threshold, nms_threshold, eta, top_k):
    """bbox_util.cpp's ApplyNMSFast transcribed line by line (one candidate at a time)."""
    pairs = [(float(s), i) for i, s in enumerate(scores) if s > score_threshold]
    pairs.sort(key=lambda p: -p[0])  # Python's sort is stable, like std::stable_sort
    if -1 < top_k < len(pairs):
        pairs = pairs[:top_k]
    threshold = np.float32(nms_threshold)
    indices = []
    for _, idx in pairs:
        keep = True
        for kept in indices:
            overlap = bx.jaccard(boxes[idx], boxes[kept])
            keep = bool(overlap <= threshold)
            if not keep:
                break
        if keep:
            indices.append(idx)
        if keep and eta < 1 and threshold > 0.5:
            threshold = np.float32(threshold * np.float32(eta))
    return indices


@pytest.mark.parametrize("nms_threshold, eta, top_k", [
    (0.45, 1.0, -1), (0.8, 0.9, -1), (0.7, 0.95, 25), (0.3, 1.0, 10)])
def test_nms_matches_caffe_loop(nms_threshold, eta, top_k):
    rng = np.random.default_rng(3)
    centre = rng.uniform(0.2, 0.8, (200, 2))
    size = rng.uniform(0.05, 0.4, (200, 2))
    boxes = torch.tensor(np.concatenate([centre - size / 2, centre + size / 2], 1),
                         dtype=torch.float32)
    scores = torch.tensor(rng.uniform(0, 1, 200).round(2), dtype=torch.float32)  # with ties
    expected = apply_nms_fast_loop(boxes, scores, 0.2, nms_threshold, eta, top_k)
    assert len(expected) > 5
    assert bx.nms_fast(boxes, scores, 0.2, nms_threshold, eta, top_k).tolist() == expected


def test_batched_nms_groups_are_independent():
    boxes = NMS_BOXES[None].expand(3, -1, -1)
    scores = torch.stack([NMS_SCORES, NMS_SCORES.flip(0), torch.zeros(4)])
    order, keep = bx.batched_nms_fast(boxes, scores, 0.1, 0.7)
    rows = [order[g][keep[g]].tolist() for g in range(3)]
    assert rows[0] == [0, 2, 3]
    assert rows[1] == bx.nms_fast(NMS_BOXES, NMS_SCORES.flip(0), 0.1, 0.7).tolist()
    assert rows[1] == [3, 2, 1]  # C, D, B kept (IoU(C,B) = 0.4), A out (0.6 with C)
    assert rows[2] == []


def test_decode_by_hand():
    prior = torch.tensor([[0.2, 0.2, 0.6, 0.4]])      # w 0.4, h 0.2, centre (0.4, 0.3)
    var = torch.tensor([[0.1, 0.1, 0.2, 0.2]])
    ln2 = math.log(2.0)
    # centre x 0.1*1*0.4 + 0.4 = 0.44, y 0.1*-2*0.2 + 0.3 = 0.26, w 2*0.4, h 0.2
    expected = [0.04, 0.16, 0.84, 0.36]
    got = bx.decode_boxes(torch.tensor([[1.0, -2.0, 5 * ln2, 0.0]]), prior, var, bx.CENTER_SIZE)
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-6)
    got = bx.decode_boxes(torch.tensor([[0.1, -0.2, ln2, 0.0]]), prior, var, bx.CENTER_SIZE,
                          variance_encoded_in_target=True)
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-6)
    loc = torch.tensor([[1.0, -1.0, 2.0, 3.0]])
    got = bx.decode_boxes(loc, prior, var, bx.CORNER)
    np.testing.assert_allclose(got[0].numpy(), [0.3, 0.1, 1.0, 1.0], atol=1e-6)
    got = bx.decode_boxes(loc, prior, var, bx.CORNER_SIZE)  # offsets times prior w/h
    np.testing.assert_allclose(got[0].numpy(), [0.24, 0.18, 0.76, 0.52], atol=1e-6)
    got = bx.decode_boxes(loc, prior, var, bx.CORNER, variance_encoded_in_target=True)
    np.testing.assert_allclose(got[0].numpy(), [1.2, -0.8, 2.6, 3.4], atol=1e-6)
    got = bx.decode_boxes(loc, prior, var, bx.CORNER, clip=True)
    np.testing.assert_allclose(got[0].numpy(), [0.3, 0.1, 1.0, 1.0], atol=1e-6)


# -- Normalize -------------------------------------------------------------------------------

def test_normalize_by_hand():
    x = np.array([[[[3.0, 0.0]], [[4.0, 1.0]]]])  # (1, 2, 1, 2): positions (3,4) and (0,1)
    layer = make_layer('name: "n" type: "Normalize" norm_param { across_spatial: false '
                       'channel_shared: false }', [x.shape], [[2.0, 10.0]])
    assert layer.blob_shapes() == [(2,)]
    (y,) = run(layer, x)
    np.testing.assert_allclose(y, [[[[3 / 5 * 2, 0.0]], [[4 / 5 * 10, 1.0 * 10]]]], rtol=1e-6)
    layer = make_layer('name: "n" type: "Normalize"', [x.shape], [[20.0]])  # defaults
    assert layer.blob_shapes() == [(1,)]
    (y,) = run(layer, x)
    np.testing.assert_allclose(y, x / math.sqrt(26.0) * 20, rtol=1e-6)
    (y,) = run(layer, np.zeros((3, 2, 1, 2)))  # eps keeps zeros finite
    assert np.all(y == 0)
    layer = make_layer('name: "n" type: "Normalize" norm_param { channel_shared: false }',
                       [x.shape], [[2.0, 10.0]])
    (y,) = run(layer, np.concatenate([x, 2 * x]))  # per sample norms: sqrt(26), 2 sqrt(26)
    np.testing.assert_allclose(y, np.concatenate([x, x]) / math.sqrt(26.0)
                               * np.array([2.0, 10.0])[None, :, None, None], rtol=1e-6)
    with pytest.raises(LayerError):
        make_layer('name: "n" type: "Normalize"', [x.shape], [[1.0, 2.0]])


@pytest.mark.parametrize("across_spatial, channel_shared", [
    (False, False), (False, True), (True, True)])  # OpenCV lacks across + per-channel scale
def test_normalize_matches_opencv(across_spatial, channel_shared):
    rng = np.random.default_rng(1)
    shape = (2, 5, 4, 3)
    x = rng.normal(size=shape).astype(np.float32)
    scale = rng.uniform(1, 20, size=1 if channel_shared else shape[1]).astype(np.float32)
    norm = (f'name: "norm" type: "Normalize" bottom: "x" top: "norm" norm_param {{ '
            f'across_spatial: {str(across_spatial).lower()} '
            f'channel_shared: {str(channel_shared).lower()} }}')
    ref = opencv_forward(input_layers({"x": shape}) + f"layer {{ {norm} }}",
                         {"norm": [scale]}, {"x": x}, ["norm"])["norm"]
    (y,) = run(make_layer(norm, [shape], [scale]), x)
    assert_close(y, ref)


# -- PriorBox --------------------------------------------------------------------------------

def prior_box_by_hand(layer_hw, img_hw, min_size, max_size, ratios, step, offset, clip):
    """Caffe-SSD's loop written out in plain Python (ratios already expanded by flip)."""
    out = []
    for h in range(layer_hw[0]):
        for w in range(layer_hw[1]):
            cx, cy = (w + offset) * step[1], (h + offset) * step[0]
            sizes = [(min_size, min_size), (math.sqrt(min_size * max_size),) * 2]
            sizes += [(min_size * math.sqrt(r), min_size / math.sqrt(r)) for r in ratios]
            for bw, bh in sizes:
                out.append([(cx - bw / 2) / img_hw[1], (cy - bh / 2) / img_hw[0],
                            (cx + bw / 2) / img_hw[1], (cy + bh / 2) / img_hw[0]])
    out = np.array(out)
    return np.clip(out, 0, 1) if clip else out


def test_prior_box_by_hand():
    # 2x2 map on a 20x16 (h x w) image, step 10 x 8 (h, w), offset 0.2: centres (1.6, 2),
    # (9.6, 2), (1.6, 12), (9.6, 12); min 4, max 9 (sqrt 6), ratio 2 flipped to 0.5 -> 4
    # priors per cell in order min, sqrt(min*max), 2, 1/2; clip cuts the corners below 0
    text = ('name: "p" type: "PriorBox" prior_box_param { min_size: 4 max_size: 9 '
            'aspect_ratio: 2 flip: true clip: true variance: 0.1 variance: 0.1 variance: 0.2 '
            'variance: 0.2 step_h: 10 step_w: 8 offset: 0.2 }')
    layer = make_layer(text, [(1, 8, 2, 2), (1, 3, 20, 16)])
    (y,) = run(layer, np.zeros((3, 8, 2, 2)), np.zeros((3, 3, 20, 16)))
    assert y.shape == (1, 2, 2 * 2 * 4 * 4)
    expected = prior_box_by_hand((2, 2), (20, 16), 4, 9, [2, 0.5], (10, 8), 0.2, True)
    np.testing.assert_allclose(y[0, 0].reshape(-1, 4), expected, atol=1e-6)
    # first cell, first prior written out: centre (1.6, 2), side 4 -> [-0.4, 0, 3.6, 4] / (16, 20)
    np.testing.assert_allclose(y[0, 0, :4], [0.0, 0.0, 3.6 / 16, 0.2], atol=1e-6)
    # second prior: side 6 -> [-1.4, -1, 4.6, 5] -> clipped [0, 0, 0.2875, 0.25]
    np.testing.assert_allclose(y[0, 0, 4:8], [0.0, 0.0, 4.6 / 16, 0.25], atol=1e-6)
    np.testing.assert_allclose(y[0, 1].reshape(-1, 4), np.tile([0.1, 0.1, 0.2, 0.2], (16, 1)),
                               atol=1e-7)
    # img_h/img_w replace the image bottom's size (OpenCV ignores them)
    layer = make_layer(text.replace("step_h", "img_h: 20 img_w: 16 step_h"),
                       [(1, 8, 2, 2), (1, 3, 99, 99)])
    (y2,) = run(layer, np.zeros((1, 8, 2, 2)), np.zeros((1, 3, 99, 99)))
    np.testing.assert_array_equal(y2, y)


def test_prior_box_defaults_and_int_sizes():
    # no step: image / map; one variance for all four; no max_size; ratio 1 and duplicates
    # ignored. Caffe-SSD truncates min_size to int (4.7 -> 4), unlike OpenCV.
    text = ('name: "p" type: "PriorBox" prior_box_param { min_size: 4.7 aspect_ratio: 1 '
            'aspect_ratio: 3 aspect_ratio: 3.0000001 flip: false variance: 0.5 }')
    layer = make_layer(text, [(1, 1, 3, 2), (1, 3, 30, 10)])
    assert layer.num_priors == 2
    (y,) = run(layer, np.zeros((1, 1, 3, 2)), np.zeros((1, 3, 30, 10)))
    r3 = math.sqrt(3)
    out = []
    for h in range(3):
        for w in range(2):
            cx, cy = (w + 0.5) * 5, (h + 0.5) * 10
            for bw, bh in [(4, 4), (4 * r3, 4 / r3)]:
                out.append([(cx - bw / 2) / 10, (cy - bh / 2) / 30, (cx + bw / 2) / 10,
                            (cy + bh / 2) / 30])
    np.testing.assert_allclose(y[0, 0].reshape(-1, 4), out, atol=1e-6)
    assert np.all(y[0, 1] == np.float32(0.5))
    assert y[0, 0].min() < 0 and y[0, 0].max() > 1  # clip defaults to false


def test_prior_box_rejects_bad_params():
    for body in ['max_size: 10', 'min_size: 10 max_size: 5', 'min_size: 4 variance: 0.1 '
                 'variance: 0.2', 'min_size: 4 step: 8 step_h: 8']:
        with pytest.raises(LayerError):
            make_layer(f'name: "p" type: "PriorBox" prior_box_param {{ {body} }}',
                       [(1, 1, 2, 2), (1, 3, 8, 8)])


@pytest.mark.parametrize("params, fmap, image", [
    # MobileNet-SSD style: step from the image, two ratios flipped
    ("min_size: 60 max_size: 105 aspect_ratio: 2 aspect_ratio: 3 flip: true clip: false "
     "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 offset: 0.5", (19, 19), (300, 300)),
    # two min sizes, clip, img_size and a non-square map
    ("min_size: 30 min_size: 50 max_size: 60 max_size: 90 aspect_ratio: 2 clip: true "
     "variance: 0.1 step: 16", (5, 7), (120, 100)),
])
def test_prior_box_matches_opencv(params, fmap, image):
    shapes = {"f": (1, 4) + fmap, "img": (1, 3) + image}
    text = ('name: "p" type: "PriorBox" bottom: "f" bottom: "img" top: "p" '
            f'prior_box_param {{ {params} }}')
    ref = opencv_forward(input_layers(shapes) + f"layer {{ {text} }}", None,
                         {k: np.zeros(s, np.float32) for k, s in shapes.items()}, ["p"])["p"]
    (y,) = run(make_layer(text, list(shapes.values())), *[np.zeros(s) for s in shapes.values()])
    assert_close(y, ref.reshape(y.shape))


def real_priors(prototxt, maps):
    """Run the PriorBox layers of a real deploy prototxt through ours and OpenCV (asserting
    they agree) for the given feature map sizes; the (2, P, 4) priors."""
    net = caffe_pb2.NetParameter()
    text_format.Merge(prototxt.read_text(), net)
    shapes = {name: (1, 2, size, size) for name, size in maps.items()}
    shapes["data"] = (1, 3, 300, 300)
    layers = [layer for layer in net.layer if layer.type == "PriorBox"]
    assert len(layers) == 6
    text = input_layers(shapes) + "".join(
        f"layer {{ {text_format.MessageToString(layer, as_one_line=True)} }}\n"
        for layer in layers)
    inputs = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    refs = opencv_forward(text, None, inputs, [layer.top[0] for layer in layers])
    priors = []
    for layer in layers:
        bottoms = [shapes[b] for b in layer.bottom]
        (y,) = run(layer_class("PriorBox")(layer, bottoms), *[inputs[b] for b in layer.bottom])
        assert_close(y, refs[layer.top[0]].reshape(y.shape))
        priors.append(y[0].reshape(2, -1, 4))
    return np.concatenate(priors, axis=1)


def test_res10_priors_match_opencv(shared):
    """The face detector's six PriorBox layers: 8892 priors, unclipped, reaching far past 1
    (its 5x5 maps with steps 100 and 300)."""
    priors = real_priors(shared / "models/res10_ssd/deploy.prototxt",
                         {"conv4_3_norm": 38, "fc7": 19, "conv6_2_h": 10, "conv7_2_h": 5,
                          "conv8_2_h": 5, "conv9_2_h": 5})
    assert priors.shape == (2, 8892, 4)
    # last prior: conv9_2_h cell (4, 4), centre 4.5 * 300, ratio 1/2 box of 264/sqrt2 x 264 sqrt2
    half_w, half_h = 132 / math.sqrt(2), 132 * math.sqrt(2)
    np.testing.assert_allclose(priors[0, -1], [(1350 - half_w) / 300, (1350 - half_h) / 300,
                                               (1350 + half_w) / 300, (1350 + half_h) / 300],
                               rtol=1e-6)
    assert priors[0].min() < 0


def test_mobilenet_ssd_priors_match_opencv(shared):
    """chuanqi305 MobileNet-SSD: steps derived from the image (300 / 19 ...), 1917 priors."""
    priors = real_priors(shared / "models/zoo/chuanqi305_mobilenet_ssd/deploy.prototxt",
                         {"conv11": 19, "conv13": 10, "conv14_2": 5, "conv15_2": 3,
                          "conv16_2": 2, "conv17_2": 1})
    assert priors.shape == (2, 1917, 4)


# -- DetectionOutput -------------------------------------------------------------------------

def random_detection_inputs(rng, n, p, c, loc_classes):
    centre = rng.uniform(0.1, 0.9, (p, 2))
    size = rng.uniform(0.05, 0.5, (p, 2))
    prior = np.concatenate([centre - size / 2, centre + size / 2], 1).astype(np.float32)
    var = np.tile(np.float32([0.1, 0.1, 0.2, 0.2]), (p, 1))
    prior_blob = np.stack([prior.ravel(), var.ravel()])[None]
    loc = rng.normal(0, 1, (n, p * loc_classes * 4)).astype(np.float32)
    logits = rng.normal(0, 2, (n, p, c))
    conf = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return loc, conf.reshape(n, -1).astype(np.float32), prior_blob


def detection_text(c, extra):
    return (f'name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" '
            f'top: "det" detection_output_param {{ num_classes: {c} {extra} }}')


@pytest.mark.parametrize("extra, loc_classes", [
    # top_k 10 per class and keep_top_k 25 per image both cut
    ("share_location: true background_label_id: 0 nms_param { nms_threshold: 0.45 top_k: 10 } "
     "code_type: CENTER_SIZE keep_top_k: 25 confidence_threshold: 0.05", 1),
    ("share_location: false background_label_id: 1 nms_param { nms_threshold: 0.3 } "
     "code_type: CORNER keep_top_k: 1000 confidence_threshold: 0.2", 4),
    # (OpenCV ignores nms eta, always 1: adaptive NMS is checked by hand above)
    ("share_location: true background_label_id: 0 nms_param { nms_threshold: 0.6 top_k: 30 } "
     "code_type: CENTER_SIZE variance_encoded_in_target: true keep_top_k: 1000 "
     "confidence_threshold: 0.1", 1),
])
def test_detection_output_matches_opencv(extra, loc_classes):
    rng = np.random.default_rng(2)
    n, p, c = 3, 120, 4
    loc, conf, prior = random_detection_inputs(rng, n, p, c, loc_classes)
    if "variance_encoded" in extra:
        loc *= 0.1
        prior = prior[:, :1]  # OpenCV wants no variances then; Caffe ignores them
    shapes = {"loc": loc.shape, "conf": conf.shape, "prior": prior.shape}
    text = detection_text(c, extra)
    ref = opencv_forward(input_layers(shapes) + f"layer {{ {text} }}", None,
                         {"loc": loc, "conf": conf, "prior": prior}, ["det"])["det"]
    ref = ref[0, 0][ref[0, 0, :, 2] > 0]  # OpenCV pads with zero rows
    # after keep_top_k OpenCV lists an image's rows by score; Caffe-SSD by label, then score
    ref = ref[np.lexsort((-ref[:, 2], ref[:, 1], ref[:, 0]))]
    (y,) = run(make_layer(text, list(shapes.values())), loc, conf, prior)
    assert y.shape[:2] == (1, 1) and y.shape[3] == 7
    y = y[0, 0]
    assert len(ref) > 10
    assert y.shape == ref.shape
    np.testing.assert_array_equal(y[:, :2], ref[:, :2])   # same images and labels, in order
    np.testing.assert_allclose(y[:, 2:], ref[:, 2:], atol=1e-5)
    # Caffe-SSD order: image, then label, then score descending
    keys = list(zip(y[:, 0], y[:, 1], -y[:, 2]))
    assert keys == sorted(keys)


def test_detection_output_keep_top_k_and_empty_by_hand():
    # two priors far apart, three classes (0 background); image 0 has four detections over
    # two labels, keep_top_k 3 drops the weakest; image 1 has none and gets no row
    prior = np.array([[[0.1, 0.1, 0.3, 0.3, 0.6, 0.6, 0.8, 0.8], [0.1] * 8]], np.float32)
    loc = np.zeros((2, 8), np.float32)
    conf = np.array([[0.1, 0.5, 0.4,   0.2, 0.3, 0.6],
                     [0.9, 0.05, 0.05, 0.95, 0.0, 0.05]], np.float32)
    text = detection_text(3, "nms_param { nms_threshold: 0.45 } code_type: CORNER "
                             "keep_top_k: 3 confidence_threshold: 0.1")
    layer = make_layer(text, [loc.shape, conf.shape, prior.shape])
    (y,) = run(layer, loc, conf, prior)
    box0, box1 = [0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.8, 0.8]
    np.testing.assert_allclose(y[0, 0], [[0, 1, 0.5] + box0,    # label 1: 0.5 (0.3 dropped)
                                         [0, 2, 0.6] + box1,    # label 2: 0.6 then 0.4
                                         [0, 2, 0.4] + box0], atol=1e-7)
    # nothing above the threshold anywhere: one fake row per image
    (y,) = run(layer, loc, conf * 0.1, prior)
    np.testing.assert_array_equal(y, [[[[0, -1, -1, -1, -1, -1, -1],
                                        [1, -1, -1, -1, -1, -1, -1]]]])
    # decode() exposes the NMS input
    boxes, scores = layer.decode(*[torch.from_numpy(a) for a in (loc, conf, prior)])
    assert boxes.shape == (2, 2, 1, 4) and scores.shape == (2, 2, 3)


def test_detection_output_rejects_bad_shapes():
    with pytest.raises(LayerError):
        make_layer(detection_text(3, ""), [(1, 12), (1, 6), (1, 2, 8)])   # loc for 3 priors
    with pytest.raises(LayerError):
        make_layer(detection_text(3, "nms_param { eta: 0 }"), [(1, 8), (1, 6), (1, 2, 8)])


def test_res10_detection_output_matches_opencv(shared):
    """The face detector's own DetectionOutput (8892 priors) on OpenCV's intermediate blobs
    for four real images."""
    import cv2

    model = shared / "models/res10_ssd"
    net = cv2.dnn.readNetFromCaffe(str(model / "deploy.prototxt"),
                                   str(model / "res10_300x300_ssd_iter_140000.caffemodel"))
    images = sorted((shared / "data/faces-pseudo/images").glob("*.JPEG"))[:4]
    net.setInput(cv2.dnn.blobFromImages([cv2.imread(str(p)) for p in images], 1.0, (300, 300),
                                        (104.0, 177.0, 123.0)))
    names = ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox", "detection_out"]
    blobs = dict(zip(names, net.forward(names)))
    deploy = caffe_pb2.NetParameter()
    text_format.Merge((model / "deploy.prototxt").read_text(), deploy)
    (param,) = [layer for layer in deploy.layer if layer.type == "DetectionOutput"]
    layer = layer_class("DetectionOutput")(param, [blobs[n].shape for n in names[:3]])
    (y,) = run(layer, *[blobs[n] for n in names[:3]])
    ref = blobs["detection_out"][0, 0]
    ref = ref[ref[:, 2] > 0]
    ref = ref[np.lexsort((-ref[:, 2], ref[:, 1], ref[:, 0]))]
    assert y.shape == (1, 1, len(ref), 7) and len(ref) > 100
    np.testing.assert_array_equal(y[0, 0, :, :2], ref[:, :2])
    np.testing.assert_allclose(y[0, 0, :, 2:], ref[:, 2:], atol=1e-5)
