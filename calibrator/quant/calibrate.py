"""One calibration: fused view -> statistics -> scales (the plan)."""

from __future__ import annotations

from dataclasses import dataclass

from calibrator.data.feed import batches
from calibrator.quant.estimators import HISTOGRAM, statistics_needed
from calibrator.quant.fusion import FusedGraph, analyze
from calibrator.quant.scales import QuantOptions, QuantPlan, UnitChoice, build_plan
from calibrator.quant.simulate import FoldedFP32
from calibrator.quant.statistics import collect


@dataclass
class Calibration:
    fused: FusedGraph
    stats: dict
    options: QuantOptions

    def plan(self, choices: dict[str, UnitChoice] | None = None) -> QuantPlan:
        return build_plan(self.fused, self.stats, self.options, choices)


def calibrate(model, options: QuantOptions, sampling_iterations: int, *,
              quiet: bool = False, estimators=None) -> Calibration:
    """Statistics of ``model``'s fused tensors over ``sampling_iterations`` batches, for
    ``options.estimator`` and any other ``estimators`` a later step will use (default:
    every statistic, so that any estimator can be tried)."""
    fused = analyze(model.net, quantize_fc=options.quantize_fc)
    needs = (frozenset({HISTOGRAM}) if estimators is None
             else statistics_needed([options.estimator, *estimators]))
    passes = iter(("statistics 1/2", "statistics 2/2") if HISTOGRAM in needs
                  else ("statistics",))

    def make_batches():
        desc = next(passes, "statistics")
        return (feeds for _, feeds in batches(model, sampling_iterations, desc=desc,
                                              quiet=quiet))

    stats = collect(model.net, fused, make_batches, needs=needs,
                    overrides=FoldedFP32(fused).overrides)
    return Calibration(fused, stats, options)
