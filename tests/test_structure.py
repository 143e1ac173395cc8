"""The seams: the wheel installs as users install it, the registries take an estimator, a
metric and a writer defined in a test file alone, the gate runs a plan as the backend it was
searched for, and mAP follows ap_version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from calibrator import pipeline
from calibrator.backends import recorded_backend
from calibrator.caffe.caffemodel import write_caffemodel
from calibrator.cli.main import main
from calibrator.config import RunConfig
from calibrator.metrics import BatchOutcome, Metric, register_metric
from calibrator.quant.estimators import (Estimator, parse_estimator, register_estimator,
                                         statistics_needed)
from calibrator.quant.estimators.base import BASIC
from calibrator.quant.scales import QuantOptions
from calibrator.search import SearchSettings
from calibrator.writers import Writer, register_writer
from tests.netutil import parse_net, random_weights, tinted_image_net
from tests.test_countermeasures import saturating  # noqa: F401  (fixture)
from tests.test_search import tiny  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]

DEPLOY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
  convolution_param { num_output: 6 kernel_size: 1 } }
"""


def _tiny_deploy(folder: Path) -> tuple[Path, Path, Path]:
    """A deploy net, its random weights and a folder of 8 images."""
    rng = np.random.default_rng(3)
    prototxt, _ = tinted_image_net(folder, rng, 8, 8, DEPLOY.replace("{", "{{")
                                   .replace("}", "}}"), "tiny")
    weights = folder / "tiny.caffemodel"
    write_caffemodel(weights, random_weights(parse_net(DEPLOY), seed=3), parse_net(DEPLOY))
    return prototxt, weights, folder / "img"


