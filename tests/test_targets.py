"""Targets: the simulation's accumulation against numpy references written here.

A single conv (or fc) gets integer inputs and weights at scale 1, so the simulated FP32
output is exactly the integer accumulator. The ``avx2`` reference forms the pairs of the
reduction axis as MLAS packs it (k = c + Cg * position, pairs (k, k+1), a zero partner for an
odd K), clips each pair sum to int16 with np.clip and adds in int64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrator.graph.net import CaffeNet
from calibrator.quant import targets
from calibrator.quant.fusion import analyze
from calibrator.quant.scales import LayerQuant, QuantOptions, QuantPlan, UnitChoice, build_plan
from calibrator.quant.simulate import Int8Simulator
from tests.netutil import parse_net
from tests.quant_helpers import TinyNet, input_text

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 ssse3 {extra}
bugs\t\t: sysret_ss_attrs
"""


def conv_net(shape, conv_param, weight, kind="Convolution"):
    text = ('layer { name: "in" type: "Input" top: "data" input_param { shape { '
            + " ".join(f"dim: {d}" for d in shape) + " } } }\n"
            + f'layer {{ name: "conv" type: "{kind}" bottom: "data" top: "y" '
              f'{conv_param} }}\n')
    param = parse_net(text)
    net = CaffeNet(param, {"conv": [weight.astype(np.float32)]}).eval()
    return net


def integer_plan(net, unsigned=True, bits=8, kind="conv"):
    fused = analyze(net, quantize_fc=kind == "fc")
    unit = fused.units[0]
    channels = unit.layer.module.weight_bias()[0].shape[0]
    lq = LayerQuant(unit.name, 1.0, 1.0, [1.0] * channels, unsigned, False, False, bits=bits)
    return fused, QuantPlan({unit.name: lq}, QuantOptions(quantize_fc=True), {})


def simulate(net, fused, plan, x, target):
    sim = Int8Simulator(fused, plan, target=target)
    with torch.no_grad():
        out = net({"data": torch.from_numpy(x)}, overrides=sim.overrides)
    return out["y"].double().numpy()


