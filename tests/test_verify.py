"""ONNX export of a quantized net and ONNX Runtime's real kernels against the simulation.

The tiny net covers the exported layer kinds: a quantized first conv (s8 input) with folded
BatchNorm/Scale and ReLU, a depthwise conv, ReLU6, convs that absorb an Eltwise residual (c3:
the float data input, added in float by ORT; c6: an INT8 tensor, a QLinearAdd in ORT),
AVE pooling with Caffe's ceil-mode windows, MAX pooling, an FP32 InnerProduct, Softmax and an
Accuracy layer (left to PyTorch). On this machine ORT must reproduce the simulation for the
target ``auto`` detects: every INT8 unit output equal up to one quantum in at most 0.5% of the
elements (ORT requantizes in float32, the simulation in float64), and the final
probabilities within 1e-4."""

from __future__ import annotations

import shutil
import types

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from calibrator.quant import targets  # noqa: E402
from calibrator.quant.simulate import Int8Simulator  # noqa: E402
from calibrator.verify import run as verify_run  # noqa: E402
from calibrator.export.qdq import build_onnx, export_onnx  # noqa: E402
from calibrator.backends.ort import read_ort_graph  # noqa: E402
from calibrator.ort_worker import make_session  # noqa: E402
from tests.quant_helpers import (TinyNet, bn_scale_text, conv_text, input_text,  # noqa: E402
                                 relu_text)

TEXT = (input_text((4, 8, 8, 8))
        + conv_text("c1", "data", "a", 16, 3) + bn_scale_text("c1", "a") + relu_text("r1", "a")
        + conv_text("c2", "a", "b", 16, 3, "group: 16")
        + 'layer { name: "r6" type: "ReLU6" bottom: "b" top: "b" }\n'
        + conv_text("c3", "b", "c", 8, 1)
        + 'layer { name: "add" type: "Eltwise" bottom: "c" bottom: "data" top: "d" }\n'
        + conv_text("c4", "d", "e", 12, 1) + relu_text("r4", "e")
        + conv_text("c6", "e", "h", 12, 1)
        + 'layer { name: "add2" type: "Eltwise" bottom: "h" bottom: "e" top: "k" }\n'
        + conv_text("c5", "k", "g", 12, 3, "group: 12")
        + 'layer { name: "pool" type: "Pooling" bottom: "g" top: "p" '
          'pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }\n'
        + 'layer { name: "mp" type: "Pooling" bottom: "p" top: "m" '
          'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
        + 'layer { name: "fc" type: "InnerProduct" bottom: "m" top: "f" '
          'inner_product_param { num_output: 10 } }\n'
        + 'layer { name: "prob" type: "Softmax" bottom: "f" top: "prob" }\n')

DIFFERING_LIMIT = 0.005
PROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny():
    net = TinyNet(TEXT, seed=3)
    net.calibrate(first_conv=True, per_channel=True)
    return net


def _sim(tiny, target, feeds, capture_units=(), requant=None, exact_units=()):
    """The simulation as the ORT backend sets it up: the units ORT runs as float
    convolutions (``exact_units``) accumulate exactly whatever the target."""
    sim = Int8Simulator(tiny.fused, tiny.plan, requant=requant, target=target,
                        exact_units=exact_units)
    last = {tiny.fused.by_name[n].last.index: n for n in capture_units}
    captured = {}

    def hook(node, tops):
        if node.index in last:
            captured[last[node.index]] = tops[0].double().numpy()

    with torch.no_grad():
        out = tiny.net(feeds, overrides=sim.overrides, hook=hook)
    return out, captured


