"""One calibration: fused view -> statistics -> scales (the plan)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from calibrator import distributed
from calibrator.data.feed import batches
from calibrator.graph.layers.detection_evaluate import seek_state
from calibrator.metrics import BatchOutcome, Metric, measure
from calibrator.quant.estimators import HISTOGRAM, statistics_needed
from calibrator.quant.fusion import FusedGraph, analyze
from calibrator.quant.scales import (QuantOptions, QuantPlan, UnitChoice, build_plan,
                                     histogram_keys, kept_fp32)
from calibrator.quant.simulate import FoldedFP32
from calibrator.quant.statistics import collect, collect_sharded


@dataclass
class Calibration:
    fused: FusedGraph
    stats: dict
    options: QuantOptions
    #: the FP32 outcomes of a metric measured in the same pass (see ``calibrate``)
    fp32: list[BatchOutcome] | None = field(default=None, repr=False)
    fp32_seconds: float = 0.0

    def plan(self, choices: dict[str, UnitChoice] | None = None) -> QuantPlan:
        return build_plan(self.fused, self.stats, self.options, choices)


def calibrate(model, options: QuantOptions, sampling_iterations: int, *,
              quiet: bool = False, estimators=None, metric: Metric | None = None,
              iterations: int = 0, single: bool = False) -> Calibration:
    """Statistics of ``model``'s fused tensors over ``sampling_iterations`` batches, for
    ``options.estimator`` and any other ``estimators`` a later step will use (default:
    every statistic, so that any estimator can be tried).

    With a ``metric``, the statistics pass also measures it on the FP32 net over its
    batches, and the first ``iterations`` batches of that measurement (continued past the
    statistics batches if needed) are kept in ``calibration.fp32``: the search's FP32
    evaluation reads the same batches, so it costs no pass of its own.

    ``single`` (``-ss``): the statistics come from the last of the ``sampling_iterations``
    batches only, as Intel's ``sampling.py`` keeps only its last pass (no shared pass then)."""
    fused = analyze(model.net, quantize_fc=options.quantize_fc)
    kept_fp32(fused)  # weights that cannot be quantized fail here, before the passes
    needs = (frozenset({HISTOGRAM}) if estimators is None
             else statistics_needed([options.estimator, *estimators]))
    overrides = FoldedFP32(fused).overrides
    # the statistics to gather: histograms only of the tensors some plan may read
    gather = {"needs": needs, "hist_keys": histogram_keys(fused, options)}
    if distributed.world() > 1 and not single:  # -ss reads one batch: every rank alike
        return _calibrate_sharded(model, fused, options, sampling_iterations, gather, overrides,
                                  quiet, metric, iterations)
    if metric is None or single:
        first = sampling_iterations - 1 if single else 0
        feeds = (feeds for _, feeds in batches(model, sampling_iterations, desc="statistics",
                                               quiet=quiet, first=first))
        return Calibration(fused, collect(model.net, fused, feeds, **gather,
                                          overrides=overrides), options)
    started = time.time()
    shared = min(sampling_iterations, iterations)
    metric.start(model.net)
    outcomes = []

    def read(outputs):
        if len(outcomes) < shared:
            metric.remember(outputs)
            outcomes.append(metric.read(outputs))

    feeds = (feeds for _, feeds in batches(model, sampling_iterations,
                                           desc="statistics + FP32", quiet=quiet))
    stats = collect(model.net, fused, feeds, **gather, overrides=overrides,
                    outputs=metric.outputs(), on_batch=read)
    if iterations > shared:  # the FP32 evaluation reads more batches than the statistics
        rest = measure(model, [metric], iterations, overrides=overrides, reference=True,
                       desc="FP32", quiet=quiet, first=shared, start=False)[0]
        outcomes.extend(rest)
    return Calibration(fused, stats, options, outcomes, time.time() - started)


def _calibrate_sharded(model, fused, options, sampling_iterations, gather, overrides, quiet,
                       metric, iterations) -> Calibration:
    """:func:`calibrate` under torchrun: each rank reads its own batches
    (:func:`~calibrator.quant.statistics.collect_sharded`); the FP32 outcomes measured on
    the way are gathered back in batch order. The same Calibration as one process's."""
    started = time.time()
    shared = min(sampling_iterations, iterations) if metric is not None else 0
    outcomes = {}
    if metric is not None:
        metric.start(model.net)

    def read(index, outputs):
        if index < shared:
            metric.remember(outputs)
            outcomes[index] = metric.read(outputs)

    def make_batches(desc):
        return batches(model, sampling_iterations, desc=desc, quiet=quiet, shard=True)

    stats = collect_sharded(
        model.net, fused, make_batches, **gather, overrides=overrides,
        outputs=metric.outputs() if metric is not None else None,
        on_batch=read if metric is not None else None,
        before_batch=lambda index: seek_state(model.net, index * model.batch_size))
    if metric is None:
        return Calibration(fused, stats, options)
    fp32 = distributed.gather_batches(lambda: outcomes)
    if iterations > shared:  # the FP32 evaluation reads more batches than the statistics
        fp32 += measure(model, [metric], iterations, overrides=overrides, reference=True,
                        desc="FP32", quiet=quiet, first=shared, start=False)[0]
    return Calibration(fused, stats, options, fp32, time.time() - started)
