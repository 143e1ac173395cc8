"""ncnn's INT8 arithmetic: our simulation (calibrator.ncnn.simulate) against ncnn's real x86
kernels (the ``ncnn`` package) and against a numpy reference written here from ncnn's source.

Exactness: every int8 layer's output (float or requantized int8) is bit-exact; so is every
float layer whose float32 result does not depend on summation order (Eltwise SUM of two
inputs, MAX pooling, Concat). That needs ncnn's rounding rules: float2int8's +-0.5 trick,
saturation at +-127, 1/(s_in*s_w) in float32 (``_mm_rcp_ps`` on the packed depthwise path,
read off ncnn on this CPU), and one rounding (fma) or two per kernel (see
calibrator.ncnn.simulate.dequantize_rule)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from calibrator.ncnn.quantize import read_ncnn_table
from calibrator.ncnn.simulate import NcnnSimulator
from calibrator.ncnn.writer import write_ncnn_model
from calibrator.quant.simulate import Int8Simulator
from tests.quant_helpers import TinyNet, bn_scale_text, conv_int64, conv_text, input_text, relu_text


def relu6(blob, name):
    return f'layer {{ name: "{name}" type: "ReLU6" bottom: "{blob}" top: "{blob}" }}\n'


#: every x86 int8 path: im2col/packed conv (s8 first-layer input), Winograd F(4,3) 3x3 s1,
#: packed depthwise (rcpps, no fma), elempack-1 depthwise 3x3 s2 (fma) and 5x5 (no fma),
#: requantization into a convolution and into a Split of convolutions, a float residual add,
#: Concat, MAX pooling, an int8 InnerProduct (-fc)
PATH_NET = (input_text((2, 3, 20, 20))
            + conv_text("c1", "data", "c1", 16, 3, "stride: 2") + bn_scale_text("c1", "c1")
            + relu6("c1", "c1_relu")
            + conv_text("dw1", "c1", "dw1", 16, 3, "group: 16") + bn_scale_text("dw1", "dw1")
            + relu6("dw1", "dw1_relu")
            + conv_text("pw1", "dw1", "pw1", 16, 1) + bn_scale_text("pw1", "pw1")
            + 'layer { name: "add1" type: "Eltwise" bottom: "c1" bottom: "pw1" top: "add1" }\n'
            + conv_text("w3", "add1", "w3", 12, 3) + relu_text("w3_relu", "w3")
            + conv_text("dw2", "w3", "dw2", 12, 3, "group: 12 stride: 2")
            + relu_text("dw2_relu", "dw2")
            + conv_text("dw3", "dw2", "dw3", 12, 5, "group: 12") + relu6("dw3", "dw3_relu")
            + conv_text("a", "dw3", "a", 8, 1) + relu_text("a_relu", "a")
            + conv_text("b", "dw3", "b", 16, 3)
            + 'layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }\n'
              'layer { name: "pool" type: "Pooling" bottom: "cat" top: "pool" '
              'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
              'layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" '
              'inner_product_param { num_output: 10 } }\n')


def test_int8_model_on_ncnn_equals_simulation_bit_for_bit(tmp_path):
    pytest.importorskip("ncnn")
    from calibrator.ncnn.runtime import run_ncnn

    net = TinyNet(PATH_NET, seed=5)
    plan = net.calibrate(first_conv=True, per_channel=True, quantize_fc=True)
    model = write_ncnn_model(net.net, plan, tmp_path / "int8")
    terms = {l.name: l.int8_scale_term for l in model.graph.live()}
    assert terms["dw1"] == 101 and terms["c1"] == 2 and terms["w3"] == 102  # c1 feeds a Split
    assert terms["dw3"] == 101 and terms["fc"] == 2                         # ...to convs only
    simulator = NcnnSimulator(net.fused, plan)
    x = np.random.default_rng(11).normal(0, 1.2, (3, 3, 20, 20)).astype(np.float32)
    with torch.no_grad():
        ours = net.net({"data": torch.from_numpy(x)}, overrides=simulator.overrides,
                       keep_all=True)
    compared = 0
    for layer in model.graph.live():
        if layer.type in ("Input", "Split"):
            continue
        caffe_blob = net.net.nodes[max(layer.nodes)].tops[0]
        got = run_ncnn(model.param_path, model.bin_path, {"data": x}, [layer.tops[0]])
        ref = ours[caffe_blob].numpy()
        got = got[layer.tops[0]].reshape(ref.shape)
        assert np.array_equal(got, ref), (layer.name, int((got != ref).sum()), ref.size)
        compared += 1
    assert compared == 12


# -- where ncnn and Intel differ, against integers computed here from ncnn's source ----------

RESIDUAL_NET = (input_text((2, 4, 8, 8))
                + conv_text("conv_a", "data", "conv_a", 8, 3) + relu_text("relu_a", "conv_a")
                + conv_text("conv_b", "conv_a", "conv_b", 8, 1)
                + 'layer { name: "add" type: "Eltwise" bottom: "conv_a" bottom: "conv_b" '
                  'top: "add" }\n'
                + conv_text("conv_c", "add", "conv_c", 6, 1))


def f2i8(v):
    """float2int8_avx512 (src/layer/x86/x86_usability.h): trunc(v + copysign(0.5f, v)) in
    float32, saturated to [-127, 127]."""
    v = np.asarray(v, np.float32)
    return np.clip(np.trunc(v + np.copysign(np.float32(0.5), v)), -127, 127).astype(np.int64)


def round_f32(value: Fraction) -> np.float32:
    """The float32 nearest to an exact rational (ties to even): what a fused multiply-add
    returns."""
    guess = np.float32(float(value))
    candidates = [guess, np.nextafter(guess, np.float32(-np.inf)),
                  np.nextafter(guess, np.float32(np.inf))]
    best = min(abs(Fraction(float(c)) - value) for c in candidates)
    ties = [c for c in candidates if abs(Fraction(float(c)) - value) == best]
    return min(ties, key=lambda c: int(np.float32(c).view(np.int32)) & 1)


def dequantize(acc, bottom_scale, weight_scales, bias):
    """Convolution_x86 + Dequantize_x86 (src/layer/x86/dequantize_x86.cpp):
    scale_in = 1.f / (bottom_scale * weight_scale) in float32, then
    _mm512_fmadd_ps(float(acc), scale_in, bias): a*b + c rounded once."""
    out = np.empty(acc.shape, np.float32)
    for o in range(acc.shape[1]):
        scale = np.float32(1) / np.float32(np.float32(bottom_scale) * np.float32(weight_scales[o]))
        s, b = Fraction(float(scale)), Fraction(float(np.float32(bias[o])))
        for index in np.ndindex(acc.shape[0], *acc.shape[2:]):
            at = (index[0], o) + index[1:]
            out[at] = round_f32(Fraction(int(acc[at])) * s + b)
    return out


def ncnn_reference(net, table, x):
    """conv_a (s8 input, ReLU) -> conv_b (s8 input, float output: its reader is an Eltwise)
    -> float32 add -> conv_c (s8 input of the sum), as ncnn runs the model ncnn2int8 makes
    from the Caffe weights and our ``table`` (weights quantized with ncnn2int8's
    quantize_to_int8, i.e. the same float2int8)."""
    outputs = {}

    def layer(name, inp, pad, relu):
        weight, bias = (np.asarray(b, np.float32) for b in net.weights[name])
        bottom, scales = table[name].bottom_scale, table[name].weight_scales
        q_w = f2i8(weight * scales[:, None, None, None])
        q_in = f2i8(inp * bottom)
        outputs[name + "_q_in"] = q_in
        y = dequantize(conv_int64(q_in, q_w, pad=(pad, pad)), bottom, scales, bias)
        outputs[name] = np.maximum(y, np.float32(0)) if relu else y
        return outputs[name]

    a = layer("conv_a", x, 1, True)
    b = layer("conv_b", a, 0, False)
    outputs["add"] = (a + b).astype(np.float32)
    layer("conv_c", outputs["add"], 0, False)
    return outputs


def test_ncnn_arithmetic_differs_from_intel_and_matches_integer_reference(tmp_path):
    net = TinyNet(RESIDUAL_NET, seed=7)
    plan = net.calibrate(first_conv=True, per_channel=True)
    # Intel: conv_b reads u8 (after the ReLU, 255/T) and absorbs the add with an int8 output
    lq_b = plan.layers["conv_b"]
    assert lq_b.input_unsigned and net.fused.by_name["conv_b"].eltwise is not None
    model = write_ncnn_model(net.net, plan, tmp_path / "residual", table=tmp_path / "table")
    table = read_ncnn_table((tmp_path / "table").read_text())
    # ncnn's blob scale is 127/T: signed, also after the ReLU
    assert table["conv_b"].bottom_scale == np.float32(127 / lq_b.input_threshold)
    x = np.random.default_rng(3).normal(0, 1, (2, 4, 8, 8)).astype(np.float32)
    ref = ncnn_reference(net, table, x)
    simulator = NcnnSimulator(net.fused, plan, reciprocal="exact")
    with torch.no_grad():
        ours = net.net({"data": torch.from_numpy(x)}, overrides=simulator.overrides,
                       keep_all=True)
        intel = net.net({"data": torch.from_numpy(x)},
                        overrides=Int8Simulator(net.fused, plan).overrides)
    for blob in ("conv_a", "conv_b", "add", "conv_c"):
        if blob in ref:
            assert np.array_equal(ours[blob].numpy(), ref[blob]), blob
    # the two runtimes really compute different things here
    u8 = np.clip(np.rint(ours["conv_a"].numpy() * np.float32(lq_b.scale_in)), 0, 255)
    assert u8.max() > 127 >= ref["conv_b_q_in"].max()
    assert not np.array_equal(intel["conv_c"].numpy(), ref["conv_c"])
    # and ncnn's own kernels agree with the reference where the package is installed
    try:
        from calibrator.ncnn.runtime import run_ncnn
        import ncnn  # noqa: F401
    except ImportError:
        return
    got = run_ncnn(model.param_path, model.bin_path, {"data": x}, ["add", "conv_c"])
    assert np.array_equal(got["add"].reshape(ref["add"].shape), ref["add"])
    assert np.array_equal(got["conv_c"].reshape(ref["conv_c"].shape), ref["conv_c"])


def test_float_layers_of_an_int8_model_run_with_fp16_weights(tmp_path):
    """Intel's default plan keeps the first convolution in FP32, and Deconvolution is never
    quantized: ncnn2int8 stores their weights in fp16, ncnn runs them in float32 with those
    weights; the simulation does the same, to float32 rounding (another summation order)."""
    pytest.importorskip("ncnn")
    from calibrator.ncnn.runtime import run_ncnn

    text = (input_text((2, 3, 12, 12))
            + conv_text("c1", "data", "c1", 8, 3, "stride: 2") + bn_scale_text("c1", "c1")
            + relu_text("r1", "c1")
            + conv_text("c2", "c1", "c2", 8, 1) + relu_text("r2", "c2")
            + 'layer { name: "up" type: "Deconvolution" bottom: "c2" top: "up" '
              'convolution_param { num_output: 4 kernel_size: 2 stride: 2 } }\n'
            + bn_scale_text("up", "up") + relu_text("r3", "up")
            + conv_text("c3", "up", "c3", 6, 1))
    net = TinyNet(text, seed=9)
    plan = net.calibrate(per_channel=True)
    assert set(plan.layers) == {"c2", "c3"}
    model = write_ncnn_model(net.net, plan, tmp_path / "mixed")
    assert {l.name for l in model.graph.live() if l.fp16_weight} == {"c1", "up"}
    x = np.random.default_rng(2).normal(0, 1, (2, 3, 12, 12)).astype(np.float32)
    with torch.no_grad():
        ours = net.net({"data": torch.from_numpy(x)},
                       overrides=NcnnSimulator(net.fused, plan).overrides, keep_all=True)
        fp32_weights = net.net({"data": torch.from_numpy(x)}, keep_all=True)
    got = run_ncnn(model.param_path, model.bin_path, {"data": x}, ["c1_r1", "up_r3"])
    for ncnn_blob, blob in (("c1_r1", "c1"), ("up_r3", "up")):
        ref = ours[blob].numpy()
        diff = np.abs(got[ncnn_blob].reshape(ref.shape) - ref).max()
        assert diff <= 1e-5 * np.abs(ref).max(), blob
        # and the fp16 weights matter: FP32 Caffe weights give visibly different values
        assert np.abs(fp32_weights[blob].numpy() - ref).max() > 10 * diff + 1e-7, blob
