"""Statistics of the fused tensors, gathered for every tracked tensor at once, in one pass
over the ``-s`` calibration batches whatever the number of layers: each tensor's exact
min/max/|max|, zeros, per-batch max|x| and, when an estimator needs it (``needs``) and a
plan may read it (``hist_keys``: :func:`~calibrator.quant.scales.histogram_keys`), a
histogram of |x| whose range grows as larger values arrive
(:class:`~calibrator.quant.histogram.GrowingHistogram`), re-binned at the end to 2048 bins
over [0, max|x|]. Only running aggregates stay in memory (on the model's device), never the
activations themselves. Where the C kernels run (:mod:`calibrator.quant.native`), each
tensor is read once a batch: a histogrammed one's figures are taken while its values are
counted at the histogram's current range
(:meth:`~calibrator.quant.histogram.GrowingHistogram.add_with_figures`; where a batch
passes the range, its counts at the grown range come from the same read; read twice on the
first batch, which sets the range: figures, then counts), the others' in one read of min,
max and zeros, taken while the in-place ReLU6 that alone reads such a tensor clamps it
(:meth:`_Collector.clamp_overrides`: MobileNetV2's 35 expand outputs a batch), and where
that ReLU6's output is histogrammed, counted on the same read
(:meth:`~calibrator.quant.histogram.GrowingHistogram.add_clamped`; on the first batch the
clamp's read gives the figures of both, and a second one counts). MobileNetV2's 520
histogrammed tensor-batches take 538 reads (the tensor code: 1040); the same statistics
and values as the tensor code's.

Under torchrun each rank reads its own share of the batches (:func:`collect_sharded`, see
:mod:`calibrator.distributed`) and the statistics come out exactly as one process computes
them: a first pass keeps each batch's min/max/|max|/counts, gathered to every rank and
folded in batch order (the per-batch |max| list included); from the |max| sequence every
rank knows the range one process's growing histogram has when it counts each batch, so a
second pass counts each batch at that range, merges it up to the final range (pairs of bins
summed, as the growing histogram does) and the int64 counts are summed across the ranks."""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable

import torch

from calibrator import distributed
from calibrator.errors import CalibratorError, LayerError, shorten
from calibrator.graph.net import in_memory_order
from calibrator.quant import native
from calibrator.quant.estimators import HISTOGRAM, TensorStats
from calibrator.quant.fusion import BlobRef, FusedGraph
from calibrator.quant.histogram import FINE_BINS, GrowingHistogram
from calibrator.quant.kl import abs_histogram


def tracked_refs(fused: FusedGraph) -> list[BlobRef]:
    """Every tensor a scale may be computed for: unit inputs, outputs and residuals."""
    refs: dict[str, BlobRef] = {}
    for unit in fused.units:
        for ref in (unit.input, unit.output, unit.residual):
            if ref is not None:
                refs.setdefault(ref.key, ref)
    return list(refs.values())


def batch_figures(x: torch.Tensor, zeros: bool = True) -> tuple[float, float, float, int, int]:
    """One batch's figures for a tensor: (min, max, max|x|, elements, zeros); without
    ``zeros`` the zeros are left at 0 for the caller to count (a histogram of the batch
    counts them on the way: see :func:`~calibrator.quant.kl.abs_histogram`)."""
    flat = in_memory_order(x)   # (reductions of a channels-last blob would copy it first)
    count = x.numel()
    figures = native.figures(flat)      # one read, where the kernel is built
    if figures is not None:
        lo, hi, absmax, zero_count = figures
        return lo, hi, absmax, count, zero_count if zeros else 0
    lo, hi = (float(v) for v in torch.aminmax(flat))
    if not zeros:
        return lo, hi, max(abs(lo), abs(hi)), count, 0
    return lo, hi, max(abs(lo), abs(hi)), count, count - int(torch.count_nonzero(flat))


def checked_figures(ref: BlobRef, x: torch.Tensor, node=None, zeros: bool = True) -> tuple:
    """:func:`batch_figures`, refusing a tensor that is not finite: one line naming the
    data blob, or the layer (``node``) whose top it is."""
    figures = batch_figures(x, zeros)
    if math.isfinite(figures[0]) and math.isfinite(figures[1]):
        return figures
    _refuse(ref, node)


