"""The one-pass requantization kernel against the tensor operations it replaces, bit for bit
(int32 views: signed zeros count), and the simulation with and without it."""

from __future__ import annotations

import ctypes
import platform

import numpy as np
import pytest
import torch

from calibrator.backends import make_backend
from calibrator.quant import native
from tests.quant_helpers import TinyNet, conv_text, input_text, relu_text

pytestmark = pytest.mark.skipif(not native.available(),
                                reason="no C compiler: the simulation runs tensor operations")


def tensor_code(x, m, low, high, residual=None, scale=0.0):
    """What calibrator.quant.simulate does without the kernel, in its order."""
    y = x * (m.reshape(1, -1, *([1] * (x.dim() - 2))) if isinstance(m, torch.Tensor) else m)
    if residual is not None:
        y = y.double().add_(residual.double(), alpha=scale).float()
    if low >= 0 or low != int(low) or high != int(high):
        return y.clamp_(low, high).round_()
    return y.round_().clamp_(low, high)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def values(shape, seed, layout):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(0, 200, shape).astype(np.float32))
    flat = x.view(-1)
    flat[:64] = torch.arange(-32, 32, dtype=torch.float32) + 0.5     # ties once multiplied by 1
    flat[64:72] = -0.0
    flat[72:80] = -0.2                                              # rounds to -0.0
    flat[80:88] = 1e6                                               # saturates
    return x.contiguous(memory_format=torch.channels_last) if layout == "last" else x


@pytest.mark.parametrize("layout", ["last", "first"])
@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (3, 16, 64, 64)])   # one piece, several
@pytest.mark.parametrize("bounds", [(0, 255), (-128, 127), (0, 127), (-64, 63), (0.0, 170.25)])
def test_the_kernel_gives_the_tensor_codes_bits(layout, shape, bounds):
    x = values(shape, 1, layout)
    m = torch.cat([torch.ones(2), torch.full((2,), 0.5),
                   torch.rand(shape[1] - 4, generator=torch.Generator().manual_seed(2))])
    for multiplier in (m, 0.731):
        want = tensor_code(x.clone(), multiplier, *bounds)
        got = native.requantize(x.clone(), multiplier, *bounds)
        assert got is not None
        assert torch.equal(bits(got), bits(want))
        in_place = x.clone()
        assert native.requantize(in_place, multiplier, *bounds, out=in_place) is in_place
        assert torch.equal(bits(in_place), bits(want))


@pytest.mark.parametrize("layout", ["last", "first"])
def test_with_a_residual_the_sum_is_intels_fma_in_float64(layout):
    shape = (3, 16, 64, 64)
    x = values(shape, 3, layout)
    residual = torch.from_numpy(np.random.default_rng(4).integers(0, 256, shape)
                                .astype(np.float32))
    residual = residual.contiguous(memory_format=torch.channels_last) \
        if layout == "last" else residual
    m = torch.rand(16, generator=torch.Generator().manual_seed(5))
    scale = float(np.float32(0.3719))
    for low, high in ((0, 255), (-128, 127)):
        want = tensor_code(x.clone(), m, low, high, residual, scale)
        got = native.requantize(x.clone(), m, low, high, residual=residual,
                                residual_scale=scale)
        assert torch.equal(bits(got), bits(want))


def test_two_dimensional_outputs_and_refusals():
    x = torch.randn(5, 10) * 300
    m = torch.rand(10)
    assert torch.equal(bits(native.requantize(x, m, -128, 127)),
                       bits(tensor_code(x.clone(), m, -128, 127)))
    # what the kernel does not read in place: the caller's tensor code runs
    assert native.requantize(x.double(), m, -128, 127) is None
    assert native.requantize(x.t(), torch.rand(5), -128, 127) is None
    assert native.requantize(x, m, 0, 255, residual=torch.zeros(5, 10).t().contiguous().t(),
                             residual_scale=1.0) is None


