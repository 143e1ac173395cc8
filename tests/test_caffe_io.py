"""Prototxt/caffemodel readers and writers, V1 upgrade, input headers, phase filtering."""

from __future__ import annotations

import numpy as np
from google.protobuf import text_format
import pytest

from calibrator.caffe import caffe_pb2
from calibrator.caffe.caffemodel import read_caffemodel, write_caffemodel
from calibrator.caffe.netstate import filter_net
from calibrator.caffe.prototxt import read_net, write_net
from calibrator.errors import CalibratorError

V1_NET = """
name: "old"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
         blobs_lr: 1 blobs_lr: 2
         convolution_param { num_output: 4 kernel_size: 3 } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
layers { name: "pool" type: POOLING bottom: "conv" top: "pool"
         pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layers { name: "ip" type: INNER_PRODUCT bottom: "pool" top: "ip"
         inner_product_param { num_output: 5 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" top: "loss"
         include { phase: TRAIN } }
"""


def test_v1_layers_and_input_dim_header_are_upgraded(tmp_path):
    path = tmp_path / "old.prototxt"
    path.write_text(V1_NET)
    net = read_net(path)
    assert [l.type for l in net.layer] == ["Input", "Convolution", "ReLU", "Pooling",
                                           "InnerProduct", "SoftmaxWithLoss"]
    assert list(net.layer[0].top) == ["data"]
    assert list(net.layer[0].input_param.shape[0].dim) == [2, 3, 8, 8]
    assert net.layer[1].convolution_param.num_output == 4
    assert [p.lr_mult for p in net.layer[1].param] == [1.0, 2.0]
    assert net.layer[3].pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert len(net.input) == 0 and len(net.layers) == 0


def test_v1_caffemodel_blobs_with_num_channels_height_width(tmp_path):
    net = caffe_pb2.NetParameter()
    layer = net.layers.add(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
    blob = layer.blobs.add(num=1, channels=1, height=5, width=3)
    blob.data.extend(np.arange(15, dtype=np.float32))
    bias = layer.blobs.add(num=1, channels=1, height=1, width=5)
    bias.data.extend([1, 2, 3, 4, 5])
    path = tmp_path / "old.caffemodel"
    path.write_bytes(net.SerializeToString())
    weights = read_caffemodel(path)
    assert weights["ip"][0].shape == (1, 1, 5, 3)
    assert weights["ip"][0][0, 0, 4, 2] == 14
    assert weights["ip"][1].ravel().tolist() == [1, 2, 3, 4, 5]


def test_input_shape_header(tmp_path):
    path = tmp_path / "n.prototxt"
    path.write_text('input: "a" input_shape { dim: 1 dim: 3 dim: 4 dim: 5 }\n'
                    'input: "b" input_shape { dim: 1 dim: 2 }\n'
                    'layer { name: "r" type: "ReLU" bottom: "a" top: "a" }\n')
    net = read_net(path)
    assert net.layer[0].type == "Input" and list(net.layer[0].top) == ["a", "b"]
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 3, 4, 5], [1, 2]]


def test_input_dim_count_mismatch_is_an_error(tmp_path):
    path = tmp_path / "n.prototxt"
    path.write_text('input: "a" input_dim: 1 input_dim: 3\n')
    with pytest.raises(CalibratorError, match="input_dim"):
        read_net(path)


def test_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.prototxt"
    path.write_text('name: "x"\nlayer {\n  name: "a"\n  type: "ReLU"\n  bogus_field: 3\n}\n')
    with pytest.raises(CalibratorError) as info:
        read_net(path)
    message = str(info.value)
    assert message.startswith(f"{path}:5:") and "bogus_field" in message
    assert "\n" not in message


def test_missing_prototxt(tmp_path):
    with pytest.raises(CalibratorError, match="not found"):
        read_net(tmp_path / "nope.prototxt")


RULES_NET = """
layer { name: "always" type: "ReLU" bottom: "x" top: "x" }
layer { name: "train" type: "ReLU" bottom: "x" top: "x" include { phase: TRAIN } }
layer { name: "test" type: "ReLU" bottom: "x" top: "x" include { phase: TEST } }
layer { name: "not_test" type: "ReLU" bottom: "x" top: "x" exclude { phase: TEST } }
layer { name: "staged" type: "ReLU" bottom: "x" top: "x" include { phase: TEST stage: "deploy" } }
layer { name: "unstaged" type: "ReLU" bottom: "x" top: "x" include { not_stage: "deploy" } }
layer { name: "leveled" type: "ReLU" bottom: "x" top: "x" include { min_level: 2 } }
layer { name: "either" type: "ReLU" bottom: "x" top: "x"
        include { phase: TRAIN } include { stage: "deploy" } }
"""


