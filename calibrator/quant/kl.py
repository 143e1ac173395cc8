"""Entropy (KL) calibration, TensorRT's method in ncnn's convention, vectorised over all
candidate thresholds at once.

Given a histogram of |x| in 2048 bins over [0, absmax] (exact zeros skipped), each candidate
``i`` (the number of levels ... 2047) builds

* P: the first ``i`` bins with the mass of every bin from ``i`` on added to bin ``i - 1``
  (clipping puts outliers on the threshold);
* Q: the same ``i`` bins *without* the tail, merged into ``levels`` equal-width levels
  (fractional bin edges split a bin's count pro rata) and spread back uniformly over the
  bins that were non-zero in the histogram;

both smoothed (zeros get 1e-4, taken evenly from the non-zero bins so the mass is kept) and
normalised; the candidate with the first minimal KL(P || Q) wins and the threshold is the
middle of its last bin, ``(i + 0.5) * absmax / 2048``.

Every candidate is one row of a (candidates x bins) matrix; each bin overlaps at most two
levels because a level is at least one bin wide, so merging and spreading are two
``scatter_add``/``gather`` calls per side instead of Python loops.

That tensor code defines the thresholds (:func:`kl_divergences`). Where the C kernel is
built, a threshold costs about a sixth of it: the kernel scores every candidate by the same
formula (equal up to rounding: each level's mass from prefix sums, Q's logarithm once a
level, P's by a table and a short series; within 3e-14 of the tensor code on MobileNetV2's
histograms), and the tensor code scores again only the chunks holding candidates within
rounding of the minimum (:func:`_best_candidate`): the same threshold, bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from calibrator.graph.net import in_memory_order
from calibrator.quant import native
from calibrator.quant.counting import Read, bin_counts, bin_counts_with_figures

NUM_BINS = 2048
SMOOTH_EPS = 1e-4


@dataclass(frozen=True)
class _Layout:
    """Where each bin of each candidate row falls among the ``levels`` levels: what Q's
    merging and spreading need that does not depend on the histogram (the same for every
    tensor, so :func:`kl_divergences` builds it once per chunk of candidates)."""

    valid: torch.Tensor        # (C, B) bool: bin k < candidate i
    level: torch.Tensor        # (C, B) int64: the level of the bin's start (``levels``: sink)
    level_next: torch.Tensor   # (C, B) int64: the next level (a bin overlaps at most two)
    w_first: torch.Tensor      # (C, B) float64: the bin's fraction inside ``level``
    w_next: torch.Tensor       # (C, B) float64: the rest, inside ``level_next``
    levels: int


def _layout(bins: int, candidates: torch.Tensor, levels: int, device) -> _Layout:
    k = torch.arange(bins, dtype=torch.int64, device=device)
    i = candidates.to(torch.int64).unsqueeze(1)                       # (C, 1)
    valid = k.unsqueeze(0) < i                                        # (C, B)
    level = torch.div(k.unsqueeze(0) * levels, i, rounding_mode="floor")  # level of bin start
    # fraction of bin k inside `level`: up to the level's right edge (level + 1) * i / levels
    edge = (level + 1).to(torch.float64) * i.to(torch.float64) / levels
    w_first = (edge - k.unsqueeze(0).to(torch.float64)).clamp(max=1.0)
    level_next = (level + 1).clamp(max=levels)                        # column `levels` = sink
    return _Layout(valid, level.clamp(max=levels), level_next, w_first, 1.0 - w_first, levels)


def _merge_and_expand(hist: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """Q for every row of ``layout`` (see :func:`merge_and_expand`)."""
    counts = torch.where(layout.valid, hist.unsqueeze(0), 0.0)
    nonzero = (hist != 0).unsqueeze(0) & layout.valid
    shape = (layout.valid.shape[0], layout.levels + 1)
    mass = torch.zeros(shape, dtype=torch.float64, device=hist.device)
    mass.scatter_add_(1, layout.level, counts * layout.w_first)
    mass.scatter_add_(1, layout.level_next, counts * layout.w_next)
    support = torch.zeros_like(mass)
    support.scatter_add_(1, layout.level, torch.where(nonzero, layout.w_first, 0.0))
    support.scatter_add_(1, layout.level_next, torch.where(nonzero, layout.w_next, 0.0))
    per_bin = torch.where(support > 0, mass / support.clamp(min=1e-300), 0.0)
    spread = (layout.w_first * per_bin.gather(1, layout.level)
              + layout.w_next * per_bin.gather(1, layout.level_next))
    return torch.where(nonzero, spread, 0.0)


def merge_and_expand(hist: torch.Tensor, candidates: torch.Tensor, levels: int) -> torch.Tensor:
    """Q for every candidate: rows of ``len(candidates)`` x ``len(hist)`` (zero past ``i``).

    ``hist`` holds float64 counts; ``candidates`` the bin counts ``i`` (each >= levels)."""
    return _merge_and_expand(hist, _layout(hist.numel(), candidates, levels, hist.device))


def clip_with_tail(hist: torch.Tensor, candidates: torch.Tensor,
                   width: int | None = None) -> torch.Tensor:
    """P for every candidate: the first ``i`` bins, the tail mass added to bin ``i - 1``
    (rows ``width`` bins wide, enough for the largest candidate; default all bins)."""
    width = hist.numel() if width is None else width
    i = candidates.to(torch.int64)
    valid = torch.arange(width, device=hist.device).unsqueeze(0) < i.unsqueeze(1)
    return _clip_with_tail(hist, i, valid, _tails(hist))


def _tails(hist: torch.Tensor) -> torch.Tensor:
    """``hist[k:].sum()`` for k = 0 ... len(hist) (0 past the end)."""
    suffix = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])
    return torch.cat([suffix, suffix.new_zeros(1)])


def _clip_with_tail(hist: torch.Tensor, candidates: torch.Tensor, valid: torch.Tensor,
                    tails: torch.Tensor) -> torch.Tensor:
    """:func:`clip_with_tail` for int64 ``candidates`` whose rows' mask is ``valid`` and
    the histogram's :func:`_tails`."""
    p = torch.where(valid, hist[:valid.shape[1]].unsqueeze(0), 0.0)
    p.scatter_add_(1, candidates.unsqueeze(1) - 1, tails[candidates].unsqueeze(1))
    return p