def im2col_mlas(x, kh, kw, pad, stride, groups):
    """(N, G, K, L) int64 with k = c + Cg * (i * kw + j) inside each group, explicit loops."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (w + 2 * pad - kw) // stride + 1
    cg = c // groups
    cols = np.zeros((n, groups, cg * kh * kw, oh * ow), np.int64)
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                for ch in range(cg):
                    k = ch + cg * (i * kw + j)
                    patch = xp[:, g * cg + ch, i:i + stride * oh:stride, j:j + stride * ow:stride]
                    cols[:, g, k, :] = patch.reshape(n, -1)
    return cols, oh, ow


def weights_mlas(weight, groups):
    """(G, Og, K) int64 in the same k order."""
    o, cg, kh, kw = weight.shape
    w = np.zeros((groups, o // groups, cg * kh * kw), np.int64)
    for g in range(groups):
        for oo in range(o // groups):
            for i in range(kh):
                for j in range(kw):
                    for ch in range(cg):
                        w[g, oo, ch + cg * (i * kw + j)] = weight[g * (o // groups) + oo, ch, i, j]
    return w


def reference(x, weight, pad, stride, groups, saturate, shift=0):
    """Accumulator (N, O, OH, OW): exact int64, or pairs clipped to int16 (shifted input
    u = x + shift, padding included, minus the compensation shift * sum(w))."""
    kh, kw = weight.shape[2:]
    cols, oh, ow = im2col_mlas(x.astype(np.int64), kh, kw, pad, stride, groups)
    w = weights_mlas(weight.astype(np.int64), groups)
    if not saturate:
        acc = np.einsum("ngkl,gok->ngol", cols, w)
    else:
        u = cols + shift
        if w.shape[-1] % 2:
            w = np.concatenate([w, np.zeros(w.shape[:-1] + (1,), np.int64)], -1)
            u = np.concatenate([u, np.zeros(u.shape[:2] + (1,) + u.shape[3:], np.int64)], 2)
        pairs = np.einsum("ngpel,gope->ngopl", u.reshape(u.shape[0], u.shape[1], -1, 2,
                                                           u.shape[-1]),
                          w.reshape(w.shape[0], w.shape[1], -1, 2))
        acc = np.clip(pairs, -32768, 32767).sum(3) - shift * w.sum(-1)[None, :, :, None]
    n = x.shape[0]
    return acc.reshape(n, -1, oh, ow).astype(np.float64)


def large_case(rng, shape, out, k, groups=1):
    cg = shape[1] // groups
    weight = rng.integers(-127, 128, size=(out, cg, k, k))
    weight[:, :, 0, 0] = 127  # pairs of two 127s: 255 * 254 saturates for sure
    x = rng.integers(0, 256, size=shape).astype(np.float32)
    x[:, :, ::2, ::2] = 255
    return x, weight


@pytest.mark.parametrize("channels,k,pad,stride,groups", [
    (8, 1, 0, 1, 1),     # pointwise, pairs of neighbouring channels
    (6, 3, 1, 1, 1),     # Cg % 4 != 0
    (3, 3, 1, 2, 1),     # odd Cg: pairs straddle kernel positions, odd K padded
    (8, 3, 1, 1, 2),     # grouped
])
def test_avx2_equals_pairwise_int16_reference(channels, k, pad, stride, groups):
    rng = np.random.default_rng(channels * 10 + k)
    shape = (2, channels, 7, 6)
    x, weight = large_case(rng, shape, 4, k, groups)
    net = conv_net(shape, f"convolution_param {{ num_output: 4 kernel_size: {k} pad: {pad} "
                          f"stride: {stride} group: {groups} bias_term: false }}", weight)
    fused, plan = integer_plan(net)
    got = simulate(net, fused, plan, x, "avx2")
    want = reference(x, weight, pad, stride, groups, saturate=True)
    exact = reference(x, weight, pad, stride, groups, saturate=False)
    assert not np.array_equal(want, exact)  # the case really saturates
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(simulate(net, fused, plan, x, "vnni"), exact)
    np.testing.assert_array_equal(simulate(net, fused, plan, x, "generic"), exact)
    np.testing.assert_array_equal(simulate(net, fused, plan, x, "avx512bw"), want)


def test_vnni_is_the_default_simulation():
    rng = np.random.default_rng(1)
    shape = (1, 8, 5, 5)
    x, weight = large_case(rng, shape, 4, 3)
    net = conv_net(shape, "convolution_param { num_output: 4 kernel_size: 3 pad: 1 "
                          "bias_term: false }", weight)
    fused, plan = integer_plan(net)
    sim = Int8Simulator(fused, plan)
    with torch.no_grad():
        default = net({"data": torch.from_numpy(x)}, overrides=sim.overrides)["y"]
    np.testing.assert_array_equal(default.double().numpy(),
                                  simulate(net, fused, plan, x, "vnni"))
    np.testing.assert_array_equal(default.double().numpy(),
                                  reference(x, weight, 1, 1, 1, saturate=False))


def test_signed_input_is_shifted_by_128_with_compensation():
    rng = np.random.default_rng(7)
    shape = (2, 8, 5, 5)
    weight = rng.integers(-127, 128, size=(4, 8, 3, 3))
    weight[:, :2] = 120
    x = rng.integers(-128, 128, size=shape).astype(np.float32)
    net = conv_net(shape, "convolution_param { num_output: 4 kernel_size: 3 pad: 1 "
                          "bias_term: false }", weight)
    fused, plan = integer_plan(net, unsigned=False)
    got = simulate(net, fused, plan, x, "avx2")
    want = reference(x, weight, 1, 1, 1, saturate=True, shift=128)
    assert not np.array_equal(want, reference(x, weight, 1, 1, 1, saturate=False))
    np.testing.assert_array_equal(got, want)


def test_onednn_halves_weights_for_signed_input():
    rng = np.random.default_rng(8)
    shape = (1, 8, 4, 4)
    weight = rng.integers(-127, 128, size=(4, 8, 1, 1))
    x = rng.integers(-128, 128, size=shape).astype(np.float32)
    net = conv_net(shape, "convolution_param { num_output: 4 kernel_size: 1 "
                          "bias_term: false }", weight)
    fused, plan = integer_plan(net, unsigned=False)
    halved = np.round(weight * 0.5)  # half to even, as oneDNN's nearbyint
    want = 2 * reference(x, halved, 0, 1, 1, saturate=False)
    np.testing.assert_array_equal(simulate(net, fused, plan, x, "avx2-onednn"), want)


def test_depthwise_never_saturates():
    shape = (2, 4, 6, 6)
    weight = np.full((4, 1, 3, 3), 127)
    x = np.full(shape, 255, np.float32)
    net = conv_net(shape, "convolution_param { num_output: 4 kernel_size: 3 pad: 1 group: 4 "
                          "bias_term: false }", weight)
    fused, plan = integer_plan(net)
    exact = reference(x, weight, 1, 1, 4, saturate=False)
    np.testing.assert_array_equal(simulate(net, fused, plan, x, "avx2"), exact)


def test_inner_product_pairs_neighbouring_inputs():
    rng = np.random.default_rng(4)
    weight = rng.integers(-127, 128, size=(5, 3 * 2 * 2))
    weight[:, :4] = -127
    x = rng.integers(0, 256, size=(3, 3, 2, 2)).astype(np.float32)
    x[:, 0] = 255
    text = ('layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 3 '
            'dim: 3 dim: 2 dim: 2 } } }\n'
            'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "y" '
            'inner_product_param { num_output: 5 bias_term: false } }\n')
    net = CaffeNet(parse_net(text), {"fc": [weight.astype(np.float32)]}).eval()
    fused, plan = integer_plan(net, kind="fc")
    flat = x.reshape(3, -1).astype(np.int64)
    pairs = np.einsum("npe,ope->nop", flat.reshape(3, -1, 2), weight.reshape(5, -1, 2))
    want = np.clip(pairs, -32768, 32767).sum(-1).astype(np.float64)
    assert not np.array_equal(want, flat @ weight.T)
    np.testing.assert_array_equal(simulate(net, fused, plan, x, "avx2"), want)


def test_no_risky_pair_takes_the_exact_path():
    """7-bit weights (|w| <= 63): 255 * 63 * 2 < 32767, so avx2 equals the exact result."""
    rng = np.random.default_rng(5)
    shape = (2, 8, 5, 5)
    weight = rng.integers(-63, 64, size=(4, 8, 3, 3))
    x = np.full(shape, 255, np.float32)
    net = conv_net(shape, "convolution_param { num_output: 4 kernel_size: 3 pad: 1 "
                          "bias_term: false }", weight)
    fused, plan = integer_plan(net)
    sim = Int8Simulator(fused, plan)
    kernel = sim.kernels["conv"]
    assert not targets.can_saturate(kernel, "avx2")
    assert targets.saturating_layers(sim, "avx2") == []
    np.testing.assert_array_equal(simulate(net, fused, plan, x, "avx2"),
                                  reference(x, weight, 1, 1, 1, saturate=False))


def test_int7_limits_operands():
    rng = np.random.default_rng(6)
    shape = (1, 4, 4, 4)
    weight = rng.integers(-127, 128, size=(3, 4, 1, 1))
    x = rng.integers(0, 256, size=shape).astype(np.float32)
    net = conv_net(shape, "convolution_param { num_output: 3 kernel_size: 1 "
                          "bias_term: false }", weight)
    fused, plan = integer_plan(net)
    want = reference(np.clip(x, 0, 127), np.clip(weight, -64, 63), 0, 1, 1, saturate=False)
    np.testing.assert_array_equal(simulate(net, fused, plan, x, "int7"), want)
    # a 7-bit plan is unchanged by the int7 target
    fused7, plan7 = integer_plan(net, bits=7)
    x7 = np.clip(x, 0, 127)
    w7 = np.clip(weight, -64, 63)
    net7 = conv_net(shape, "convolution_param { num_output: 3 kernel_size: 1 "
                           "bias_term: false }", w7)
    fused7, plan7 = integer_plan(net7, bits=7)
    np.testing.assert_array_equal(simulate(net7, fused7, plan7, x7, "int7"),
                                  simulate(net7, fused7, plan7, x7, "vnni"))


@pytest.mark.parametrize("extra,expected", [
    ("avx2 avx512f avx512bw avx512_vnni", "vnni"),
    ("avx2 avx_vnni", "vnni"),
    ("avx2 avx512f avx512bw avx512vl", "avx512bw"),
    ("avx avx2 fma", "avx2"),
    ("avx", "generic"),
])
def test_auto_reads_cpuinfo_flags(extra, expected):
    text = CPUINFO.format(extra=extra)
    assert targets.detect_target(text) == expected
    assert targets.get_target("auto", cpuinfo=text).name == expected


def test_auto_reads_arm_features_and_unknown_names():
    assert targets.detect_target("processor : 0\nFeatures : fp asimd asimddp\n") == "generic"
    with pytest.raises(ValueError):
        targets.get_target("sse9")


def test_record_counts_saturated_outputs():
    rng = np.random.default_rng(9)
    shape = (1, 8, 4, 4)
    x, weight = large_case(rng, shape, 4, 1)
    net = conv_net(shape, "convolution_param { num_output: 4 kernel_size: 1 "
                          "bias_term: false }", weight)
    fused, plan = integer_plan(net)
    record = {}
    sim = Int8Simulator(fused, plan, target="avx2", saturation=record)
    with torch.no_grad():
        net({"data": torch.from_numpy(x)}, overrides=sim.overrides)
    entry = record["conv"]
    assert entry.outputs == 4 * 16 and 0 < entry.changed <= entry.outputs
    assert entry.relative_error > 0


def test_countermeasure_changes_and_effect():
    tiny = TinyNet(input_text((1, 3, 4, 4)) + """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 2 kernel_size: 1 } }""")
    tiny.calibrate(first_conv=True)
    with pytest.raises(ValueError):  # an unknown counter-measure is refused
        build_plan(tiny.fused, tiny.stats, QuantOptions(first_conv=True),
                   {"conv": UnitChoice(saturation_fix="w6")})
    assert targets.countermeasure_helps("w7", "avx2")
    assert not targets.countermeasure_helps("s8", "avx2")
    assert targets.countermeasure_helps("s8", "avx2-onednn")
    assert not targets.countermeasure_helps("w7", "vnni")
    lq = LayerQuant("c", 255 / 4, 1.0, [127.0, 10.0], True, True, True)
    targets.apply_countermeasure(lq, "s8")
    assert lq.scale_in == pytest.approx(127 / 4) and not lq.input_unsigned
    targets.apply_countermeasure(lq, "w7")
    assert lq.scale_params == pytest.approx([63.0, 10 * 63 / 127])
