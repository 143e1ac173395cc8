"""Intel Caffe's kernel and compile rules, each on a small net against a numpy reference of
Intel's integer arithmetic (tests/intel_reference.py, tests/quant_helpers.py, written from
Intel's sources) or against the rule as Intel's source states it:

* fusion (net.cpp CompilationRuleConvSumFusion): the Eltwise right after the conv, a Split
  with more than two tops, any operation and coefficient, a ReLU before the sum;
* a fused sum writes the residual's data type; an FP32 residual makes the conv FP32;
* Concat requantizes INT8 inputs to the smallest scale, a u8/s8 mix goes FP32;
* AVE pooling on INT8 rounds to the grid; InnerProduct with any fused ReLU writes u8;
* a standalone INT8 Eltwise adds at scale 1.0; INT8 -> INT8 reorders into a conv;
* calibrator.py's force_fp32_opt (and -uff) and cac_opt (and -ucac).
The same nets run through real Intel Caffe in `make intel-check` (tools/intel_check)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from calibrator.quant.params import to_proto
from calibrator.quant.scales import QuantOptions, UnitChoice, build_plan, histogram_keys
from calibrator.quant.statistics import collect
from calibrator.quant.simulate import Int8Simulator
from tests import intel_reference as ref
from tests.quant_helpers import (TinyNet, conv_int64, conv_text, input_text, intel_output,
                                 quantize_bias, quantize_input, quantize_weights, relu_text)


def plan_of(net: TinyNet, **options):
    """DIRECT scales (T = max|x|), the first conv quantized too (s8 input)."""
    return net.calibrate(estimator="DIRECT", first_conv=True, **options)


def run(net: TinyNet, plan, batch=0) -> dict[str, np.ndarray]:
    """Every top the simulation writes, by top name (the last writer of in-place blobs)."""
    sim = Int8Simulator(net.fused, plan)
    seen = {}

    def hook(node, tops):
        for name, value in zip(node.tops, tops):
            seen[name] = value.detach().numpy().copy()

    with torch.no_grad():
        net.net(net.batches[batch], overrides=sim.overrides, hook=hook)
    return seen


def conv(net: TinyNet, plan, name, q_in, out_dtype, slope=None, pad=0, q_res=None,
         res_scale=None, coeff=(1.0, 1.0)):
    """Intel's integers (or float32 for an FP32 output) of conv ``name`` on ``q_in``."""
    lq = plan.layers[name]
    weight, bias = net.weights[name][0], net.weights[name][1]
    acc = conv_int64(q_in, quantize_weights(weight, lq.scale_params), pad=(pad, pad))
    return intel_output(acc, quantize_bias(bias, lq.scale_in, lq.scale_params), lq.scale_in,
                        lq.scale_params, lq.scale_out, out_dtype, slope=slope, q_res=q_res,
                        res_scale=res_scale, coeff=coeff)


def first_layer_integers(net: TinyNet, plan, name, out_dtype="u8", slope=0.0, pad=1):
    lq = plan.layers[name]
    x = net.batches[0]["data"].numpy()
    return conv(net, plan, name, quantize_input(x, lq.scale_in, False), out_dtype, slope, pad)


def eltwise_text(name, a, b, top, extra=""):
    return (f'layer {{ name: "{name}" type: "Eltwise" bottom: "{a}" bottom: "{b}" '
            f'top: "{top}" {extra} }}\n')


# -- fusion conditions (net.cpp CompilationRuleConvSumFusion) ----------------------------------

def residual_net(between="", coeff="", op="", pre_relu=False, add_bottoms=("r", "b")):
    eltwise = f"eltwise_param {{ {op} {coeff} }}" if (coeff or op) else ""
    return (input_text((2, 3, 6, 6))
            + conv_text("conv0", "data", "c0", 4, 3) + relu_text("relu0", "c0")
            + conv_text("convr", "c0", "r", 4, 1)
            + conv_text("convb", "c0", "b", 4, 3)
            + (relu_text("relub", "b") if pre_relu else "")
            + between
            + eltwise_text("add", *add_bottoms, "s", eltwise)
            + conv_text("convn", "s", "n", 4, 1) + relu_text("relun", "n")
            + conv_text("last", "n", "out", 3, 1))