def test_export_passes_the_checker_and_covers_the_net(tiny, tmp_path):
    model = types.SimpleNamespace(net=tiny.net)
    result = export_onnx(model, tiny.fused, tiny.plan, tmp_path / "tiny.onnx")
    assert (tmp_path / "tiny.onnx").exists()
    onnx.checker.check_model(onnx.load(str(tmp_path / "tiny.onnx")))
    assert not result.left_out
    assert list(result.outputs.values()) == [(tiny.net.node("prob").index, "prob")]
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and "Conv" in ops and "Gemm" in ops
    inits = {i.name: i for i in result.model.graph.initializer}
    c1 = tiny.plan.layers["c1"]
    scale = onnx.numpy_helper.to_array(inits["c1:in:scale"])
    assert scale == np.float32(1 / c1.scale_in)
    w_scale = onnx.numpy_helper.to_array(inits["c1:Ws"])
    np.testing.assert_allclose(w_scale, 1 / np.array(c1.scale_params), rtol=1e-7)
    assert onnx.numpy_helper.to_array(inits["c1:Bq"]).dtype == np.int32
    assert onnx.numpy_helper.to_array(inits["c1:in:zp"]) == 128  # s8 input as u8 + 128


def test_ort_fuses_real_int8_kernels(tiny, tmp_path):
    result = build_onnx(tiny.net, tiny.fused, tiny.plan, residual="requant")
    path = tmp_path / "optimized.onnx"
    make_session(result.model.SerializeToString(), optimized_path=str(path))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QLinearConv") >= 3 and ops.count("QLinearAdd") == 1
    assert result.mid_scales == {
        name: pytest.approx(127 / tiny.plan.layers[name].output_threshold)
        for name in ("c3", "c6")}


@pytest.mark.parametrize("residual", ["float", "requant"])
def test_float_units_are_read_off_ort(tiny, residual):
    """Every quantized conv whose output reaches a Q (directly, through a fused Relu, or
    through ReLU6 into the next unit's input Q) runs as QLinearConv; c5 feeds AVE pooling
    in FP32, and with residual="float" c3 has no Q before its float add."""
    result = build_onnx(tiny.net, tiny.fused, tiny.plan, residual=residual)
    assert not tiny.plan.layers["c2"].output_int8  # ReLU6 follows: FP32 output in the plan
    want = {"c5"} | ({"c3", "c6"} if residual == "float" else set())
    graph = read_ort_graph(result)
    assert graph.float_units == want & set(tiny.plan.layers)
    int8 = {name for name, rule in graph.requant.items() if rule.multiplier is not None}
    assert int8 == set(tiny.plan.layers) - graph.float_units
    assert set(graph.requant) == set(tiny.plan.layers)  # float units: their input Q only
    # c3's residual is the float data input: ORT adds in float32, then quantizes the sum;
    # c6's residual is c4's INT8 output: QLinearAdd
    assert graph.requant["c3"].add is None
    assert (graph.requant["c3"].out is not None) == (residual == "requant")
    if residual == "requant":
        assert graph.requant["c6"].add is not None


