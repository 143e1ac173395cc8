"""Intel Caffe's fusion and scale rules on small synthetic nets. Expected scales are computed
here from the FP32 activations (DIRECT: T = max|x|, so 255/T or 127/T by hand) and from
weights folded by hand in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrator.quant.folding import folded_once
from calibrator.quant.fusion import analyze
from calibrator.quant.params import to_proto
from calibrator.quant.scales import build_plan
from calibrator.quant.simulate import Int8Simulator
from tests.quant_helpers import (TinyNet, bn_scale_text, conv_text, fold_bn_scale, input_text,
                                 relu_text)

REL = 1e-6  # scales come from float32 activations / weights: compare to float32 precision


def absmax_of(net: TinyNet, layer: str) -> float:
    return net.absmax_after(layer)


def simulate(net: TinyNet, plan, batch=0):
    sim = Int8Simulator(net.fused, plan)
    with torch.no_grad():
        return net.net(net.batches[batch], overrides=sim.overrides)


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- (a) ResNet block: conv2 absorbs the add and the ReLU after it ------------------------

RESNET = (input_text((2, 3, 8, 8))
          + conv_text("conv0", "data", "c0", 8, 3) + relu_text("relu0", "c0")
          + conv_text("conv_in", "c0", "x", 8, 3) + relu_text("relu_in", "x")
          + conv_text("conv1", "x", "b1", 8, 3) + bn_scale_text("conv1", "b1")
          + relu_text("relu1", "b1")
          + conv_text("conv2", "b1", "b2", 8, 3) + bn_scale_text("conv2", "b2")
          + 'layer { name: "add" type: "Eltwise" bottom: "x" bottom: "b2" top: "sum" }\n'
          + relu_text("relu_sum", "sum")
          + conv_text("conv3", "sum", "c3", 8, 1) + relu_text("relu3", "c3")
          + conv_text("conv4", "c3", "out", 4, 1))


def test_resnet_block_fusion_and_signs():
    net = TinyNet(RESNET, seed=1)
    plan = net.calibrate(estimator="DIRECT")
    units = net.fused.by_name
    conv2 = units["conv2"]
    assert [n.name for n in conv2.folded] == ["conv2_bn", "conv2_scale"]
    assert conv2.eltwise.name == "add" and conv2.relu.name == "relu_sum"
    assert conv2.residual.key == f"{net.node_index('relu_in')}:x"
    assert units["conv1"].relu.name == "relu1" and units["conv1"].eltwise is None
    assert units["conv_in"].eltwise is None  # it has a ReLU and two readers

    lq = plan.layers["conv2"]
    block_out = absmax_of(net, "relu_sum")      # the block output, after the ReLU
    assert lq.output_unsigned and lq.output_int8
    assert lq.scale_out == pytest.approx(255 / block_out, rel=REL)
    assert lq.scale_out != pytest.approx(255 / absmax_of(net, "conv2_scale"), rel=1e-3)
    assert lq.input_unsigned                    # conv1 has a ReLU
    assert plan.layers["conv1"].input_unsigned  # conv_in (quantized) has a ReLU
    assert plan.layers["conv3"].input_unsigned  # the absorbed ReLU makes the sum u8
    assert plan.layers["conv3"].scale_in == pytest.approx(255 / block_out, rel=REL)
    assert not to_proto(plan.layers["conv3"]).HasField("is_negative_input")
    # the simulation of the fused block stays close to FP32
    fp32 = net.net(net.batches[0])["out"]
    assert relative_error(simulate(net, plan)["out"], fp32) < 0.05


def test_projection_shortcut_the_later_conv_absorbs_the_add():
    text = (input_text((1, 3, 8, 8))
            + conv_text("conv0", "data", "c0", 8, 3) + relu_text("relu0", "c0")
            + conv_text("branch1", "c0", "p", 8, 1) + bn_scale_text("branch1", "p")
            + conv_text("branch2a", "c0", "a", 8, 1) + relu_text("relu2a", "a")
            + conv_text("branch2b", "a", "b", 8, 3) + bn_scale_text("branch2b", "b")
            + 'layer { name: "add" type: "Eltwise" bottom: "p" bottom: "b" top: "s" }\n'
            + relu_text("relu_s", "s")
            + conv_text("conv_next", "s", "n", 4, 1))
    net = TinyNet(text, seed=2)
    plan = net.calibrate(estimator="DIRECT")
    units = net.fused.by_name
    assert units["branch2b"].eltwise.name == "add" and units["branch2b"].relu.name == "relu_s"
    assert units["branch2b"].residual.key == f"{net.node_index('branch1_scale')}:p"
    assert units["branch1"].eltwise is None and units["branch1"].relu is None
    # branch1 has no ReLU: the residual is s8. Intel's fused sum writes its residual's type,
    # so branch2b's output is s8 although the absorbed ReLU makes it non-negative: its scale
    # is 127/T (255/T would clip at T/2), and conv_next still reads it as u8
    assert not plan.layers["branch1"].output_unsigned
    assert plan.layers["branch1"].scale_out == pytest.approx(
        127 / absmax_of(net, "branch1_scale"), rel=REL)
    assert not plan.layers["branch2b"].output_unsigned
    assert plan.layers["branch2b"].scale_out == pytest.approx(
        127 / absmax_of(net, "relu_s"), rel=REL)
    assert plan.layers["conv_next"].input_unsigned
    fp32 = net.net(net.batches[0])["n"]
    assert relative_error(simulate(net, plan)["n"], fp32) < 0.05


# -- (b) MobileNetV2 linear bottleneck: s8 after the linear conv ----------------------------

def mobilenet_v2_text():
    def conv_bn(name, bottom, top, n, k, relu=True, extra=""):
        text = conv_text(name, bottom, top, n, k, extra) + bn_scale_text(name, top)
        return text + (relu_text(f"{name}_relu", top) if relu else "")

    return (input_text((2, 3, 8, 8))
            + conv_bn("conv0", "data", "c0", 8, 3)
            + conv_bn("expand1", "c0", "e1", 16, 1)
            + conv_bn("dwise1", "e1", "d1", 16, 3, extra="group: 16")
            + conv_bn("linear1", "d1", "l1", 8, 1, relu=False)
            + conv_bn("expand2", "l1", "e2", 16, 1)
            + conv_bn("dwise2", "e2", "d2", 16, 3, extra="group: 16")
            + conv_bn("linear2", "d2", "l2", 8, 1, relu=False)
            + 'layer { name: "block2_add" type: "Eltwise" bottom: "l1" bottom: "l2" '
              'top: "s2" }\n'
            + conv_bn("expand3", "s2", "e3", 16, 1)
            + conv_text("head", "e3", "out", 4, 1))


def test_mobilenet_v2_linear_bottleneck_is_signed():
    net = TinyNet(mobilenet_v2_text(), seed=3)
    plan = net.calibrate(estimator="DIRECT")
    layers = plan.layers
    for name in ("expand1", "dwise1", "expand2", "dwise2", "expand3"):
        assert layers[name].output_unsigned, name
    for name in ("dwise1", "linear1", "dwise2", "linear2", "head"):
        assert layers[name].input_unsigned, name  # after a ReLU'd conv
    # the linear conv has no ReLU: s8 output, 127/T
    assert not layers["linear1"].output_unsigned
    assert layers["linear1"].scale_out == pytest.approx(127 / absmax_of(net, "linear1_scale"),
                                                        rel=REL)
    # the next conv reads s8: is_negative_input in what is written
    assert not layers["expand2"].input_unsigned
    assert layers["expand2"].scale_in == pytest.approx(127 / absmax_of(net, "linear1_scale"),
                                                       rel=REL)
    assert to_proto(layers["expand2"]).is_negative_input
    # the residual block: linear2 (later in layer order) absorbs the add, no ReLU: s8 again
    unit = net.fused.by_name["linear2"]
    assert unit.eltwise.name == "block2_add" and unit.relu is None
    assert not layers["linear2"].output_unsigned
    assert layers["linear2"].scale_out == pytest.approx(127 / absmax_of(net, "block2_add"),
                                                        rel=REL)
    assert not layers["expand3"].input_unsigned
    assert to_proto(layers["expand3"]).is_negative_input
    assert layers["expand1"].input_unsigned     # conv0 (FP32) has a ReLU
    assert not to_proto(layers["expand1"]).HasField("is_negative_input")
    fp32 = net.net(net.batches[0])["out"]
    assert relative_error(simulate(net, plan)["out"], fp32) < 0.08


# -- (c) the first convolution ----------------------------------------------------------------

CHAIN = (input_text((2, 3, 6, 6))
         + conv_text("conv1", "data", "c1", 6, 3) + relu_text("relu1", "c1")
         + conv_text("conv2", "c1", "c2", 6, 3) + relu_text("relu2", "c2")
         + conv_text("conv3", "c2", "c3", 4, 1))


def test_first_conv_fp32_by_default_s8_with_1st():
    net = TinyNet(CHAIN, seed=4, nonnegative_input=True)  # image-like input, never negative
    plan = net.calibrate(estimator="DIRECT")
    assert "conv1" not in plan.layers and list(plan.layers) == ["conv2", "conv3"]
    plan = net.calibrate(estimator="DIRECT", first_conv=True)
    lq = plan.layers["conv1"]
    assert not lq.input_unsigned                  # Intel: the first conv takes s8
    assert lq.scale_in == pytest.approx(127 / absmax_of_feed(net), rel=REL)
    assert to_proto(lq).is_negative_input
    assert lq.output_unsigned and lq.output_int8
    assert plan.layers["conv2"].input_unsigned


def absmax_of_feed(net: TinyNet) -> float:
    return max(float(b["data"].abs().max()) for b in net.batches)


def test_conv_after_an_fp32_conv_with_relu_reads_u8():
    # Intel's is_convolution_input_u8 walks up to the nearest Convolution, quantized or not:
    # the FP32 first conv with a fused ReLU makes conv2's input u8.
    net = TinyNet(CHAIN, seed=4)
    plan = net.calibrate(estimator="DIRECT")
    assert plan.layers["conv2"].input_unsigned
    assert plan.layers["conv2"].scale_in == pytest.approx(255 / absmax_of(net, "relu1"), rel=REL)


# -- (d) FP32 output ---------------------------------------------------------------------------

FP32_OUT = (input_text((2, 3, 6, 6))
            + conv_text("conv1", "data", "c1", 6, 3) + relu_text("relu1", "c1")
            + conv_text("conv2", "c1", "c2", 6, 3) + relu_text("relu2", "c2")
            + conv_text("conv3", "c2", "c3", 6, 3) + relu_text("relu3", "c3")
            + 'layer { name: "fc" type: "InnerProduct" bottom: "c3" top: "fc" '
              'inner_product_param { num_output: 5 } }\n'
            + 'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n'
            + conv_text("conv4", "c2", "c4", 6, 3) + relu_text("relu4", "c4")
            + conv_text("conv_sm", "c4", "s", 3, 1)
            + 'layer { name: "softmax" type: "Softmax" bottom: "s" top: "sprob" }\n'
            + conv_text("conv5", "c4", "c5", 4, 1))


def test_fp32_output_without_int8_consumer_and_for_the_last_conv():
    net = TinyNet(FP32_OUT, seed=5)
    plan = net.calibrate(estimator="DIRECT")
    layers = plan.layers
    fp32 = {"conv3": "fc (InnerProduct, FP32 without -fc)", "conv_sm": "Softmax",
            "conv5": "the last quantized conv"}
    for name, why in fp32.items():
        lq = layers[name]
        assert not lq.output_int8 and lq.scale_out == 1.0, why
        param = to_proto(lq)
        assert param.bw_layer_out == 32 and list(param.scale_out) == [1.0], why
    for name in ("conv2", "conv4"):
        assert layers[name].output_int8 and to_proto(layers[name]).bw_layer_out == 8
        assert layers[name].scale_out == pytest.approx(
            255 / absmax_of(net, f"relu{name[-1]}"), rel=REL)
    # an FP32 output is not rounded: the simulated conv_sm output is acc / (s_in * sp)
    out = simulate(net, plan)
    assert relative_error(out["sprob"], net.net(net.batches[0])["sprob"]) < 0.05


def test_with_fc_the_conv_feeding_it_stays_int8():
    net = TinyNet(FP32_OUT, seed=5)
    plan = net.calibrate(estimator="DIRECT", quantize_fc=True)
    assert plan.layers["conv3"].output_int8
    assert not plan.layers["fc"].output_int8   # feeds only the Softmax
    assert not plan.layers["conv5"].output_int8


# -- (e) AVE pooling between two quantized convs -----------------------------------------------

def pooling_text(pool):
    return (input_text((2, 3, 8, 8))
            + conv_text("conv1", "data", "c1", 6, 3) + relu_text("relu1", "c1")
            + conv_text("conv2", "c1", "c2", 6, 3) + relu_text("relu2", "c2")
            + f'layer {{ name: "pool" type: "Pooling" bottom: "c2" top: "p" '
              f'pooling_param {{ pool: {pool} kernel_size: 2 stride: 2 }} }}\n'
            + conv_text("conv3", "p", "c3", 6, 3) + relu_text("relu3", "c3")
            + conv_text("conv4", "c3", "c4", 4, 1))


def test_average_pooling_keeps_the_producer_scale():
    net = TinyNet(pooling_text("AVE"), seed=6)
    plan = net.calibrate(estimator="DIRECT")
    conv2, conv3 = plan.layers["conv2"], plan.layers["conv3"]
    assert conv2.scale_out == pytest.approx(255 / absmax_of(net, "relu2"), rel=REL)
    assert conv3.scale_in == conv2.scale_out
    own = 255 / absmax_of(net, "pool")  # what the pooled tensor's own statistics would give
    assert own > 1.05 * conv2.scale_out
    assert conv3.input_unsigned


def test_max_pooling_uses_its_own_statistics():
    net = TinyNet(pooling_text("MAX"), seed=6)
    plan = net.calibrate(estimator="MAXP")
    t = net.stats[net.fused.by_name["conv3"].input.key]
    assert t.maximum == pytest.approx(absmax_of(net, "pool"), rel=REL)
    assert plan.layers["conv3"].input_threshold < t.absmax  # MAXP on the pooled tensor
    assert plan.layers["conv3"].scale_in == pytest.approx(
        255 / plan.layers["conv3"].input_threshold, rel=REL)


# -- (f) Concat: -f unifies, -t makes FP32 ------------------------------------------------------

CONCAT = (input_text((2, 3, 6, 6))
          + conv_text("conv1", "data", "c1", 6, 3) + relu_text("relu1", "c1")
          + conv_text("conv2", "c1", "c2", 4, 3) + relu_text("relu2", "c2")
          + conv_text("conv3", "c1", "c3", 4, 1) + relu_text("relu3", "c3")
          + 'layer { name: "concat" type: "Concat" bottom: "c2" bottom: "c3" top: "cat" }\n'
          + conv_text("conv4", "cat", "c4", 6, 3) + relu_text("relu4", "c4")
          + conv_text("conv5", "c4", "c5", 4, 1))


def test_concat_scales_plain_unified_and_fp32():
    net = TinyNet(CONCAT, seed=7)
    net.weights["conv3"][0] *= 3                 # make the two scales clearly different
    net = TinyNet(CONCAT, weights=net.weights, batches=[{k: v.numpy() for k, v in b.items()}
                                                        for b in net.batches])
    own = {name: 255 / absmax_of(net, f"relu{name[-1]}") for name in ("conv2", "conv3")}
    assert abs(own["conv2"] / own["conv3"] - 1) > 0.05  # the test needs them different
    plan = net.calibrate(estimator="DIRECT")
    for name, scale in own.items():
        assert plan.layers[name].scale_out == pytest.approx(scale, rel=REL)

    plan = net.calibrate(estimator="DIRECT", unify_concat=True)
    smallest = min(own.values())
    for name in own:
        assert plan.layers[name].scale_out == pytest.approx(smallest, rel=REL)
        assert plan.layers[name].output_int8
    assert plan.layers["conv4"].scale_in == pytest.approx(
        255 / max(absmax_of(net, "relu2"), absmax_of(net, "relu3")), rel=REL)

    plan = net.calibrate(estimator="DIRECT", concat_fp32=True)
    for name in own:
        lq = plan.layers[name]
        assert not lq.output_int8 and lq.scale_out == 1.0
        assert to_proto(lq).bw_layer_out == 32
    assert plan.layers["conv4"].output_int8


# -- (g) weight scales from the folded weights ---------------------------------------------------

WEIGHTS = (input_text((1, 3, 6, 6))
           + conv_text("conv1", "data", "c1", 6, 3) + relu_text("relu1", "c1")
           + conv_text("conv2", "c1", "c2", 5, 3) + bn_scale_text("conv2", "c2")
           + relu_text("relu2", "c2")
           + conv_text("conv3", "c2", "c3", 4, 1))


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_scales_from_hand_folded_weights(per_channel):
    net = TinyNet(WEIGHTS, seed=8)
    weights = net.weights
    weights["conv2"][0][2] = 0.0                  # a zero output channel
    net = TinyNet(WEIGHTS, weights=weights)
    folded, _ = fold_bn_scale(weights["conv2"][0], weights["conv2"][1], weights["conv2_bn"],
                              weights["conv2_scale"])
    plan = net.calibrate(estimator="DIRECT", per_channel=per_channel)
    lq = plan.layers["conv2"]
    maxima = np.abs(folded).reshape(5, -1).max(1)
    if per_channel:
        expected = [127 / m if m > 0 else 0.0 for m in maxima]
    else:
        expected = [127 / maxima.max()] * 5
    np.testing.assert_allclose(lq.scale_params, expected, rtol=REL)
    assert (lq.scale_params[2] == 0.0) == per_channel
    written = list(to_proto(lq).scale_params)
    assert len(written) == (5 if per_channel else 1)   # Intel writes one value per tensor
    np.testing.assert_allclose(written, expected[:len(written)], rtol=REL)
    # the unfolded weights would give other scales: the folding matters
    raw = np.abs(weights["conv2"][0]).reshape(5, -1).max(1)
    assert not np.allclose(raw[raw > 0], maxima[maxima > 0], rtol=1e-2)


def test_plans_recompute_weight_scales_when_the_weights_change():
    """The plans' cache of weight scales (per fused graph) follows the weights: a weight
    changed in place after a plan gives the next plan its new scales."""
    net = TinyNet(input_text((2, 3, 6, 6)) + conv_text("c1", "data", "a", 4, 3)
                  + relu_text("r1", "a") + conv_text("c2", "a", "b", 4, 1), seed=4)
    plan = net.calibrate(first_conv=True, per_channel=True)
    before = list(plan.layers["c2"].scale_params)
    assert build_plan(net.fused, net.stats, plan.options).layers["c2"].scale_params == before
    with torch.no_grad():
        net.net.node("c2").module.weight.mul_(2)
    after = build_plan(net.fused, net.stats, plan.options).layers["c2"].scale_params
    assert after == pytest.approx([s / 2 for s in before], rel=1e-6)
    assert build_plan(net.fused, net.stats, plan.options).layers["c1"].scale_params == list(
        plan.layers["c1"].scale_params)


def test_the_fp32_units_folded_weights_follow_the_weights():
    """The FP32 units' cache of folded weights (per fused graph, shared by every simulator
    of a search): hand-folded BatchNorm/Scale weights; a weight or a BatchNorm statistic
    changed in place gives the next simulator the new folding."""
    net = TinyNet(WEIGHTS, seed=8)
    fused = analyze(net.net)
    unit = fused.by_name["conv2"]
    blobs = net.weights
    w, b = (np.array(v) for v in blobs["conv2"])   # (copies: the blobs are views)
    bn, scale = [np.array(v) for v in blobs["conv2_bn"]], blobs["conv2_scale"]
    weight, bias = folded_once(fused, unit)
    np.testing.assert_allclose(weight.numpy(), fold_bn_scale(w, b, bn, scale)[0], rtol=1e-6)
    assert folded_once(fused, unit)[0] is weight                # cached while unchanged
    with torch.no_grad():
        net.net.node("conv2").module.weight.mul_(3)
        net.net.node("conv2_bn").module.variance.mul_(4)
    bn[1] = bn[1] * 4
    weight, bias = folded_once(fused, unit)
    want_w, want_b = fold_bn_scale(w * 3, b, bn, scale)
    np.testing.assert_allclose(weight.numpy(), want_w, rtol=1e-5)
    np.testing.assert_allclose(bias.numpy(), want_b, rtol=1e-5, atol=1e-6)