def test_the_eltwise_must_follow_the_conv():
    between = conv_text("convx", "c0", "x", 4, 1) + relu_text("relux", "x")
    net = TinyNet(residual_net(between + conv_text("convy", "x", "y", 4, 1)), seed=11)
    plan_of(net)
    # convb is not right before the Eltwise: Intel leaves the Eltwise standalone
    assert net.fused.by_name["convb"].eltwise is None
    assert net.fused.by_name["convr"].eltwise is None
    net = TinyNet(residual_net(), seed=11)
    plan_of(net)
    assert net.fused.by_name["convb"].eltwise.name == "add"


def test_a_split_with_more_than_two_tops_blocks_the_fusion():
    # r is read three times (Split r -> 3 tops, in reading order): fused only when the
    # Eltwise is the last reader
    readers = conv_text("convp", "r", "p", 4, 1) + conv_text("convq", "r", "q", 4, 1)
    after = TinyNet(residual_net() + readers, seed=12)
    plan_of(after)
    assert after.fused.by_name["convb"].eltwise is None
    before = residual_net().replace(conv_text("convb", "c0", "b", 4, 3),
                                    readers + conv_text("convb", "c0", "b", 4, 3))
    before = TinyNet(before, seed=12)
    plan_of(before)
    assert before.fused.by_name["convb"].eltwise.name == "add"


@pytest.mark.parametrize("coeff, op, bottoms", [
    ("coeff: 0.5 coeff: -1.5", "", ("b", "r")),    # conv at bottom 0: coefficients swap
    ("coeff: 2 coeff: 0.25", "", ("r", "b")),
    ("", "operation: PROD", ("r", "b")),             # Intel sums
    ("", "operation: MAX", ("b", "r")),
])
def test_any_operation_and_coefficients_are_absorbed(coeff, op, bottoms):
    net = TinyNet(residual_net(coeff=coeff, op=op, add_bottoms=bottoms), seed=13)
    plan = plan_of(net)
    unit = net.fused.by_name["convb"]
    assert unit.eltwise.name == "add" and unit.residual.name == "r"
    assert net.fused.intel_notes or (coeff and bottoms == ("r", "b"))
    values = [float(v) for v in coeff.replace("coeff:", "").split()] or [1.0, 1.0]
    c0, c1 = values
    out = run(net, plan)
    q0 = first_layer_integers(net, plan, "conv0")
    lr, lb = plan.layers["convr"], plan.layers["convb"]
    assert not lr.output_unsigned and lr.output_int8
    x0 = ref.reorder(q0, plan.layers["conv0"].scale_out, lr.scale_in, "u8")
    qr = conv(net, plan, "convr", x0, "s8")
    xb = ref.reorder(q0, plan.layers["conv0"].scale_out, lb.scale_in, "u8")
    # Intel: coeff(0) on the residual, coeff(1) on the conv, whatever the bottom order
    qs = conv(net, plan, "convb", xb, "s8", pad=1, q_res=qr, res_scale=lr.scale_out,
              coeff=(c0, c1))
    np.testing.assert_array_equal(out["s"], ref.dequantize(qs, lb.scale_out))