def _refuse(ref: BlobRef, node=None):
    """The error for a tracked tensor that is not finite (see :func:`checked_figures`)."""
    if node is None:
        raise CalibratorError(f"the data blob '{shorten(ref.name)}' holds values that are "
                              "not finite (NaN or Inf) on the calibration batches")
    raise LayerError(node.name, node.type, f"its top '{shorten(ref.name)}' is not finite "
                     "(NaN or Inf) on the calibration batches: the net overflows float32 "
                     "(weights or inputs too large?)")


def fold(stats: TensorStats, figures: tuple) -> None:
    """Add one batch's :func:`batch_figures` to ``stats`` (batches in order)."""
    lo, hi, absmax, count, zeros = figures
    stats.minimum = min(stats.minimum, lo)
    stats.maximum = max(stats.maximum, hi)
    stats.absmax = max(stats.absmax, absmax)
    stats.batch_absmax.append(absmax)
    stats.count += count
    stats.zeros += zeros


def _histogrammed(refs: list[BlobRef], needs, hist_keys) -> set[str]:
    """The keys of ``refs`` to histogram: none unless ``needs`` asks for a histogram; all,
    or those of ``hist_keys`` (see :func:`~calibrator.quant.scales.histogram_keys`)."""
    if HISTOGRAM not in needs:
        return set()
    return {ref.key for ref in refs if hist_keys is None or ref.key in hist_keys}


class _Collector:
    def __init__(self, refs: Iterable[BlobRef], histograms: set[str]):
        self.by_producer: dict[int, list[BlobRef]] = {}
        for ref in refs:
            self.by_producer.setdefault(ref.producer, []).append(ref)
        self.stats = {ref.key: TensorStats() for refs in self.by_producer.values()
                      for ref in refs}
        self.hists = {key: GrowingHistogram() for key in self.stats if key in histograms}
        self.clamping: set[int] = set()   # the ReLU6 nodes that take figures (see below)
        self.counted: str | None = None   # a top's key _clamp has observed already

    def observe(self, ref: BlobRef, x: torch.Tensor, node=None) -> None:
        x = x.detach()
        hist = self.hists.get(ref.key)
        counted = hist.add_with_figures(x) if hist is not None else None
        if counted is not None:   # figures and counts in one read
            lo, hi, absmax, zeros = counted
            row = (lo, hi, absmax, x.numel(), zeros)
        else:
            row = checked_figures(ref, x, node, zeros=hist is None)
            if hist is not None:  # the histogram counts the nonzero values
                nonzero = hist.add(x, row[2], nonnegative=row[0] >= 0)
                row = row[:4] + (row[3] - nonzero,)
        fold(self.stats[ref.key], row)

    def clamp_overrides(self, net, overrides: dict | None) -> dict | None:
        """``overrides`` with one more for each in-place clamp (a layer with
        ``clamp_bounds``: ReLU6) that is the only reader of a tracked tensor without a
        histogram (MobileNetV2's expand outputs): the tensor's figures are read while the
        ReLU6 clamps it (:func:`~calibrator.quant.native.
        clamp_with_figures`: one pass where the hook and the layer made two); the same
        statistics and the same values."""
        if not native.available():
            return overrides
        merged = dict(overrides or {})
        for producer, refs in list(self.by_producer.items()):
            for ref in list(refs):
                readers = net.consumers(ref.name, after=producer) if producer >= 0 else []
                if ref.key in self.hists or not readers:
                    continue
                node = readers[0]
                bounds = getattr(node.module, "clamp_bounds", None)
                if (bounds is None or node.index in merged
                        or list(node.bottoms) != [ref.name] or list(node.tops) != [ref.name]
                        or any(ref.name in between.tops  # (it would read another version)
                               for between in net.nodes[producer + 1:node.index])):
                    continue
                refs.remove(ref)
                self.clamping.add(node.index)
                merged[node.index] = functools.partial(self._clamp, ref=ref, bounds=bounds,
                                                       producer=net.nodes[producer])
        return merged

    def _clamp(self, node, blobs, *, ref: BlobRef, bounds: tuple[float, float], producer):
        name = node.bottoms[0]
        x = blobs[name]
        owned = blobs.owned == name
        flat = in_memory_order(x) if owned else None
        if flat is not None and flat.data_ptr() == x.data_ptr():   # (a view: x is dense)
            if self._count_clamped(node, flat, ref, bounds, producer):
                return (x,)
            got = native.clamp_with_figures(flat, *bounds)   # (None: not a CPU float32 blob)
            if got is not None:
                extremes, zeros = got
                if extremes is None:
                    _refuse(ref, producer)
                fold(self.stats[ref.key], (*extremes, x.numel(), zeros))
                return (x,)
        self.observe(ref, x, producer)
        return (node.module.apply_(x) if owned else node.module.apply(x),)

    def _count_clamped(self, node, flat: torch.Tensor, ref: BlobRef, bounds, producer) -> bool:
        """Where the clamp's own top is histogrammed: ``flat`` clamped and counted in one
        read (two on the first batch: :meth:`~calibrator.quant.histogram.GrowingHistogram.
        add_clamped`), the figures of ``ref`` (before) and of the top (after) folded, the
        hook told the top is observed. False where that cannot run (without the kernel:
        ``flat`` untouched)."""
        top = next((r for r in self.by_producer.get(node.index, ())
                    if r.name == node.tops[0] and r.key in self.hists), None)
        got = self.hists[top.key].add_clamped(flat, *bounds) if top is not None else None
        if got is None:
            return False
        before, after = got
        if before is None:
            _refuse(ref, producer)
        fold(self.stats[ref.key], (*before[:3], flat.numel(), before[3]))
        fold(self.stats[top.key], (*after[:3], flat.numel(), after[3]))
        self.counted = top.key
        return True

    def feeds(self, feeds: dict) -> None:
        for ref in self.by_producer.get(-1, []):
            self.observe(ref, feeds[ref.name])

    def hook(self, node, tops):
        counted, self.counted = self.counted, None
        for ref in self.by_producer.get(node.index, ()):
            if ref.key != counted:
                self.observe(ref, tops[node.tops.index(ref.name)], node)

    def finish(self) -> dict[str, TensorStats]:
        for key, hist in self.hists.items():
            stats = self.stats[key]
            stats.hist = hist.rebin(stats.absmax)
        return self.stats


