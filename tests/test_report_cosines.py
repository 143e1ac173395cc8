"""The report: its per-unit cosines against numpy on every unit's recorded outputs, and the
report a quantize-only run writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calibrator.backends import make_backend
from calibrator.cli.main import main
from calibrator.quant.simulate import FoldedFP32
from calibrator.report import unit_cosines
from tests.quant_helpers import TinyNet, conv_text, input_text
from tests.test_cli_test_cmd import make_tiny_net

# a ReLU6 in place on each conv's output: the FP32 output a cosine compares is the unit's,
# before the ReLU6 overwrites the blob of the same name
TEXT = (input_text((2, 3, 6, 6))
        + conv_text("c1", "data", "c1", 8, kernel=3, extra="pad: 1")
        + 'layer { name: "r1" type: "ReLU6" bottom: "c1" top: "c1" }\n'
        + conv_text("c2", "c1", "c2", 6, kernel=1)
        + 'layer { name: "r2" type: "ReLU6" bottom: "c2" top: "c2" }\n'
        + conv_text("c3", "c2", "c3", 4, kernel=3))


def _unit_outputs(tiny, overrides, feeds) -> dict[str, np.ndarray]:
    last = {unit.last.index: unit.name for unit in tiny.fused.units}
    seen = {}

    def hook(node, tops):
        if node.index in last:
            seen[last[node.index]] = tops[0].detach().numpy().astype(np.float64).copy()

    with torch.no_grad():
        tiny.net(feeds, overrides=overrides, hook=hook)
    return seen


def test_each_units_cosine_is_numpys_on_its_own_outputs():
    tiny = TinyNet(TEXT, seed=3)
    plan = tiny.calibrate()
    overrides = make_backend().simulator(tiny.fused, plan).overrides
    feeds = tiny.batches[0]
    got = unit_cosines(tiny.net, tiny.fused, overrides, feeds)
    fp32 = _unit_outputs(tiny, FoldedFP32(tiny.fused).overrides, feeds)
    int8 = _unit_outputs(tiny, overrides, feeds)
    assert set(got) == set(fp32) == {"c1", "c2", "c3"}
    for name, a in fp32.items():
        assert (a < 0).any()          # the unit's output, not the ReLU6's after it
        b = int8[name]
        want = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
        assert got[name] == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert min(got.values()) < 1.0    # INT8 differs from FP32 somewhere



def test_a_quantize_only_run_writes_its_report(tmp_path, capsys):
    net = make_tiny_net(tmp_path / "net", count=5, batch=2)
    out = tmp_path / "out"
    argv = ["-m", net.prototxt, "-w", net.weights_path, "-q", "-1st", "-fc", "-s", "1",
            "--output", out / "q.prototxt", "--report", out / "report"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert f"report written: {out / 'report' / 'report.md'}" in capsys.readouterr().out
    text = (out / "report" / "report.md").read_text()
    assert "## Layers" in text and "## Search trace" not in text   # -q runs no search
    record = json.loads((out / "report" / "report.json").read_text())
    assert record["trace"] == [] and record["summary"]["int8_layers"] == 2
    assert set(record["cosine"]) == {"conv", "ip"}
    assert all(0.0 < c <= 1.0 for c in record["cosine"].values())
    assert (out / "report" / "cosine.png").stat().st_size > 0
