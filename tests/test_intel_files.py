"""Every file Intel's tools write is read: the thirteen INT8 prototxts of shared
models/intel_int8 (written by Intel's calibrator) parse, and `calibrator test` runs each as
INT8 on random weights from our writer, fed from an image folder (--images replaces their
Data/AnnotatedData/DummyData layers); YOLOv2's Reorg stops with the usual one-line error.
And the other direction: a net Intel Caffe cannot run is said so in one line."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from calibrator.caffe.caffemodel import write_caffemodel
from calibrator.caffe.netstate import filter_net
from calibrator.caffe.prototxt import read_net
from calibrator.caffe.types import not_in_intel_caffe
from calibrator.cli.main import main
from calibrator.data.options import ImageFolderOptions
from calibrator.model import load_model, quantized_plan
from tests.netutil import parse_net, random_weights

INTEL_FILES = ["mobilenet_v1_int8_acc", "mobilenet_v1_int8_full_conv_acc",
               "mobilenet_v1_int8_full_conv_perf", "mobilenet_v1_int8_perf",
               "mobilenet_v2_int8_acc", "mobilenet_v2_int8_full_conv_acc",
               "mobilenet_v2_int8_full_conv_perf", "mobilenet_v2_int8_perf",
               "ssd_mobilenet_int8", "ssd_mobilenet_int8_acc",
               "yolov2_int8", "yolov2_int8_acc", "yolov2_int8_full_conv"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (64, 80, 3), np.uint8))
    return folder


def test_the_thirteen_files_are_all_there(shared):
    found = sorted(p.stem for p in (shared / "models/intel_int8").glob("*.prototxt"))
    assert found == sorted(INTEL_FILES)


@pytest.mark.slow
@pytest.mark.parametrize("name", INTEL_FILES)
def test_intel_written_prototxt_parses_and_runs_as_int8(shared, tmp_path, image_folder, name,
                                                        capsys):
    path = shared / "models/intel_int8" / f"{name}.prototxt"
    net = read_net(path)
    test = filter_net(net)
    quantized = [l.name for l in test.layer if l.HasField("quantization_param")]
    assert len(quantized) > 10
    size = 300 if name.startswith("ssd") else 224 if "yolo" not in name else 416
    argv = ["test", "-m", path, "--images", image_folder, "--size", size, size,
            "--batch-size", 1, "-i", 1, "--quiet"]
    shapes = {}
    for layer in test.layer:
        if layer.type in ("Data", "AnnotatedData"):
            shapes[layer.top[0]] = (1, 3, size, size)
            for top in layer.top[1:]:
                shapes[top] = (1,) if layer.type == "Data" else (1, 1, 1, 8)
    if "yolo" in name:  # Intel's Reorg/Region layers: not run here, said so in one line
        empty = type(test)()
        empty.layer.add(name="nothing")
        (tmp_path / "w.caffemodel").write_bytes(empty.SerializeToString())
        code = main([str(a) for a in argv + ["-w", tmp_path / "w.caffemodel"]])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1
        assert "'extra_layer-reorg' (Reorg)" in err[0] and "unknown layer type" in err[0]
        return
    weights = write_caffemodel(tmp_path / "w.caffemodel", random_weights(test, shapes), test)
    assert main([str(a) for a in argv + ["-w", weights]]) == 0, capsys.readouterr().err
    model = load_model(path, weights, images=ImageFolderOptions(str(image_folder),
                                                                size=(size, size),
                                                                batch_size=1))
    fused, plan = quantized_plan(model.net)
    assert sorted(plan.layers) == sorted(quantized)   # every INT8 layer Intel wrote


def test_what_intel_caffe_lacks(shared):
    missing = not_in_intel_caffe(read_net(shared / "models/mobilenet_v2/test.prototxt"))
    assert list(missing) == ["ReLU6"] and len(missing["ReLU6"]) == 35
    for name in INTEL_FILES:
        assert not not_in_intel_caffe(read_net(shared / f"models/intel_int8/{name}.prototxt"))


def test_calibrating_a_net_intel_cannot_run_says_so(tmp_path, capsys):
    text = ('layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }\n'
            'layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" '
            'convolution_param { num_output: 4 kernel_size: 3 } }\n'
            'layer { name: "r1" type: "ReLU6" bottom: "c1" top: "c1" }\n'
            'layer { name: "dw" type: "ConvolutionDepthwise" bottom: "c1" top: "dw" '
            'convolution_param { num_output: 4 group: 4 kernel_size: 3 } }\n'
            'layer { name: "r2" type: "ReLU6" bottom: "dw" top: "dw" }\n'
            'layer { name: "c2" type: "Convolution" bottom: "dw" top: "c2" '
            'convolution_param { num_output: 2 kernel_size: 1 } }\n')
    (tmp_path / "net.prototxt").write_text(text)
    weights = write_caffemodel(tmp_path / "w.caffemodel", random_weights(parse_net(text)))
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    code = main(["-m", str(tmp_path / "net.prototxt"), "-w", str(weights), "-q", "--quiet",
                 "--images", str(tmp_path), "-s", "1"])
    err = [l for l in capsys.readouterr().err.splitlines() if "Intel Caffe 1.1.6" in l]
    assert code == 0 and len(err) == 1
    assert "ReLU6 (r1, r2)" in err[0] and "ConvolutionDepthwise (dw)" in err[0]
    assert "--table" in err[0] and "--export-onnx" in err[0]
    assert Path(tmp_path / "net_quantized.prototxt").exists()