def collect(net, fused: FusedGraph, batches: Iterable[dict], *, refs=None,
            needs=frozenset({HISTOGRAM}), hist_keys=None, overrides=None, outputs=None,
            on_batch=None) -> dict[str, TensorStats]:
    """TensorStats for each tracked blob version, keyed by ``BlobRef.key``, from one pass
    over ``batches`` (the calibration feeds: blob name -> tensor on the net's device).
    ``needs``: the statistics beyond the basic ones (see :mod:`calibrator.quant.estimators`);
    ``hist_keys``: the only tensors to histogram (None: all).
    ``overrides``: how the net runs (e.g. :class:`~calibrator.quant.simulate.FoldedFP32`,
    each unit one convolution). With ``outputs``, the whole net runs and
    ``on_batch(outputs)`` sees them (another measurement sharing the pass); otherwise the
    pass stops after the last tracked tensor."""
    refs = tracked_refs(fused) if refs is None else refs
    collector = _Collector(refs, _histogrammed(refs, needs, hist_keys))
    stop = None if outputs is not None else max([r.producer for r in refs] + [0]) + 1
    overrides = collector.clamp_overrides(net, overrides)
    if stop is not None:   # (a ReLU6 that reads a tracked tensor for the statistics runs)
        stop = max([stop, *(index + 1 for index in collector.clamping)])
    with torch.no_grad():
        for feeds in batches:
            collector.feeds(feeds)
            result = net(feeds, hook=collector.hook, stop=stop,
                         outputs=() if outputs is None else outputs, overrides=overrides)
            if on_batch is not None:
                on_batch(result)
    return collector.finish()


# -- several ranks -----------------------------------------------------------------------------

def _ranges(batch_absmax: list[float]) -> tuple[list[tuple[float, int] | None], float, int]:
    """The range a :class:`GrowingHistogram` fed these per-batch |max| values in order has
    when it counts each batch, with the number of doublings so far (None: the batch is not
    counted), and its final range and doublings."""
    schedule, current, doublings = [], 0.0, 0
    started = False
    for absmax in batch_absmax:
        if absmax <= 0:
            schedule.append(None)
            continue
        if not started:
            current, started = float(absmax), True
        while absmax > current:
            current *= 2.0
            doublings += 1
        schedule.append((current, doublings))
    return schedule, current, doublings


