"""Channel equalization (``--equalize``, calibrator.quant.equalize): which tensors it may
rescale, its factors, and that the rescaled weights compute the same FP32 net in OpenCV's
Caffe importer (an independent runtime) while every channel reaches the widest one."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import pytest
import torch

from calibrator.caffe.caffemodel import read_caffemodel, write_caffemodel
from calibrator.cli.main import main
from calibrator.quant.equalize import Group, alpha_of, factors, find_groups, rescaled
from tests.netutil import deployable, parse_net, random_weights, tinted_image_net
from tests.opencv_ref import opencv_forward
from tests.quant_helpers import bn_scale_text, conv_text, input_text, relu_text


def relu6_text(name, blob):
    return f'layer {{ name: "{name}" type: "ReLU6" bottom: "{blob}" top: "{blob}" }}\n'


def eltwise_text(name, bottoms, top, operation="SUM"):
    joined = " ".join(f'bottom: "{b}"' for b in bottoms)
    return (f'layer {{ name: "{name}" type: "Eltwise" {joined} top: "{top}" '
            f'eltwise_param {{ operation: {operation} }} }}\n')


#: c1 -> ReLU6 -> depthwise -> ReLU -> two 1x1 branches summed -> f, and g read by a pool
BLOCK = (conv_text("c1", "data", "a", 6, 3) + bn_scale_text("c1", "a") + relu6_text("r1", "a")
         + conv_text("dw", "a", "b", 6, 3, "group: 6") + bn_scale_text("dw", "b")
         + relu_text("r2", "b")
         + conv_text("p", "b", "c", 4) + bn_scale_text("p", "c")
         + conv_text("q", "b", "d", 4)
         + eltwise_text("e", ["c", "d"], "e")
         + conv_text("f", "e", "g", 5) + relu_text("r3", "g")
         + 'layer { name: "pool" type: "Pooling" bottom: "g" top: "pool" '
           'pooling_param { pool: AVE global_pooling: true } }\n')


def _net(text, seed=0):
    from calibrator.graph.net import CaffeNet

    net_param = parse_net(input_text((2, 3, 8, 8)) + text)
    weights = random_weights(net_param, seed=seed)
    return net_param, weights, CaffeNet(net_param, weights).eval()


def _summary(groups):
    return [(sorted(g.blobs), g.producers, g.consumers, g.clipped, g.channels) for g in groups]


def test_groups_follow_the_readers_and_writers():
    _, weights, net = _net(BLOCK)
    assert _summary(find_groups(net, weights)) == [
        (["a"], ["c1_scale"], ["dw"], ["a"], 6),          # ReLU6 in place: clipped
        (["b"], ["dw_scale"], ["p", "q"], [], 6),
        (["c", "d", "e"], ["p_scale", "q"], ["f"], [], 4),  # the sum shares one factor
    ]   # g: read by a Pooling, not rescalable


@pytest.mark.parametrize("change, gone", [
    # a product is not homogeneous: the stream is refused (its parts are then separate
    # tensors each read by the Eltwise: refused too)
    (lambda t: t.replace("operation: SUM", "operation: PROD"), ["c"]),
    # a BatchNorm without a Scale cannot carry a factor
    (lambda t: t.replace(bn_scale_text("dw", "b"),
                         'layer { name: "dw_bn" type: "BatchNorm" bottom: "b" top: "b" }\n'),
     ["b"]),
    # a ReLU writing another blob reads the tensor: not a convolution
    (lambda t: t.replace(relu6_text("r1", "a"),
                         'layer { name: "r1" type: "ReLU6" bottom: "a" top: "a2" }\n')
     .replace('bottom: "a" top: "b"', 'bottom: "a2" top: "b"'), ["a"]),
    # a sigmoid does not commute with a factor
    (lambda t: t.replace('type: "ReLU6"', 'type: "Sigmoid"'), ["a"]),
])
def test_a_reader_or_writer_that_does_not_commute_refuses_the_group(change, gone):
    _, weights, net = _net(change(BLOCK))
    blobs = {b for g in find_groups(net, weights) for b in g.blobs}
    assert blobs and not blobs & set(gone)


def test_factors_alpha_dead_channels_and_the_relu6_cap():
    group = Group(blobs=["x", "y"], clipped=["y"], channels=4)
    maxima = {"x": torch.tensor([10.0, 1.0, 2.5, 0.0], dtype=torch.float64),
              "y": torch.tensor([6.0, 3.0, 0.5, 0.0], dtype=torch.float64)}
    # r = [10, 3, 2.5, 0]: s = R / r; y's ReLU6 caps s at 6 / y's own max: [1, 2, 12]
    assert factors(group, maxima, 1.0) == pytest.approx([1.0, 2.0, 4.0, 1.0])
    assert factors(group, maxima, 0.5) == pytest.approx(
        [1.0, np.sqrt(10 / 3), 2.0, 1.0])
    tiny = {"x": torch.tensor([1.0, 1e-5]), "y": torch.tensor([1.0, 1e-5])}
    assert factors(Group(["x", "y"], channels=2), tiny, 1.0) == pytest.approx([1.0, 1.0])
    for bad in (float("inf"), float("nan")):   # an FP32 overflow leaves the group alone
        values = {"x": torch.tensor([bad, 1.0]), "y": torch.tensor([1.0, 0.5])}
        assert list(factors(Group(["x", "y"], channels=2), values, 1.0)) == [1.0, 1.0]


def test_alpha_is_one_only_for_depthwise_consumers_with_per_channel_weights():
    _, weights, net = _net(BLOCK)
    a, b, _ = find_groups(net, weights)
    assert alpha_of(a, weights, per_channel=True) == 1.0
    assert alpha_of(a, weights, per_channel=False) == 0.5
    assert alpha_of(b, weights, per_channel=True) == 0.5


#: a deploy block for OpenCV (no Pooling: its outputs are the tensors themselves)
DEPLOY = BLOCK.split('layer { name: "pool"')[0]


def _maxima(net, feeds, blobs):
    with torch.no_grad():
        out = net({"data": torch.from_numpy(feeds)}, outputs=blobs)
    return {b: out[b].abs().amax(dim=(0, 2, 3)).double() for b in blobs}


@pytest.mark.parametrize("per_channel", [True, False])
def test_rescaled_weights_compute_the_same_net_in_opencv(per_channel):
    """OpenCV runs the original and the rescaled caffemodel on the images the ranges were
    measured on: the same output and the same final tensor of every group (up to the
    factors), and each equalized channel of an alpha-1 group at the widest channel's
    range (alpha 1/2: at the geometric mean of its own and the widest)."""
    net_param, weights, net = _net(DEPLOY, seed=4)
    rng = np.random.default_rng(9)
    # channels of very different ranges: the case equalization is for
    for name in ("c1_scale", "dw_scale", "p_scale"):
        spread = np.geomspace(1, 0.02, weights[name][0].size).astype(np.float32)
        weights[name] = [weights[name][0] * spread, weights[name][1] * spread]
    weights["c1_scale"][0] *= 4   # past ReLU6's 6 on the widest channels
    x = rng.uniform(0, 3, (2, 3, 8, 8)).astype(np.float32)
    from calibrator.graph.net import CaffeNet

    net = CaffeNet(net_param, weights).eval()
    groups = find_groups(net, weights)
    blobs = sorted({b for g in groups for b in g.blobs})
    maxima = _maxima(net, x, blobs)
    scales = [factors(g, maxima, alpha_of(g, weights, per_channel)) for g in groups]
    assert all(s.max() > 2 for s in scales)   # something was rescaled
    new = rescaled(weights, net, groups, scales)
    text = input_text((2, 3, 8, 8)) + DEPLOY
    # OpenCV's outputs by layer: the last layer writing each (in-place) blob (its Caffe
    # importer names a convolution after its top)
    writer = {"a": "r1", "b": "r2", "c": "p_scale", "d": "d", "e": "e"}
    assert set(writer) == set(blobs)

    def run(blobs_):
        got = opencv_forward(text, blobs_, {"data": x}, ["r3"] + [writer[b] for b in blobs],
                             fusion=False)   # every layer's own output readable
        return {"g": got["r3"], **{b: got[writer[b]] for b in blobs}}
    before, after = run(weights), run(new)
    assert np.abs(after["g"] - before["g"]).max() <= 1e-5 * np.abs(before["g"]).max()
    for group, s in zip(groups, scales):
        alpha = alpha_of(group, weights, per_channel)
        widest = max(float(np.abs(before[b]).max()) for b in group.blobs)
        for blob in group.blobs:
            scaled = before[blob] * s.reshape(1, -1, 1, 1)
            assert np.abs(after[blob] - scaled).max() <= 1e-5 * np.abs(scaled).max()
        r = np.max([np.abs(before[b]).max(axis=(0, 2, 3)) for b in group.blobs], axis=0)
        reached = np.max([np.abs(after[b]).max(axis=(0, 2, 3)) for b in group.blobs], axis=0)
        if not group.clipped:
            assert reached == pytest.approx(widest ** alpha * r ** (1 - alpha), rel=1e-5)
        else:   # under a ReLU6 the cap keeps s r <= 6
            assert np.all(reached <= 6 * (1 + 1e-6))
            assert reached == pytest.approx(np.minimum(widest ** alpha * r ** (1 - alpha),
                                                       6.0), rel=1e-5)


TEMPLATE = ('layer {{ name: "data" type: "ImageData" top: "data" top: "label" '
            'transform_param {{ scale: 0.02 }} image_data_param {{ source: "{source}" '
            'root_folder: "{root}/" batch_size: 4 }} }}\n'
            + BLOCK.replace("{", "{{").replace("}", "}}")
            + 'layer {{ name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" '
              'inner_product_param {{ num_output: 3 }} }}\n'
            + 'layer {{ name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" '
              'top: "acc" }}\n')


@pytest.fixture(scope="module")
def image_net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("equalize")
    prototxt, _ = tinted_image_net(tmp, np.random.default_rng(2), 8, 8, TEMPLATE, "net")
    net_param = parse_net(prototxt.read_text())
    weights = random_weights(net_param, {"data": (4, 3, 8, 8), "label": (4,)}, seed=6)
    for name in ("c1_scale", "dw_scale", "p_scale"):
        spread = np.geomspace(1, 0.02, weights[name][0].size).astype(np.float32)
        weights[name] = [weights[name][0] * spread, weights[name][1] * spread]
    caffemodel = tmp / "net.caffemodel"
    write_caffemodel(caffemodel, weights, net_param)
    return tmp, prototxt, caffemodel


def test_equalize_needs_weights_out(image_net, capsys):
    tmp, prototxt, caffemodel = image_net
    out = tmp / "refused"
    code = main(["-m", str(prototxt), "-w", str(caffemodel), "-q", "--equalize",
                 "--output", str(out / "q.prototxt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--weights-out" in err[0]
    assert not out.exists()


def test_cli_writes_the_rescaled_weights_and_opencv_sees_one_range(image_net):
    """-q -c multiple --equalize --weights-out: the input caffemodel untouched; the JSON
    names the written caffemodel and the groups; the written weights are the original ones
    with each group's channel factor multiplied into its producers and divided out of its
    consumers (so the FP32 net is the same, as OpenCV shows above); and OpenCV running the
    written caffemodel on the calibration images finds every live channel of the depthwise
    conv's input at one range."""
    tmp, prototxt, caffemodel = image_net
    digest = hashlib.sha256(caffemodel.read_bytes()).hexdigest()
    out = tmp / "eq"
    assert main(["-m", str(prototxt), "-w", str(caffemodel), "-q", "-c", "multiple",
                 "-s", "2", "--quiet", "--equalize", "--output", str(out / "q.prototxt"),
                 "--weights-out", str(out / "q.caffemodel"), "--json",
                 str(out / "q.json")]) == 0
    assert hashlib.sha256(caffemodel.read_bytes()).hexdigest() == digest
    record = json.loads((out / "q.json").read_text())
    assert record["weights_out"] == str(out / "q.caffemodel")
    groups = record["equalization"]["groups"]
    assert [sorted(g["tensors"]) for g in groups] == [["a"], ["b"], ["c", "d", "e"]]
    assert all(g["largest_factor"] > 1.5 for g in groups)
    o = {k: [np.asarray(b, np.float64) for b in v] for k, v in
         read_caffemodel(caffemodel).items()}
    w = {k: [np.asarray(b, np.float64) for b in v] for k, v in
         read_caffemodel(out / "q.caffemodel").items()}
    s_a = w["c1_scale"][0] / o["c1_scale"][0]     # (c1 is FP32: no bias shift either)
    s_b = w["dw_scale"][0] / o["dw_scale"][0]
    s_c = w["p_scale"][0] / o["p_scale"][0]
    assert np.all(s_a > 0) and np.all(s_b > 0) and np.all(s_c > 0)
    assert np.allclose(w["c1_scale"][1], o["c1_scale"][1] * s_a, rtol=1e-5, atol=1e-7)
    assert np.allclose(w["dw"][0], o["dw"][0] / s_a[:, None, None, None], rtol=1e-5)
    assert np.allclose(w["p"][0], o["p"][0] / s_b[None, :, None, None], rtol=1e-5)
    assert np.allclose(w["q"][0], o["q"][0] * s_c[:, None, None, None]
                       / s_b[None, :, None, None], rtol=1e-5)
    assert np.allclose(w["f"][0], o["f"][0] / s_c[None, :, None, None], rtol=1e-5)
    from calibrator.caffe.prototxt import read_net, write_net

    deploy = tmp / "deploy.prototxt"
    write_net(deploy, deployable(read_net(prototxt), {"data": (8, 3, 8, 8)},
                                 drop_types=("Accuracy",)))
    images = sorted((tmp / "img").glob("*.png"))
    x = np.stack([cv2.imread(str(p)).transpose(2, 0, 1) for p in images]).astype(
        np.float32) * 0.02
    cv_net = cv2.dnn.readNetFromCaffe(str(deploy), str(out / "q.caffemodel"))
    cv_net.setInput(x, "data")
    a = cv_net.forward("r1")      # the last layer writing the in-place blob a
    ranges = np.abs(a).max(axis=(0, 2, 3))
    live = ranges > 1e-3 * ranges.max()
    assert live.sum() >= 3
    assert ranges[live] == pytest.approx(ranges.max(), rel=1e-4)