RESIDUAL_NET = (input_text((2, 3, 9, 9))
                + conv_text("c1", "data", "c1", 16, kernel=3, extra="pad: 1")
                + relu_text("r1", "c1")
                + conv_text("c2", "c1", "c2", 16, kernel=3, extra="pad: 1")
                + 'layer { name: "sum" type: "Eltwise" bottom: "c1" bottom: "c2" top: "s" }\n'
                + relu_text("r2", "s")
                + conv_text("c3", "s", "c3", 8, kernel=1)
                + 'layer { name: "r3" type: "ReLU6" bottom: "c3" top: "c3" }\n'
                + conv_text("c4", "c3", "c4", 8, kernel=3))


def test_the_simulation_is_the_same_with_and_without_the_kernel(monkeypatch):
    tiny = TinyNet(RESIDUAL_NET, seed=7)
    plan = tiny.calibrate(first_conv=True)
    runs, calls = [], []
    real = native.requantize

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    for use in (True, False):
        monkeypatch.setattr(native, "requantize",
                            counted if use else (lambda *a, **k: None))
        overrides = make_backend().simulator(tiny.fused, plan).overrides
        seen = {}

        def hook(node, tops, seen=seen):
            seen[node.name] = [t.detach().clone() for t in tops]

        with torch.no_grad():
            for feeds in tiny.batches:
                tiny.net(feeds, overrides=overrides, hook=hook)
        runs.append(seen)
    with_kernel, without = runs
    assert sum(calls) >= 4 * len(tiny.batches)   # every unit's quantization or epilogue
    assert set(with_kernel) == set(without)
    for name in with_kernel:
        for a, b in zip(with_kernel[name], without[name]):
            assert torch.equal(bits(a), bits(b)), name


