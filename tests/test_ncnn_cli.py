"""ncnn through the command line: --ncnn writes the INT8 model, --runtime ncnn simulates it
in the search, and `calibrator verify --runtime ncnn` runs it on ncnn's real kernels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibrator.cli.main import main
from tests.test_search import tiny  # noqa: F401  (fixture)

ncnn = pytest.importorskip("ncnn")


def test_runtime_ncnn_search_writes_the_model_that_verify_runs(tiny, tmp_path, capsys):
    _, prototxt, caffemodel = tiny
    out = tmp_path / "q.prototxt"
    code = main(["-m", str(prototxt), "-w", str(caffemodel), "-i", "2", "-s", "2",
                 "-l", "0.05", "--runtime", "ncnn", "-1st", "--quiet", "--output", str(out),
                 "--json", str(tmp_path / "q.json"), "--ncnn", str(tmp_path / "tiny_int8")])
    assert code in (0, 1)
    search = json.loads((tmp_path / "q.json").read_text())["search"]
    assert search["runtime"] == "ncnn"
    param = (tmp_path / "tiny_int8.param").read_text()
    assert (tmp_path / "tiny_int8.bin").stat().st_size > 0
    assert "int8_scale_term" in param or "8=" in param   # ncnn's INT8 layers
    # the written prototxt records the runtime, so verify's default comparison is ncnn's
    capsys.readouterr()
    code = main(["verify", "-m", str(out), "-w", str(caffemodel), "-i", "2", "--runtime",
                 "ncnn", "--layers", "4", "--quiet", "--json", str(tmp_path / "v.json")])
    assert code == 0
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["agreement"]["simulation"] == 1.0
    assert result["score_diff"]["simulation"] < 1e-4
    int8 = [layer for layer in result["layers"] if layer["kind"] == "int8"]
    assert int8 and all(layer["differing"] == 0 for layer in int8)
    printed = capsys.readouterr().out
    assert "top-1 agreement with ncnn" in printed
