"""EasyQuant and bias correction (calibrator.quant.layerwise), the corrected caffemodel, and
full evaluations stopped once their verdict is decided."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibrator.caffe.caffemodel import write_caffemodel
from calibrator.cli.main import main
from calibrator.metrics import AccuracyMetric
from calibrator.model import load_model
from calibrator.quant import layerwise as layerwise_module
from calibrator.quant.layerwise import LayerwiseSettings, factors, layerwise
from calibrator.quant.scales import QuantOptions, build_plan, qmax
from calibrator.search.evaluator import Evaluator, SearchState
from tests.netutil import deployable, parse_net, random_weights
from tests.quant_helpers import (TinyNet, as_integers, bn_scale_text, conv_int64, conv_text,
                                input_text, intel_output, quantize_bias, quantize_input,
                                quantize_weights, relu_text)
from tests.test_search import tiny  # noqa: F401  (fixture)

ONE_CONV = (input_text((6, 4, 7, 7))
            + conv_text("conv", "data", "y", 5, 3, "pad: 1") + relu_text("relu", "y"))


#: one convolution (and its ReLU) per layout the candidate products take: plain, grouped
#: with several outputs per group, depthwise
CONVS = {"plain": (ONE_CONV, 1),
         "grouped": (input_text((6, 4, 7, 7)) + conv_text("conv", "data", "y", 6, 3, "group: 2")
                     + relu_text("relu", "y"), 2),
         "depthwise": (input_text((6, 4, 7, 7)) + conv_text("conv", "data", "y", 4, 3,
                                                            "group: 4")
                       + relu_text("relu", "y"), 4)}
#: without a ReLU the unit's output is affine in its weights: the weight step scores the
#: candidates from moments of the patches (``_WeightMoments``), not from their outputs
CONVS.update({f"{name} linear": (text[:text.index('layer { name: "relu"')], groups)
              for name, (text, groups) in list(CONVS.items())})


def _one_conv(seed=5, text=ONE_CONV):
    net = TinyNet(text, seed=seed, nonnegative_input=True)
    net.calibrate(first_conv=True, per_channel=True)
    return net


def _brute_force(net, s_in: float, s_w: np.ndarray, grid: np.ndarray, unsigned: bool,
                 groups: int = 1, relu: bool = True):
    """Every candidate run as a whole convolution (no sampling, no stacking): each channel's
    best weight factor at ``s_in``, then the best input factor."""
    low, high = (0, 255) if unsigned else (-128, 127)
    x = net.batches[0]["data"]
    w, b = (torch.from_numpy(a) for a in net.weights["conv"])
    activation = F.relu if relu else (lambda v: v)
    ref = activation(F.conv2d(x, w, b, padding=1, groups=groups)).double()

    def run(si, sw):
        q_in = torch.round(x * si).clamp(low, high)
        q_w = torch.round(w * torch.tensor(sw, dtype=torch.float32)[:, None, None, None]
                          ).clamp(-128, 127)
        scale = torch.tensor(np.float32(si) * sw.astype(np.float32))
        q_b = torch.round(b * scale)
        acc = F.conv2d(q_in, q_w, padding=1, groups=groups)
        return activation((acc + q_b[None, :, None, None]) / scale[None, :, None, None]
                          ).double()

    def channel_cos(y):
        a, r = y.transpose(0, 1).reshape(y.shape[1], -1), ref.transpose(0, 1).reshape(
            y.shape[1], -1)
        return ((a * r).sum(1) / torch.sqrt((a * a).sum(1) * (r * r).sum(1))).numpy()

    best = np.full(len(s_w), -np.inf)
    chosen = s_w.copy()
    for f in grid:
        cos = channel_cos(run(s_in, s_w * f))
        better = cos > best + 1e-12
        best, chosen = np.where(better, cos, best), np.where(better, s_w * f, chosen)
    best_score, best_factor = -np.inf, None
    for f in grid:
        y = run(s_in * f, chosen)
        score = float((y * ref).sum() / torch.sqrt((y * y).sum() * (ref * ref).sum()))
        if score > best_score + 1e-12:
            best_score, best_factor = score, f
    return s_in * best_factor, chosen


@pytest.mark.parametrize("layout", sorted(CONVS))
def test_easyquant_finds_the_brute_force_optimum_of_the_grid(layout):
    text, groups = CONVS[layout]
    net = _one_conv(text=text)
    options = QuantOptions(first_conv=True, per_channel=True)
    settings = LayerwiseSettings(steps=41, rounds=1, bias_correction=False,
                                 positions=10 ** 6)       # every output position
    lq = net.plan.layers["conv"]
    choices, reports = layerwise(net.net, net.fused, net.stats, options, {},
                                 net.batches[0], settings)
    grid = factors(settings).numpy().astype(np.float64)
    s_in, s_w = _brute_force(net, np.float32(lq.scale_in),
                             np.array(lq.scale_params, np.float32), grid.astype(np.float32),
                             lq.input_unsigned, groups, relu="linear" not in layout)
    choice = choices["conv"]
    assert np.allclose(choice.weight_scales, s_w, rtol=1e-6)
    assert qmax(lq.input_unsigned) / choice.input_threshold == pytest.approx(s_in, rel=1e-5)
    report = reports["conv"]
    assert report.cosine_after >= report.cosine_before
    assert any(abs(a / b - 1) > 1e-6 for a, b in zip(choice.weight_scales, lq.scale_params))


@pytest.mark.parametrize("unsigned", [True, False])
def test_the_int8_products_equal_int64_arithmetic(unsigned):
    if not layerwise_module.int8_products_work():
        pytest.skip("no int8 matrix products in this PyTorch build")
    rng = np.random.default_rng(3)
    low, high = (0, 255) if unsigned else (-128, 127)
    a = rng.integers(low, high + 1, (37, 29))
    a[0] = high                                     # the extremes of the input range
    a[1] = low
    w = rng.integers(-128, 128, (11, 29))           # (N, C): the product reads it transposed
    product = layerwise_module._IntegerProduct(255 if unsigned else 127)
    a8 = product.input(torch.tensor(a, dtype=torch.float32))
    got = product(a8, torch.tensor(w, dtype=torch.int8).t())
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy().astype(np.int64), a @ w.T)


def _three_convs():
    net = TinyNet(input_text((4, 3, 9, 9)) + conv_text("c1", "data", "a", 8, 3, "pad: 1")
                  + relu_text("r1", "a") + conv_text("c2", "a", "b", 6, 3)
                  + relu_text("r2", "b") + conv_text("c3", "b", "c", 4, 1), seed=9)
    return net


@pytest.mark.parametrize("bits", [8, 7])
def test_the_int8_products_make_the_choices_the_float_products_make(bits, monkeypatch):
    """c1 reads signed data, c2 and c3 unsigned ReLU outputs (shifted by 128 at 8 bits)."""
    if not layerwise_module.int8_products_work():
        pytest.skip("no int8 matrix products in this PyTorch build")
    run = _three_convs_pass(bits)
    monkeypatch.setattr(layerwise_module, "INT8_PRODUCTS", True)
    integer = run()
    monkeypatch.setattr(layerwise_module, "INT8_PRODUCTS", False)
    _assert_same_choices(integer, run(), bias_atol=1e-9)


@pytest.mark.parametrize("bits", [8, 7])
def test_the_cosine_kernels_make_the_choices_the_tensor_code_makes(bits, monkeypatch):
    """The cosines' float64 sums by the C kernels (one read of the candidates' outputs) and
    by float64 copies of them choose the same scales and corrections (float products: the
    int8 ones have kernels of their own, tested below)."""
    from calibrator.quant import native
    if not native.available():
        pytest.skip("no C compiler")
    monkeypatch.setattr(layerwise_module, "INT8_PRODUCTS", False)
    run = _three_convs_pass(bits)
    calls = []
    real = native.column_dot_square
    monkeypatch.setattr(native, "column_dot_square", lambda *a: calls.append(1) or real(*a))
    with_kernel = run()
    assert calls
    for name in ("dot_square", "column_dot_square", "depthwise_sums", "quantized_rows",
                 "integer_sums"):
        monkeypatch.setattr(native, name, lambda *a, **k: None)
    _assert_same_choices(with_kernel, run(), bias_atol=0.0)


#: every way a unit's candidates are scored: dense int8 products with an unsigned input
#: (offset 128) and a signed one, eight outputs and five (the kernel's two lane paths), a
#: residual with the ReLU after the sum, a leaky ReLU, none; depthwise 3 x 3 with a residual
#: and 5 x 5 with a leaky ReLU (the depthwise kernel's nine-tap path and its other one)
_FUSED_NET = (input_text((6, 4, 7, 7)) + conv_text("c1", "data", "a", 8, 1)
              + relu_text("r1", "a")
              + conv_text("dw", "a", "b", 8, 3, "pad: 1 group: 8")
              + 'layer { name: "s1" type: "Eltwise" bottom: "a" bottom: "b" top: "c" }\n'
              + relu_text("r2", "c")
              + conv_text("pw", "c", "d", 8, 1)
              + 'layer { name: "s2" type: "Eltwise" bottom: "c" bottom: "d" top: "e" }\n'
              + relu_text("r3", "e")
              + conv_text("dw2", "e", "f", 8, 5, "pad: 2 group: 8") + relu_text("r4", "f", 0.1)
              + conv_text("c4", "f", "g", 5, 1) + relu_text("r5", "g", 0.1)
              + conv_text("c5", "g", "h", 8, 1))


@pytest.mark.parametrize("bits, slice_elements", [(8, None), (7, None), (8, 1),
                                                   (8, 2 * 22 * 294 * 9)])
def test_the_fused_candidate_kernels_give_the_tensor_codes_cosines(bits, slice_elements,
                                                                   monkeypatch):
    """The kernels that make, requantize and sum the candidates' outputs in cache
    (depthwise_sums; quantized_rows and integer_sums around the int8 products, in the input
    step and, per column, in the weight step) give every cosine of the pass bit for bit as
    the tensor code with dot_square does, so the same choices: each layout above, at 8 and
    7 bits; the groups' sums added slice by slice, one or two groups a slice (the 22
    candidates of the input step on 294 positions of 9 taps) or more."""
    from calibrator.quant import native
    if not native.available() or not layerwise_module.int8_products_work():
        pytest.skip("no C compiler or no int8 matrix products")
    monkeypatch.setattr(layerwise_module, "INT8_PRODUCTS", True)
    if slice_elements is not None:
        monkeypatch.setattr(layerwise_module, "SLICE_ELEMENTS", slice_elements)
    net = TinyNet(_FUSED_NET, seed=4, nonnegative_input=True)
    net.calibrate(first_conv=True, per_channel=True, bits=bits)
    options = QuantOptions(first_conv=True, per_channel=True, bits=bits)
    leaky = float(np.float32(0.1))
    kinds = {u.name: (u.residual is not None, u.relu_slope) for u in net.fused.units
             if u.name in net.plan.layers and u.name not in net.plan.excluded}
    assert kinds == {"c1": (False, 0.0), "dw": (True, 0.0), "pw": (True, 0.0),
                     "dw2": (False, leaky), "c4": (False, leaky), "c5": (False, None)}
    unsigned = {name: lq.input_unsigned for name, lq in net.plan.layers.items()}
    assert unsigned["pw"] and not unsigned["c5"]
    scored = []   # every cosine of the pass, in order
    for cls, method in ((layerwise_module._Unit, "input_cosines"),
                        (layerwise_module._WeightProducts, "channel_cosines")):
        def record(self, *args, real=getattr(cls, method)):
            cos = real(self, *args)
            scored.append(cos)
            return cos
        monkeypatch.setattr(cls, method, record)

    def run():
        scored.clear()
        got = layerwise(net.net, net.fused, net.stats, options, {}, net.batches[0],
                        LayerwiseSettings(steps=21))
        return (*got, list(scored))

    calls = {}
    for name in ("depthwise_sums", "quantized_rows", "integer_sums"):
        real = getattr(native, name)

        def spy(*args, real=real, name=name, **kwargs):
            got = real(*args, **kwargs)
            calls.setdefault(name + " columns" * kwargs.get("columns", False), []).append(
                got is not None)
            return got
        monkeypatch.setattr(native, name, spy)
    fused_choices, fused_reports, fused_cosines = run()
    assert set(calls) == {"depthwise_sums", "quantized_rows", "integer_sums",
                          "integer_sums columns"}
    assert all(all(ran) for ran in calls.values())
    for name in ("depthwise_sums", "quantized_rows", "integer_sums"):
        monkeypatch.setattr(native, name, lambda *a, **k: None)
    choices, reports, cosines = run()
    assert len(fused_cosines) == len(cosines) > 0
    assert all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)   # (NaN: a dead channel)
               for a, b in zip(fused_cosines, cosines))
    assert fused_choices == choices
    assert {n: vars(r) for n, r in fused_reports.items()} == \
        {n: vars(r) for n, r in reports.items()}


#: two inverted residual blocks as MobileNetV2 has them: a linear (no ReLU) output read by
#: the next block's expansion and by the residual add fused into that block's projection
_RESIDUAL_BLOCKS = (input_text((6, 4, 7, 7)) + conv_text("c1", "data", "a", 8, 1)
                    + conv_text("e1", "a", "b", 16, 1) + relu_text("r1", "b")
                    + conv_text("d1", "b", "c", 16, 3, "pad: 1 group: 16")
                    + relu_text("r2", "c") + conv_text("p1", "c", "d", 8, 1)
                    + 'layer { name: "s1" type: "Eltwise" bottom: "a" bottom: "d" top: "e" }\n'
                    + conv_text("e2", "e", "f", 16, 1) + relu_text("r3", "f")
                    + conv_text("p2", "f", "g", 8, 1)
                    + 'layer { name: "s2" type: "Eltwise" bottom: "e" bottom: "g" top: "h" }\n'
                    + conv_text("c9", "h", "i", 5, 1))


@pytest.mark.parametrize("bits", [8, 7])
def test_a_shared_output_is_rounded_once_at_its_writers_scale(bits, monkeypatch):
    """c1's output is read by e1 and by the residual add fused into p1; p1's (the sum) by
    e2 and by p2's add. The runtime writes each once, as integers at its writer's
    scale_out, and every reader reads those (``sat(rne(q * scale_in / s))``, the fused
    add ``q_residual``): the pass hands the reader those integers and keeps its input
    scale at the writer's (EasyQuant searches its weight scales only), so the final plan
    rounds nothing twice. A unit that one unit alone reads (e1 -> d1) writes unrounded
    values in the pass, and its reader's input scale is searched."""
    net = TinyNet(_RESIDUAL_BLOCKS, seed=4, nonnegative_input=True)
    net.calibrate(first_conv=True, per_channel=True, bits=bits)
    options = QuantOptions(first_conv=True, per_channel=True, bits=bits)
    seen = {}   # unit -> (the quantized input the pass hands it, keep_input)
    real = layerwise_module._through_unit

    def spy(unit, fused, fp_blobs, q_blobs, owned, deployed, settings, keep_input=False,
            **kwargs):
        seen[unit.name] = (q_blobs[unit.layer.bottoms[0]].clone(), keep_input)
        return real(unit, fused, fp_blobs, q_blobs, owned, deployed, settings,
                    keep_input=keep_input, **kwargs)
    monkeypatch.setattr(layerwise_module, "_through_unit", spy)
    choices, reports = layerwise(net.net, net.fused, net.stats, options, {},
                                 net.batches[0], LayerwiseSettings(steps=21))
    plan = build_plan(net.fused, net.stats, options, choices)
    assert set(seen) == {"c1", "e1", "d1", "p1", "e2", "p2", "c9"}
    assert {name for name, (_, keep) in seen.items() if keep} == {"e1", "e2"}
    # e1 reads Intel's s8 integers of c1 at c1's deployed plan (its corrected bias), as
    # the kernel's arithmetic written in numpy gives them (tests/quant_helpers)
    lq = plan.layers["c1"]
    data = net.batches[0]["data"].numpy()
    weight, bias = net.weights["c1"]
    if lq.bias_shift is not None:
        bias = (np.asarray(bias, np.float32) + np.asarray(lq.bias_shift, np.float32)).astype(
            np.float32)
    acc = conv_int64(quantize_input(data, lq.scale_in, lq.input_unsigned, bits),
                     quantize_weights(weight, lq.scale_params, bits))
    want = intel_output(acc, quantize_bias(bias, lq.scale_in, lq.scale_params), lq.scale_in,
                        lq.scale_params, lq.scale_out, "s8", bits=bits)
    assert np.array_equal(as_integers(seen["e1"][0].numpy(), lq.scale_out), want)
    for reader, writer in (("e1", "c1"), ("e2", "p1")):
        lq_w = plan.layers[writer]
        assert lq_w.output_int8 and not lq_w.output_unsigned
        # what the reader gets: integers at the writer's (calibrated) scale_out, in range
        q = as_integers(seen[reader][0].numpy(), lq_w.scale_out)
        assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
        assert len(np.unique(q)) > 8
        assert lq_w.scale_out == net.plan.layers[writer].scale_out
        # the reader keeps that scale; its weight scales were searched
        assert choices[reader].input_threshold is None
        assert plan.layers[reader].scale_in == lq_w.scale_out
        assert choices[reader].weight_scales is not None
        assert choices[reader].weight_scales != tuple(net.plan.layers[reader].scale_params)
    # a single reader's input: unrounded in the pass, its scale searched, and its writer
    # then writes at that scale (one rounding)
    assert not seen["d1"][1] and choices["d1"].input_threshold is not None
    with pytest.raises(AssertionError, match="not INT8 values"):
        as_integers(seen["d1"][0].numpy(), plan.layers["e1"].scale_out)
    assert plan.layers["e1"].scale_out == plan.layers["d1"].scale_in


