"""The ncnn files we write, read back the way ncnn reads them (tests/ncnn_reader.py), against
the conventions of ncnn's tools: which layers there are, Caffe's pooling windows, the
calibration table (ncnn2table's 6-bit Winograd weight scales) and what ncnn2int8 stores.
None of these tests needs the ncnn package."""

from __future__ import annotations

import numpy as np
import pytest

from calibrator.errors import LayerError
from calibrator.graph.layers.pooling import caffe_pooled_size
from calibrator.ncnn.quantize import read_ncnn_table
from calibrator.ncnn.writer import build_ncnn_graph, write_ncnn_model
from tests.ncnn_reader import read_model
from tests.quant_helpers import TinyNet, conv_text, input_text, relu_text


def _read(model):
    return {layer.name: layer for layer in read_model(model.param_path.read_text(),
                                                      model.bin_path.read_bytes())}


@pytest.mark.parametrize("layer_text", [
    'layer { name: "crop_me" type: "Crop" bottom: "data" bottom: "data" top: "y" }',
    'layer { name: "tile_me" type: "Tile" bottom: "data" top: "y" tile_param { tiles: 2 } }',
    'layer { name: "argmax_me" type: "ArgMax" bottom: "data" top: "y" }',
    'layer { name: "batch_concat" type: "Concat" bottom: "data" bottom: "data" top: "y" '
    'concat_param { axis: 0 } }',
])
def test_layers_without_ncnn_counterpart_raise(layer_text, tmp_path):
    net = TinyNet(input_text((1, 4, 6, 6)) + layer_text + "\n")
    name = layer_text.split('"')[1]
    with pytest.raises(LayerError) as error:
        write_ncnn_model(net.net, None, tmp_path / "m")
    assert error.value.layer_name == name
    assert not (tmp_path / "m.param").exists()


def test_evaluation_layers_and_their_inputs_are_left_out(tmp_path):
    text = ('layer { name: "input" type: "Input" top: "data" top: "label" input_param { '
            'shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 } } }\n'
            + conv_text("conv", "data", "conv", 4, 3) + relu_text("relu", "conv")
            + 'layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" '
              'inner_product_param { num_output: 5 } }\n'
              'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" '
              'top: "loss" }\n'
              'layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" }\n')
    model = write_ncnn_model(TinyNet(text).net, None, tmp_path / "m")
    layers = read_model(model.param_path.read_text(), model.bin_path.read_bytes())
    assert [(l.type, l.name) for l in layers] == [
        ("Input", "data"), ("Convolution", "conv"), ("InnerProduct", "fc")]
    assert layers[0].tops == ["data"] and layers[0].params == {0: 8, 1: 8, 2: 3}
    assert layers[1].params[9] == 1  # ReLU fused as activation_type 1, as ncnnoptimize does
    assert model.outputs == {"fc": "fc"}


def _ncnn_pooled(size, kernel, stride, pad_left, pad_right, pad_mode):
    """src/layer/pooling.cpp make_padding + forward: the output length ncnn computes."""
    if pad_mode == 0:
        tail = (size + pad_left + pad_right - kernel) % stride
        pad_right += stride - tail if tail else 0
    return (size + pad_left + pad_right - kernel) // stride + 1


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_pooling_gets_caffes_window_count(pool):
    checked = 0
    for size in range(3, 12):
        for kernel in (2, 3):
            for stride in (1, 2, 3):
                for pad in range(kernel):
                    text = input_text((1, 2, size, size)) + (
                        f'layer {{ name: "p" type: "Pooling" bottom: "data" top: "p" '
                        f'pooling_param {{ pool: {pool} kernel_size: {kernel} stride: {stride} '
                        f'pad: {pad} }} }}\n')
                    try:
                        graph = build_ncnn_graph(TinyNet(text).net)
                    except LayerError:
                        assert pool == "AVE" and pad > 0  # a window crosses the padded border
                        continue
                    p = graph.layer("p").params
                    expected = caffe_pooled_size(size, kernel, pad, stride, True, pad > 0)
                    got = _ncnn_pooled(size, kernel, stride, p[3], p[14], p.get(5, 0))
                    assert got == expected, (size, kernel, stride, pad, p)
                    if pool == "AVE" and pad:
                        assert p[6] == 1  # divide by the kernel area, padding included
                    checked += 1
    assert checked > 80


