"""The main command's outputs on a tiny ImageData net: the quantized prototxt (round trip,
every layer kept, Intel's fields), agreement of `calibrator test` on it with the in-memory
simulation, byte-identical reruns, naming, the table format, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibrator.backends import make_backend
from calibrator.caffe import caffe_pb2
from calibrator.caffe.caffemodel import write_caffemodel
from calibrator.caffe.prototxt import read_net
from calibrator.cli.main import main
from tests.netutil import parse_net, random_weights

NET = """name: "tiny"
layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.0078125 mean_value: 128 }}
  image_data_param {{ source: "{list}" batch_size: 4 shuffle: true }} }}
layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.0078125 mean_value: 128 }}
  image_data_param {{ source: "{list}" batch_size: 4 }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 bias_term: false }} }}
layer {{ name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }}
layer {{ name: "scale2" type: "Scale" bottom: "conv2" top: "conv2"
  scale_param {{ bias_term: true }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv2" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv3" type: "Convolution" bottom: "pool1" top: "conv3"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 }} }}
layer {{ name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
  convolution_param {{ num_output: 6 kernel_size: 1 }} }}
layer {{ name: "relu4" type: "ReLU" bottom: "conv4" top: "conv4" }}
layer {{ name: "fc" type: "InnerProduct" bottom: "conv4" top: "fc"
  inner_product_param {{ num_output: 4 }} }}