def _three_convs_pass(bits: int):
    """The layer-wise pass over ``_three_convs`` at ``bits`` (per-channel, first conv
    INT8, 21 steps): a function giving its choices."""
    net = _three_convs()
    net.calibrate(first_conv=True, per_channel=True, bits=bits)
    options = QuantOptions(first_conv=True, per_channel=True, bits=bits)
    settings = LayerwiseSettings(steps=21)
    return lambda: layerwise(net.net, net.fused, net.stats, options, {}, net.batches[0],
                             settings)[0]


def _assert_same_choices(got: dict, want: dict, bias_atol: float) -> None:
    assert set(got) == set(want) == {"c1", "c2", "c3"}
    for name in got:
        assert got[name].input_threshold == want[name].input_threshold
        assert got[name].weight_scales == want[name].weight_scales
        assert np.allclose(got[name].bias_shift, want[name].bias_shift, rtol=0,
                           atol=bias_atol)


@pytest.mark.parametrize("bits", [8, 7])
def test_easyquant_never_lowers_the_cosine_and_runs_at_7_bits(bits):
    net = _three_convs()
    net.calibrate(first_conv=True, per_channel=True, bits=bits)
    options = QuantOptions(first_conv=True, per_channel=True, bits=bits)
    _, reports = layerwise(net.net, net.fused, net.stats, options, {}, net.batches[0],
                           LayerwiseSettings(steps=21, bias_correction=False))
    assert set(reports) == {"c1", "c2", "c3"}
    for report in reports.values():
        assert report.cosine_after >= report.cosine_before - 1e-12


