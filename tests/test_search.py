"""The accuracy-driven search on a small net where one layer is made to break under INT8.

conv2 carries a weight of 1000 on an input channel that conv1 never activates (its filter is
zero and its bias negative, so ReLU gives 0). The weight changes nothing in FP32, but it sets
every weight scale of conv2 (per tensor and per channel alike), so all its real weights round
to zero in INT8. No estimator, per-channel scale or EasyQuant scale in [0.5S, 2S] can repair
that: the only fix is keeping conv2 in FP32."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from calibrator.caffe.caffemodel import write_caffemodel
from calibrator.cli.main import main
from calibrator.search.prefix import evaluations_bound
from tests.netutil import tinted_image_net

NET = """
name: "tiny"
layer {{ name: "data" type: "ImageData" top: "data" top: "label"
  transform_param {{ scale: 0.0078125 mean_value: 128 mean_value: 128 mean_value: 128 }}
  image_data_param {{ source: "{source}" root_folder: "{root}/" batch_size: 16 }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 }} }}
layer {{ name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }}
layer {{ name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
  convolution_param {{ num_output: 8 kernel_size: 1 }} }}
layer {{ name: "relu4" type: "ReLU" bottom: "conv4" top: "conv4" }}
layer {{ name: "pool" type: "Pooling" bottom: "conv4" top: "pool"
  pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
  inner_product_param {{ num_output: 10 }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy" }}
"""

IMAGES = 64


def _weights(rng):
    def conv(o, c, k):
        return [rng.normal(0, math.sqrt(2.0 / (c * k * k)), (o, c, k, k)).astype(np.float32),
                np.zeros(o, np.float32)]

    weights = {"conv1": conv(8, 3, 3), "conv2": conv(8, 8, 3), "conv3": conv(8, 8, 3),
               "conv4": conv(8, 8, 1),
               "fc": [rng.normal(0, 0.5, (10, 8)).astype(np.float32),
                      np.zeros(10, np.float32)]}
    weights["conv1"][0][7] = 0.0          # input channel 7 of conv2 is always 0 after ReLU
    weights["conv1"][1][7] = -1.0
    weights["conv2"][0][:, 7, 1, 1] = 1000.0  # invisible in FP32, fatal to INT8 scales
    return weights


def _labels_from_fp32(tmp, prototxt, caffemodel, names, weights, rng):
    """Centre the classifier on the pooled features (so the FP32 net predicts varied
    classes), then label every image with the FP32 net's own prediction (accuracy 1.0)."""
    from calibrator.model import load_model

    model = load_model(prototxt, caffemodel)
    pooled = np.concatenate([model.net(model.source.batch(i), outputs=["pool"])["pool"]
                             .reshape(16, -1).numpy() for i in range(IMAGES // 16)])
    w = rng.normal(0, 1, (10, pooled.shape[1])) / (pooled.std(0) + 1e-6)
    weights["fc"] = [w.astype(np.float32), (-w @ pooled.mean(0)).astype(np.float32)]
    write_caffemodel(caffemodel, weights)
    model = load_model(prototxt, caffemodel)
    labels = []
    for index in range(IMAGES // 16):
        out = model.net(model.source.batch(index), outputs=["fc"])["fc"]
        labels.extend(out.argmax(1).tolist())
    (tmp / "list.txt").write_text("".join(f"{n} {l}\n" for n, l in zip(names, labels)))
    return labels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(7)
    prototxt, names = tinted_image_net(tmp, rng, IMAGES, 12, NET, "tiny")
    caffemodel = tmp / "tiny.caffemodel"
    weights = _weights(rng)
    write_caffemodel(caffemodel, weights)
    labels = _labels_from_fp32(tmp, prototxt, caffemodel, names, weights, rng)
    assert len(set(labels)) >= 5, "the FP32 net must predict varied classes"
    return tmp, prototxt, caffemodel


def _run(tiny, out, *extra):
    tmp, prototxt, caffemodel = tiny
    out.mkdir(parents=True, exist_ok=True)
    argv = ["-m", str(prototxt), "-w", str(caffemodel), "-i", "4", "-s", "4", "-l", "0.05",
            "--output", str(out / "q.prototxt"), "--json", str(out / "q.json"),
            "--table", str(out / "q.table"), "--probe-images", "16", "--quiet", *extra]
    return main(argv)


def test_search_ranks_the_broken_layer_first_and_reverts_only_it(tiny, tmp_path, capsys):
    code = _run(tiny, tmp_path / "a")
    assert code == 0
    record = json.loads((tmp_path / "a/q.json").read_text())
    search = record["search"]
    sensitivity = search["sensitivity"]
    assert max(sensitivity, key=sensitivity.get) == "conv2"
    assert search["fp32_layers"] == ["conv2"]
    assert search["met"] and search["loss"] <= 0.05
    quantized = 3  # conv2..conv4 (conv1 stays FP32 by Intel's rule)
    # FP32, all INT8, whole-net adjustments, worst layers adjusted, revert prefix, pruning
    assert search["full_evaluations"] <= 4 + evaluations_bound(quantized) + 2
    # the broken layer alone suffices: one trial of the reverted prefix, the first
    assert [a for a, _ in search["trace"] if a.startswith("revert")] == ["revert top 1"]
    precision = {l["name"]: l["precision"] for l in record["layers"]}
    assert precision == {"conv1": "fp32", "conv2": "fp32", "conv3": "int8", "conv4": "int8"}


def test_all_int8_really_breaks(tiny, tmp_path):
    """The premise: with every eligible layer INT8 the tolerance is far from met."""
    code = _run(tiny, tmp_path / "b", "--max-evals", "2")
    record = json.loads((tmp_path / "b/q.json").read_text())
    assert code == 1 and record["search"]["loss"] > 0.3


def test_resume_after_second_evaluation_gives_identical_files(tiny, tmp_path):
    assert _run(tiny, tmp_path / "full") == 0
    assert _run(tiny, tmp_path / "part", "--max-evals", "2") == 1
    state = tmp_path / "part/q.prototxt.search.json"
    assert state.exists() and len(json.loads(state.read_text())["evaluations"]) == 2
    assert _run(tiny, tmp_path / "part", "--resume") == 0
    for name in ("q.prototxt", "q.json", "q.table"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "part" / name).read_bytes()
    assert not state.exists()


def test_intel_strategy_reverts_in_prototxt_order(tiny, tmp_path):
    code = _run(tiny, tmp_path / "intel", "--strategy", "intel")
    search = json.loads((tmp_path / "intel/q.json").read_text())["search"]
    assert code == 0
    assert search["fp32_layers"] == ["conv2"]  # the first quantized conv in layer order
    assert [t[0] for t in search["trace"]] == ["FP32", "all INT8", "revert conv2"]


def test_same_inputs_give_byte_identical_outputs(tiny, tmp_path):
    _run(tiny, tmp_path / "x")
    _run(tiny, tmp_path / "y")
    for name in ("q.prototxt", "q.json", "q.table"):
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()


def test_the_probe_is_made_once_and_only_when_the_search_needs_it(tiny, tmp_path,
                                                                   monkeypatch):
    """The probe (FP32 activations of a few images at every cut) is made when the search
    first ranks layers and then reused; a search met by its whole-net adjustment never
    makes it."""
    from calibrator.quant.scales import with_choice
    from calibrator.search import loop

    made = []
    real = loop.make_probe
    monkeypatch.setattr(loop, "make_probe", lambda *a, **k: made.append(1) or real(*a, **k))
    assert _run(tiny, tmp_path / "ranked") == 0
    assert made == [1]          # ranking, adjustments and bisection on one probe
    made.clear()
    monkeypatch.setattr(loop.Search, "_whole_net",   # an adjustment that meets -l
                        lambda self, choices, outcome: with_choice(choices, "conv2", fp32=True))
    assert _run(tiny, tmp_path / "adjusted") == 0
    record = json.loads((tmp_path / "adjusted/q.json").read_text())["search"]
    assert record["met"] and made == []