def zero_bin_value(eps: float) -> float:
    """What :func:`smooth` gives a zero bin: ``eps`` rounded to float32."""
    return float(np.float32(eps))


def smooth(dist: torch.Tensor, valid: torch.Tensor, eps: float = SMOOTH_EPS) -> torch.Tensor:
    """Give zero bins ``eps``, taking the same total evenly from the non-zero bins. (A zero
    bin gets ``eps`` rounded to float32, the value this code has always given it; the total
    taken uses ``eps`` itself: the thresholds stay those of earlier versions.)"""
    zeros = (dist == 0) & valid
    nonzeros = (dist != 0) & valid
    n_zero = zeros.sum(1, keepdim=True).to(dist.dtype)
    n_nonzero = nonzeros.sum(1, keepdim=True).to(dist.dtype).clamp(min=1)
    return torch.where(nonzeros, dist - eps * n_zero / n_nonzero,
                       torch.where(zeros, zero_bin_value(eps), dist))


def kl_divergences(hist: torch.Tensor, levels: int = 128,
                   chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidates, KL per candidate) for a histogram of ``NUM_BINS`` counts.

    Candidates go in chunks whose rows are only as wide as their largest candidate: the
    bins past ``i`` take no part in candidate ``i``, so this halves the work. Each chunk's
    layout (:class:`_Layout`) is built once and kept for the next tensor."""
    hist = hist.to(torch.float64)
    candidates, chunks = _chunks(hist.numel(), levels, chunk, hist.device)
    tails = _tails(hist)
    return candidates, torch.cat([_chunk_divergences(hist, part, layout, tails)
                                  for part, layout in chunks])


def _chunk_divergences(hist: torch.Tensor, part: torch.Tensor, layout: _Layout,
                       tails: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) of one chunk of candidates (float64 ``hist``, its :func:`_tails`)."""
    valid = layout.valid
    p = smooth(_clip_with_tail(hist, part, valid, tails), valid)
    q = smooth(_merge_and_expand(hist[:valid.shape[1]], layout), valid)
    p = p / p.sum(1, keepdim=True).clamp(min=1e-300)
    q = q / q.sum(1, keepdim=True).clamp(min=1e-300)
    usable = valid & (p > 0)
    ratio = torch.where(usable & (q > 0), p / q.clamp(min=1e-300), torch.ones_like(p))
    # q == 0 where p > 0 cannot happen after smoothing unless a row is all zero
    return torch.where(usable, p * torch.log(ratio), torch.zeros_like(p)).sum(1)


#: how far the kernel's divergence may be from the tensor code's, per unit of the candidate's
#: probability mass (1) and of the sum of its |terms|: both are float64 sums of about 2000
#: terms, each term good to a few ulps; 1e-9 is a thousand times that bound
_FILTER_MARGIN = 1e-9


