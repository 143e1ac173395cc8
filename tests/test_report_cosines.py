"""The report's per-unit cosines against numpy on every unit's recorded outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrator.backends import make_backend
from calibrator.quant.simulate import FoldedFP32
from calibrator.report import unit_cosines
from tests.quant_helpers import TinyNet, conv_text, input_text

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

