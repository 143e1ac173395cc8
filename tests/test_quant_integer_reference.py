"""The INT8 simulation against an integer reference written here from Intel Caffe's and
MKL-DNN's sources (tests/quant_helpers.py): quantize the input (float32 product, round half to
even, saturate), quantize weights and bias as Intel's reorders do, convolve by explicit
im2col in int64, then the kernel's float32 epilogue ((acc + bias) * multiplier, fused sum,
ReLU, round, saturate). The simulated INT8 output times scale_out must give exactly the
reference integers; an FP32 output must be exactly the epilogue's float32 value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import calibrator.quant.simulate as simulate
from calibrator.quant.fusion import analyze
from calibrator.quant.scales import (LayerQuant, QuantOptions, QuantPlan, UnitChoice,
                                     build_plan)
from tests.quant_helpers import (TinyNet, as_integers, conv_int64, conv_text, dequantized,
                                 input_text, intel_output, quantize_bias, quantize_input,
                                 quantize_weights, relu_text)


class Case:
    def __init__(self, name, in_shape, conv_param, kernel, stride=(1, 1), pad=(0, 0),
                 dilation=(1, 1), group=1, bias=True, depthwise=False, in_u8=False,
                 per_channel=False, slope=None, int8_out=True, clip_in=1.0, clip_out=0.8):
        self.__dict__.update(locals())
        del self.__dict__["self"]


CASES = [
    Case("plain_s8_in_per_tensor", (2, 3, 7, 6), "num_output: 5 kernel_size: 3 pad: 1", (3, 3),
         pad=(1, 1)),
    Case("no_bias_u8_in_relu_per_channel", (2, 4, 6, 6),
         "num_output: 6 kernel_size: 3 bias_term: false", (3, 3), bias=False, in_u8=True,
         per_channel=True, slope=0.0),
    Case("grouped_stride_pad_dilation_leaky", (1, 6, 9, 8),
         "num_output: 4 kernel_size: 3 stride: 2 pad: 2 dilation: 2 group: 2", (3, 3),
         stride=(2, 2), pad=(2, 2), dilation=(2, 2), group=2, per_channel=True, slope=0.1,
         clip_in=0.6),
    Case("depthwise_u8_in_relu_fp32_out", (2, 5, 6, 7), "num_output: 5 kernel_size: 3 pad: 1",
         (3, 3), pad=(1, 1), group=5, depthwise=True, in_u8=True, per_channel=True, slope=0.0,
         int8_out=False),
    Case("asymmetric_kernel_fp32_out_leaky", (2, 3, 6, 8),
         "num_output: 4 kernel_h: 1 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 0 pad_w: 1",
         (1, 3), stride=(2, 1), pad=(0, 1), slope=0.25, int8_out=False),
    Case("saturating_s8_out", (2, 3, 5, 5), "num_output: 4 kernel_size: 1", (1, 1),
         clip_in=0.5, clip_out=0.3),
]


def single_conv(case: Case, seed: int):
    type_name = "ConvolutionDepthwise" if case.depthwise else "Convolution"
    text = (input_text(case.in_shape)
            + f'layer {{ name: "conv" type: "{type_name}" bottom: "data" top: "y" '
              f'convolution_param {{ {case.conv_param} }} }}\n')
    if case.slope is not None:
        text += relu_text("relu", "y", case.slope)
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, case.in_shape).astype(np.float32)
    if case.in_u8:
        x = np.abs(x)
    return TinyNet(text, seed=seed, batches=[{"data": x}]), x


#: CUDA runs too where there is a GPU (cuDNN must not pick an inexact algorithm, no TF32)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


def run_simulation(net: TinyNet, plan: QuantPlan, captured=None, device="cpu"):
    """The simulated outputs (on the CPU) of the first batch; ``captured`` gets each
    node's first top. On CUDA nothing is set beforehand: the simulator turns TF32 off for its
    own accumulations.

    The outputs come from a run without a hook, where the units hand each other the stored
    integers (``simulate.StoredIntegers``); the captured tops from a second run with a hook,
    which sees every top's values, so each unit there reads what Caffe reads: both runs must
    give the same outputs, bit for bit."""
    net.net.to(device)
    try:
        sim = simulate.Int8Simulator(analyze(net.net), plan)

        def hook(node, tops):
            if captured is not None:
                captured[node.name] = tops[0].detach().cpu().numpy().copy()

        feeds = {k: v.to(device) for k, v in net.batches[0].items()}
        with torch.no_grad():
            out = net.net(dict(feeds), overrides=sim.overrides)
            seen = net.net(dict(feeds), overrides=sim.overrides, hook=hook)
        assert out.keys() == seen.keys()
        for name in out:
            assert torch.equal(out[name], seen[name]), name
        return {k: v.cpu() for k, v in out.items()}
    finally:
        net.net.to("cpu")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("device", DEVICES)
def test_single_conv_is_bit_exact(case, seed, device):
    net, x = single_conv(case, seed)
    weights = net.weights["conv"]
    w = weights[0]
    b = weights[1] if case.bias else None
    assert w.shape[2:] == case.kernel and len(weights) == (2 if case.bias else 1)
    o = w.shape[0]
    # scales as the calibrator would choose them, some with clipping
    s_in = (255.0 if case.in_u8 else 127.0) / (case.clip_in * float(np.abs(x).max()))
    maxima = np.abs(w).reshape(o, -1).max(1).astype(np.float64)
    sp = (127 / maxima) if case.per_channel else np.full(o, 127 / maxima.max())
    fp32 = net.net(net.batches[0])["y"].numpy()
    out_u8 = case.slope == 0.0
    s_out = (255.0 if out_u8 else 127.0) / (case.clip_out * float(np.abs(fp32).max()))
    lq = LayerQuant("conv", s_in, s_out if case.int8_out else 1.0, [float(s) for s in sp],
                    input_unsigned=case.in_u8, output_unsigned=out_u8,
                    output_int8=case.int8_out)
    out = run_simulation(net, QuantPlan({"conv": lq}, QuantOptions(), {}),
                         device=device)["y"].numpy()

    # the reference
    q_in = quantize_input(x, s_in, case.in_u8)
    q_w = quantize_weights(w, sp)
    acc = conv_int64(q_in, q_w, case.stride, case.pad, case.dilation, case.group)
    q_b = quantize_bias(b, s_in, sp) if b is not None else np.zeros(o, np.int64)
    assert acc.shape == out.shape
    if case.int8_out:
        ref = intel_output(acc, q_b, s_in, sp, s_out, "u8" if out_u8 else "s8", case.slope)
        got = as_integers(out, s_out)
        assert np.array_equal(got, ref)
        lo, hi = (0, 255) if out_u8 else (-128, 127)
        assert got.min() >= lo and got.max() <= hi
        if case.clip_out < 1:
            assert (ref == hi).any() or (ref == lo).any()  # saturation was checked too
    else:
        y = intel_output(acc, q_b, s_in, sp, 1.0, None, case.slope)
        assert out.dtype == np.float32
        assert np.array_equal(out, y)
    # sanity: the INT8 result is near the FP32 one where the output does not saturate
    if case.clip_in == 1.0:
        inside = np.abs(fp32) < 0.75 * case.clip_out * np.abs(fp32).max()
        assert np.abs(out - fp32)[inside].max() < 0.05 * np.abs(fp32).max()


def test_ties_round_half_to_even():
    """Dyadic scales make input products and requantized outputs land exactly on .5: the
    runtime's nearbyint rounds them to even, not away from zero."""
    case = Case("ties", (1, 4, 5, 5), "num_output: 3 kernel_size: 3 pad: 1", (3, 3),
                pad=(1, 1))
    rng = np.random.default_rng(3)
    x = (rng.integers(-12, 12, case.in_shape) / 4).astype(np.float32)   # x * 2: k + 0.5 often
    weights = {"conv": [(rng.integers(-32, 33, (3, 4, 3, 3)) / 8).astype(np.float32),
                        (rng.integers(-8, 9, 3) / 16).astype(np.float32)]}
    net = TinyNet(input_text(case.in_shape)
                  + 'layer { name: "conv" type: "Convolution" bottom: "data" top: "y" '
                    'convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }\n',
                  weights=weights, batches=[{"data": x}])
    s_in, sp, s_out = 2.0, np.array([2.0, 4.0, 8.0]), 1.0
    lq = LayerQuant("conv", s_in, s_out, list(sp), input_unsigned=False,
                    output_unsigned=False, output_int8=True)
    out = run_simulation(net, QuantPlan({"conv": lq}, QuantOptions(), {}))["y"].numpy()
    q_in = quantize_input(x, s_in, False)
    acc = conv_int64(q_in, quantize_weights(weights["conv"][0], sp), pad=(1, 1))
    q_b = quantize_bias(weights["conv"][1], s_in, sp)
    ref = intel_output(acc, q_b, s_in, sp, s_out, "s8")
    # ties really occur, and half-away-from-zero would give other integers
    acc = acc + q_b[None, :, None, None]
    exact = acc * s_out / (s_in * sp.reshape(1, -1, 1, 1))
    assert (np.abs(exact - np.floor(exact)) == 0.5).sum() > 10
    assert (np.abs(x * 2 - np.floor(x * 2)) == 0.5).sum() > 10
    away = np.clip(np.sign(exact) * np.floor(np.abs(exact) + 0.5), -128, 127)
    assert not np.array_equal(away, ref)
    assert np.array_equal(as_integers(out, s_out), ref)