def test_bias_correction_zeroes_each_channels_mean_error():
    """After the correction the unit's INT8 output before its ReLU (accumulator dequantized,
    its FP32 input quantized) has no mean error per channel against FP32."""
    text = (input_text((4, 3, 8, 8)) + conv_text("c1", "data", "a", 6, 3, "pad: 1")
            + relu_text("r1", "a") + conv_text("c2", "a", "b", 5, 3, "pad: 1")
            + bn_scale_text("c2", "b"))
    net = TinyNet(text, seed=3)
    net.calibrate(first_conv=True)
    options = QuantOptions(first_conv=True)
    choices, reports = layerwise(net.net, net.fused, net.stats, options, {}, net.batches[0],
                                 LayerwiseSettings(easyquant=False))
    plan = build_plan(net.fused, net.stats, options, choices)
    assert plan.layers["c2"].bias_shift is not None and reports["c2"].bias_shift > 0
    from calibrator.quant.layerwise import (_constants, _dequantized, _fp32_unit,
                                            _quantized_input)

    def _quantized_unit(unit, lq, x):
        return _dequantized(unit, _constants(unit, lq), _quantized_input(lq, x, False))

    x = net.batches[0]["data"]
    unit1, unit2 = net.fused.by_name["c1"], net.fused.by_name["c2"]
    with torch.no_grad():
        a_fp = F.relu(_fp32_unit(unit1, x))
        a_q = F.relu(_quantized_unit(unit1, plan.layers["c1"], x))
        uncorrected = build_plan(net.fused, net.stats, options, {}).layers["c2"]

        def mean_error(lq, a):
            return (_quantized_unit(unit2, lq, a).double()
                    - _fp32_unit(unit2, a_fp).double()).mean((0, 2, 3)).numpy()

        error, before = mean_error(plan.layers["c2"], a_fp), mean_error(uncorrected, a_fp)
        upstream = mean_error(plan.layers["c2"], a_q)   # with c1 quantized as well
    lq = plan.layers["c2"]
    step = 1 / (lq.scale_in * np.array(lq.scale_params))   # one step of the int32 bias
    assert np.all(np.abs(error) <= 0.5 * step + 1e-6)
    assert np.abs(before).max() > 5 * step.max()   # there was an error to correct
    # the shift is the unit's own error, not c1's quantization error passed on
    assert np.abs(upstream).max() > 5 * step.max()