def _awkward(size: int, seed: int) -> torch.Tensor:
    """Gaussian values with zeros of both signs, the smallest subnormals, the largest
    finite values, and the extremes somewhere in the middle."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(0, 1, size).astype(np.float32))
    x[::5] = -0.0
    x[3::7] = 0.0
    x[1::11] = 1e-45
    x[2::17] = -1e-45
    if size > 40:
        x[size // 2] = 3.4e38
        x[size // 3] = -3.0e38
    return x


@pytest.mark.parametrize("size", [1, 2047, 2049, 3_000_001])
def test_figures_are_aminmax_and_the_zero_count(size):
    """min, max, max|x| and the zeros of either sign (not the tiny values) in one read, on
    one thread or several; a zero extreme is +0; None for a tensor holding NaN or Inf."""
    for x in (_awkward(size, size), _awkward(size, size).clamp(min=0),
              -_awkward(size, size).abs()):
        lo, hi = (float(v) for v in torch.aminmax(x))
        want = (lo + 0.0, hi + 0.0, float(x.abs().max()), size - int(torch.count_nonzero(x)))
        got = native.figures(x)
        assert got == want
        assert all(np.copysign(1.0, g) == 1.0 for g in got[:2] if g == 0.0)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = _awkward(size, size)
        x[size // 4] = bad
        assert native.figures(x) is None


@pytest.mark.parametrize("size", [2049, 3_000_001])
def test_counts_with_figures_are_the_counts_and_the_figures(size):
    """The counting kernel's figures read on the way: those of :func:`native.figures`, the
    counts those of the kernel without them; values past the range in the last key."""
    x = _awkward(size, size + 1)
    x[0] = 7.5                                  # past the range [0, 6]
    for high in (6.0, float(x.abs().max())):
        width = float(np.float32(high) - np.float32(2.0 ** -149))
        counts, figures, zeros, _ = native.bin_counts(x, 2048, 2.0 ** -149, width, True,
                                                      with_figures=True)
        assert torch.equal(counts, native.bin_counts(x, 2048, 2.0 ** -149, width, True))
        assert figures == native.figures(x)[:3] and zeros is None
        assert int(counts[0]) == native.figures(x)[3]        # key 0: the zeros
    x[5] = float("nan")
    assert native.bin_counts(x, 2048, 2.0 ** -149, 6.0, True, with_figures=True) is None


@pytest.mark.parametrize("size", [2047, 3_000_001])
def test_counts_of_a_clamp_are_torchs_clamp_counted_and_the_figures_before_it(size):
    """Counting with a clamp: the tensor becomes ``clamp_(0, 6)``'s bit for bit, the counts
    are the tensor route's keys of the clamped values, the figures and zeros those of the
    values before the clamp; where a value is not finite the figures are None (the values
    clamped all the same, as torch clamps them)."""
    from calibrator.quant.counting import _count
    low = 2.0 ** -149

    def keys(values, width):   # the tensor route's keys, those past the range in the last
        counts = _count(values, 2048, low, width, True)
        return torch.cat([counts[:2049], counts[2049:].sum().reshape(1)])

    for bad in (None, float("nan"), float("inf")):
        x = _awkward(size, size + 3)
        x[7::13] += 5.0                    # values past the clamp
        x[1] = 6.5                         # clamped to 6: the last bin's edge
        if bad is not None:
            x[size // 4] = bad
        before = native.figures(x.clone())
        want = x.clone().clamp_(0.0, 6.0)
        for high in (6.0, 3.0):            # 3: clamped values past the range, the last key
            width = float(np.float32(high) - np.float32(low))
            y = x.clone()
            counts, extremes, zeros, _ = native.bin_counts(y, 2048, low, width, True,
                                                           with_figures=True, clamp=(0.0, 6.0))
            assert torch.equal(bits(y), bits(want))
            assert zeros == size - int(torch.count_nonzero(x))
            if bad is None:
                assert (*extremes, zeros) == before
                assert torch.equal(counts, keys(want, width))
            else:
                assert extremes is None
                if bad != bad:            # (a NaN has no key; inf was clamped to 6)
                    continue
                assert torch.equal(counts, keys(want, width))


@pytest.mark.skipif(not native.available(), reason="no C compiler")
def test_a_kernel_without_memory_says_so_and_the_tensor_code_runs(monkeypatch):
    """The allocating kernels return -1 where malloc/calloc fail (here: tables of 2^62
    counters, and a tail of 2^60 doubles, which no allocator gives) without touching their
    outputs; the wrappers then answer None and the callers count and score with tensors."""
    library = native._library()
    counts = torch.zeros(8, dtype=torch.int64)
    x = torch.ones(16)
    none = (None, 0.0, 0.0, None, None, 0, None)   # (no clamp, no keys past the range)
    assert library.hist_count(x.data_ptr(), 16, 2 ** 61, 0.0, 1.0, 1, counts.data_ptr(),
                              None, *none) == -1
    zeros = torch.zeros(1, dtype=torch.int64)
    assert library.hist_count(x.data_ptr(), 2 ** 18, 2 ** 61, 0.0, 1.0, 1, counts.data_ptr(),
                              None, torch.full((2 ** 18,), -1.0).data_ptr(), 0.0, 0.5,
                              zeros.data_ptr(), None, 0, None) == -1   # (a clamp: see below)
    assert library.hist_count(x.data_ptr(), 16, 4, 0.0, 1.0, 1, counts.data_ptr(), None,
                              *none) == 0
    assert counts.tolist() == [0, 0, 0, 0, 0, 16, 0, 0]   # |1| / 1 * 4 bins: key 5, the last
    h = torch.ones(4, dtype=torch.float64)
    out = torch.full((2,), 7.0, dtype=torch.float64)
    assert library.kl_all(h.data_ptr(), 2 ** 60, 2, 1e-4, 1e-4, out.data_ptr(),
                          out.data_ptr()) == -1
    assert out.tolist() == [7.0, 7.0]

    class Starved:   # the real kernels, every allocation failing
        def __getattr__(self, name):
            return lambda *args: -1

    monkeypatch.setattr(native, "_library", lambda: Starved())
    assert native.bin_counts(torch.rand(1000), 2048, 0.0, 1.0, True) is None
    assert native.bin_counts(torch.rand(1000), 2048, 0.0, 1.0, True, with_figures=True) is None
    x = torch.rand(1000) * 8
    kept = x.clone()
    assert native.bin_counts(x, 2048, 0.0, 1.0, True, with_figures=True,
                             clamp=(0.0, 6.0)) is None
    assert torch.equal(x, kept)
    assert native.kl_divergences(torch.rand(2048, dtype=torch.float64), 128, 1e-4, 1e-4) is None


def _baseline_library(tmp_path, monkeypatch, *names: str):
    """The kernels built with the baseline alone (-DWITH_AVX2= -DWITH_AVX512=, into a
    cache of the test's own), ``names`` given their C signatures."""
    monkeypatch.setenv("CALIBRATOR_CACHE", str(tmp_path))
    baseline = ctypes.CDLL(str(native._build(native._compiler(),
                                              ("-DWITH_AVX2=", "-DWITH_AVX512="))))
    for name in names:
        restype, argtypes = native._SIGNATURES[name]
        getattr(baseline, name).restype, getattr(baseline, name).argtypes = restype, argtypes
    return baseline


@pytest.mark.skipif(not native.available() or platform.machine() != "x86_64",
                    reason="no C compiler, or not x86-64 (no AVX2 copy)")
def test_the_avx2_counting_kernel_counts_what_the_baseline_one_counts(tmp_path, monkeypatch):
    """The loaded library's hist_count and figures are the AVX2 copies on a CPU that has
    AVX2; a build with the baseline alone (-DWITH_AVX2=) counts the same at every bin edge,
    its neighbours, tiny and subnormal values, zeros of either sign and values past the
    range (whose own keys both keep alike), and finds the same extremes and zeros."""
    baseline = _baseline_library(tmp_path, monkeypatch, "hist_count", "figures")
    rng = np.random.default_rng(3)
    bins, high = 2048, 6.0
    edges = np.arange(bins + 1, dtype=np.float32) * np.float32(high / bins)
    values = np.concatenate([
        edges, np.nextafter(edges, np.float32(0)), np.nextafter(edges, np.float32(10)),
        rng.normal(0, 2, 1_000_000), np.float32(2.0) ** -np.arange(110, 150),
        [0.0, -0.0, high, 7.5, -6.0]]).astype(np.float32)
    x = torch.from_numpy(values)
    for absolute in (1, 0):
        for low in (0.0, 2.0 ** -149):
            got, want = (torch.zeros(bins + 2, dtype=torch.int64) for _ in range(2))
            extremes = [torch.tensor(native._NO_EXTREMES, dtype=torch.int32) for _ in range(2)]
            past = [torch.full((1 << 16,), -1, dtype=torch.int64) for _ in range(2)]
            npast = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
            for library, counts, ext, kept, n in (
                    (native._library(), got, extremes[0], past[0], npast[0]),
                    (baseline, want, extremes[1], past[1], npast[1])):
                assert library.hist_count(x.data_ptr(), x.numel(), bins, low, high, absolute,
                                          counts.data_ptr(), ext.data_ptr(), None, 0.0, 0.0,
                                          None, kept.data_ptr(), 1 << 16, n.data_ptr()) == 0
            assert torch.equal(got, want) and int(got.sum()) == x.numel()
            assert torch.equal(*extremes)
            # the keys past the range: 7.5's and the normal tail's (where absolute is 0,
            # negative values too, whose keys cannot be had: more than the buffer holds)
            assert int(npast[0]) == int(npast[1]) > 0
            if absolute:
                assert torch.equal(*(torch.sort(kept[:int(n)]).values
                                     for kept, n in zip(past, npast)))
                assert (past[0][:int(npast[0])] > bins + 1).all()
            else:
                assert int(npast[0]) > 1 << 16
            assert native._extremes(extremes[0]) == (float(values.min()), float(values.max()),
                                                      float(np.abs(values).max()))
    for x in (torch.from_numpy(values), _awkward(3_000_001, 4)):
        extremes = [torch.tensor(native._NO_EXTREMES, dtype=torch.int32) for _ in range(2)]
        zeros = [library.figures(x.data_ptr(), x.numel(), ext.data_ptr(), None, 0.0, 0.0)
                 for library, ext in ((native._library(), extremes[0]), (baseline, extremes[1]))]
        assert zeros[0] == zeros[1] == x.numel() - int(torch.count_nonzero(x))
        assert torch.equal(*extremes)


@pytest.mark.skipif(not native.available() or platform.machine() != "x86_64",
                    reason="no C compiler, or not x86-64 (no vector copies)")
def test_the_vector_requantization_kernels_give_the_baselines_bits(tmp_path, monkeypatch):
    """The loaded library's rq_last and rq_first (the AVX-512 or AVX2 copies, as the CPU
    has them) write the bits of a build with the baseline alone, in place and not, with and
    without a residual, ties, signed zeros and saturation included, on rows that are not a
    multiple of the vector width."""
    baseline = _baseline_library(tmp_path, monkeypatch, "rq_last", "rq_first")
    loaded = native._library()
    shape = (3, 37, 13, 11)
    x = values(shape, 6, "first")
    residual = torch.from_numpy(np.random.default_rng(7).integers(-128, 128, shape)
                                .astype(np.float32))
    m = torch.rand(shape[1], generator=torch.Generator().manual_seed(8))
    checked = 0
    for low, high in ((0.0, 255.0), (-128.0, 127.0), (0.0, 170.25)):
        for res in (None, residual):
            outs = []
            for library in (loaded, baseline):
                out = torch.empty_like(x)
                library.rq_last(x.data_ptr(), out.data_ptr(), shape[0] * shape[2] * shape[3],
                                shape[1], m.data_ptr(), 1.25,
                                None if res is None else res.data_ptr(), 0.375, low, high)
                first = torch.empty_like(x)
                library.rq_first(x.data_ptr(), first.data_ptr(), shape[0] * shape[1],
                                 shape[1], shape[2] * shape[3], m.data_ptr(), 1.25,
                                 None if res is None else res.data_ptr(), 0.375, low, high)
                in_place = x.clone()
                library.rq_last(in_place.data_ptr(), in_place.data_ptr(),
                                shape[0] * shape[2] * shape[3], shape[1], m.data_ptr(), 1.0,
                                None if res is None else res.data_ptr(), 0.375, low, high)
                outs.append((out, first, in_place))
            for got, want in zip(*outs):
                assert torch.equal(bits(got), bits(want))
                checked += 1
    assert checked == 18


def assert_same_statistics(got: dict, want: dict) -> None:
    """Every tracked tensor's figures and histogram the same in both statistics."""
    assert set(got) == set(want)
    for key, a in got.items():
        b = want[key]
        assert (a.minimum, a.maximum, a.absmax, a.count, a.zeros, a.batch_absmax) == \
            (b.minimum, b.maximum, b.absmax, b.count, b.zeros, b.batch_absmax), key
        assert (a.hist is None) == (b.hist is None)
        if a.hist is not None:
            assert np.array_equal(a.hist, b.hist), key


def test_statistics_read_once_are_those_of_the_tensor_code(monkeypatch):
    """The statistics pass takes each histogrammed tensor's figures and counts in one read
    (where a batch's values pass the histogram's range too: its counts are taken at the
    grown range from that read); every statistic, the histograms included, is what the
    tensor code (no kernel) gives, over batches whose range grows, shrinks and grows again."""
    from calibrator.quant.counting import Read
    from calibrator.quant.histogram import GrowingHistogram
    from calibrator.quant.statistics import collect
    rng = np.random.default_rng(12)
    batches = [{"data": rng.normal(0, scale, (2, 3, 9, 9)).astype(np.float32)}
               for scale in (1.0, 4.0, 0.25, 20.0, 3.0)]
    tiny = TinyNet(RESIDUAL_NET, seed=7, batches=batches)
    tiny.calibrate()
    grown = []
    real_add = GrowingHistogram.add

    def add(self, *args, **kwargs):
        grown.append(self.counts is not None)
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(GrowingHistogram, "add", add)
    regrown, real_regrown = [], Read.regrown
    monkeypatch.setattr(Read, "regrown", lambda self, doublings: regrown.append(doublings)
                        or real_regrown(self, doublings))
    once = collect(tiny.net, tiny.fused, iter(tiny.batches))
    histograms = sum(stats.hist is not None for stats in once.values())
    assert histograms >= 4
    # the first batch sets each range; none of the rest is counted again
    assert grown.count(False) == histograms and grown.count(True) == 0
    assert len(regrown) >= histograms and max(regrown) >= 2   # (x4, then x5: three doublings)
    monkeypatch.setattr(native, "_library", lambda: None)
    grown.clear()
    without = collect(tiny.net, tiny.fused, iter(tiny.batches))
    assert len(grown) == 5 * histograms     # the tensor code: two reads of every batch
    assert_same_statistics(once, without)


@pytest.mark.parametrize("size", [2047, 3_000_001])
def test_clamp_with_figures_is_torchs_clamp_and_the_figures_before_it(size):
    """The ReLU6 in place, bit for bit as ``clamp_(0, 6)`` (signed zeros, NaNs), with the
    figures of the values before it; None as the extremes where a value is not finite (the
    values are clamped all the same, as torch clamps them)."""
    for bad in (None, float("nan"), float("inf"), float("-inf")):
        x = _awkward(size, size + 2)
        if bad is not None:
            x[size // 3] = bad
        want = x.clone().clamp_(0.0, 6.0)
        before = native.figures(x.clone())
        extremes, zeros = native.clamp_with_figures(x, 0.0, 6.0)
        assert torch.equal(bits(x), bits(want))
        assert zeros == int((want.numel() - torch.count_nonzero(_awkward(size, size + 2))))
        assert (extremes is None) == (bad is not None)
        if bad is None:
            assert (*extremes, zeros) == before


def test_statistics_read_a_relu6_input_while_it_clamps(monkeypatch):
    """A tracked tensor without a histogram that only an in-place ReLU6 reads (c3 here) has
    its figures read while the ReLU6 clamps it: the statistics and every value the net
    computes are those of the tensor code; a NaN there is refused naming c3."""
    from calibrator.errors import LayerError
    from calibrator.quant.statistics import collect, tracked_refs
    from tests.netutil import parse_net, random_weights
    weights = random_weights(parse_net(RESIDUAL_NET), seed=7)
    weights["c3"][0][0] = 0.0          # c3's channel 0 is exactly zero: zeros to count
    weights["c3"][1][0] = 0.0
    tiny = TinyNet(RESIDUAL_NET, seed=7, weights=weights)
    tiny.calibrate()
    refs = tracked_refs(tiny.fused)
    pre = next(r for r in refs if r.name == "c3"
               and tiny.net.nodes[r.producer].name == "c3")
    keys = {r.key for r in refs} - {pre.key}
    calls = []
    real, real_library = native.clamp_with_figures, native._library
    monkeypatch.setattr(native, "clamp_with_figures",
                        lambda *a: calls.append(a[0].numel()) or real(*a))
    seen = {}

    def run():
        values = {}
        stats = collect(tiny.net, tiny.fused, iter(tiny.batches), hist_keys=keys,
                        outputs=["c4"], on_batch=lambda out: values.setdefault(
                            len(values), out["c4"].clone()))
        return stats, values

    seen["kernel"] = run()
    # the first batch (which sets c3's ReLU6 output's histogram range) clamps with the
    # figures; the later ones clamp while counting (the next test)
    assert len(calls) == 1
    monkeypatch.setattr(native, "_library", lambda: None)
    seen["tensors"] = run()
    (stats, values), (other, other_values) = seen["kernel"], seen["tensors"]
    assert stats[pre.key].hist is None and stats[pre.key].minimum < 0
    assert stats[pre.key].zeros >= stats[pre.key].count // 8
    assert_same_statistics(stats, other)
    for i in values:
        assert torch.equal(bits(values[i]), bits(other_values[i]))
    monkeypatch.setattr(native, "_library", real_library)
    post = next(r for r in refs if r.name == "c3" and r.producer > pre.producer)
    for batch, tracked in ((0, [pre]), (len(tiny.batches) - 1, [pre, post])):
        broken = [dict(feeds) for feeds in tiny.batches]    # (the last: clamp and count)
        broken[batch]["data"] = broken[batch]["data"].clone()
        broken[batch]["data"][0, 0, 0, 0] = float("nan")
        calls.clear()
        with pytest.raises(LayerError, match="'c3'"):    # c3's output, before the ReLU6
            collect(tiny.net, tiny.fused, iter(broken), refs=tracked,
                    hist_keys={r.key for r in tracked[1:]})
        assert len(calls) == 1   # the first batch's clamp (the last batch: clamp and count)


def test_statistics_count_a_relu6_output_while_it_clamps(monkeypatch):
    """Where the in-place ReLU6's output is histogrammed (c3's ReLU6 here), every batch
    after the first clamps and counts it in one read (the first, which sets the range, clamps
    with the figures, then counts): the histogram, the figures before and after the clamp
    and the values the net computes are the tensor code's, a batch past the histogram's range
    included (its counts taken at the grown range from the same read)."""
    from calibrator.quant.histogram import GrowingHistogram
    from calibrator.quant.statistics import collect, tracked_refs
    tiny = TinyNet(RESIDUAL_NET, seed=11)
    tiny.calibrate()
    refs = tracked_refs(tiny.fused)
    pre = next(r for r in refs if r.name == "c3" and tiny.net.nodes[r.producer].name == "c3")
    keys = {r.key for r in refs} - {pre.key}     # c3's output read by the ReLU6 alone
    feeds = [dict(f) for f in tiny.batches]
    feeds[0]["data"] = feeds[0]["data"] / 64      # the later batches past its range
    fused, grown = [], []
    real_clamped, real_add = GrowingHistogram.add_clamped, GrowingHistogram.add
    monkeypatch.setattr(GrowingHistogram, "add_clamped",
                        lambda self, *a: fused.append(real_clamped(self, *a)) or fused[-1])
    monkeypatch.setattr(GrowingHistogram, "add",
                        lambda self, *a, **k: grown.append(a[1]) or real_add(self, *a, **k))
    runs = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(native, "_library", lambda: None)
        values = []
        runs.append((collect(tiny.net, tiny.fused, iter(feeds), outputs=["c4"], hist_keys=keys,
                             on_batch=lambda out: values.append(out["c4"].clone())), values))
    assert len([f for f in fused if f is not None]) == len(feeds)
    post = next(r for r in refs if r.name == "c3" and r.producer > pre.producer)
    (stats, values), (other, other_values) = runs
    assert stats[post.key].batch_absmax[0] < stats[post.key].batch_absmax[-1] == 6.0
    assert stats[pre.key].absmax > 6.0 and stats[pre.key].hist is None
    assert_same_statistics(stats, other)
    for a, b in zip(values, other_values, strict=True):
        assert torch.equal(bits(a), bits(b))


def test_a_relu6_reading_a_later_version_takes_no_figures_for_an_earlier_one(monkeypatch):
    """c2 is written twice (c2, then c2b's top of the same name) before the ReLU6 reads it:
    the ReLU6 reads c2b's version only, so c2's figures come from the hook as before."""
    from calibrator.quant.statistics import collect
    text = (input_text((2, 3, 9, 9))
            + conv_text("c1", "data", "c1", 8, kernel=3, extra="pad: 1")
            + conv_text("c2", "c1", "c2", 8, kernel=1)
            + conv_text("c2b", "c1", "c2", 8, kernel=1)
            + 'layer { name: "r2" type: "ReLU6" bottom: "c2" top: "c2" }\n'
            + conv_text("c4", "c2", "c4", 8, kernel=1))
    tiny = TinyNet(text, seed=3)
    tiny.calibrate()
    runs, calls = [], []
    real = native.clamp_with_figures
    monkeypatch.setattr(native, "clamp_with_figures",
                        lambda *a: calls.append(a[0].numel()) or real(*a))
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(native, "_library", lambda: None)
        runs.append(collect(tiny.net, tiny.fused, iter(tiny.batches), hist_keys=set()))
    with_kernel, without = runs
    assert calls == [2 * 8 * 9 * 9] * len(tiny.batches)     # c2b's version, by the ReLU6
    assert set(with_kernel) == set(without)
    for key in with_kernel:
        a, b = with_kernel[key], without[key]
        assert (a.minimum, a.maximum, a.count, a.zeros, a.batch_absmax) == \
            (b.minimum, b.maximum, b.count, b.zeros, b.batch_absmax), key


@pytest.mark.skipif(not native.available(), reason="no C compiler")
@pytest.mark.parametrize("n", [1, 7, 8, 1029])
def test_the_cosine_sums_are_the_float64_sums(n):
    """dot_square and column_dot_square: the float64 sums of y.double()'s products with the
    reference and with itself, within float64 rounding of another summation order; rows (or
    candidates) of equal values give equal sums exactly; other dtypes or shapes: None."""
    rng = np.random.default_rng(n)
    groups, per = 3, 5
    y = torch.from_numpy(rng.normal(0, 50, (groups, per, n)).astype(np.float32))
    y[:, 1] = y[:, 0]                                 # equal rows
    ref = torch.from_numpy(rng.normal(0, 50, (groups, n)))
    dot, square = native.dot_square(y, ref)
    y64 = y.double()
    assert torch.allclose(dot, (y64 * ref[:, None]).sum(2), rtol=1e-13, atol=0)
    assert torch.allclose(square, (y64 * y64).sum(2), rtol=1e-13, atol=0)
    assert torch.equal(dot[:, 0], dot[:, 1]) and torch.equal(square[:, 0], square[:, 1])
    cols = torch.from_numpy(rng.normal(0, 50, (groups, n, per, 4)).astype(np.float32))
    cols[:, :, 2] = cols[:, :, 3]                     # equal candidates
    cref = torch.from_numpy(rng.normal(0, 50, (groups, n, 4)))
    cdot, csquare = native.column_dot_square(cols, cref)
    c64 = cols.double()
    assert torch.allclose(cdot, (c64 * cref[:, :, None]).sum(1), rtol=1e-13, atol=1e-9)
    assert torch.allclose(csquare, (c64 * c64).sum(1), rtol=1e-13, atol=0)
    assert torch.equal(cdot[:, 2], cdot[:, 3]) and torch.equal(csquare[:, 2], csquare[:, 3])
    assert native.dot_square(y.double(), ref) is None
    assert native.dot_square(y, ref.float()) is None
    assert native.dot_square(y.transpose(0, 1), ref) is None
    assert native.column_dot_square(cols, cref[:, :-1]) is None


@pytest.mark.parametrize("bounds, offset", [((0.0, 255.0), 128), ((-128.0, 127.0), 0),
                                            ((0.0, 127.0), 0)])
def test_quantized_rows_are_the_tensor_codes_int8_patches(bounds, offset):
    """quantized_rows: ``(x * s).round_().clamp_(*bounds).sub_(offset).to(int8)`` for each
    scale, the same bytes: ties to even, negative zeros, values past either bound; a tensor
    that is not float32, contiguous, 2-D: None."""
    rng = np.random.default_rng(int(bounds[1]) + offset)
    x = torch.from_numpy(rng.normal(0, 40, (37, 19)).astype(np.float32))
    x[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -0.0, 254.5, -127.5])   # ties at s = 1
    x[1, :2] = torch.tensor([1e9, -1e9])
    scales = torch.tensor([1.0, 0.37, 2.0, 3.3], dtype=torch.float32)
    got = native.quantized_rows(x, scales, bounds, offset)
    want = torch.cat([(x * s).round_().clamp_(*bounds).sub_(offset).to(torch.int8)
                      for s in scales])
    assert torch.equal(got, want)
    assert native.quantized_rows(x.double(), scales, bounds, offset) is None
    assert native.quantized_rows(x.t(), scales, bounds, offset) is None


def test_the_fused_sums_refuse_what_they_do_not_read():
    """depthwise_sums and integer_sums answer None (the tensor code runs) for a tensor of
    another dtype, shape or layout."""
    taps, scales = torch.zeros(3, 9, 16), torch.ones(2)
    weight, terms, ref = torch.zeros(3, 9), torch.ones(3, 2), torch.zeros(3, 16,
                                                                          dtype=torch.float64)
    assert native.depthwise_sums(taps, scales, weight, terms, terms, None, 0.0, (0.0, 255.0),
                                 ref) is not None
    assert native.depthwise_sums(taps, scales, weight, terms, terms, None, 0.0, (0.0, 255.0),
                                 ref.float()) is None
    assert native.depthwise_sums(taps, scales, weight.t(), terms, terms, None, 0.0,
                                 (0.0, 255.0), ref) is None
    acc = torch.zeros(2, 16, 5, dtype=torch.int32)
    bias, ref = torch.ones(2, 5), torch.zeros(16, 5, dtype=torch.float64)
    assert native.integer_sums(acc, None, bias, bias, None, None, ref) is not None
    assert native.integer_sums(acc.float(), None, bias, bias, None, None, ref) is None
    assert native.integer_sums(acc, torch.zeros(4, dtype=torch.int32), bias, bias, None,
                               None, ref) is None
