"""ncnn through the command line: --ncnn writes the INT8 model, --runtime ncnn simulates it
in the search, and `calibrator verify --runtime ncnn` runs it on ncnn's real kernels."""

from __future__ import annotations

import json

import pytest

from calibrator.cli.main import main
from calibrator.model import load_model, quantized_plan
from calibrator.ncnn.quantize import bottom_scale
from tests.test_quant_outputs import make_model, run_main
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


def test_a_plan_read_from_the_prototxt_gives_ncnn_the_table_s_blob_scales(tmp_path, capsys):
    """``verify --runtime ncnn`` rebuilds the ncnn model from the written prototxt: the plan
    read back must carry the thresholds its scales stand for (T = qmax / scale_in), so the
    blob scales 127/T equal the ones ``--table`` wrote from the calibration (a read-back plan
    once had T = 0 and every blob scale 1.0: ncnn's top-1 fell to 0)."""
    prototxt, caffemodel = make_model(tmp_path)
    out, table = tmp_path / "q.prototxt", tmp_path / "q.table"
    code, _, err = run_main(capsys, ["-m", prototxt, "-w", caffemodel, "-q", "-1st", "-c",
                                     "multiple", "--quiet", "--output", out, "--table", table])
    assert code == 0, err
    written = {parts[0]: float(parts[1]) for parts in
               (line.split() for line in table.read_text().splitlines())
               if len(parts) == 2 and "_param_" not in parts[0]}
    fused, plan = quantized_plan(load_model(out, caffemodel).net)
    assert written and set(written) <= set(plan.layers)
    for name, scale in written.items():
        assert float(bottom_scale(plan.layers[name])) == pytest.approx(scale, rel=1e-6), name
        assert scale != 1.0