WINOGRAD_NET = (input_text((2, 8, 10, 10))
                + conv_text("c3s1", "data", "c3s1", 16, 3) + relu_text("r1", "c3s1")
                + conv_text("c3s2", "c3s1", "c3s2", 16, 3, "stride: 2")
                + conv_text("dw3s1", "c3s2", "dw3s1", 16, 3, "group: 16") + relu_text("r2", "dw3s1")
                + conv_text("c1", "dw3s1", "c1", 12, 1)
                + conv_text("c3s1b", "c1", "c3s1b", 8, 3)
                + 'layer { name: "fc" type: "InnerProduct" bottom: "c3s1b" top: "fc" '
                  'inner_product_param { num_output: 6 } }\n')


def test_table_follows_ncnn2table_winograd_convention(tmp_path):
    """ncnn2table (tools/quantize/ncnn2table.cpp) gives a 3x3 stride-1 dilation-1
    Convolution 31/max|W| per output channel (6-bit, for int8 Winograd F(4,3)), every other
    layer 127/max|W|, with W the weights of the optimized FP32 ncnn model; blob lines are
    127/T. Here W is read back from the FP32 .bin we write."""
    net = TinyNet(WINOGRAD_NET, seed=2)
    plan = net.calibrate(first_conv=True, per_channel=True, quantize_fc=True)
    fp32 = _read(write_ncnn_model(net.net, None, tmp_path / "fp32"))
    int8_model = write_ncnn_model(net.net, plan, tmp_path / "int8", table=tmp_path / "t.table")
    table = read_ncnn_table((tmp_path / "t.table").read_text())
    assert set(table) == {"c3s1", "c3s2", "dw3s1", "c1", "c3s1b", "fc"}
    for name, scales in table.items():
        layer = fp32[name]
        storage, weight = layer.blobs[0]
        assert storage == "fp32"
        rows = layer.params.get(7, 1) if layer.type == "ConvolutionDepthWise" else layer.params[0]
        absmax = np.abs(weight.reshape(rows, -1)).max(axis=1).astype(np.float32)
        limit = 31 if name in ("c3s1", "c3s1b") else 127
        np.testing.assert_allclose(scales.weight_scales, np.float32(limit) / absmax, rtol=2e-6,
                                   err_msg=name)
        lq = plan.layers[name]
        assert scales.bottom_scale == np.float32(127 / lq.input_threshold)
    # ncnn2int8 then stores weights of at most 6 bits for those convolutions
    int8 = _read(int8_model)
    for name in table:
        storage, q = int8[name].blobs[0]
        assert storage == "int8"
        limit = 31 if name in ("c3s1", "c3s1b") else 127
        assert np.abs(q.astype(int)).max() == limit, name


def test_int8_model_stores_what_ncnn2int8_stores(tmp_path):
    """int8 weights = float2int8(W * scale) per output channel, the table's scales, the
    requantize fusion between consecutive convolutions (int8_scale_term + 100, the next
    layer's bottom scale), fp16 weights for the layers left in float (ncnn2int8's
    storage_type 1)."""
    net = TinyNet(WINOGRAD_NET, seed=2)
    plan = net.calibrate(per_channel=True)  # Intel's default: first conv and fc stay FP32
    fp32 = _read(write_ncnn_model(net.net, None, tmp_path / "fp32"))
    int8 = _read(write_ncnn_model(net.net, plan, tmp_path / "int8", table=tmp_path / "t"))
    table = read_ncnn_table((tmp_path / "t").read_text())
    for name, layer in int8.items():
        if name not in table:
            if layer.blobs and layer.type != "BatchNorm":
                storage, weight = layer.blobs[0]
                assert storage == "fp16", name
                np.testing.assert_array_equal(
                    weight, fp32[name].blobs[0][1].astype(np.float16).astype(np.float32))
            continue
        scales = table[name]
        w = fp32[name].blobs[0][1]
        rows = len(scales.weight_scales)
        v = (w.reshape(rows, -1) * scales.weight_scales[:, None]).astype(np.float32)
        expected = np.clip(np.where(v >= 0, np.floor(v + np.float32(0.5)),
                                    np.ceil(v - np.float32(0.5))), -127, 127)
        np.testing.assert_array_equal(layer.blobs[0][1].reshape(rows, -1), expected)
        np.testing.assert_array_equal(layer.blobs[2][1], scales.weight_scales)
        assert layer.blobs[3][1][0] == scales.bottom_scale
    # c3s2 -> dw3s1 -> c1 -> c3s1b are consecutive int8 convolutions: requantized
    for producer, reader in (("c3s2", "dw3s1"), ("dw3s1", "c1"), ("c1", "c3s1b")):
        assert int8[producer].params[8] > 100, producer
        assert int8[producer].blobs[-1][1][0] == table[reader].bottom_scale
    assert int8["c3s1b"].params[8] == 2  # its reader is the FP32 InnerProduct
    assert "c3s1" not in table  # Intel's default plan keeps the first convolution in FP32