@pytest.mark.slow
def test_the_wheel_installs_and_calibrates_outside_the_repository(tmp_path):
    """``pip wheel .`` holds every package; installed without -e into a fresh virtual
    environment (dependencies borrowed from this one), `calibrator --help` and a tiny -q
    run from another folder use the installed copy."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(REPO)], check=True, capture_output=True)
    (wheel,) = wheels.glob("calibrator-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted({str(p.parent.relative_to(REPO)) for p in (REPO / "calibrator").rglob("*.py")
                       if "__pycache__" not in p.parts})
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, f"packages left out of the wheel: {missing}"
    assert "calibrator/graph/layers/conv.py" in names and "calibrator/caffe/caffe.proto" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig."
                                "get_paths()['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip())
    borrowed = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    (site / "zz_borrowed_dependencies.pth").write_text("\n".join(borrowed) + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    prototxt, weights, images = _tiny_deploy(work)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import calibrator.graph.layers.conv as m; "
                            "print(m.__file__)"], cwd=work, env=env, capture_output=True,
                           text=True)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    helped = subprocess.run([str(venv / "bin" / "calibrator"), "--help"], cwd=work, env=env,
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "calibrator" in helped.stdout, helped.stderr
    out = work / "out" / "q.prototxt"
    out.parent.mkdir()
    done = subprocess.run([str(venv / "bin" / "calibrator"), "-m", prototxt.name, "-w",
                           weights.name, "-q", "-s", "2", "--images", str(images),
                           "--batch-size", "4", "--output", str(out), "--quiet"],
                          cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "quantization_param" in out.read_text()


# -- the recipes of ARCHITECTURE.md, from this file alone ---------------------------------

class HalfRange(Estimator):
    """A toy estimator: half of max|x| (needs only the first pass)."""

    name = "TOYHALF"
    description = "half of max |x|"
    needs = frozenset({BASIC})

    def estimate(self, stats, bits):
        return stats.absmax / 2


class Percent(Metric):
    """A toy metric: the Accuracy blob in percent."""

    description = "accuracy in percent"

    def __init__(self, net, blob):
        self.blob = blob

    def read(self, outputs):
        return BatchOutcome(100.0 * float(outputs[self.blob].double().mean()), None)


class LayerList(Writer):
    """A toy writer: the INT8 layers, one per line."""

    name = "toylist"
    option = "--toy-list"
    help = "the INT8 layers, one per line"

    def write(self, path, context):
        Path(path).write_text("".join(f"{name}\n" for name in context.plan.layers))
        return Path(path)


@pytest.fixture(scope="module")
def registered():
    register_estimator(HalfRange())
    register_metric("toypercent")(Percent)
    register_writer(LayerList())


def test_toy_estimator_metric_and_writer_run_through_the_pipeline(registered, tiny, tmp_path):
    assert parse_estimator("toyhalf") == "TOYHALF"
    assert statistics_needed(["TOYHALF"]) == {BASIC}
    _, prototxt, caffemodel = tiny
    config = RunConfig(prototxt, caffemodel, quant=QuantOptions(estimator="TOYHALF"),
                       iterations=2, sampling_iterations=2, blob="accuracy",
                       metric="toypercent",
                       outputs={"prototxt": tmp_path / "q.prototxt",
                                "toylist": tmp_path / "layers.txt",
                                "json": tmp_path / "q.json"},
                       search=SearchSettings(tolerance=100.0), quiet=True)
    assert pipeline.run(config) == 0
    record = json.loads((tmp_path / "q.json").read_text())
    int8 = [layer for layer in record["layers"] if layer["precision"] == "int8"]
    assert int8 and all(layer["estimator"] == "TOYHALF" for layer in int8)
    for layer in int8:  # T = max|x| / 2, scale_in = qmax / T
        qmax = 255 if layer["input"] == "u8" else 127
        assert layer["input_threshold"] == pytest.approx(layer["input_stats"]["absmax"] / 2)
        assert layer["scale_in"] == pytest.approx(qmax / layer["input_threshold"], rel=1e-6)
    assert record["search"]["fp32"] == pytest.approx(100.0)  # the tiny net's accuracy is 1
    assert (tmp_path / "layers.txt").read_text().split() == [l["name"] for l in int8]


def test_toy_writer_gets_its_command_line_option(registered, tiny, tmp_path):
    _, prototxt, caffemodel = tiny
    code = main(["-m", str(prototxt), "-w", str(caffemodel), "-q", "-s", "1", "--quiet",
                 "--output", str(tmp_path / "q.prototxt"), "--toy-list",
                 str(tmp_path / "list.txt"), "-a", "toyhalf"])
    assert code == 0
    written = (tmp_path / "list.txt").read_text().split()
    quantized = (tmp_path / "q.prototxt").read_text()
    assert written == ["conv2", "conv3", "conv4"]
    assert quantized.count("quantization_param") == len(written)


# -- the gate runs a plan as the backend it was searched for ------------------------------

def test_gate_reproduces_the_avx2_search_exactly(saturating, tmp_path, capsys):
    _, prototxt, caffemodel = saturating
    out = tmp_path / "q.prototxt"
    code = main(["-m", str(prototxt), "-w", str(caffemodel), "-i", "4", "-s", "4",
                 "-l", "0.5", "--target", "avx2", "--saturation-fix", "off", "--quiet",
                 "--output", str(out), "--json", str(tmp_path / "q.json")])
    assert code == 0
    search = json.loads((tmp_path / "q.json").read_text())["search"]
    assert recorded_backend(out) == ("intel", "avx2")
    results = {}
    for extra in ([], ["--target", "vnni"]):
        gate_json = tmp_path / f"gate{len(extra)}.json"
        main(["gate", "-m", str(prototxt), "-w", str(caffemodel), str(out), "-i", "4",
              "-n", f"{search['metric']}=1", "--json", str(gate_json), "--quiet", *extra])
        (case,) = json.loads(gate_json.read_text())["results"]
        results[tuple(extra)] = case["int8"]
    assert results[()] == search["int8"]        # as recorded (avx2): the search's very value
    assert results[("--target", "vnni")] > search["int8"] + 0.05  # exact int32 saturates not
    capsys.readouterr()