@pytest.mark.parametrize("residual", ["float", "requant"])
def test_ort_agrees_with_the_simulation_of_this_cpu(tiny, residual):
    """Given ORT's requantization constants the simulation computes ORT's integers exactly
    (requant: every unit is an INT8 kernel); with residual="float" c3 is a float conv in
    ORT, whose summation order differs, so its output and what follows may move by one."""
    target = targets.detect_target()
    result = build_onnx(tiny.net, tiny.fused, tiny.plan, residual=residual, unit_outputs=True)
    graph = read_ort_graph(result)
    session = make_session(result.model.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    for feeds in tiny.batches:
        values = dict(zip(names, session.run(names, {"data": feeds["data"].numpy()})))
        out, captured = _sim(tiny, target, feeds, result.unit_outputs, graph.requant,
                             graph.float_units)
        for unit, (q, scale_out, zp, _) in result.unit_outputs.items():
            delta = np.abs((values[q].astype(np.float64) - zp)
                           - np.round(captured[unit] * scale_out))
            if residual == "requant":
                assert delta.max() == 0, unit
            assert delta.max() <= 1, unit
            assert np.mean(delta > 0) <= DIFFERING_LIMIT, unit
        prob = values[next(iter(result.outputs))]
        np.testing.assert_allclose(prob, out["prob"].numpy(), atol=PROB_TOLERANCE)


def test_ort_simulator_runs_what_ort_runs(tiny):
    """ort_simulator (what ``--runtime ort`` evaluates) gives ORT's probabilities; Intel's
    fused kernels (one rounding after the residual add, float64) do not."""
    from calibrator.backends import make_backend

    target = targets.get_target(targets.detect_target())
    result = build_onnx(tiny.net, tiny.fused, tiny.plan)
    session = make_session(result.model.SerializeToString())
    ours = make_backend("ort", target).simulator(tiny.fused, tiny.plan)
    intel = make_backend("intel", target).simulator(tiny.fused, tiny.plan)
    worst_intel = 0.0
    for feeds in tiny.batches:
        prob = session.run(None, {"data": feeds["data"].numpy()})[0]
        with torch.no_grad():
            mine = tiny.net(feeds, overrides=ours.overrides)["prob"].numpy()
            theirs = tiny.net(feeds, overrides=intel.overrides)["prob"].numpy()
        np.testing.assert_allclose(mine, prob, atol=1e-5)
        worst_intel = max(worst_intel, float(np.abs(theirs - prob).max()))
    assert worst_intel > 1e-3


def test_written_prototxt_exports_the_same_model(tiny):
    """The plan read back from the written quantization_param exports byte-identical ONNX
    initializers (so `calibrator verify` on the prototxt checks what the search measured);
    the units Intel would run in FP32 (c3: FP32 residual) or clip (c6: u8 residual, no ReLU
    after the sum), and c4, whose INT8 output is the FP32 c6's residual (Intel aborts on an
    FP32 conv + sum with an INT8 residual), are written without quantization_param."""
    from calibrator.graph.net import CaffeNet
    from calibrator.quant.fusion import analyze
    from calibrator.quant.params import annotate, from_proto
    from calibrator.quant.scales import QuantPlan

    assert set(tiny.plan.excluded) == {"c3", "c4", "c6"}
    written = CaffeNet(annotate(tiny.net_param, tiny.plan), tiny.weights).eval()
    fused = analyze(written, quantize_fc=True)
    again = build_onnx(written, fused, from_proto(fused))
    intel = QuantPlan({name: lq for name, lq in tiny.plan.layers.items()
                       if name not in tiny.plan.excluded}, tiny.plan.options, {})
    first = build_onnx(tiny.net, tiny.fused, intel)
    assert again.mid_scales == first.mid_scales

    def initializers(result):
        return {i.name: i.SerializeToString() for i in result.model.graph.initializer}

    assert initializers(again) == initializers(first)


def test_fp32_export_matches_the_caffe_net(tiny):
    result = build_onnx(tiny.net, tiny.fused, None)
    session = make_session(result.model.SerializeToString())
    for feeds in tiny.batches:
        prob = session.run(None, {"data": feeds["data"].numpy()})[0]
        with torch.no_grad():
            want = tiny.net(feeds)["prob"].numpy()
        np.testing.assert_allclose(prob, want, atol=1e-5)


ACCURACY_TEXT = (TEXT.replace(input_text((4, 8, 8, 8)), "")
                 + 'layer { name: "acc" type: "Accuracy" bottom: "f" bottom: "label" '
                   'top: "accuracy" }\n')


class _Source:
    def __init__(self, batches):
        self.batches = batches
        self.batch_size = 4

    def prefetch(self, n):
        return None

    def batch(self, index):
        return self.batches[index]


def test_verify_runs_left_out_layers_in_pytorch():
    text = (input_text((4, 8, 8, 8)) + input_text((4,), "label").replace('"input"', '"lab"')
            + ACCURACY_TEXT)
    rng = np.random.default_rng(0)
    batches = [{"data": rng.normal(0, 1, (4, 8, 8, 8)).astype(np.float32),
                "label": rng.integers(0, 10, 4).astype(np.float32)} for _ in range(2)]
    tiny = TinyNet(text, seed=3, batches=batches)
    tiny.calibrate(first_conv=True, per_channel=True)
    param = tiny.net_param
    model = types.SimpleNamespace(net=tiny.net, test_param=param, device=torch.device("cpu"),
                                  source=_Source(tiny.batches), prototxt="tiny")
    result = verify_run.verify(model, tiny.fused, tiny.plan, iterations=2,
                               target_names=("vnni", "avx2"), quiet=True, residual="float",
                               layer_images=2, speed=True)
    assert [entry.split(" ")[0] for entry in result.export.left_out] == ["acc"]
    assert set(result.metrics) == {"fp32", "sim:vnni", "sim:avx2", "ort"}
    assert result.score_blob == "f" and result.images == 8
    own = "sim:" + targets.detect_target()
    if own in result.agreement:
        assert result.agreement[own] == 1.0
        assert result.metrics[own]["accuracy"] == result.metrics["ort"]["accuracy"]
    assert result.speed["int8"] > 0 and result.speed["fp32"] > 0
    assert set(result.layers) == {"vnni", "avx2"}
    report = verify_run.format_report(result)
    assert "ORT real kernels" in report and "accuracy" in report


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="needs qemu-user (apt-get install qemu-user) to emulate AVX2")
def test_avx2_simulation_matches_ort_on_an_emulated_haswell(tiny):
    """ORT on a Haswell (AVX2, no VNNI) emulated by qemu-user: its MLAS kernels saturate the
    int16 pair sums, and the avx2 target reproduces them bit for bit, where vnni does not."""
    model = types.SimpleNamespace(net=tiny.net, device=torch.device("cpu"))
    feeds = {"data": tiny.batches[0]["data"] * 2}
    diffs = verify_run.layer_differences(
        model, tiny.fused, tiny.plan, feeds, 4,
        [targets.get_target("avx2"), targets.get_target("vnni")], "float",
        "qemu-x86_64 -cpu Haswell", None)
    assert all(d.differing == 0 for d in diffs["avx2"])
    assert any(d.differing > 0 for d in diffs["vnni"])


