"""Statistics of the fused tensors, gathered for every tracked tensor at once.

At most two passes over the ``-s`` calibration batches, whatever the number of layers: the
first finds each tensor's exact min/max/|max| (the histogram range); the second, only when
an estimator needs it (``needs``), fills an int64 histogram of |x| in 2048 bins over
[0, absmax], exact zeros skipped. Only running aggregates stay in memory (on the model's
device), never the activations themselves."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from calibrator.quant.estimators import HISTOGRAM, TensorStats
from calibrator.quant.fusion import BlobRef, FusedGraph
from calibrator.quant.kl import NUM_BINS, abs_histogram


def tracked_refs(fused: FusedGraph) -> list[BlobRef]:
    """Every tensor a scale may be computed for: unit inputs, outputs and residuals."""
    refs: dict[str, BlobRef] = {}
    for unit in fused.units:
        for ref in (unit.input, unit.output, unit.residual):
            if ref is not None:
                refs.setdefault(ref.key, ref)
    return list(refs.values())


class _Collector:
    def __init__(self, refs: Iterable[BlobRef], device):
        self.by_producer: dict[int, list[BlobRef]] = {}
        for ref in refs:
            self.by_producer.setdefault(ref.producer, []).append(ref)
        self.stats = {ref.key: TensorStats() for refs in self.by_producer.values()
                      for ref in refs}
        self.hists = {}
        self.device = device
        self.second_pass = False

    def observe(self, ref: BlobRef, x: torch.Tensor) -> None:
        stats = self.stats[ref.key]
        x = x.detach()
        if not self.second_pass:
            lo, hi = (float(v) for v in torch.aminmax(x))
            absmax = max(abs(lo), abs(hi))
            stats.minimum = min(stats.minimum, lo)
            stats.maximum = max(stats.maximum, hi)
            stats.absmax = max(stats.absmax, absmax)
            stats.batch_absmax.append(absmax)
            stats.count += x.numel()
            stats.zeros += int((x == 0).sum())
            return
        if stats.absmax <= 0:
            return
        counts = abs_histogram(x, stats.absmax)
        if ref.key in self.hists:
            self.hists[ref.key] += counts
        else:
            self.hists[ref.key] = counts

    def feeds(self, feeds: dict) -> None:
        for ref in self.by_producer.get(-1, []):
            self.observe(ref, feeds[ref.name])

    def hook(self, node, tops):
        for ref in self.by_producer.get(node.index, ()):
            self.observe(ref, tops[node.tops.index(ref.name)])
        return None


def collect(net, fused: FusedGraph, make_batches: Callable[[], Iterable[dict]], *,
            refs=None, needs=frozenset({HISTOGRAM}), overrides=None) -> dict[str, TensorStats]:
    """TensorStats for each tracked blob version, keyed by ``BlobRef.key``.

    ``make_batches()`` yields the calibration feeds (blob name -> tensor on the net's
    device); it is called once per pass. ``needs``: the statistics to gather beyond the
    first pass's (see :mod:`calibrator.quant.estimators`). ``overrides``: how the net runs
    (e.g. :class:`~calibrator.quant.simulate.FoldedFP32`, each unit one convolution)."""
    refs = tracked_refs(fused) if refs is None else refs
    collector = _Collector(refs, net.device)
    last = max([r.producer for r in refs] + [0])
    passes = (False, True) if HISTOGRAM in needs else (False,)
    with torch.no_grad():
        for second in passes:
            collector.second_pass = second
            for feeds in make_batches():
                collector.feeds(feeds)
                net(feeds, hook=collector.hook, stop=last + 1, outputs=(), overrides=overrides)
    if HISTOGRAM not in needs:
        return collector.stats
    for key, stats in collector.stats.items():
        hist = collector.hists.get(key)
        stats.hist = (hist.cpu().numpy() if hist is not None
                      else torch.zeros(NUM_BINS, dtype=torch.int64).numpy())
    return collector.stats