@pytest.mark.parametrize("shift_helps", [True, False])
def test_a_correction_is_kept_only_where_it_brings_the_output_closer(shift_helps,
                                                                       monkeypatch):
    """The pass compares the unit's output with and without its new shift (after the
    activation, quantized upstream) and keeps the closer one: the choice, the report and
    the output the next unit reads follow that decision."""
    text = (input_text((4, 3, 8, 8)) + conv_text("c1", "data", "a", 6, 3, "pad: 1")
            + bn_scale_text("c1", "a"))
    net = TinyNet(text, seed=3)
    net.calibrate(first_conv=True)
    options = QuantOptions(first_conv=True)
    seen = []
    real = layerwise_module._squared_error

    def judged(y, reference, bounds):
        seen.append(real(y, reference, bounds))
        return float(len(seen) == 1) if shift_helps else float(len(seen) == 2)

    monkeypatch.setattr(layerwise_module, "_squared_error", judged)
    choices, reports = layerwise(net.net, net.fused, net.stats, options, {}, net.batches[0],
                                 LayerwiseSettings(easyquant=False))
    assert len(seen) == 2          # the output without the shift, then with it
    if shift_helps:
        assert choices["c1"].bias_shift is not None and reports["c1"].bias_shift > 0
    else:
        assert "c1" not in choices or choices["c1"].bias_shift is None
        assert reports["c1"].bias_shift == 0.0
    # unmocked: on the unit's own (FP32) input and no activation, the mean shift can only
    # bring the output closer (up to the int32 bias rounding)
    assert seen[1] <= seen[0]


