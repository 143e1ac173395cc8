"""The fast bin counts against ``torch.histc`` itself (the reference the growing histograms
and the KL tests were written against), on values placed where float32 rounding decides the
bin: each bin edge and its neighbouring floats, for ranges of every magnitude."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrator.quant import counting, native
from calibrator.quant.counting import bin_counts
from calibrator.quant.kl import _SMALLEST


@pytest.fixture(params=["kernel", "tensor"])
def route(request, monkeypatch):
    """Each test on both routes: the C kernel (where it builds) and the tensor operations."""
    if request.param == "kernel":
        if not native.available():
            pytest.skip("no C compiler: the kernel is not built")
    else:
        monkeypatch.setattr(native, "bin_counts", lambda *args: None)
    return request.param


def histc(values: torch.Tensor, bins: int, high: float, absolute: bool) -> torch.Tensor:
    """torch.histc's own counts as int64 (``values`` small enough for exact float counts)."""
    x = values.abs() if absolute else values
    return torch.histc(x, bins=bins, min=_SMALLEST, max=high).to(torch.int64)


def edge_values(bins: int, high: float, rng: np.random.Generator) -> np.ndarray:
    """Each bin edge k * high / bins and the two floats either side of it, random values,
    exact zeros, the smallest positive float, and high itself."""
    edges = (np.arange(bins + 1, dtype=np.float64) * high / bins).astype(np.float32)
    around = np.concatenate([edges, np.nextafter(edges, np.float32(0)),
                             np.nextafter(edges, np.float32(np.inf))])
    around = around[(around >= 0) & (around <= np.float32(high))]
    rand = (rng.random(50_000) * high).astype(np.float32)
    special = np.array([0.0, 0.0, _SMALLEST, np.float32(high)], np.float32)
    # where the kernel stops subtracting the subnormal low end (2^-123) and its neighbours
    powers = np.ldexp(np.float32(1), np.arange(-127, -118)).astype(np.float32)
    boundary = np.concatenate([powers, np.nextafter(powers, np.float32(0)),
                               np.nextafter(powers, np.float32(1))])
    boundary = boundary[boundary <= np.float32(high)]
    return np.concatenate([around, rand, special, boundary]).astype(np.float32)


@pytest.mark.parametrize("high", [3e-45, 1e-42, 1e-39, 2.0 ** -120, 1e-30, 3.0e-3, 0.7, 1.0,
                                  6.0, 35.1, 4095.0, 1e5])
@pytest.mark.parametrize("bins", [64, 2048, 65536])
def test_counts_equal_torch_histc_at_every_bin_edge(high, bins, route):
    rng = np.random.default_rng(bins)
    values = torch.from_numpy(edge_values(bins, high, rng))
    signed = values * torch.from_numpy(np.where(rng.random(values.numel()) < 0.5, -1, 1)
                                       .astype(np.float32))
    for absolute, x in ((False, values), (True, signed)):
        got = bin_counts(x, bins, _SMALLEST, float(np.float32(high)), absolute)
        want = histc(x, bins, float(np.float32(high)), absolute)
        assert got.dtype == torch.int64
        assert torch.equal(got, want), (high, bins, absolute)
        assert int(got.sum()) == int((x != 0).sum())      # the zeros are not counted


def test_many_slices_on_several_threads_count_what_one_slice_counts(monkeypatch, route):
    """Split into many slices, counted on a pool of threads and summed: the same counts as
    histc; and the same on one thread."""
    rng = np.random.default_rng(3)
    x = torch.from_numpy(np.maximum(rng.standard_normal(300_001), 0).astype(np.float32))
    high = float(x.max())
    want = histc(x, 2048, high, False)
    monkeypatch.setattr(counting, "SLICE", 4096)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(bin_counts(x, 2048, _SMALLEST, high, False), want)
            assert torch.get_num_threads() == n          # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)


def test_ranges_past_the_exact_route_fall_back_to_histc(monkeypatch):
    """A range of 2 x bins or more would round a zero's key to -0 (bin 0), a subnormal one
    put it below -1: histc counts those."""
    calls = []
    real = torch.histc
    monkeypatch.setattr(torch, "histc", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.tensor([0.0, 1.0, 500.0, 1000.0])
    counts = bin_counts(x, 64, _SMALLEST, 1000.0, False)
    assert calls and int(counts.sum()) == 3 and int(counts[0]) == 1 and int(counts[-1]) == 1
    calls.clear()
    bin_counts(x, 1024, _SMALLEST, 1000.0, False)
    assert not calls
    tiny = torch.tensor([0.0, 1e-43, 2e-43])                 # subnormal: quotient below -1
    counts = bin_counts(tiny, 256, _SMALLEST, 2e-43, False)
    assert calls and torch.equal(counts, histc(tiny, 256, 2e-43, False)) and int(counts.sum()) == 2


def test_fewer_pieces_than_threads_restore_the_callers_thread_count():
    """Two pieces on four threads: two worker threads, and torch's four threads afterwards
    (the count of pieces must not become the caller's setting)."""
    from calibrator.threads import on_cores

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        seen = on_cores(lambda n: (n, torch.get_num_threads()), [1, 2])
        assert seen == [(1, 1), (2, 1)]                   # each piece on one core
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not native.available(), reason="no C compiler: the kernel is not built")
@pytest.mark.parametrize("bins, high", [(bins, high) for bins in (64, 65536)
                                         for high in (1e-30, 3.0e-3, 0.7, 6.0, 35.1)]
                         + [(65536, 1023.0)])