def test_a_relu_before_the_eltwise_moves_after_the_sum():
    net = TinyNet(residual_net(pre_relu=True), seed=14)
    plan = plan_of(net)
    unit = net.fused.by_name["convb"]
    assert unit.pre_relu.name == "relub" and unit.relu is None and unit.relu_slope == 0.0
    assert any("after" in note for note in net.fused.intel_notes)
    out = run(net, plan)
    q0 = first_layer_integers(net, plan, "conv0")
    lr, lb = plan.layers["convr"], plan.layers["convb"]
    qr = conv(net, plan, "convr", ref.reorder(q0, plan.layers["conv0"].scale_out, lr.scale_in,
                                              "u8"), "s8")
    xb = ref.reorder(q0, plan.layers["conv0"].scale_out, lb.scale_in, "u8")
    qs = conv(net, plan, "convb", xb, "s8", slope=0.0, pad=1, q_res=qr,
              res_scale=lr.scale_out)                # ReLU(conv + residual), s8 (residual)
    np.testing.assert_array_equal(out["s"], ref.dequantize(qs, lb.scale_out))
    fp32 = net.versions()[0][net.node_index("add")]["s"]
    assert (fp32 < 0).any() and (out["s"] >= 0).all()  # the net itself has negatives


RELU_FLAG_NET = (input_text((1, 3, 6, 6))
                 + conv_text("conv0", "data", "c0", 4, 3) + relu_text("relu0", "c0")
                 + conv_text("a1", "c0", "a", 4, 1)
                 + eltwise_text("add1", "c0", "a", "s1")
                 + conv_text("b1", "s1", "b", 4, 1)
                 + eltwise_text("add2", "s1", "b", "s2") + relu_text("relu2", "s2")
                 + conv_text("last", "s2", "out", 3, 1))


def test_relu_after_the_sum_stops_once_a_sum_had_none():
    text = RELU_FLAG_NET
    net = TinyNet(text, seed=15)
    plan_of(net)
    assert net.fused.by_name["a1"].eltwise.name == "add1"
    assert net.fused.by_name["b1"].eltwise.name == "add2"
    assert net.fused.by_name["b1"].relu is None   # has_relu_flag was cleared by add1


# -- data types of a fused sum -------------------------------------------------------------------

def test_fused_sum_writes_the_residual_type_and_clips_a_255_scale():
    """As Intel's calibrator writes it: the sum conv with its ReLU gets 255/T, but the
    residual is s8, so the kernel writes s8 and clips at 127 (our plan writes 127/T)."""
    text = residual_net().replace(eltwise_text("add", "r", "b", "s"), eltwise_text(
        "add", "r", "b", "s") + relu_text("relus", "s"))
    net = TinyNet(text, seed=16)
    plan = plan_of(net)
    lb = plan.layers["convb"]
    assert net.fused.by_name["convb"].relu.name == "relus"
    assert not lb.output_unsigned                     # our plan: s8, 127/T
    lb.scale_out *= 255 / 127                         # Intel's calibrator: 255/T
    lb.output_unsigned = True
    out = run(net, plan)
    q0 = first_layer_integers(net, plan, "conv0")
    lr = plan.layers["convr"]
    qr = conv(net, plan, "convr", ref.reorder(q0, plan.layers["conv0"].scale_out, lr.scale_in,
                                              "u8"), "s8")
    qs = conv(net, plan, "convb", ref.reorder(q0, plan.layers["conv0"].scale_out, lb.scale_in,
                                              "u8"), "s8", slope=0.0, pad=1, q_res=qr,
              res_scale=lr.scale_out)
    assert qs.max() == 127                            # clipped at T/2
    np.testing.assert_array_equal(out["s"], ref.dequantize(qs, lb.scale_out))


PRE_ACTIVATION = residual_net().replace(
    eltwise_text("add", "r", "b", "s"),
    eltwise_text("add", "r", "b", "s")
    + 'layer { name: "bn_s" type: "BatchNorm" bottom: "s" top: "t" }\n'
    + 'layer { name: "scale_s" type: "Scale" bottom: "t" top: "t" '
      'scale_param { bias_term: true } }\n'
    + relu_text("relu_t", "t")).replace('bottom: "s" top: "n"', 'bottom: "t" top: "n"')