def big_accumulation_net(channels: int, seed: int = 0):
    """1x1 conv, u8 input at 252..255, weights 124..127 (s_in = sp = 1, so the floats are
    the integers): the accumulation reaches 255 * 127 * channels. The bias cancels most of it
    so that the exact sum is visible in the FP32 output (an error of 1 shows). 1024 channels
    need two 4-bit digits, 9216 narrower ones, 140000 more than any digit allows. The
    epilogue then converts the exact accumulator to float32, as Intel's kernel does (the
    140000-channel sum exceeds int32, which the real kernel could not hold)."""
    rng = np.random.default_rng(seed)
    x = (255 - rng.integers(0, 4, (2, channels, 2, 2))).astype(np.float32)
    w = (127 - rng.integers(0, 4, (3, channels, 1, 1))).astype(np.float32)
    acc = conv_int64(x.astype(np.int64), w.astype(np.int64))
    bias = (-np.median(acc, axis=(0, 2, 3))).astype(np.float32)
    text = (input_text((2, channels, 2, 2))
            + 'layer { name: "conv" type: "Convolution" bottom: "data" top: "y" '
              'convolution_param { num_output: 3 kernel_size: 1 } }\n')
    net = TinyNet(text, weights={"conv": [w, bias]}, batches=[{"data": x}])
    ref = intel_output(acc, quantize_bias(bias, 1.0, np.ones(3)), 1.0, np.ones(3), 1.0, None)
    return net, acc, ref