def test_counts_regrown_from_one_read_equal_torch_histc_at_the_grown_range(high, bins,
                                                                           monkeypatch):
    """A read at [low, high] whose values pass high: its counts taken at the range doubled
    once to five times (each value's key from its key at high, those past the range from
    the kernel) are ``torch.histc``'s at that range, at every bin edge of the grown range
    and its neighbours, at high itself and at the grown high; the read's own counts are
    histc's at high where nothing passes it (added to a histogram: the values counted)."""
    monkeypatch.setattr(counting, "SPILL", 1 << 20)   # (most values here pass high)
    rng = np.random.default_rng(bins)
    high = float(np.float32(high))
    for doublings in range(1, 6):
        grown = high * 2.0 ** doublings
        values = torch.from_numpy(np.concatenate([edge_values(bins, grown, rng),
                                                  edge_values(bins, high, rng)]))
        signed = values * torch.from_numpy(np.where(rng.random(values.numel()) < 0.5, -1, 1)
                                           .astype(np.float32))
        read = counting.bin_counts_with_figures(signed, bins, _SMALLEST, high)
        assert read.extremes[2] == grown and read.counted.past.numel() > 0
        if grown >= 2 * bins:   # (histc's route at that range: see the next test)
            assert read.regrown(doublings) is None
            continue
        assert torch.equal(read.regrown(doublings), histc(signed, bins, grown, True))
    inside = signed[signed.abs() <= high]
    read = counting.bin_counts_with_figures(inside, bins, _SMALLEST, high)
    counts = torch.full((bins,), 5, dtype=torch.int64)
    assert read.add_counts(counts) == int((inside != 0).sum())
    assert torch.equal(counts - 5, histc(inside, bins, high, True))
    assert torch.equal(read.regrown(0), counts - 5)


@pytest.mark.skipif(not native.available(), reason="no C compiler: the kernel is not built")
def test_counts_that_cannot_be_regrown_exactly_are_refused(monkeypatch):
    """None (the caller counts again) where the kernel kept fewer keys past the range than
    there were, where the doubled range's width is not twice the width (a subnormal high),
    where the grown range leaves the kernel's route (histc counts there) and where the
    doublings outnumber what the bins can halve."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.normal(0, 1, 100_000).astype(np.float32))
    past = int((x.abs() > 4.0).sum())
    assert 0 < past < 20
    assert counting.bin_counts_with_figures(x, 2048, _SMALLEST, 4.0).regrown(1) is not None
    monkeypatch.setattr(counting, "SPILL", past - 1)
    assert counting.bin_counts_with_figures(x, 2048, _SMALLEST, 4.0).regrown(1) is None
    monkeypatch.undo()
    small = torch.tensor([0.0, 1e-42, 3e-42], dtype=torch.float32)
    high = float(np.float32(1e-42))
    read = counting.bin_counts_with_figures(small, 64, _SMALLEST, high)
    assert read is not None and read.regrown(2) is None   # 1e-42 - 2^-149 is not 1e-42
    read = counting.bin_counts_with_figures(x / 8, 64, _SMALLEST, 1.0)
    assert read.regrown(6) is not None and read.regrown(7) is None       # 2^7 > 64 bins
    read = counting.bin_counts_with_figures(x * 1000, 2048, _SMALLEST, 3000.0)
    assert read is not None and read.regrown(1) is None      # 6000: past 2 x 2048, histc's


@pytest.mark.skipif(not native.available(), reason="no C compiler: the kernel is not built")
def test_a_read_without_room_for_keys_past_the_range_knows_none_of_them():
    """Asked to keep no keys past the range, the kernel's read says it does not know them
    (None), not that there were none: such a read is never regrown."""
    x = torch.tensor([0.5, 3.0, 0.0], dtype=torch.float32)
    width = float(np.float32(1.0) - np.float32(_SMALLEST))
    kept = native.bin_counts(x, 64, _SMALLEST, width, True, with_figures=True, spill=4)
    assert kept.past.tolist() == [3 * 64 + 1]
    assert native.bin_counts(x, 64, _SMALLEST, width, True, with_figures=True).past is None