def test_int8_data_never_reaches_a_standalone_batchnorm():
    """Pre-activation ResNets (res10 SSD): the sum feeds BatchNorm + Scale + ReLU. Intel's
    MKLDNN BatchNorm runs on its input's memory as is: INT8 data becomes integers at scale
    1.0 (make intel-check, sum_conv_*). A sum conv cannot write FP32 (it writes its
    residual's type), so it runs FP32 with its residual's producer."""
    net = TinyNet(PRE_ACTIVATION, seed=27)
    plan = plan_of(net)
    assert net.fused.by_name["convb"].eltwise.name == "add"
    assert "BatchNorm 'bn_s'" in plan.excluded["convb"]
    assert "aborts" in plan.excluded["convr"]
    assert plan.layers["convn"].input_unsigned and "convn" not in plan.excluded


def test_a_sum_conv_written_fp32_computes_its_residual_type_at_scale_one():
    """Intel's force_fp32_opt writes bw_layer_out 32 for a sum read by a BatchNorm; the
    kernel writes the residual's type anyway, s8 at scale 1.0: integers clipped at 127
    (res10's simulated mAP fell from 0.98 to 0.11 with such a plan)."""
    net = TinyNet(PRE_ACTIVATION, seed=27)
    plan = plan_of(net)
    plan.excluded.clear()                             # as Intel's calibrator writes it
    lb = plan.layers["convb"]
    lb.output_int8, lb.scale_out = False, 1.0
    out = run(net, plan)
    q0 = first_layer_integers(net, plan, "conv0")
    lr = plan.layers["convr"]
    s0 = plan.layers["conv0"].scale_out
    qr = conv(net, plan, "convr", ref.reorder(q0, s0, lr.scale_in, "u8"), "s8")
    qs = conv(net, plan, "convb", ref.reorder(q0, s0, lb.scale_in, "u8"), "s8", pad=1,
              q_res=qr, res_scale=lr.scale_out)
    np.testing.assert_array_equal(out["s"], qs.astype(np.float32))


def test_a_plain_conv_feeding_a_standalone_batchnorm_writes_fp32():
    text = (input_text((2, 3, 6, 6))
            + conv_text("conv0", "data", "c0", 4, 3) + relu_text("relu0", "c0")
            + conv_text("c1", "c0", "x", 4, 3) + relu_text("relu1", "x")
            + 'layer { name: "pool" type: "Pooling" bottom: "x" top: "p" '
              'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
            + 'layer { name: "bn" type: "BatchNorm" bottom: "p" top: "b" }\n'
            + conv_text("c2", "b", "y", 4, 1) + relu_text("relu2", "y")
            + conv_text("last", "y", "out", 3, 1))
    net = TinyNet(text, seed=28)
    plan = plan_of(net)
    assert not plan.layers["c1"].output_int8
    assert "BatchNorm 'bn'" in plan.layers["c1"].notes[-1]


def test_an_fp32_residual_makes_the_fused_conv_fp32():
    net = TinyNet(residual_net(), seed=17)
    plan = plan_of(net)
    plan.layers["convr"].output_int8 = False          # the residual is FP32
    plan.layers["convr"].scale_out = 1.0
    out = run(net, plan)
    sim = Int8Simulator(net.fused, plan)
    assert "convb" in sim.fp32_units
    # the sum is the FP32 conv + the FP32 residual: the net's own layers on those inputs
    conv_b = net.net.node("convb")
    with torch.no_grad():
        b = conv_b.module(torch.from_numpy(out["c0"]))[0].numpy()
    np.testing.assert_allclose(out["s"], b + out["r"], rtol=0, atol=1e-6)


def test_an_int8_conv_with_fp32_output_never_feeds_a_fused_sum():
    """Intel's runtime reads an INT8 conv's FP32 output as garbage when it is the residual
    of a conv + sum (NaN / 1e33 measured by make intel-check): such a producer runs FP32."""
    text = residual_net().replace(
        eltwise_text("add", "r", "b", "s"),
        eltwise_text("add", "r", "b", "s")
        + 'layer { name: "cat" type: "Concat" bottom: "r" bottom: "s" top: "cat" }\n'
    ).replace('conv_text("convn", "s"', 'conv_text("convn", "cat"')
    text = text.replace('bottom: "s" top: "n"', 'bottom: "cat" top: "n"')
    net = TinyNet(text, seed=26)
    plan = plan_of(net, concat_fp32=True)            # -t: convr feeds a Concat: FP32 output
    assert net.fused.by_name["convb"].residual.name == "r"
    assert "convr" in plan.excluded and "residual of 'convb'" in plan.excluded["convr"]
    assert "convb" in plan.excluded
    written = [name for name in plan.layers if name not in plan.excluded]
    assert "convr" not in written and "conv0" in written


