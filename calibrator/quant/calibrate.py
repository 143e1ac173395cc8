"""One calibration: fused view -> statistics -> scales (the plan) -> simulator."""

from __future__ import annotations

from dataclasses import dataclass

from calibrator.quant.fusion import FusedGraph, analyze
from calibrator.quant.scales import QuantOptions, QuantPlan, UnitChoice, build_plan
from calibrator.quant.simulate import Int8Simulator
from calibrator.quant.statistics import collect


@dataclass
class Calibration:
    fused: FusedGraph
    stats: dict
    options: QuantOptions

    def plan(self, choices: dict[str, UnitChoice] | None = None) -> QuantPlan:
        return build_plan(self.fused, self.stats, self.options, choices)

    def simulator(self, plan: QuantPlan) -> Int8Simulator:
        return Int8Simulator(self.fused, plan)


def calibrate(model, options: QuantOptions, sampling_iterations: int, *,
              quiet: bool = False) -> Calibration:
    fused = analyze(model.net, quantize_fc=options.quantize_fc)
    stats = collect(model, fused, sampling_iterations, quiet=quiet)
    return Calibration(fused, stats, options)