@pytest.mark.parametrize("channels", [1024, 9216, 140_000])
@pytest.mark.parametrize("device", DEVICES)
def test_accumulation_beyond_2_24_is_exact(channels, device, monkeypatch):
    net, acc, ref = big_accumulation_net(channels)
    assert acc.max() > 2 ** 24
    lq = LayerQuant("conv", 1.0, 1.0, [1.0] * 3, input_unsigned=True, output_unsigned=False,
                    output_int8=False)
    plan = QuantPlan({"conv": lq}, QuantOptions(), {})
    out = run_simulation(net, plan, device=device)["y"].numpy()
    assert np.array_equal(out, ref)
    # INT8 output of the same sum (s_out 1/64): the rounding sees the same float32 value
    lq8 = LayerQuant("conv", 1.0, 1 / 64, [1.0] * 3, input_unsigned=True,
                     output_unsigned=False, output_int8=True)
    out8 = run_simulation(net, QuantPlan({"conv": lq8}, QuantOptions(), {}),
                          device=device)["y"].numpy()
    bias = quantize_bias(net.weights["conv"][1], 1.0, np.ones(3))
    assert np.array_equal(as_integers(out8, 1 / 64),
                          intel_output(acc, bias, 1.0, np.ones(3), 1 / 64, "s8"))
    # the test has teeth: one float32 convolution (no split) is not exact here
    monkeypatch.setattr(simulate, "EXACT_LIMIT", 2 ** 62)
    unsplit = run_simulation(net, plan, device=device)["y"].numpy()
    assert not np.array_equal(unsplit, ref)