def test_the_squared_error_is_float64_and_clamps_to_the_activation():
    rng = np.random.default_rng(5)
    y = rng.normal(0, 4, (5, 3, 4, 4)).astype(np.float32)
    ref = rng.normal(0, 4, (5, 3, 4, 4)).astype(np.float32)
    got = layerwise_module._squared_error(torch.tensor(y), torch.tensor(ref), None)
    assert got == pytest.approx(((y.astype(np.float64) - ref) ** 2).sum(), rel=1e-6)
    clamped = layerwise_module._squared_error(torch.tensor(y), torch.tensor(ref), (0.0, 6.0))
    want = ((np.clip(y, 0, 6).astype(np.float64) - np.clip(ref, 0, 6)) ** 2).sum()
    assert clamped == pytest.approx(want, rel=1e-6) and clamped < got

NETS = {
    "plain": conv_text("conv", "data", "y", 4, 3),
    "no_bias": conv_text("conv", "data", "y", 4, 3, "bias_term: false"),
    "bn_scale": conv_text("conv", "data", "y", 4, 3) + bn_scale_text("conv", "y"),
}


@pytest.mark.parametrize("kind", sorted(NETS))
def test_written_caffemodel_loads_in_opencv_with_the_corrected_biases(kind, tmp_path):
    """calibrator -q --weights-out: OpenCV's Caffe importer reads the written prototxt and
    caffemodel, and its conv output is the FP32 conv with the corrected folded bias."""
    from tests.netutil import tinted_image_net

    template = ('layer {{ name: "data" type: "ImageData" top: "data" top: "label" '
                'transform_param {{ scale: 0.02 }} image_data_param {{ source: "{source}" '
                'root_folder: "{root}/" batch_size: 4 }} }}\n'
                + NETS[kind].replace("{", "{{").replace("}", "}}")
                + 'layer { name: "relu" type: "ReLU" bottom: "y" top: "y" }\n'
                .replace("{", "{{").replace("}", "}}"))
    prototxt, _ = tinted_image_net(tmp_path, np.random.default_rng(1), 8, 10, template, "net")
    net_param = parse_net(prototxt.read_text())
    caffemodel = tmp_path / "net.caffemodel"
    write_caffemodel(caffemodel, random_weights(net_param, {"data": (4, 3, 10, 10),
                                                        "label": (4,)}, seed=2),
                     net_param)
    out = tmp_path / "out"
    assert main(["-m", str(prototxt), "-w", str(caffemodel), "-q", "-1st", "-s", "2",
                 "--quiet", "--output", str(out / "q.prototxt"), "--weights-out",
                 str(out / "q.caffemodel"), "--json", str(out / "q.json")]) == 0
    record = json.loads((out / "q.json").read_text())
    assert record["layerwise"]["conv"]["bias_shift"] > 0
    model = load_model(prototxt, caffemodel)
    from calibrator.quant.fusion import analyze
    from calibrator.quant.folding import folded_weights
    from calibrator.quant.params import from_proto

    written = load_model(out / "q.prototxt", out / "q.caffemodel")
    shift = np.array(from_proto(analyze(written.net, quantize_fc=True)).layers["conv"]
                     .bias_shift or [0.0])   # the prototxt carries no shift: it is 0
    assert not shift.any()
    weight, bias = folded_weights(analyze(model.net).by_name["conv"])
    weight2, bias2 = folded_weights(analyze(written.net).by_name["conv"])
    expected = json.loads((out / "q.json").read_text())
    (entry,) = [l for l in expected["layers"] if l["name"] == "conv"]
    assert np.allclose(weight2.numpy(), weight.numpy(), rtol=1e-6)
    assert not np.allclose(bias2.numpy(), bias.numpy())
    # OpenCV reads the same weights and computes the corrected FP32 conv (ReLU folded)
    from calibrator.caffe.prototxt import read_net, write_net

    deploy = tmp_path / "deploy.prototxt"
    write_net(deploy, deployable(read_net(out / "q.prototxt"), {"data": (2, 3, 10, 10)}))
    cv_net = cv2.dnn.readNetFromCaffe(str(deploy), str(out / "q.caffemodel"))
    x = np.random.default_rng(4).uniform(0, 5, (2, 3, 10, 10)).astype(np.float32)
    cv_net.setInput(x, "data")
    got = cv_net.forward("relu")  # the last layer writing the in-place blob y
    want = F.relu(written.net.node("conv").module.run_with(torch.from_numpy(x), weight2,
                                                          bias2)).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert entry["precision"] == "int8"


