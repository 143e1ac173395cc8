"""One-pass histograms of |x| whose range grows as larger values arrive.

The two-pass method (find max|x|, then fill 2048 bins over [0, max|x|]) reads the calibration
batches twice. Here each tensor keeps a fine histogram (``FINE_BINS`` = 32 x 2048 bins) over
[0, R]: R starts at the first batch's max|x| and doubles when a larger value arrives, the
bins merged in pairs, which is exact (a bin of the doubled range is the union of two bins of
the old one). At the end, :meth:`GrowingHistogram.rebin` gives the 2048 bins over
[0, max|x|] that the two-pass method fills, each fine bin's count split pro rata between the
bins it overlaps: the counts differ from the two-pass ones only inside one fine bin at each
edge, so the KL, percentile and MSE thresholds agree with the two-pass ones to within one
2048-bin (tests/test_quant_kl.py checks it)."""

from __future__ import annotations

import numpy as np
import torch

from calibrator.quant import native
from calibrator.quant.kl import NUM_BINS, abs_histogram, abs_histogram_with_figures

FINE_BINS = 32 * NUM_BINS


class GrowingHistogram:
    """int64 counts of |x| over [0, ``range``] in ``bins`` bins, exact zeros skipped."""

    def __init__(self, bins: int = FINE_BINS):
        self.bins = bins
        self.range = 0.0
        self.counts: torch.Tensor | None = None

    def add(self, x: torch.Tensor, absmax: float, nonnegative: bool = False) -> int:
        """Count ``x`` (whose max|x| is ``absmax``; ``nonnegative``: no value below 0);
        returns the number of its nonzero values (all of them counted)."""
        if absmax <= 0:
            return 0
        if self.counts is None:
            self.range = float(absmax)
            self.counts = torch.zeros(self.bins, dtype=torch.int64, device=x.device)
        self._grow(self._doublings(absmax))
        counts = abs_histogram(x, self.range, self.bins, nonnegative)
        self.counts += counts
        return int(counts.sum())

    def _doublings(self, absmax: float) -> int:
        """How often the range doubles to reach ``absmax``."""
        doublings, reach = 0, self.range
        while absmax > reach:
            reach *= 2.0
            doublings += 1
        return doublings

    def _grow(self, doublings: int) -> None:
        """The range doubled ``doublings`` times, the bins merged in pairs each time."""
        for _ in range(doublings):
            merged = self.counts.reshape(-1, 2).sum(1)
            self.counts = torch.cat([merged, torch.zeros_like(merged)])
            self.range *= 2.0

    def _take(self, read, x: torch.Tensor, lo: float, absmax: float) -> int:
        """Add what one read at the current range counted (``read``: a
        :class:`~calibrator.quant.counting.Read` of ``x``, whose min and max|x| are ``lo``
        and ``absmax``); where ``absmax`` passed the range, the range grows and the read's
        counts are taken at the grown range (:meth:`~calibrator.quant.counting.Read.
        regrown`), or, where they cannot be, ``x`` is counted again (:meth:`add`).
        Returns the nonzero values of ``x``."""
        if absmax <= self.range:
            return read.add_counts(self.counts)
        doublings = self._doublings(absmax)
        counts = read.regrown(doublings)
        if counts is None:
            return self.add(x, absmax, nonnegative=lo >= 0)
        self._grow(doublings)
        self.counts += counts
        return int(counts.sum())

    def add_with_figures(self, x: torch.Tensor) -> tuple[float, float, float, int] | None:
        """Count ``x`` and return its (min, max, max|x|, zeros), all from one read where the
        C kernel runs (see :meth:`_take` where a value lies past the current range). None
        where it cannot: before the first batch (which sets the range), without the kernel,
        or where ``x`` is not finite; nothing is counted then (the caller takes the figures
        and calls :meth:`add`)."""
        if self.counts is None:
            return None
        read = abs_histogram_with_figures(x, self.range, self.bins)
        if read is None:
            return None
        lo, hi, absmax = read.extremes
        nonzero = self._take(read, x, lo, absmax)
        return lo, hi, absmax, x.numel() - nonzero

    def add_clamped(self, flat: torch.Tensor, low: float, high: float):
        """``flat.clamp_(low, high)`` (``flat`` 1-D, dense) and the clamped values counted,
        in one read where the C kernel runs (two on the first batch, which sets the range:
        the clamp with the figures, then the count): returns the figures (min, max, max|x|,
        zeros) of ``flat`` before the clamp (None where a value is not finite) and after it.
        None where it cannot (without the kernel): ``flat`` is then untouched and nothing
        counted."""
        if self.counts is None:
            read, got = None, native.clamp_with_figures(flat, low, high)
        else:
            read = abs_histogram_with_figures(flat, self.range, self.bins, clamp=(low, high))
            got = None if read is None else (read.extremes, read.zeros)
        if got is None:
            return None
        extremes, zeros = got
        if extremes is None:
            return None, None
        lo, hi, absmax = extremes
        # the clamp is monotone: the clamped extremes are the extremes clamped
        # (a zero extreme as +0, as the kernel reports one)
        c_lo, c_hi = (min(max(v, low), high) + 0.0 for v in (lo, hi))
        c_absmax = max(abs(c_lo), abs(c_hi))
        if read is None:
            nonzero = self.add(flat, c_absmax, nonnegative=c_lo >= 0)
        else:
            nonzero = self._take(read, flat, c_lo, c_absmax)
        return (lo, hi, absmax, zeros), (c_lo, c_hi, c_absmax, flat.numel() - nonzero)

    def rebin(self, absmax: float, bins: int = NUM_BINS) -> np.ndarray:
        """Counts (float64) in ``bins`` bins over [0, absmax], absmax <= range."""
        if self.counts is None or absmax <= 0:
            return np.zeros(bins, np.float64)
        counts = self.counts.cpu().numpy().astype(np.float64)
        width = self.range / self.bins
        # cumulative counts at the fine edges; values are <= absmax, so the fine bin that
        # holds absmax is taken as spread over [its start, absmax] only
        edges = np.arange(self.bins + 1, dtype=np.float64) * width
        edges = np.minimum(edges, absmax)
        cumulative = np.concatenate([[0.0], np.cumsum(counts)])
        keep = np.concatenate([[True], edges[1:] > edges[:-1]])  # drop empty spans past absmax
        target = np.linspace(0.0, absmax, bins + 1)
        at = np.interp(target, edges[keep], cumulative[keep])
        at[-1] = cumulative[-1]
        return np.diff(at)