def test_an_fp32_sum_conv_never_reads_an_int8_residual():
    """Intel aborts on an FP32 conv + sum with an INT8 residual (Check failed: convFwd_pd,
    make intel-check): add1's residual is u8 without a ReLU after the sum, so a1 runs FP32,
    and so does conv0, whose u8 output is that residual; b1's residual (a1's sum) is FP32
    then, so b1 runs FP32 too. Reverting a sum conv (the search) cascades the same way."""
    net = TinyNet(RELU_FLAG_NET, seed=15)
    plan = plan_of(net)
    assert "u8" in plan.excluded["a1"]
    assert "aborts" in plan.excluded["conv0"] and "'a1'" in plan.excluded["conv0"]
    assert "residual is FP32" in plan.excluded["b1"]
    assert "last" not in plan.excluded
    net = TinyNet(residual_net(), seed=13)       # the search reverting the sum conv alone
    assert not plan_of(net).excluded
    plan = build_plan(net.fused, net.stats, QuantOptions(estimator="DIRECT", first_conv=True),
                      {"convb": UnitChoice(fp32=True)})
    assert "convb" not in plan.layers
    assert "convr" in plan.excluded and "aborts" in plan.excluded["convr"]
    assert "conv0" not in plan.excluded


# -- Concat, pooling, inner product ----------------------------------------------------------

def concat_net(relu_b=True):
    return (input_text((2, 3, 6, 6))
            + conv_text("conv0", "data", "c0", 4, 3) + relu_text("relu0", "c0")
            + conv_text("ca", "c0", "a", 3, 1) + relu_text("relua", "a")
            + conv_text("cb", "c0", "b", 5, 3) + (relu_text("relub", "b") if relu_b else "")
            + 'layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }\n'
            + conv_text("cn", "cat", "n", 4, 1) + relu_text("relun", "n")
            + conv_text("last", "n", "out", 3, 1))


def test_concat_requantizes_to_the_smallest_scale():
    net = TinyNet(concat_net(), seed=18)
    net.weights["cb"][0] *= 4
    net = TinyNet(concat_net(), weights=net.weights, batches=[{k: v.numpy() for k, v in
                                                               b.items()} for b in net.batches])
    plan = plan_of(net)
    la, lb, ln = plan.layers["ca"], plan.layers["cb"], plan.layers["cn"]
    assert la.output_int8 and lb.output_int8 and lb.scale_out < la.scale_out
    out = run(net, plan)
    q0 = first_layer_integers(net, plan, "conv0")
    s0 = plan.layers["conv0"].scale_out
    qa = conv(net, plan, "ca", ref.reorder(q0, s0, la.scale_in, "u8"), "u8", 0.0)
    qb = conv(net, plan, "cb", ref.reorder(q0, s0, lb.scale_in, "u8"), "u8", 0.0, pad=1)
    q_cat, s_cat = ref.concat([(qa, la.scale_out), (qb, lb.scale_out)], "u8")
    assert s_cat == lb.scale_out
    np.testing.assert_array_equal(out["cat"], ref.dequantize(q_cat, s_cat))
    qn = conv(net, plan, "cn", ref.reorder(q_cat, s_cat, ln.scale_in, "u8"), "u8", 0.0)
    np.testing.assert_array_equal(out["n"], ref.dequantize(qn, ln.scale_out))