def test_early_stopped_evaluations_give_the_complete_verdict(tiny):
    """For every threshold, an evaluation stopped as soon as its verdict is certain agrees
    with the complete evaluation, and reads fewer batches where the verdict came early."""
    _, prototxt, caffemodel = tiny
    model = load_model(prototxt, caffemodel)
    metric = AccuracyMetric(model.net, "accuracy")
    node = model.net.node("conv2")

    def broken(node_, blobs):  # a damaged conv2: some images become wrong
        (y,) = node.module(blobs[node.bottoms[0]])
        return (y * 0.3,)

    class Plan:  # stands in for a QuantPlan in the evaluator's fingerprint
        layers, excluded = {}, {}

    complete = Evaluator(model, metric, 4, SearchState(None, {}), quiet=True).evaluate(
        Plan(), {node.index: broken})
    value = complete.metric
    assert 0.0 < value < 1.0 and not complete.partial
    stopped_somewhere = False
    for need in np.linspace(0.0, 1.0, 21):
        def decide(low, high, need=need):
            if low >= need:
                return True
            if high < need:
                return False
            return None

        fresh = Evaluator(model, metric, 4, SearchState(None, {}), quiet=True)
        result = fresh.evaluate(Plan(), {node.index: broken}, decide=decide)
        assert (result.metric >= need) == (value >= need), need
        stopped_somewhere |= result.partial
        if result.partial:
            assert result.batches < 4
            done = fresh.complete(Plan(), {node.index: broken}, result)
            assert done.metric == value and not done.partial
    assert stopped_somewhere