@pytest.mark.parametrize("bias", [1000.0, 12_000_000.0])
def test_the_bias_goes_into_the_convolution_only_where_every_partial_sum_is_exact(bias):
    """u8 inputs 252..255 and weights 124..127 over 256 channels (s_in = sp = 1): the
    accumulator reaches 8.3 M, exact in float32 with or without a bias of 1000; a bias of
    12 M takes partial sums past 2^24, so the simulator adds it after the convolution.
    Either way the FP32 output is Intel's f32(acc + bias) x multiplier on the int64 sum."""
    channels = 256
    rng = np.random.default_rng(4)
    x = (255 - rng.integers(0, 4, (2, channels, 3, 3))).astype(np.float32)
    w = (127 - rng.integers(0, 4, (3, channels, 1, 1))).astype(np.float32)
    b = np.full(3, bias, np.float32)
    net = TinyNet(input_text((2, channels, 3, 3))
                  + 'layer { name: "conv" type: "Convolution" bottom: "data" top: "y" '
                    'convolution_param { num_output: 3 kernel_size: 1 } }\n',
                  weights={"conv": [w, b]}, batches=[{"data": x}])
    lq = LayerQuant("conv", 1.0, 1.0, [1.0] * 3, input_unsigned=True, output_unsigned=False,
                    output_int8=False)
    plan = QuantPlan({"conv": lq}, QuantOptions(), {})
    kernel = simulate.Int8Simulator(analyze(net.net), plan).kernels["conv"]
    assert kernel.split is None and kernel.bias_folds == (bias < 2 ** 23)
    acc = conv_int64(x.astype(np.int64), w.astype(np.int64))
    assert acc.max() < 2 ** 24 and (acc.max() + bias > 2 ** 24) == (bias > 2 ** 23)
    ref = intel_output(acc, quantize_bias(b, 1.0, np.ones(3)), 1.0, np.ones(3), 1.0, None)
    assert np.array_equal(run_simulation(net, plan)["y"].numpy(), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_residual_net_is_bit_exact(device):
    text = (input_text((2, 4, 6, 6))
            + 'layer { name: "conv_a" type: "Convolution" bottom: "data" top: "a" '
              'convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }\n'
            + relu_text("relu_a", "a")
            + 'layer { name: "conv_b" type: "Convolution" bottom: "a" top: "b" '
              'convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }\n'
            + 'layer { name: "add" type: "Eltwise" bottom: "a" bottom: "b" top: "s" }\n'
            + relu_text("relu_s", "s")
            + 'layer { name: "conv_c" type: "Convolution" bottom: "s" top: "c" '
              'convolution_param { num_output: 4 kernel_size: 1 } }\n'
            + relu_text("relu_c", "c"))
    net = TinyNet(text, seed=11)
    plan = net.calibrate(first_conv=True, per_channel=True, estimator="MAXP")
    unit = net.fused.by_name["conv_b"]
    assert unit.eltwise.name == "add" and unit.relu.name == "relu_s"
    a, b, c = (plan.layers[n] for n in ("conv_a", "conv_b", "conv_c"))
    assert not a.input_unsigned and b.input_unsigned and c.input_unsigned
    assert a.output_int8 and b.output_int8 and not c.output_int8
    captured = {}
    out = run_simulation(net, plan, captured, device=device)["c"].numpy()

    def layer(name, lq, x_float, unsigned_in, pad):
        w, bias = net.weights[name]
        sp = np.array(lq.scale_params)
        q_in = quantize_input(x_float, lq.scale_in, unsigned_in)
        acc = conv_int64(q_in, quantize_weights(w, sp), pad=(pad, pad))
        return q_in, acc, quantize_bias(bias, lq.scale_in, sp), sp

    x = net.batches[0]["data"].numpy()
    _, acc_a, bias_a, sp_a = layer("conv_a", a, x, False, 1)
    q_a = intel_output(acc_a, bias_a, a.scale_in, sp_a, a.scale_out, "u8", 0.0)
    a_float = dequantized(q_a, a.scale_out)       # what conv_a hands on
    q_in_b, acc_b, bias_b, sp_b = layer("conv_b", b, a_float, True, 1)
    assert b.scale_in == a.scale_out and np.array_equal(q_in_b, q_a)  # no double rounding
    # the sum writes its residual's type (u8) and adds f32(s_out / s_a) * q_a
    q_b = intel_output(acc_b, bias_b, b.scale_in, sp_b, b.scale_out, "u8", 0.0, q_res=q_a,
                       res_scale=a.scale_out)
    b_float = dequantized(q_b, b.scale_out)
    _, acc_c, bias_c, sp_c = layer("conv_c", c, b_float, True, 0)
    ref_c = intel_output(acc_c, bias_c, c.scale_in, sp_c, 1.0, None, 0.0)

    assert np.array_equal(as_integers(captured["relu_a"], a.scale_out), q_a)
    assert np.array_equal(as_integers(captured["relu_s"], b.scale_out), q_b)
    assert np.array_equal(out, ref_c)
    assert (q_b == 255).any() or q_b.max() > 200  # the u8 range is used
    # and it is an approximation of the FP32 net
    fp32 = net.net(net.batches[0])["c"].numpy()
    assert np.abs(out - fp32).max() < 0.1 * np.abs(fp32).max()


def test_linear_bottleneck_with_its_sum_last_is_bit_exact():
    """MobileNetV2's residual block: conv_0 (ReLU) -> conv_a (linear: s8 out) -> conv_b + a
    (the sum fused into conv_b, its last node: s8 out) -> conv_c. conv_b reads its residual
    as the stored integers conv_a handed on (``simulate.StoredIntegers``), conv_c the stored
    sum; the integers equal the numpy reference's."""
    text = (input_text((2, 4, 6, 6))
            + conv_text("conv_0", "data", "z", 8, 3) + relu_text("relu_0", "z")
            + conv_text("conv_a", "z", "a", 8, 1)
            + conv_text("conv_b", "a", "b", 8, 3)
            + 'layer { name: "add" type: "Eltwise" bottom: "a" bottom: "b" top: "s" }\n'
            + conv_text("conv_c", "s", "c", 4, 1) + relu_text("relu_c", "c"))
    net = TinyNet(text, seed=5)
    plan = net.calibrate(first_conv=True, estimator="MAXP")
    unit = net.fused.by_name["conv_b"]
    assert unit.last is unit.eltwise
    zero, a, b, c = (plan.layers[n] for n in ("conv_0", "conv_a", "conv_b", "conv_c"))
    assert zero.output_int8 and a.output_int8 and b.output_int8 and not c.output_int8
    assert not a.output_unsigned and not b.input_unsigned and not c.input_unsigned
    captured = {}
    out = run_simulation(net, plan, captured)["c"].numpy()

    def layer(name, lq, x_float, pad):
        w, bias = net.weights[name]
        sp = np.array(lq.scale_params)
        q_in = quantize_input(x_float, lq.scale_in, lq.input_unsigned)
        acc = conv_int64(q_in, quantize_weights(w, sp), pad=(pad, pad))
        return q_in, acc, quantize_bias(bias, lq.scale_in, sp), sp

    x = net.batches[0]["data"].numpy()
    _, acc, bias, sp = layer("conv_0", zero, x, 1)
    q_0 = intel_output(acc, bias, zero.scale_in, sp, zero.scale_out, "u8", 0.0)
    _, acc, bias, sp = layer("conv_a", a, dequantized(q_0, zero.scale_out), 0)
    q_a = intel_output(acc, bias, a.scale_in, sp, a.scale_out, "s8")
    q_in_b, acc, bias, sp = layer("conv_b", b, dequantized(q_a, a.scale_out), 1)
    assert b.scale_in == a.scale_out and np.array_equal(q_in_b, q_a)
    q_b = intel_output(acc, bias, b.scale_in, sp, b.scale_out, "s8", q_res=q_a,
                       res_scale=a.scale_out)
    _, acc, bias, sp = layer("conv_c", c, dequantized(q_b, b.scale_out), 0)
    ref_c = intel_output(acc, bias, c.scale_in, sp, 1.0, None, 0.0)
    assert np.array_equal(as_integers(captured["conv_a"], a.scale_out), q_a)
    assert np.array_equal(as_integers(captured["add"], b.scale_out), q_b)
    assert (q_a < 0).any() and (q_b < 0).any()          # the signed range is used
    assert np.array_equal(out, ref_c)


@pytest.mark.parametrize("also_read", [False, True])
@pytest.mark.parametrize("threshold", [None, 9.0])
def test_a_relu6_between_units_is_bit_exact(also_read, threshold):
    """conv_a -> ReLU6 (an FP32 layer in Intel's runtime) -> conv_b: conv_b quantizes the
    ReLU6's output, which the simulation leaves to conv_b's quantization
    (``simulate.PendingReLU6``) where the ReLU6 may run in place; with the ReLU6's input read
    again later (``also_read``, by conv_c) the layer runs as it is. Both against the numpy
    reference, with u8 input saturating at 6 and at the u8 range's end (``threshold``: conv_b's
    input threshold set beyond 6, as EasyQuant may, so that 6 is below the range's end)."""
    text = (input_text((2, 4, 6, 6)) + conv_text("conv_a", "data", "a", 8, 3)
            + 'layer { name: "r6" type: "ReLU6" bottom: "a" top: '
            + ('"r" }\n' if also_read else '"a" }\n')
            + conv_text("conv_b", "r" if also_read else "a", "b", 8, 1)
            + (conv_text("conv_c", "a", "c", 4, 1) if also_read else ""))
    net = TinyNet(text, seed=7)
    w, bias = net.weights["conv_a"]
    weights = dict(net.weights, conv_a=[w * 3, bias + 2])      # much of it beyond 6
    net = TinyNet(text, seed=7, weights=weights)
    plan = net.calibrate(first_conv=True, estimator="MAXP")
    if threshold is not None:
        plan = build_plan(net.fused, net.stats, plan.options,
                          {"conv_b": UnitChoice(input_threshold=threshold)})
    a, b = plan.layers["conv_a"], plan.layers["conv_b"]
    assert b.input_unsigned and (threshold is None or 6 * b.scale_in < 250)
    captured = {}
    out = run_simulation(net, plan, captured)
    x = net.batches[0]["data"].numpy()
    sp_a, sp_b = np.array(a.scale_params), np.array(b.scale_params)
    w_a, bias_a = net.weights["conv_a"]
    q_in = quantize_input(x, a.scale_in, False)
    acc_a = conv_int64(q_in, quantize_weights(w_a, sp_a), pad=(1, 1))
    if a.output_int8:      # s8 memory (no ReLU fused), which the ReLU6 reads as Caffe does
        y_a = dequantized(intel_output(acc_a, quantize_bias(bias_a, a.scale_in, sp_a),
                                       a.scale_in, sp_a, a.scale_out, "s8"), a.scale_out)
    else:
        y_a = intel_output(acc_a, quantize_bias(bias_a, a.scale_in, sp_a), a.scale_in, sp_a,
                           1.0, None)
    relu6 = np.clip(y_a, np.float32(0), np.float32(6)).astype(np.float32)
    assert (relu6 == 6).any() and (y_a < 0).any()
    q_b = quantize_input(relu6, b.scale_in, True)
    assert (q_b == (255 if threshold is None else round(6 * b.scale_in))).any()
    w_b, bias_b = net.weights["conv_b"]
    ref_b = intel_output(conv_int64(q_b, quantize_weights(w_b, sp_b)),
                         quantize_bias(bias_b, b.scale_in, sp_b), b.scale_in, sp_b, 1.0, None)
    assert np.array_equal(out["b"].numpy(), ref_b)
