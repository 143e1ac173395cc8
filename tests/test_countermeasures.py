"""Saturation counter-measures chosen by the search on a net built to saturate on AVX2.

conv1 gets a bias of +2, so its ReLU'd outputs (conv2's u8 input) sit high in the u8 range;
conv2 (1x1) has weights of 0.7-1.0 x its largest, with the same sign inside each pair of
neighbouring input channels (the pairs MLAS forms). Every pair sum is then about
2 x 200 x 110 > 32767: on ``--target avx2`` conv2's pairs saturate to int16 and accuracy
falls, while exact int32 (``vnni``) keeps it. 7-bit weights or halved weight scales bound a
pair by 255 x 2 x 64 = 32640 and remove the saturation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from calibrator.caffe.caffemodel import write_caffemodel
from calibrator.cli.main import main
from tests.netutil import tinted_image_net
from calibrator.quant import targets
from calibrator.quant.calibrate import calibrate
from calibrator.quant.scales import QuantOptions, UnitChoice
from calibrator.quant.simulate import Int8Simulator
from calibrator.search.countermeasures import candidate_fixes, forced_choices
from tests import test_search

NET = test_search.NET.replace(
    'layer {{ name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"\n'
    '  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 }} }}',
    'layer {{ name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"\n'
    '  convolution_param {{ num_output: 8 kernel_size: 1 }} }}')


@pytest.fixture(scope="module")
def saturating(tmp_path_factory):
    assert "kernel_size: 1 }} }}\nlayer {{ name: \"relu2\"" in NET
    tmp = tmp_path_factory.mktemp("saturating")
    rng = np.random.default_rng(7)
    prototxt, names = tinted_image_net(tmp, rng, test_search.IMAGES, 12, NET, "net")

    def conv(o, c, k):
        return [rng.normal(0, math.sqrt(2.0 / (c * k * k)), (o, c, k, k)).astype(np.float32),
                np.zeros(o, np.float32)]

    weights = {"conv1": conv(8, 3, 3), "conv3": conv(8, 8, 3), "conv4": conv(8, 8, 1),
               "fc": [np.zeros((10, 8), np.float32), np.zeros(10, np.float32)]}
    weights["conv1"][1][:] = 2.0
    magnitude = rng.uniform(0.7, 1.0, (8, 8))
    sign = rng.choice([-1.0, 1.0], (8, 4)).repeat(2, axis=1)  # one sign per channel pair
    weights["conv2"] = [(0.3 * magnitude * sign).reshape(8, 8, 1, 1).astype(np.float32),
                        np.zeros(8, np.float32)]
    caffemodel = tmp / "net.caffemodel"
    write_caffemodel(caffemodel, weights)
    labels = test_search._labels_from_fp32(tmp, prototxt, caffemodel, names, weights, rng)
    assert len(set(labels)) >= 5
    return tmp, prototxt, caffemodel


def _search(saturating, out, *extra, quiet=True):
    tmp, prototxt, caffemodel = saturating
    out.mkdir(parents=True, exist_ok=True)
    code = main(["-m", str(prototxt), "-w", str(caffemodel), "-i", "4", "-s", "4",
                 "-l", "0.05", "--output", str(out / "q.prototxt"), "--json",
                 str(out / "q.json"), "--probe-images", "16", *extra]
                + (["--quiet"] if quiet else []))
    record = json.loads((out / "q.json").read_text())
    return code, record["search"], {layer["name"]: layer for layer in record["layers"]}


def test_search_fixes_the_saturating_layer_instead_of_reverting(saturating, tmp_path, capsys):
    code, exact, _ = _search(saturating, tmp_path / "vnni", "--target", "vnni")
    assert code == 0 and exact["fp32_layers"] == []
    code, off, _ = _search(saturating, tmp_path / "off", "--target", "avx2",
                           "--saturation-fix", "off")
    # saturation costs accuracy the exact arithmetic does not lose
    assert off["trace"][1][0] == "all INT8" and off["trace"][1][1] < exact["trace"][1][1] - 0.1
    # conv2 saturates in the all-INT8 plan; the whole-net EasyQuant, blind to the pair
    # saturation, may widen another layer's range into it (the list is of the adjusted plan)
    assert "conv2" in off["saturating_layers"]
    capsys.readouterr()
    code, auto, layers = _search(saturating, tmp_path / "auto", "--target", "avx2",
                                 quiet=False)
    assert code == 0 and auto["met"] and auto["fp32_layers"] == []
    assert layers["conv2"]["saturation_fix"] in ("w7", "half")
    assert all(layers[n]["saturation_fix"] is None for n in ("conv3", "conv4"))
    assert auto["full_evaluations"] <= off["full_evaluations"]
    # the per-layer table shows the fix
    table = capsys.readouterr().out
    assert "saturation fix" in table
    row = next(line for line in table.splitlines() if line.startswith("conv2 "))
    assert layers["conv2"]["saturation_fix"] in row.split()


def test_fixed_layer_no_longer_saturates(saturating):
    from calibrator.model import load_model

    _, prototxt, caffemodel = saturating
    model = load_model(prototxt, caffemodel)
    calibration = calibrate(model, QuantOptions(), 2, quiet=True)
    feeds = model.source.batch(0)
    cases = ((None, "avx2", True), ("w7", "avx2", False), ("half", "avx2", False),
             (None, "avx2-onednn", True), ("s8", "avx2-onednn", False))
    for fix, target_name, changed in cases:
        choices = {} if fix is None else {"conv2": UnitChoice(saturation_fix=fix)}
        plan = calibration.plan(choices)
        records = {}
        sim = Int8Simulator(calibration.fused, plan, target=target_name, saturation=records)
        with torch.no_grad():
            model.net(feeds, overrides=sim.overrides, outputs=["fc"])
        record = records.get("conv2")
        assert (record is not None and record.changed > 0) == changed, fix
        lq = plan.layers["conv2"]
        if fix == "s8":  # the u8 input becomes s8: 127/T instead of 255/T, weights kept
            base = calibration.plan().layers["conv2"]
            assert base.input_unsigned and not lq.input_unsigned
            assert lq.scale_in == pytest.approx(base.scale_in * 127 / 255, rel=1e-6)
            assert lq.scale_params == base.scale_params
        elif fix is not None:
            limit = 63 if fix == "w7" else 64
            q = np.round(np.array(plan.layers["conv2"].scale_params)
                         * np.abs(model.net.node("conv2").module.weight_bias()[0]
                                  .detach().numpy()).reshape(8, -1).max(1))
            assert q.max() <= limit


def test_forced_fix_and_candidates(saturating):
    from calibrator.model import load_model

    _, prototxt, caffemodel = saturating
    model = load_model(prototxt, caffemodel)
    calibration = calibrate(model, QuantOptions(), 2, quiet=True)
    plan = calibration.plan()
    avx2 = targets.get_target("avx2")
    choices = forced_choices(calibration.fused, plan, avx2, "w7")
    assert "conv2" in choices and all(c.saturation_fix == "w7" for c in choices.values())
    assert forced_choices(calibration.fused, plan, targets.get_target("vnni"), "w7") == {}
    assert candidate_fixes(avx2, True) == ["w7", "half"]
    assert candidate_fixes(targets.get_target("avx2-onednn"), True) == ["w7", "half", "s8"]
    assert candidate_fixes(targets.get_target("avx2-onednn"), False) == ["w7", "half"]
    assert candidate_fixes(targets.get_target("vnni"), True) == []


def test_runtime_ort_runs_every_full_evaluation_through_ort_graph(saturating, tmp_path,
                                                                   monkeypatch):
    """--runtime ort: each INT8 full evaluation simulates the plan's exported model as ORT
    runs it (``ort_simulator``; its exactness is tested in test_verify.py)."""
    pytest.importorskip("onnxruntime")
    from calibrator.backends import OrtBackend

    calls = []
    original = OrtBackend.simulator

    def counting(self, fused, plan, **options):
        calls.append(self.target.name)
        return original(self, fused, plan, **options)

    monkeypatch.setattr(OrtBackend, "simulator", counting)
    code, search, _ = _search(saturating, tmp_path / "ort", "--target", "avx2",
                              "--runtime", "ort")
    int8_evaluations = len(search["trace"]) - 1  # all but FP32
    assert search["runtime"] == "ort" and int8_evaluations >= 1
    assert calls == ["avx2"] * int8_evaluations


def test_quantize_only_with_a_forced_fix(saturating, tmp_path, capsys):
    """-q --saturation-fix w7: 7-bit weights on every layer whose weight pairs can saturate
    on --target, none elsewhere; the written scales are the 8-bit ones x 63/127."""
    _, prototxt, caffemodel = saturating

    def quantize(out, *extra):
        out.mkdir()
        assert main(["-m", str(prototxt), "-w", str(caffemodel), "-s", "4", "-q", "--quiet",
                     "--output", str(out / "q.prototxt"), "--json", str(out / "q.json"),
                     *extra]) == 0
        return {layer["name"]: layer for layer in json.loads((out / "q.json").read_text())
                ["layers"]}

    plain = quantize(tmp_path / "plain", "--target", "avx2")
    fixed = quantize(tmp_path / "w7", "--target", "avx2", "--saturation-fix", "w7")
    ignored = quantize(tmp_path / "vnni", "--target", "vnni", "--saturation-fix", "w7")
    assert "never saturates" in capsys.readouterr().err
    assert fixed["conv2"]["saturation_fix"] == "w7"
    np.testing.assert_allclose(fixed["conv2"]["scale_params"],
                               np.array(plain["conv2"]["scale_params"]) * 63 / 127, rtol=1e-6)
    for name, layer in fixed.items():
        if layer.get("saturation_fix") is None and "scale_params" in layer:
            assert layer["scale_params"] == plain[name]["scale_params"]
    assert all(layer.get("saturation_fix") is None for layer in ignored.values())
    assert all(layer.get("saturation_fix") is None for layer in plain.values())