@pytest.mark.slow
def test_mobilenet_v2_simulation_runs_ort_integers(shared):
    """The shared MobileNetV2 with every conv INT8 (-1st, per-channel), 200 images: the
    simulation of this CPU's target, given ORT's graph, agrees with ORT image for image
    (only conv9, a float conv in ORT, computes in a different order); and int16 pair
    saturation (avx2) costs far more accuracy than exact int32 (vnni) predicts - the
    12-18 point loss ONNX Runtime shows on AVX2 CPUs without VNNI."""
    from calibrator.model import load_model
    from calibrator.quant.calibrate import calibrate
    from calibrator.quant.scales import QuantOptions

    folder = shared / "models/mobilenet_v2"
    model = load_model(folder / "test.prototxt", folder / "mobilenet_v2.caffemodel")
    calibration = calibrate(model, QuantOptions(first_conv=True, per_channel=True), 2,
                            quiet=True)
    own = targets.detect_target()
    names = ("vnni", "avx2") if own in ("vnni", "avx2") else ("vnni", "avx2", own)
    result = verify_run.verify(model, calibration.fused, calibration.plan(), iterations=4,
                               target_names=names, quiet=True, fp32=False)
    assert result.images == 200
    assert result.float_units == ["conv9"]
    assert result.agreement[f"sim:{own}"] >= 0.995
    top1 = {run: values["accuracy-top1"] for run, values in result.metrics.items()}
    assert abs(top1[f"sim:{own}"] - top1["ort"]) <= 0.005
    assert top1["sim:avx2"] < top1["sim:vnni"] - 0.08