def _merge(counts: torch.Tensor, times: int) -> torch.Tensor:
    """``counts`` over a range doubled ``times`` times (pairs of bins summed, exactly)."""
    for _ in range(times):
        merged = counts.reshape(-1, 2).sum(1)
        counts = torch.cat([merged, torch.zeros_like(merged)])
    return counts


def collect_sharded(net, fused: FusedGraph, make_batches: Callable[[str], Iterable], *,
                    refs=None, needs=frozenset({HISTOGRAM}), hist_keys=None, overrides=None,
                    outputs=None, on_batch=None, before_batch=None) -> dict[str, TensorStats]:
    """:func:`collect` over the batches of every rank, each rank reading its own:
    ``make_batches(desc)`` yields this rank's ``(batch index, feeds)`` and is called once
    per pass (twice when a histogram is needed). The result is the same on every rank and
    the same as one process's. ``on_batch(index, outputs)`` sees the first pass's outputs
    (with ``outputs``); ``before_batch(index)`` is called before each forward pass."""
    refs = tracked_refs(fused) if refs is None else refs
    collector = _Collector(refs, set())
    histogrammed = _histogrammed(refs, needs, hist_keys)
    stop = max([r.producer for r in refs] + [0]) + 1
    seen: dict[int, dict[str, tuple]] = {}
    state = {"index": 0, "histograms": None}

    def observe(ref: BlobRef, x: torch.Tensor, node=None) -> None:
        x = x.detach()
        histograms = state["histograms"]
        if histograms is None:
            seen.setdefault(state["index"], {})[ref.key] = checked_figures(ref, x, node)
            return
        at = plans.get(ref.key, {}).get(state["index"])
        if at is None:
            return
        current, doublings = at
        nonnegative = seen[state["index"]][ref.key][0] >= 0  # this batch's min, pass 1
        counts = _merge(abs_histogram(x, current, FINE_BINS, nonnegative),
                        final[ref.key][1] - doublings)
        if ref.key in histograms:
            histograms[ref.key] += counts
        else:
            histograms[ref.key] = counts

    collector.observe = observe

    def run(desc: str, whole: bool) -> None:
        for index, feeds in make_batches(desc):
            state["index"] = index
            if before_batch is not None:
                before_batch(index)
            collector.feeds(feeds)
            result = net(feeds, hook=collector.hook, stop=None if whole else stop,
                         outputs=outputs if whole else (), overrides=overrides)
            if on_batch is not None and whole:
                on_batch(index, result)

    measured = outputs is not None
    histogram = bool(histogrammed)
    with torch.no_grad():
        def first_pass() -> dict[int, tuple[int, dict[str, tuple]]]:
            run("statistics 1/2" if histogram else "statistics", measured)
            return {index: (index, row) for index, row in seen.items()}

        per_key: dict[str, list[int]] = {key: [] for key in collector.stats}
        for index, row in distributed.gather_batches(first_pass):
            for key, figures in row.items():
                fold(collector.stats[key], figures)
                per_key[key].append(index)
        if not histogram:
            return collector.stats
        plans, final = {}, {}
        for key in histogrammed:
            stats = collector.stats[key]
            schedule, current, doublings = _ranges(stats.batch_absmax)
            plans[key] = dict(zip(per_key[key], schedule))
            final[key] = (current, doublings)
        state["histograms"] = {}
        keys = [key for key in collector.stats if key in histogrammed]
        device = net.device

        def second_pass() -> torch.Tensor:
            run("statistics 2/2", False)
            empty = torch.zeros(FINE_BINS, dtype=torch.int64, device=device)
            return torch.stack([state["histograms"].get(key, empty).to(device)
                                for key in keys] or [empty])

        # every rank's pass succeeded, then the counts are summed (nothing fails in between)
        counts = distributed.all_reduce(distributed.check(second_pass), "sum")
    for key, row in zip(keys, counts):
        stats = collector.stats[key]
        hist = GrowingHistogram()
        if final[key][0] > 0:
            hist.counts, hist.range = row, final[key][0]
        stats.hist = hist.rebin(stats.absmax)
    return collector.stats
