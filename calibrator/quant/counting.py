"""``torch.histc``'s counts on the CPU, about twice as fast, exactly.

``torch.histc`` on the CPU (aten/src/ATen/native/cpu/HistogramKernel.cpp,
``histogramdd_cpu_contiguous`` with ``LINEAR_INTERPOLATION``, the histc code path) puts an
element ``e`` with ``low <= e <= high`` in bin ``int((e - low) * bins / (high - low))``,
every operation in float32, the element equal to ``high`` in the last bin, the others
skipped, in a scalar loop. Here the same float32 operations run as vectorised tensor
operations on slices of half a million elements (``floor`` of the quotient, plus one, so
that an element below ``low`` lands in an extra bin 0 of its own), and the bin numbers are
counted by ``torch.bincount`` in int64, the slices shared among torch's threads
(:func:`calibrator.threads.on_cores`), one core each. Where the C kernel is built
(:func:`calibrator.quant.native.bin_counts`) it counts the same keys in one pass, three to
six times faster. The counts are integers: the same in any order, on any number of threads.

Only for what the calibrator histograms: |x| or a tensor without negative values, finite,
no value above ``high``, ``low`` the smallest positive float32 (so nothing but exact zeros
lies below it). A zero's quotient ``-low * bins / (high - low)`` must lie in [-1, 0): where
``high`` is so large that it would round to -0 (and a zero would join bin 0), or so small
(subnormal) that it would fall below -1, :func:`bin_counts` falls back to ``torch.histc``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from calibrator.quant import native
from calibrator.threads import on_cores

#: elements per slice: large enough that the per-operation overhead is small, small enough
#: that a slice's temporaries stay in the core's cache
SLICE = 1 << 19
#: elements per ``torch.histc`` call of the fallback: its float32 counts stay exact
_HISTC_SLICE = 1 << 23


def bin_counts(flat: torch.Tensor, bins: int, low: float, high: float,
               absolute: bool) -> torch.Tensor:
    """int64 counts of ``|flat|`` (``absolute``) or ``flat`` in ``bins`` bins over
    [``low``, ``high``], exactly as ``torch.histc`` counts them (see the module's text for
    what ``flat`` may hold). ``flat``: a 1-D float tensor."""
    width = _width(flat, bins, low, high)
    if width is None:
        return _histc(flat, bins, low, high, absolute)
    counts = native.bin_counts(flat, bins, low, width, absolute)
    if counts is None:
        slices = flat.split(SLICE)
        shares = min(torch.get_num_threads(), len(slices))
        counts = sum(on_cores(lambda share: _count_all(share, bins, low, width, absolute),
                              [slices[i::shares] for i in range(shares)]))
    return _in_range(counts, bins)


#: keys past the last bin kept per read (see :meth:`Read.regrown`)
SPILL = 1 << 12


def bin_counts_with_figures(flat: torch.Tensor, bins: int, low: float, high: float,
                            clamp: tuple[float, float] | None = None) -> Read | None:
    """One read of ``flat`` by the C kernel (:func:`calibrator.quant.native.bin_counts`):
    the counts of ``|flat|`` over [``low``, ``high``] and ``flat``'s (min, max, max|x|) (see
    :class:`Read`). None where the kernel does not run, or, without a clamp, where a value
    is not finite. ``clamp`` = (low, high): ``flat`` clamped in place on the same read and
    its clamped values counted, the figures and zeros those before the clamp (the figures
    None where a value is not finite); where it returns None, ``flat`` is untouched."""
    width = _width(flat, bins, low, high)
    if width is None:
        return None
    got = native.bin_counts(flat, bins, low, width, True, with_figures=True, clamp=clamp,
                            spill=SPILL)
    return None if got is None else Read(got, bins, low, high)


@dataclass(frozen=True)
class Read:
    """What :func:`bin_counts_with_figures` read: the figures, and the keys' counts at
    [``low``, ``high``], from which follow :func:`bin_counts`'s counts at that range
    (:meth:`add_counts`, where max|x| <= ``high``) and at a range doubled any number of times
    (:meth:`regrown`, where max|x| passed ``high``), without reading the tensor again."""
    counted: native.Counted
    bins: int
    low: float
    high: float

    @property
    def extremes(self) -> tuple[float, float, float] | None:
        return self.counted.extremes

    @property
    def zeros(self) -> int | None:
        return self.counted.zeros

    def add_counts(self, into: torch.Tensor) -> int:
        """:func:`bin_counts`'s counts over [low, high] (a value past ``high`` is counted
        in the last bin) added to ``into``; returns how many values they count (those not
        below ``low``)."""
        keys, bins = self.counted.counts, self.bins
        into += keys[1:bins + 1]
        into[bins - 1] += keys[bins + 1]
        return int(keys.sum() - keys[0])

    def regrown(self, doublings: int) -> torch.Tensor | None:
        """:func:`bin_counts`'s counts over [low, high * 2^doublings], exactly: that range's
        width is this one's times 2^doublings, so each value's quotient is its quotient
        here over 2^doublings (exact in binary) and its key (one plus the quotient's floor)
        is ``((key - 1) >> doublings) + 1`` of its key here; the keys past the last one
        come from the kernel (:attr:`~calibrator.quant.native.Counted.past`). None where
        that does not hold: more such keys than the kernel kept, a width that is not
        the doubled one (or not the kernel's: :func:`bin_counts` counts with
        ``torch.histc`` there), or more doublings than the bins can halve."""
        past, bins = self.counted.past, self.bins
        step = 1 << doublings
        if past is None or step > bins or bins % step:
            return None
        grown = self.high * float(step)
        width = _key_width(bins, self.low, self.high)
        if width is None or _key_width(bins, self.low, grown) != width * step:
            return None
        table = self.counted.counts[1:].clone()   # key k at k - 1, 0 ... bins
        table[bins] -= past.numel()               # (they were counted there too)
        keys = torch.zeros(bins + 1, dtype=torch.int64)
        keys[:bins // step] = table[:bins].view(-1, step).sum(1)
        keys[bins // step] += table[bins]
        keys += torch.bincount(((past - 1) >> doublings).clamp_(max=bins), minlength=bins + 1)
        keys[bins - 1] += keys[bins]              # (the values equal to the new high)
        return keys[:bins]


def _width(flat: torch.Tensor, bins: int, low: float, high: float) -> float | None:
    """``high - low`` in float32, None where the keys of the module's text do not hold
    (``torch.histc`` itself counts then)."""
    return _key_width(bins, low, high) if flat.device.type == "cpu" else None


def _key_width(bins: int, low: float, high: float) -> float | None:
    """:func:`_width` of a CPU tensor."""
    width = float(np.float32(high) - np.float32(low))
    if low <= 0 or not low * bins <= width < 2 * bins:
        return None
    return width


def _in_range(counts: torch.Tensor, bins: int) -> torch.Tensor:
    """The ``bins`` counts from the keys' counts: the elements equal to high (key
    ``bins + 1``) go to the last bin, those below ``low`` (key 0) are dropped."""
    counts[bins] += counts[bins + 1]
    return counts[1:bins + 1]


def _count_all(slices, bins: int, low: float, width: float, absolute: bool) -> torch.Tensor:
    return sum(_count(piece, bins, low, width, absolute) for piece in slices)


def _count(piece: torch.Tensor, bins: int, low: float, width: float,
           absolute: bool) -> torch.Tensor:
    """bincount of 1 + floor((e - low) * bins / width) over ``piece``: bin 0 holds the
    elements below ``low`` (exact zeros), bin ``bins + 1`` those equal to ``high``."""
    values = piece.float()
    keys = values.abs().sub_(low) if absolute else torch.sub(values, low)
    keys.mul_(bins).div_(width).floor_().add_(1)
    return torch.bincount(keys.to(torch.int32), minlength=bins + 2)


def _histc(flat: torch.Tensor, bins: int, low: float, high: float,
           absolute: bool) -> torch.Tensor:
    """``torch.histc`` itself, on slices small enough for its float32 counts to be exact
    (below 2^24 per bin), the counts summed as int64."""
    counts = torch.zeros(bins, dtype=torch.int64, device=flat.device)
    for piece in flat.split(_HISTC_SLICE):
        values = piece.abs().float() if absolute else piece.float()
        counts += torch.histc(values, bins=bins, min=low, max=high).to(torch.int64)
    return counts