@pytest.mark.parametrize("stages,level,expected", [
    ((), None, ["always", "test", "unstaged"]),
    (("deploy",), None, ["always", "test", "staged", "either"]),
    ((), 3, ["always", "test", "unstaged", "leveled"]),
])
def test_phase_stage_level_rules(tmp_path, stages, level, expected):
    path = tmp_path / "rules.prototxt"
    path.write_text(RULES_NET)
    net = filter_net(read_net(path), stages=stages, level=level)
    assert [l.name for l in net.layer] == expected


def test_caffemodel_round_trip_keeps_order_types_and_values(tmp_path):
    net = caffe_pb2.NetParameter(name="n")
    net.layer.add(name="conv", type="Convolution")
    net.layer.add(name="bn", type="BatchNorm")
    rng = np.random.default_rng(0)
    weights = {"bn": [rng.normal(size=4).astype(np.float32)] * 2 + [np.array([999.982], np.float32)],
               "conv": [rng.normal(size=(4, 3, 3, 3)).astype(np.float32)]}
    path = write_caffemodel(tmp_path / "w.caffemodel", weights, net)
    raw = caffe_pb2.NetParameter.FromString(path.read_bytes())
    assert [(l.name, l.type) for l in raw.layer] == [("conv", "Convolution"), ("bn", "BatchNorm")]
    back = read_caffemodel(path)
    assert list(back) == ["conv", "bn"]
    for name in weights:
        for a, b in zip(weights[name], back[name]):
            assert a.shape == b.shape and np.array_equal(a, b)
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"


def test_caffemodel_carries_full_layer_definitions(tmp_path):
    """Intel Caffe compiles a caffemodel's own layers when loading it (BatchNorm folding):
    without tops it aborts, without bias_term it crashes (FINDINGS §0.6): every layer of
    the net is written as Net::ToProto writes it, blobs where there are weights."""
    text = """name: "n"
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "c"
            convolution_param { num_output: 2 kernel_size: 3 bias_term: false } }
    layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" batch_norm_param { eps: 0.1 } }
    layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }
    layer { name: "pool" type: "Pooling" bottom: "c" top: "p"
            pooling_param { pool: AVE kernel_size: 2 round_mode: FLOOR } }"""
    net = text_format.Merge(text, caffe_pb2.NetParameter())
    weights = {"conv": [np.ones((2, 3, 3, 3), np.float32)],
               "bn": [np.zeros(2, np.float32), np.ones(2, np.float32), np.ones(1, np.float32)]}
    raw = caffe_pb2.NetParameter.FromString(
        write_caffemodel(tmp_path / "w.caffemodel", weights, net).read_bytes())
    assert [l.name for l in raw.layer] == ["data", "conv", "bn", "relu", "pool"]
    conv, bn = raw.layer[1], raw.layer[2]
    assert list(conv.bottom) == ["data"] and list(conv.top) == ["c"]
    assert conv.convolution_param.HasField("bias_term") and not conv.convolution_param.bias_term
    assert bn.batch_norm_param.eps == pytest.approx(0.1) and len(bn.blobs) == 3
    assert len(raw.layer[3].blobs) == 0 and list(raw.layer[3].top) == ["c"]
    # PoolingParameter 13 is round_mode for us, avg_include_pad for Intel: not written
    assert not raw.layer[4].pooling_param.HasField("round_mode")
    assert raw.layer[4].pooling_param.kernel_size == 2
    assert list(read_caffemodel(tmp_path / "w.caffemodel")) == ["conv", "bn"]


def test_not_a_caffemodel(tmp_path):
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(b"\xff\xff\xff\xff garbage")
    with pytest.raises(CalibratorError, match="bad.caffemodel"):
        read_caffemodel(path)


def test_prototxt_writer_is_canonical_and_reparses(tmp_path):
    path = tmp_path / "n.prototxt"
    path.write_text(V1_NET)
    net = read_net(path)
    out = write_net(tmp_path / "out.prototxt", net)
    again = read_net(out)
    assert again == net
    write_net(tmp_path / "out2.prototxt", again)
    assert (tmp_path / "out.prototxt").read_bytes() == (tmp_path / "out2.prototxt").read_bytes()


def test_training_snapshot_weights_matched_by_name(shared):
    """res10's caffemodel is a training net (AnnotatedData, Split, MultiBoxLoss...)."""
    weights = read_caffemodel(shared / "models/res10_ssd/res10_300x300_ssd_iter_140000.caffemodel")
    deploy = read_net(shared / "models/res10_ssd/deploy.prototxt")
    with_blobs = {l.name for l in deploy.layer} & set(weights)
    assert len(weights) == 53 and with_blobs == set(weights)
    assert weights["data_bn"][2].tolist() == pytest.approx([999.982], rel=1e-5)