layer {{ name: "prob" type: "Softmax" bottom: "fc" top: "prob" include {{ phase: TEST }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss"
  include {{ phase: TRAIN }} }}
"""

QUANTIZED = ["conv2", "conv3", "conv4"]  # conv1 is the first (FP32), fc needs -fc


def make_model(folder: Path, name: str = "net.prototxt", images: int = 8, seed: int = 0):
    """Images + list + prototxt + caffemodel in ``folder``; returns (prototxt, caffemodel)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(images):
        path = folder / f"img{i}.png"
        assert cv2.imwrite(str(path), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        lines.append(f"{path} {i % 4}\n")
    (folder / "list.txt").write_text("".join(lines))
    prototxt = folder / name
    prototxt.write_text(NET.format(list=folder / "list.txt"))
    weights = random_weights(parse_net(NET.format(list="x")), {"data": (4, 3, 8, 8),
                                                              "label": (4,)}, seed=seed)
    caffemodel = folder / "net.caffemodel"
    write_caffemodel(caffemodel, weights)
    return prototxt, caffemodel


def run_main(capsys, argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def quantize(capsys, prototxt, caffemodel, *extra):
    code, out, err = run_main(capsys, ["-m", prototxt, "-w", caffemodel, "-q", "--quiet",
                                       "-s", "2", *extra])
    assert code == 0, err
    return out


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"))


# -- the quantized prototxt -----------------------------------------------------------------

def test_quantized_prototxt_round_trip_and_fields(capsys, model, tmp_path):
    prototxt, caffemodel = model
    out_path, json_path = tmp_path / "q.prototxt", tmp_path / "q.json"
    quantize(capsys, prototxt, caffemodel, "-a", "DIRECT", "--output", out_path,
             "--json", json_path)
    original, written = read_net(prototxt), read_net(out_path)
    # every layer of every phase, in order, unchanged but for quantization_param
    assert [(l.name, l.type) for l in written.layer] == [(l.name, l.type)
                                                         for l in original.layer]
    for before, after in zip(original.layer, written.layer):
        stripped = caffe_pb2.LayerParameter()
        stripped.CopyFrom(after)
        stripped.ClearField("quantization_param")
        assert stripped == before, before.name
    carrying = [l.name for l in written.layer if l.HasField("quantization_param")]
    assert carrying == QUANTIZED

    record = {e["name"]: e for e in json.loads(json_path.read_text())["layers"]}
    for name in QUANTIZED:
        q = next(l for l in written.layer if l.name == name).quantization_param
        for field in ("bw_layer_in", "bw_layer_out", "bw_params"):
            assert q.HasField(field), (name, field)
        assert (q.bw_layer_in, q.bw_params) == (8, 8)
        assert len(q.scale_in) == 1 and len(q.scale_out) == 1
        assert len(q.scale_params) == 1                   # -c single: one value per tensor
        entry = record[name]
        assert q.scale_in[0] == pytest.approx(entry["scale_in"], rel=1e-6)
        assert q.scale_params[0] == pytest.approx(entry["scale_params"][0], rel=1e-6)
        assert q.HasField("is_negative_input") == (entry["input"] == "s8")
        if q.HasField("is_negative_input"):
            assert q.is_negative_input
    by_name = {l.name: l.quantization_param for l in written.layer}
    # conv4 is the last quantized conv: FP32 output; conv3 has no ReLU: conv4 reads s8
    assert by_name["conv4"].bw_layer_out == 32 and list(by_name["conv4"].scale_out) == [1.0]
    assert by_name["conv2"].bw_layer_out == 8 and by_name["conv3"].bw_layer_out == 8
    assert by_name["conv4"].is_negative_input
    assert not by_name["conv2"].HasField("is_negative_input")   # after conv1's ReLU
    assert not by_name["conv3"].HasField("is_negative_input")   # after relu2 + MAX pool
    assert record["conv3"]["output"] == "s8" and record["conv2"]["output"] == "u8"


def test_calibrator_test_on_the_written_prototxt_matches_the_in_memory_simulation(
        capsys, model, tmp_path):
    from calibrator.evaluation import run_test
    from calibrator.model import load_model
    from calibrator.quant.calibrate import calibrate
    from calibrator.quant.scales import QuantOptions

    prototxt, caffemodel = model
    out_path = tmp_path / "q.prototxt"
    quantize(capsys, prototxt, caffemodel, "-a", "MSE", "--output", out_path)
    code, out, err = run_main(capsys, ["test", "-m", out_path, "-w", caffemodel, "-i", "2",
                                       "--quiet", "--dump", tmp_path / "file"])
    assert code == 0, err
    from_file = out.splitlines()

    model_ = load_model(prototxt, caffemodel)
    calibration = calibrate(model_, QuantOptions(estimator="MSE"), 2, quiet=True)
    plan = calibration.plan()
    assert sorted(plan.layers) == QUANTIZED
    in_memory = run_test(model_, 2, overrides=make_backend().simulator(calibration.fused,
                                                                      plan).overrides,
                         quiet=True, dump_dir=tmp_path / "memory").lines()
    fp32 = run_test(model_, 2, quiet=True).lines()
    assert any(line.startswith("accuracy = ") for line in from_file)
    assert from_file == in_memory
    assert from_file != fp32   # the prob values show the INT8 simulation ran
    # not only the printed metric: every output of every batch is bit-identical (the plan's
    # scales are the float32 values the prototxt stores)
    dumped = sorted(p.name for p in (tmp_path / "file").iterdir())
    assert dumped == sorted(p.name for p in (tmp_path / "memory").iterdir())
    assert "prob_1.npy" in dumped
    for name in dumped:
        assert np.array_equal(np.load(tmp_path / "file" / name),
                              np.load(tmp_path / "memory" / name)), name


def test_two_runs_are_byte_identical(capsys, model, tmp_path):
    prototxt, caffemodel = model
    runs = []
    for run in ("one", "two"):
        folder = tmp_path / run
        folder.mkdir()
        quantize(capsys, prototxt, caffemodel, "-a", "MAXP", "--output",
                 folder / "q.prototxt", "--table", folder / "q.table", "--json",
                 folder / "q.json")
        runs.append(files_in(folder))
    assert sorted(runs[0]) == ["q.json", "q.prototxt", "q.table"]
    assert runs[0] == runs[1]


def test_output_name_with_dots_in_folder_and_file(capsys, tmp_path):
    folder = tmp_path / "a.b"
    prototxt, caffemodel = make_model(folder, name="net.v2.prototxt", images=4)
    before = set(files_in(tmp_path))
    out = quantize(capsys, prototxt, caffemodel, "-a", "DIRECT")
    added = set(files_in(tmp_path)) - before
    assert added == {"a.b/net.v2_quantized.prototxt"}
    assert str(folder / "net.v2_quantized.prototxt") in out
    assert read_net(folder / "net.v2_quantized.prototxt").layer[0].name == "data"


def test_table_format(capsys, model, tmp_path):
    prototxt, caffemodel = model
    out_path, table = tmp_path / "q.prototxt", tmp_path / "q.table"
    quantize(capsys, prototxt, caffemodel, "-a", "DIRECT", "--output", out_path,
             "--table", table, "-c", "multiple")
    lines = table.read_text().splitlines()
    assert table.read_text().endswith("\n") and len(lines) == 2 * len(QUANTIZED)
    params = {l.name: l.quantization_param for l in read_net(out_path).layer
              if l.HasField("quantization_param")}
    channels = {"conv2": 8, "conv3": 8, "conv4": 6}
    for line, name in zip(lines[:3], QUANTIZED):         # weight lines first, layer order
        key, *values = line.split(" ")
        assert key == f"{name}_param_0" and len(values) == channels[name]
        np.testing.assert_allclose([float(v) for v in values], params[name].scale_params,
                                   rtol=1e-6)
    for line, name in zip(lines[3:], QUANTIZED):         # then one blob line per layer
        key, value = line.split(" ")
        assert key == name
        # signed 127 / T of the layer input: = scale_in for s8, scale_in * 127/255 for u8
        q = params[name]
        expected = q.scale_in[0] * (1.0 if q.is_negative_input else 127 / 255)
        assert float(value) == pytest.approx(expected, rel=1e-6)


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["-wi"], "Winograd"),
    (["-fu"], "-1st"),
    (["-a", "ENTROPY"], "ENTROPY"),
])
def test_bad_options_exit_2_with_one_line(capsys, tmp_path, extra, message):
    prototxt, caffemodel = make_model(tmp_path / "m", images=4)
    before = files_in(tmp_path)
    code, out, err = run_main(capsys, ["-m", prototxt, "-w", caffemodel, "-q", *extra])
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("calibrator: error:")
    assert message in err
    assert files_in(tmp_path) == before


def test_missing_model_exits_2_with_one_line(capsys, tmp_path):
    _, caffemodel = make_model(tmp_path / "m", images=4)
    before = files_in(tmp_path)
    missing = tmp_path / "m" / "missing.prototxt"
    code, out, err = run_main(capsys, ["-m", missing, "-w", caffemodel, "-q"])
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("calibrator: error:")
    assert "missing.prototxt" in err
    assert files_in(tmp_path) == before