def test_concat_of_u8_and_s8_goes_fp32():
    net = TinyNet(concat_net(relu_b=False), seed=19)
    plan = plan_of(net)
    out = run(net, plan)
    la, lb, ln = plan.layers["ca"], plan.layers["cb"], plan.layers["cn"]
    assert la.output_unsigned and not lb.output_unsigned
    q0 = first_layer_integers(net, plan, "conv0")
    s0 = plan.layers["conv0"].scale_out
    qa = conv(net, plan, "ca", ref.reorder(q0, s0, la.scale_in, "u8"), "u8", 0.0)
    qb = conv(net, plan, "cb", ref.reorder(q0, s0, lb.scale_in, "u8"), "s8", pad=1)
    cat = np.concatenate([ref.dequantize(qa, la.scale_out), ref.dequantize(qb, lb.scale_out)], 1)
    np.testing.assert_array_equal(out["cat"], cat)
    qn = conv(net, plan, "cn", quantize_input(cat, ln.scale_in, ln.input_unsigned), "u8", 0.0)
    np.testing.assert_array_equal(out["n"], ref.dequantize(qn, ln.scale_out))


def test_ave_pooling_on_int8_rounds_to_the_grid():
    text = (input_text((2, 3, 7, 7))
            + conv_text("conv0", "data", "c0", 4, 3) + relu_text("relu0", "c0")
            + conv_text("c1", "c0", "x", 4, 3) + relu_text("relu1", "x")
            + 'layer { name: "pool" type: "Pooling" bottom: "x" top: "p" '
              'pooling_param { pool: AVE kernel_size: 3 stride: 2 } }\n'
            + conv_text("c2", "p", "y", 4, 1) + relu_text("relu2", "y")
            + conv_text("last", "y", "out", 3, 1))
    net = TinyNet(text, seed=20)
    plan = plan_of(net)
    out = run(net, plan)
    l1, l2 = plan.layers["c1"], plan.layers["c2"]
    assert l2.scale_in == l1.scale_out                 # cac_opt
    q0 = first_layer_integers(net, plan, "conv0")
    q1 = conv(net, plan, "c1", ref.reorder(q0, plan.layers["conv0"].scale_out, l1.scale_in,
                                           "u8"), "u8", 0.0, pad=1)
    qp = ref.ave_pool(q1, 3, 2, "u8")
    np.testing.assert_array_equal(out["p"], ref.dequantize(qp, l1.scale_out))
    exact = ref.dequantize(q1, l1.scale_out)[:, :, 0:3, 0:3].mean((2, 3))
    assert not np.array_equal(out["p"][:, :, 0, 0], exact)   # the mean itself is off-grid


def test_inner_product_with_a_leaky_relu_writes_u8():
    text = (input_text((2, 3, 4, 4))
            + conv_text("conv0", "data", "c0", 4, 3) + relu_text("relu0", "c0")
            + 'layer { name: "fc" type: "InnerProduct" bottom: "c0" top: "f" '
              'inner_product_param { num_output: 6 } }\n' + relu_text("relufc", "f", 0.1)
            + 'layer { name: "fc2" type: "InnerProduct" bottom: "f" top: "g" '
              'inner_product_param { num_output: 3 } }\n')
    net = TinyNet(text, seed=21)
    plan = plan_of(net, quantize_fc=True)
    lf = plan.layers["fc"]
    assert lf.output_int8 and net.fused.by_name["fc"].relu_slope == pytest.approx(0.1)
    out = run(net, plan)
    q0 = first_layer_integers(net, plan, "conv0")
    x = ref.reorder(q0, plan.layers["conv0"].scale_out, lf.scale_in, "u8").reshape(2, -1, 1, 1)
    weight = net.weights["fc"][0].reshape(6, -1, 1, 1)
    acc = conv_int64(x, quantize_weights(weight, lf.scale_params))
    qf = intel_output(acc, quantize_bias(net.weights["fc"][1], lf.scale_in, lf.scale_params),
                      lf.scale_in, lf.scale_params, lf.scale_out, "u8", slope=0.1)
    np.testing.assert_array_equal(out["f"], ref.dequantize(qf, lf.scale_out).reshape(2, 6))
    assert (net.versions()[0][net.node_index("relufc")]["f"] < 0).any()  # leaky negatives


