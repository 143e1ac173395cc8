"""The cosine of every unit's INT8 output with its FP32 output, over a few images: the whole
configuration simulated (errors accumulate along the net), for the report."""

from __future__ import annotations

import torch

from calibrator.quant.simulate import FoldedFP32


def unit_cosines(net, fused, overrides: dict, feeds: dict) -> dict[str, float]:
    """unit name -> cosine of its output in the run with ``overrides`` (a simulator's) with
    the FP32 run, both on ``feeds``."""
    last = {unit.last.index: unit.name for unit in fused.units}

    def capture(into):
        def hook(node, tops):
            if node.index in last:
                into[last[node.index]] = tops[0].detach().double().reshape(-1)
            return None
        return hook

    runs = []
    for run_overrides in (FoldedFP32(fused).overrides, overrides):
        captured: dict = {}
        with torch.no_grad():
            net(feeds, overrides=run_overrides, hook=capture(captured), outputs=())
        runs.append(captured)
    fp32, int8 = runs
    out = {}
    for unit in fused.units:
        a, b = fp32.get(unit.name), int8.get(unit.name)
        if a is None or b is None:
            continue
        denominator = float(torch.sqrt((a * a).sum() * (b * b).sum()))
        out[unit.name] = float((a * b).sum()) / denominator if denominator > 0 else 1.0
    return out