def test_an_all_zero_channel_keeps_its_bias_and_the_others_are_still_searched():
    """Per-channel weights give an all-zero channel the weight scale 0, which Intel's kernel
    treats apart (bias reordered unscaled, the channel outputs rne(b)): its bias is left as it
    is, the other channels are corrected, and the input-scale search still sees a defined
    cosine (one NaN channel made every candidate NaN, and the input scale never moved)."""
    text = (input_text((4, 3, 8, 8)) + conv_text("c1", "data", "a", 6, 3)
            + relu_text("r1", "a") + conv_text("c2", "a", "b", 5, 3))
    weights = TinyNet(text, seed=3).weights
    w, b = weights["c2"]
    w[2], b[2] = 0.0, 0.3
    net = TinyNet(text, weights=dict(weights, c2=[w, b]), seed=3)
    net.calibrate(first_conv=True, per_channel=True)
    options = QuantOptions(first_conv=True, per_channel=True)
    choices, reports = layerwise(net.net, net.fused, net.stats, options, {}, net.batches[0],
                                 LayerwiseSettings(steps=21))
    shift = np.array(choices["c2"].bias_shift)
    assert np.isfinite(shift).all() and shift[2] == 0.0 and np.abs(shift).max() > 0
    assert choices["c2"].weight_scales[2] == 0.0
    report = reports["c2"]
    assert np.isfinite(report.cosine_before) and report.cosine_after >= report.cosine_before
    lq = net.plan.layers["c2"]
    assert choices["c2"].input_threshold != pytest.approx(qmax(lq.input_unsigned) / lq.scale_in)