# -- standalone Eltwise, reorders --------------------------------------------------------------

def test_standalone_int8_eltwise_adds_at_scale_one():
    text = residual_net(conv_text("convx", "c0", "x", 4, 1) + relu_text("relux", "x"))
    net = TinyNet(text, seed=22)
    plan = plan_of(net)
    lr, lb = plan.layers["convr"], plan.layers["convb"]
    # our plan keeps Intel off this: the inputs of the standalone Eltwise write FP32
    assert net.fused.by_name["convb"].eltwise is None
    assert not lr.output_int8 and not lb.output_int8
    assert any("scale 1.0" in n for n in lb.notes)
    # an Intel-written file with INT8 inputs there: the runtime adds integers at scale 1.0
    for lq, t in ((lr, "r"), (lb, "b")):
        lq.output_int8 = True
        lq.scale_out = 127 / net.absmax_after(f"conv{t}")
    out = run(net, plan)
    q0 = first_layer_integers(net, plan, "conv0")
    s0 = plan.layers["conv0"].scale_out
    qr = conv(net, plan, "convr", ref.reorder(q0, s0, lr.scale_in, "u8"), "s8")
    qb = conv(net, plan, "convb", ref.reorder(q0, s0, lb.scale_in, "u8"), "s8", pad=1)
    qs = ref.eltwise([(qr, lr.scale_out), (qb, lb.scale_out)], "s8")
    np.testing.assert_array_equal(out["s"], qs.astype(np.float32))
    assert np.abs(out["s"] - (out["r"] + out["b"])).max() > 0.3   # integers, not the sum


def test_int8_reorder_into_a_conv_at_another_scale():
    text = (input_text((2, 3, 6, 6))
            + conv_text("conv0", "data", "c0", 4, 3) + relu_text("relu0", "c0")
            + conv_text("c1", "c0", "x", 5, 3) + relu_text("relu1", "x")
            + conv_text("c2", "x", "y", 4, 1) + relu_text("relu2", "y")
            + conv_text("last", "y", "out", 3, 1))
    net = TinyNet(text, seed=23)
    plan = plan_of(net)
    l1, l2 = plan.layers["c1"], plan.layers["c2"]
    l2.scale_in = float(np.float32(l1.scale_out * 0.37))   # as a hand-edited file may say
    out = run(net, plan)
    q0 = first_layer_integers(net, plan, "conv0")
    q1 = conv(net, plan, "c1", ref.reorder(q0, plan.layers["conv0"].scale_out, l1.scale_in,
                                           "u8"), "u8", 0.0, pad=1)
    q2 = conv(net, plan, "c2", ref.reorder(q1, l1.scale_out, l2.scale_in, "u8"), "u8", 0.0)
    np.testing.assert_array_equal(out["y"], ref.dequantize(q2, l2.scale_out))


# -- calibrator.py's force_fp32_opt and cac_opt ---------------------------------------------

SQUEEZE_TAIL = (input_text((2, 3, 6, 6))
                + conv_text("conv0", "data", "c0", 4, 3) + relu_text("relu0", "c0")
                + conv_text("conv11", "c0", "d", 4, 1)
                + 'layer { name: "pool2" type: "Pooling" bottom: "d" top: "q" '
                  'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
                + 'layer { name: "fc" type: "InnerProduct" bottom: "q" top: "f" '
                  'inner_product_param { num_output: 3 } }\n'
                + conv_text("conv12", "c0", "e", 4, 1)
                + 'layer { name: "drop12" type: "Dropout" bottom: "e" top: "e" }\n'
                + conv_text("e1", "c0", "a", 3, 1) + relu_text("relua", "a")
                + conv_text("e3", "c0", "b", 3, 3) + relu_text("relub", "b")
                + 'layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }\n'
                + 'layer { name: "drop" type: "Dropout" bottom: "cat" top: "cat" }\n'
                + conv_text("conv10", "cat", "c10", 4, 1) + relu_text("relu10", "c10")
                + 'layer { name: "pool" type: "Pooling" bottom: "c10" top: "p" '
                  'pooling_param { pool: AVE global_pooling: true } }\n')