def _best_candidate(hist: torch.Tensor, levels: int, chunk: int = 64) -> int:
    """The candidate of the first minimal divergence of :func:`kl_divergences`, exactly.

    Where the C kernel is built (:func:`calibrator.quant.native.kl_divergences`) it gives
    every candidate's divergence in plain loops, equal to the tensor code's up to rounding
    (``_FILTER_MARGIN``); only the candidates that could be the tensor code's minimum within
    that rounding are scored again by the tensor code, whole chunks of them as
    :func:`kl_divergences` scores them (the same bits), and the first minimal one among them
    is the tensor code's answer: a candidate left out is above the minimum by more than the
    two codes can differ. Where the kernel's minimum is the only such candidate (all 51 of
    MobileNetV2's tensors), every other candidate's exact divergence lies above its
    exact divergence: it is the answer, and nothing is scored again."""
    hist = hist.to(torch.float64)
    fast = native.kl_divergences(hist, levels, SMOOTH_EPS, zero_bin_value(SMOOTH_EPS))
    if fast is None or not bool(torch.isfinite(fast[0]).all()):
        candidates, divergence = kl_divergences(hist, levels, chunk)
        return int(candidates[int(torch.argmin(divergence))])
    divergence, size = fast
    at = int(torch.argmin(divergence))
    bound = _FILTER_MARGIN * (1.0 + size)
    close = divergence <= divergence[at] + bound[at] + bound
    if int(close.sum()) == 1:   # (at itself)
        return levels + at
    _, chunks = _chunks(hist.numel(), levels, chunk, hist.device)
    tails = _tails(hist)
    best, best_value = None, None
    for index in sorted({int(i) // chunk for i in torch.nonzero(close).reshape(-1)}):
        part, layout = chunks[index]
        exact = _chunk_divergences(hist, part, layout, tails)
        row = int(torch.argmin(exact))          # the first minimal row of the chunk
        if best is None or float(exact[row]) < best_value:
            best, best_value = int(part[row]), float(exact[row])
    return best


def release_layouts() -> None:
    """Free the candidate layouts :func:`kl_divergences` keeps (about 70 MB): a caller that
    has its thresholds (they are cached with the statistics) needs them no more; the next
    call builds them again."""
    _chunks.cache_clear()


@functools.lru_cache(maxsize=1)
def _chunks(bins: int, levels: int, chunk: int, device
            ) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, _Layout], ...]]:
    """The candidates (``levels`` ... ``bins - 1``) and, per chunk of them, the candidates
    and their layout, rows as wide as the chunk's largest candidate (about 70 MB for
    2048 bins; one set is kept: a run calibrates at one bit width; see
    :func:`release_layouts`)."""
    candidates = torch.arange(levels, bins, device=device)
    return candidates, tuple((part, _layout(int(part[-1]), part, levels, device))
                             for part in candidates.split(chunk))


def kl_threshold(hist: torch.Tensor, absmax: float, levels: int = 128) -> float:
    """The KL threshold T for a histogram of |x| over [0, absmax]; 0 for an all-zero tensor."""
    if absmax <= 0 or float(hist.sum()) == 0:
        return float(max(absmax, 0.0))
    return (_best_candidate(hist, levels) + 0.5) * absmax / hist.numel()


def abs_histogram(x: torch.Tensor, absmax: float, bins: int = NUM_BINS,
                  nonnegative: bool = False) -> torch.Tensor:
    """int64 histogram of |x| over [0, absmax] in ``bins`` bins, exact zeros skipped (so
    its sum is the number of nonzero values of ``x``, all of which are <= absmax).
    ``nonnegative``: ``x`` has no negative value (a ReLU's output), |x| is x itself.

    The bins are ``torch.histc``'s (counted by :func:`~calibrator.quant.counting.bin_counts`,
    the same counts faster). The range starts at the smallest positive float32 (a
    subnormal): an exact zero falls below it and is not counted, so no separate pass counts
    the zeros; every other value lands in the bin it has over [0, absmax] (``v - 2^-149``
    differs from ``v`` only for values below 2^-124, which are in bin 0 either way unless
    absmax itself is below about 2^-113)."""
    if absmax <= 0:
        return torch.zeros(bins, dtype=torch.int64, device=x.device)
    return bin_counts(in_memory_order(x.detach()), bins, _SMALLEST, float(absmax),
                      absolute=not nonnegative)


def abs_histogram_with_figures(x: torch.Tensor, high: float, bins: int = NUM_BINS,
                               clamp: tuple[float, float] | None = None) -> Read | None:
    """One read of ``x`` by the C kernel: :func:`abs_histogram`'s counts of ``x`` over
    [0, ``high``] (or, where max|x| passed ``high``, over a doubled range) and ``x``'s
    (min, max, max|x|), as a :class:`~calibrator.quant.counting.Read`. None where the
    kernel does not run or ``x`` is not finite. ``clamp``: ``x`` (dense) clamped in place on
    that pass and its clamped values counted (see
    :func:`~calibrator.quant.counting.bin_counts_with_figures`)."""
    return bin_counts_with_figures(in_memory_order(x.detach()), bins, _SMALLEST, float(high),
                                   clamp)


#: the smallest positive float32 (2^-149): the low end of the histogram's range
_SMALLEST = float(np.nextafter(np.float32(0), np.float32(1)))
