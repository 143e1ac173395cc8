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
    from calibrator.evaluation import batches

    fused = analyze(model.net, quantize_fc=options.quantize_fc)
    passes = iter(("statistics 1/2", "statistics 2/2"))

    def make_batches():
        desc = next(passes, "statistics")
        return (feeds for _, feeds in batches(model, sampling_iterations, desc=desc,
                                              quiet=quiet))

    stats = collect(model.net, fused, make_batches)
    return Calibration(fused, stats, options)
