"""The cosine of every unit's INT8 output with its FP32 output, over a few images: the whole
configuration simulated (errors accumulate along the net), for the report."""

from __future__ import annotations

import torch

from calibrator.quant.simulate import FoldedFP32


def unit_cosines(net, fused, overrides: dict, feeds: dict) -> dict[str, float]:
    """unit name -> cosine of its output in the run with ``overrides`` (a simulator's) with
    the FP32 run, both on ``feeds``, in float64. The FP32 run keeps each unit's output as it
    computed it (float32); the second run compares each output as it is computed and drops
    the FP32 one: one run's outputs in memory at most, not both runs' in float64."""
    last = {unit.last.index: unit.name for unit in fused.units}
    fp32: dict[str, torch.Tensor] = {}
    sums: dict[str, tuple] = {}

    def keep(node, tops):
        if node.index in last:   # held here, the forward no longer overwrites it in place
            fp32[last[node.index]] = tops[0].detach()
        return None

    def compare(node, tops):
        a = fp32.pop(last.get(node.index), None)
        if a is not None:
            a, b = a.double().reshape(-1), tops[0].detach().double().reshape(-1)
            sums[last[node.index]] = ((a * b).sum(), (a * a).sum(), (b * b).sum())
        return None

    with torch.no_grad():
        net(feeds, overrides=FoldedFP32(fused).overrides, hook=keep, outputs=())
        net(feeds, overrides=overrides, hook=compare, outputs=())
    out = {}
    for unit in fused.units:
        if unit.name not in sums:
            continue
        ab, aa, bb = sums[unit.name]
        denominator = float(torch.sqrt(aa * bb))
        out[unit.name] = float(ab) / denominator if denominator > 0 else 1.0
    return out