@pytest.mark.parametrize("extra", ["stride: 2 dilation: 2", "stride: 1 group: 2"])
def test_patches_are_the_convolutions_input_windows(extra):
    """The sampled patches are the columns F.unfold takes for the convolution: zero where a
    tap falls in the padding (no padded copy is made), stride and dilation as the layer's."""
    text = input_text((3, 4, 9, 8)) + conv_text("conv", "data", "y", 6, 3, extra)
    net = TinyNet(text, seed=1)
    net.calibrate(first_conv=True)
    unit = net.fused.by_name["conv"]
    module = unit.layer.module
    x = torch.randn(3, 4, 9, 8)
    y = net.net({"data": x}, outputs=["y"])["y"]
    where = layerwise_module._sample_positions(unit, tuple(y.shape), 40, seed=0)
    patches = layerwise_module._patches(unit, x, where)
    columns = F.unfold(x, module.kernel, dilation=module.dilation, padding=module.pad,
                       stride=module.stride)                      # (N, C*kh*kw, L)
    n_idx, r_idx, c_idx = where
    expected = columns[n_idx, :, r_idx * y.shape[3] + c_idx]       # (P, C*kh*kw)
    assert (patches.reshape(len(n_idx), -1) == 0).any()           # some taps in the padding
    assert torch.equal(patches.reshape(len(n_idx), -1), expected)


class _SampledPass:
    """The three-conv net's layer-wise pass with every sample it draws recorded: (seed,
    count asked for, the layer's positions, the positions drawn as (n, row, col))."""

    def __init__(self, monkeypatch):
        self.net = _three_convs()
        self.net.calibrate(first_conv=True, per_channel=True)
        self.drawn = []
        sample = layerwise_module._sample_positions

        def recording(unit, shape, count, seed):
            where = sample(unit, shape, count, seed)
            total = shape[0] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            self.drawn.append((seed, count, total, torch.stack(where).t().tolist()))
            return where

        monkeypatch.setattr(layerwise_module, "_sample_positions", recording)

    def run(self, positions: int | None, seed: int, bits: int = 8) -> dict:
        """The pass's choices (EasyQuant alone, 5 candidates, one round)."""
        net = self.net
        self.drawn.clear()
        choices, _ = layerwise(net.net, net.fused, net.stats,
                               QuantOptions(first_conv=True, per_channel=True, bits=bits), {},
                               net.batches[0],
                               LayerwiseSettings(steps=5, rounds=1, positions=positions,
                                                 seed=seed, bias_correction=False))
        assert len(self.drawn) == 3                      # one sample per conv
        return choices


def test_the_seed_given_on_the_command_line_decides_the_sampled_positions(monkeypatch):
    """``--easyquant-seed`` reaches the pass: each seed samples its own output positions
    (a few of a layer's, so the scales may differ), the same seed the same ones."""
    from tests.test_intel_flags import config_of
    assert config_of("--easyquant-seed", "3").search.layerwise.seed == 3
    assert config_of().search.layerwise.seed == 0
    sampled = _SampledPass(monkeypatch)
    runs = {}
    for seed in (0, 3, 3):
        sampled.run(8, seed)
        assert {s for s, *_ in sampled.drawn} == {seed}
        runs.setdefault(seed, []).append([where for *_, where in sampled.drawn])
    assert runs[3][0] == runs[3][1]
    assert all(a != b for a, b in zip(runs[0][0], runs[3][0]))


def test_the_positions_given_on_the_command_line_size_the_sample(monkeypatch):
    """``--easyquant-positions`` reaches the pass: each layer scores its candidates on that
    many output positions, and on all of them where it has fewer, so that a sample as large
    as the layers leaves nothing to the seed (the same scales at every seed)."""
    from tests.test_intel_flags import config_of
    assert config_of("--easyquant-positions", "64").search.layerwise.positions == 64
    assert config_of().search.layerwise.positions is None     # by bit width, below
    sampled = _SampledPass(monkeypatch)
    chosen = {}
    for positions, seed in ((8, 0), (8, 3), (10 ** 6, 0), (10 ** 6, 3)):
        chosen[positions, seed] = sampled.run(positions, seed)
        for _, count, total, where in sampled.drawn:
            assert count == positions
            # distinct positions: as many as asked for, or every one the layer has
            assert len(where) == len({tuple(w) for w in where}) == min(positions, total)
    assert chosen[10 ** 6, 0] == chosen[10 ** 6, 3]
    assert chosen[8, 0] != chosen[8, 3]     # where the sample is a few positions it matters


def test_without_positions_given_the_sample_is_larger_at_7_bits(monkeypatch):
    """Without ``--easyquant-positions`` each layer samples 1,024 output positions at 8 bits
    and 4,096 at ``--bits 7`` (``POSITIONS``; BENCHMARKS.md, "A larger sample at 7 bits"),
    and a number given on the command line wins at either width."""
    sampled = _SampledPass(monkeypatch)
    for positions, bits, expected in ((None, 8, 1024), (None, 7, 4096), (64, 7, 64),
                                      (64, 8, 64)):
        sampled.run(positions, 0, bits=bits)
        assert [count for _, count, *_ in sampled.drawn] == [expected] * 3
