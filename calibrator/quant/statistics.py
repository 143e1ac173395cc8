"""Statistics of the fused tensors, gathered for every tracked tensor at once, in one pass
over the ``-s`` calibration batches whatever the number of layers: each tensor's exact
min/max/|max|, zeros, per-batch max|x| and, when an estimator needs it (``needs``), a
histogram of |x| whose range grows as larger values arrive
(:class:`~calibrator.quant.histogram.GrowingHistogram`), re-binned at the end to 2048 bins
over [0, max|x|]. Only running aggregates stay in memory (on the model's device), never the
activations themselves."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from calibrator.errors import CalibratorError, LayerError, shorten
from calibrator.quant.estimators import HISTOGRAM, TensorStats
from calibrator.quant.fusion import BlobRef, FusedGraph
from calibrator.quant.histogram import GrowingHistogram


def tracked_refs(fused: FusedGraph) -> list[BlobRef]:
    """Every tensor a scale may be computed for: unit inputs, outputs and residuals."""
    refs: dict[str, BlobRef] = {}
    for unit in fused.units:
        for ref in (unit.input, unit.output, unit.residual):
            if ref is not None:
                refs.setdefault(ref.key, ref)
    return list(refs.values())


class _Collector:
    def __init__(self, refs: Iterable[BlobRef], histograms: bool):
        self.by_producer: dict[int, list[BlobRef]] = {}
        for ref in refs:
            self.by_producer.setdefault(ref.producer, []).append(ref)
        self.stats = {ref.key: TensorStats() for refs in self.by_producer.values()
                      for ref in refs}
        self.hists = ({key: GrowingHistogram() for key in self.stats} if histograms else {})

    def observe(self, ref: BlobRef, x: torch.Tensor, node=None) -> None:
        stats = self.stats[ref.key]
        x = x.detach()
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not math.isfinite(lo) or not math.isfinite(hi):
            what = (f"blob '{shorten(ref.name)}'" if node is None
                    else f"top '{shorten(ref.name)}'")
            raise (CalibratorError(f"the data {what} holds values that are not finite (NaN "
                                   "or Inf) on the calibration batches")
                   if node is None else
                   LayerError(node.name, node.type, f"its {what} is not finite (NaN or Inf) "
                              "on the calibration batches: the net overflows float32 "
                              "(weights or inputs too large?)"))
        absmax = max(abs(lo), abs(hi))
        stats.minimum = min(stats.minimum, lo)
        stats.maximum = max(stats.maximum, hi)
        stats.absmax = max(stats.absmax, absmax)
        stats.batch_absmax.append(absmax)
        stats.count += x.numel()
        stats.zeros += x.numel() - int(torch.count_nonzero(x))
        if ref.key in self.hists:
            self.hists[ref.key].add(x, absmax)

    def feeds(self, feeds: dict) -> None:
        for ref in self.by_producer.get(-1, []):
            self.observe(ref, feeds[ref.name])

    def hook(self, node, tops):
        for ref in self.by_producer.get(node.index, ()):
            self.observe(ref, tops[node.tops.index(ref.name)], node)
        return None

    def finish(self) -> dict[str, TensorStats]:
        for key, hist in self.hists.items():
            stats = self.stats[key]
            stats.hist = hist.rebin(stats.absmax)
        return self.stats


def collect(net, fused: FusedGraph, batches: Iterable[dict], *, refs=None,
            needs=frozenset({HISTOGRAM}), overrides=None, outputs=None,
            on_batch=None) -> dict[str, TensorStats]:
    """TensorStats for each tracked blob version, keyed by ``BlobRef.key``, from one pass
    over ``batches`` (the calibration feeds: blob name -> tensor on the net's device).
    ``needs``: the statistics beyond the basic ones (see :mod:`calibrator.quant.estimators`).
    ``overrides``: how the net runs (e.g. :class:`~calibrator.quant.simulate.FoldedFP32`,
    each unit one convolution). With ``outputs``, the whole net runs and
    ``on_batch(outputs)`` sees them (another measurement sharing the pass); otherwise the
    pass stops after the last tracked tensor."""
    refs = tracked_refs(fused) if refs is None else refs
    collector = _Collector(refs, HISTOGRAM in needs)
    stop = None if outputs is not None else max([r.producer for r in refs] + [0]) + 1
    with torch.no_grad():
        for feeds in batches:
            collector.feeds(feeds)
            result = net(feeds, hook=collector.hook, stop=stop,
                         outputs=() if outputs is None else outputs, overrides=overrides)
            if on_batch is not None:
                on_batch(result)
    return collector.finish()