def test_force_fp32_opt_keeps_int8_outputs_for_int8_readers():
    net = TinyNet(SQUEEZE_TAIL, seed=24)
    layers = plan_of(net).layers
    # SqueezeNet's fire9: read by a Concat (then an in-place Dropout): INT8 (the old rule,
    # "no INT8 consumer", made it FP32 and hit MKL-DNN's batch-1 in-place Concat)
    assert layers["e1"].output_int8 and layers["e3"].output_int8
    assert to_proto(layers["e1"]).bw_layer_out == 8
    assert layers["conv11"].output_int8                    # read by a Pooling (then FP32 fc)
    assert not layers["conv12"].output_int8                # an in-place Dropout reads it
    assert "in-place" in layers["conv12"].notes[-1]
    assert not layers["conv10"].output_int8                # read by a Pooling, but the
    assert "last" in layers["conv10"].notes[-1]            # last Convolution of the net
    layers = plan_of(net, force_fp32_rule=False).layers   # -uff
    assert all(lq.output_int8 for lq in layers.values())


def test_cac_opt_through_a_concat_and_disabled_by_ucac():
    text = (input_text((2, 3, 6, 6))
            + conv_text("conv0", "data", "c0", 4, 3) + relu_text("relu0", "c0")
            + conv_text("ca", "c0", "a", 3, 1) + relu_text("relua", "a")
            + conv_text("cb", "c0", "b", 3, 3) + relu_text("relub", "b")
            + 'layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }\n'
            + conv_text("reader", "cat", "r", 4, 1) + relu_text("relur", "r")
            + 'layer { name: "pool" type: "Pooling" bottom: "cat" top: "p" '
              'pooling_param { pool: AVE kernel_size: 2 stride: 2 } }\n'
            + conv_text("down", "p", "d", 4, 1) + relu_text("relud", "d")
            + conv_text("last", "d", "out", 3, 1))
    net = TinyNet(text, seed=25)
    layers = plan_of(net).layers
    # up the pooling: the Concat (two inputs) -> its first quantized reader's scale_in
    assert layers["down"].scale_in == layers["reader"].scale_in
    assert layers["down"].scale_in != pytest.approx(255 / net.absmax_after("pool"), rel=1e-3)
    layers = plan_of(net, cac_rule=False).layers
    assert layers["down"].scale_in == pytest.approx(255 / net.absmax_after("pool"), rel=1e-6)


def test_outputs_the_rule_always_leaves_fp32_are_not_histogrammed():
    """histogram_keys leaves out conv12's and conv10's outputs (FP32 in every plan under
    force_fp32_opt); the KL plan built without their histograms is the plan built with
    every histogram, but for the thresholds nothing reads."""
    net = TinyNet(SQUEEZE_TAIL, seed=24)
    options = QuantOptions(first_conv=True)
    full = net.calibrate(first_conv=True)
    keys = histogram_keys(net.fused, options)
    assert {u.name for u in net.fused.units if u.output.key not in keys} == {"conv12",
                                                                              "conv10"}
    partial = collect(net.net, net.fused, iter(net.batches), hist_keys=keys)
    assert {key for key, stats in partial.items() if stats.hist is None} == set(partial) - keys
    plan = build_plan(net.fused, partial, options)
    assert set(plan.layers) == set(full.layers)
    for name, lq in full.layers.items():
        if lq.output_int8:
            assert plan.layers[name] == lq
        else:
            assert plan.layers[name].output_threshold is None
            assert replace(plan.layers[name], output_threshold=lq.output_threshold) == lq
    # -uff: any output may be INT8, so every output keeps its histogram
    uff = histogram_keys(net.fused, replace(options, force_fp32_rule=False))
    assert {u.output.key for u in net.fused.units if u.kind == "conv"} <= uff
