"""KL (entropy) calibration and the other range estimators against known answers and a
direct per-candidate implementation written here from the description in kl.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from calibrator.quant import estimators, native
from calibrator.quant import kl as kl_module
from calibrator.quant.estimators import TensorStats, threshold
from calibrator.quant.kl import (NUM_BINS, abs_histogram, clip_with_tail, kl_divergences,
                                 kl_threshold, merge_and_expand)
from calibrator.quant.scales import kept_fp32, weight_scales
from tests.quant_helpers import TinyNet, conv_text, input_text, relu_text

N = 1_000_000


def kl_ratio(x: np.ndarray, levels: int = 128) -> float:
    """T / absmax by KL for samples x (zeros skipped by the histogram)."""
    t = torch.from_numpy(np.asarray(x, np.float32))
    absmax = float(t.abs().max())
    return kl_threshold(abs_histogram(t, absmax), absmax, levels) / absmax


def ideal_sample(name: str, n: int = N) -> np.ndarray:
    """n quantiles (k + 0.5) / n of a distribution: a "perfect" sample whose histogram has no
    sampling noise. With random samples T / absmax swings with the sample maximum (for a
    Laplacian from 0.66 to 0.89 over a few seeds), so the known answers use these."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if name == "gaussian":
        x = torch.special.ndtri(u)
    elif name == "laplacian":
        x = -torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())
    elif name == "uniform":
        x = 2 * u - 1
    else:
        raise ValueError(name)
    return x.numpy().astype(np.float32)


@pytest.fixture(scope="module")
def gaussian():
    return ideal_sample("gaussian")


@pytest.fixture(scope="module")
def gaussian_ratio(gaussian):
    return kl_ratio(gaussian)


# -- the two distributions of one candidate, by hand --------------------------------------

def test_merge_and_expand_known_answer():
    p = torch.tensor([1, 0, 2, 3, 5, 3, 1, 7], dtype=torch.float64)
    q = merge_and_expand(p, torch.tensor([8]), 2)
    # level 0 = bins 0..3: mass 6 over the 3 non-zero bins; level 1 = bins 4..7: 16 over 4
    assert q.tolist() == [[2, 0, 2, 2, 4, 4, 4, 4]]


def test_merge_and_expand_fractional_edges_by_hand():
    # 5 bins into 2 levels: level 0 = [0, 2.5), level 1 = [2.5, 5); bin 2 is split in half.
    hist = torch.tensor([2, 0, 4, 6, 8], dtype=torch.float64)
    q = merge_and_expand(hist, torch.tensor([5]), 2)[0]
    # level 0: mass 2 + 0 + 2 = 4 over support 1 + 0 + 0.5 = 1.5; level 1: 2 + 6 + 8 = 16
    # over 0.5 + 1 + 1 = 2.5. Bin 2 gets half of each density.
    d0, d1 = 4 / 1.5, 16 / 2.5
    np.testing.assert_allclose(q.numpy(), [d0, 0, 0.5 * d0 + 0.5 * d1, d1, d1], rtol=1e-12)
    assert float(q.sum()) == pytest.approx(float(hist.sum()))  # the mass is kept


def test_clip_with_tail_puts_the_tail_into_the_last_kept_bin():
    hist = torch.tensor([1, 2, 3, 4, 5, 6], dtype=torch.float64)
    p = clip_with_tail(hist, torch.tensor([3, 4, 6]))
    assert p.tolist() == [[1, 2, 3 + 4 + 5 + 6, 0, 0, 0],
                          [1, 2, 3, 4 + 5 + 6, 0, 0],
                          [1, 2, 3, 4, 5, 6]]


# -- a direct implementation, one candidate at a time --------------------------------------

def reference_kl(hist: np.ndarray, i: int, levels: int, eps: float = 1e-4) -> float:
    """KL(P || Q) for candidate i, written from the description: P = first i bins with the
    tail added to bin i-1; Q = those i bins merged into `levels` levels of width i/levels
    (a bin cut by a level edge contributes pro rata), each level's mass spread evenly over
    its non-zero bins (pro rata again); both smoothed (zeros get eps, taken evenly from the
    non-zero entries) then normalised."""
    hist = [float(h) for h in hist]
    p = hist[:i]
    p[i - 1] += sum(hist[i:])
    q = [0.0] * i
    for j in range(levels):
        # level j spans bins [j * i / levels, (j + 1) * i / levels): in units of 1/levels
        start, end = j * i, (j + 1) * i
        overlap = {}
        for k in range(start // levels, -(-end // levels)):
            part = min((k + 1) * levels, end) - max(k * levels, start)
            if part > 0:
                overlap[k] = part / levels
        mass = sum(hist[k] * w for k, w in overlap.items())
        support = sum(w for k, w in overlap.items() if hist[k] != 0)
        if support == 0:
            continue
        for k, w in overlap.items():
            if hist[k] != 0:
                q[k] += w * mass / support

    def smoothed(d):
        zeros = sum(1 for v in d if v == 0)
        nonzeros = len(d) - zeros
        take = eps * zeros / nonzeros
        d = [eps if v == 0 else v - take for v in d]
        total = sum(d)
        return [v / total for v in d]

    p, q = smoothed(p), smoothed(q)
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


@pytest.mark.parametrize("bins, levels, seed", [(64, 8, 0), (64, 5, 1), (48, 7, 2),
                                                 (48, 40, 3)])
def test_kl_matches_the_direct_implementation_on_small_histograms(bins, levels, seed):
    rng = np.random.default_rng(seed)
    hist = rng.integers(0, 50, bins).astype(np.float64)
    hist[rng.random(bins) < 0.3] = 0          # empty bins exercise the non-zero support
    hist[0] = 3
    candidates, divergence = kl_divergences(torch.from_numpy(hist), levels)
    assert candidates.tolist() == list(range(levels, bins))
    expected = [reference_kl(hist, i, levels) for i in range(levels, bins)]
    # (rtol: the code's smoothing eps is float32(1e-4), 2.5e-8 off 1e-4)
    np.testing.assert_allclose(divergence.numpy(), expected, rtol=1e-7, atol=1e-12)
    best = levels + int(np.argmin(expected))  # the first minimum wins
    absmax = 3.0
    assert kl_threshold(torch.from_numpy(hist), absmax, levels) == pytest.approx(
        (best + 0.5) * absmax / bins, rel=1e-12)


def test_kl_matches_the_direct_implementation_at_2048_bins(gaussian):
    t = torch.from_numpy(gaussian)
    absmax = float(t.abs().max())
    hist = abs_histogram(t, absmax)
    candidates, divergence = kl_divergences(hist, 128)
    chosen = int(candidates[int(torch.argmin(divergence))])
    # multiples of 128 and fractional level edges (i not a multiple of 128), the winner
    picks = sorted({128, 129, 333, 1000, 1337, 2047, chosen})
    expected = [reference_kl(hist.numpy(), i, 128) for i in picks]
    got = divergence[[i - 128 for i in picks]].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-7)
    assert min(expected) == pytest.approx(float(divergence[chosen - 128]), rel=1e-7)


def _plain_divergences(hist: torch.Tensor, levels: int, chunk: int = 64) -> torch.Tensor:
    """The vectorised formulation as first written (bool masks multiplied in, index
    arithmetic per call), kept to hold the faster one to the same float64 values."""
    hist = hist.to(torch.float64)
    out = []
    for part in torch.arange(levels, hist.numel()).split(chunk):
        width = int(part[-1])
        i = part.unsqueeze(1)
        k = torch.arange(width)
        valid = k.unsqueeze(0) < i
        p = hist[:width].unsqueeze(0) * valid
        suffix = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])
        p.scatter_add_(1, i - 1, torch.cat([suffix, suffix.new_zeros(1)])[part].unsqueeze(1))
        level = torch.div(k.unsqueeze(0) * levels, i, rounding_mode="floor")
        edge = (level + 1).to(torch.float64) * i.to(torch.float64) / levels
        w_first = (edge - k.unsqueeze(0).to(torch.float64)).clamp(max=1.0)
        w_next = 1.0 - w_first
        counts = hist[:width].unsqueeze(0) * valid
        nonzero = ((hist[:width] != 0).unsqueeze(0) & valid).to(torch.float64)
        first, nxt = level.clamp(max=levels), (level + 1).clamp(max=levels)
        mass = torch.zeros(len(part), levels + 1, dtype=torch.float64)
        mass.scatter_add_(1, first, counts * w_first)
        mass.scatter_add_(1, nxt, counts * w_next)
        support = torch.zeros_like(mass)
        support.scatter_add_(1, first, nonzero * w_first)
        support.scatter_add_(1, nxt, nonzero * w_next)
        per_bin = torch.where(support > 0, mass / support.clamp(min=1e-300),
                              torch.zeros_like(mass))
        q = (w_first * per_bin.gather(1, first) + w_next * per_bin.gather(1, nxt)) * nonzero

        def smoothed(d):
            zeros, nonzeros = (d == 0) & valid, (d != 0) & valid
            n_zero = zeros.sum(1, keepdim=True).to(d.dtype)
            n_nonzero = nonzeros.sum(1, keepdim=True).to(d.dtype).clamp(min=1)
            d = d + 1e-4 * zeros - (1e-4 * n_zero / n_nonzero) * nonzeros
            return d / d.sum(1, keepdim=True).clamp(min=1e-300)

        p, q = smoothed(p), smoothed(q)
        usable = valid & (p > 0)
        ratio = torch.where(usable & (q > 0), p / q.clamp(min=1e-300), torch.ones_like(p))
        out.append(torch.where(usable, p * torch.log(ratio), torch.zeros_like(p)).sum(1))
    return torch.cat(out)


@pytest.mark.parametrize("levels", [128, 64])
def test_kl_divergences_equal_the_plain_formulation_bit_for_bit(gaussian, levels):
    """The thresholds of earlier versions, exactly: the shared layouts and the masks
    selected rather than multiplied in change no float64 value (so no argmin), on one
    thread or two."""
    rng = np.random.default_rng(7)
    heavy = np.abs(rng.standard_t(2, 200_000)).astype(np.float32)
    hists = [abs_histogram(torch.from_numpy(gaussian), float(np.abs(gaussian).max())),
             abs_histogram(torch.from_numpy(heavy), float(heavy.max()))]
    sparse = rng.integers(0, 1000, NUM_BINS)
    sparse[rng.random(NUM_BINS) < 0.6] = 0    # empty bins: zero supports, smoothing
    hists.append(torch.from_numpy(sparse))
    threads = torch.get_num_threads()
    try:
        for count in sorted({1, min(2, threads)}):
            torch.set_num_threads(count)
            for hist in hists:
                _, divergence = kl_divergences(hist, levels)
                assert torch.equal(divergence, _plain_divergences(hist, levels))
    finally:
        torch.set_num_threads(threads)


# -- known answers on large samples --------------------------------------------------------

def test_gaussian_threshold(gaussian_ratio):
    assert 0.85 <= gaussian_ratio <= 1.0
    # a random sample (fixed seed) of the same size lands in the same band
    random = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    assert 0.85 <= kl_ratio(random) <= 1.0


def test_laplacian_threshold():
    assert 0.65 <= kl_ratio(ideal_sample("laplacian")) <= 0.82


def test_uniform_threshold_is_the_maximum():
    assert kl_ratio(ideal_sample("uniform")) >= 0.999


def test_relu_gaussian_zeros_are_skipped(gaussian, gaussian_ratio):
    relu = torch.from_numpy(np.maximum(gaussian, 0))
    absmax = float(relu.max())
    hist = abs_histogram(relu, absmax)
    # zeros never enter the histogram: the positive half alone gives the same counts, and
    # more zeros change nothing
    positive = torch.from_numpy(gaussian[gaussian > 0])
    assert torch.equal(hist, abs_histogram(positive, absmax))
    assert torch.equal(hist, abs_histogram(torch.cat([relu, torch.zeros(N)]), absmax))
    assert int(hist.sum()) == N // 2
    # the positive half has the shape of |x| of the whole Gaussian: the same T / absmax
    ratio = kl_threshold(hist, absmax) / absmax
    assert abs(ratio - gaussian_ratio) <= 0.03
    assert 0.85 <= ratio <= 1.0


def test_int7_threshold_is_not_larger_than_int8(gaussian, gaussian_ratio):
    stats = stats_of(gaussian)
    int7 = threshold(stats, "KL", 7)      # --bits 7: 64 levels
    assert int7 <= gaussian_ratio * stats.absmax
    assert int7 != gaussian_ratio * stats.absmax    # the bits reached the KL


def test_abs_histogram_counts_by_hand():
    width = 4.0 / NUM_BINS
    values = np.array([0, 0, 0, 0.5 * width, -0.5 * width, 10.5 * width, -4.0, 4.0,
                       2047.5 * width], np.float32)
    hist = abs_histogram(torch.from_numpy(values), 4.0).numpy()
    expected = np.zeros(NUM_BINS, np.int64)
    expected[0] = 2          # +-half a bin; the three exact zeros are skipped
    expected[10] = 1
    expected[NUM_BINS - 1] = 3  # |x| == absmax lands in the last bin
    np.testing.assert_array_equal(hist, expected)


# -- an all-zero tensor ----------------------------------------------------------------------

def test_all_zero_tensor_gives_zero_threshold():
    zeros = torch.zeros(1000)
    assert kl_threshold(abs_histogram(zeros, 0.0), 0.0) == 0.0
    stats = TensorStats(absmax=0.0, minimum=0.0, maximum=0.0, count=1000, zeros=1000,
                        batch_absmax=[0.0], hist=np.zeros(NUM_BINS, np.int64))
    for name in ("KL", "DIRECT", "MAXP", "MA", "MSE", "PERCENTILE99.9"):
        assert threshold(stats, name) == 0.0


def test_all_zero_tensor_gives_finite_scales_and_simulation():
    text = (input_text((1, 3, 6, 6))
            + conv_text("conv1", "data", "c1", 4, 3) + relu_text("relu1", "c1")
            + conv_text("conv2", "c1", "c2", 4, 1) + relu_text("relu2", "c2")
            + conv_text("conv3", "c2", "c3", 4, 3) + relu_text("relu3", "c3")
            + conv_text("conv4", "c3", "c4", 2, 1))
    net = TinyNet(text, seed=3)
    net.weights["conv2"] = [np.zeros_like(b) for b in net.weights["conv2"]]
    net = TinyNet(text, weights=net.weights)
    # (threshold() answers 0 for a zero tensor before any estimator runs: KL is covered by
    # test_all_zero_tensor_gives_zero_threshold, the cheap ones keep this test fast)
    for algo in ("DIRECT", "MAXP", "MSE"):
        plan = net.calibrate(estimator=algo)
        # conv2 has nothing to quantize: it stays FP32 (and the CLI says so); its all-zero
        # output is conv3's input
        assert "conv2" not in plan.layers and "conv2" in kept_fp32(net.fused)
        conv3 = plan.layers["conv3"]
        assert conv3.input_threshold == 0.0 and conv3.scale_in == 1.0
        assert weight_scales(torch.zeros(4, 4, 1, 1), True) == [0.0] * 4  # zero: scale 0
        for lq in plan.layers.values():
            values = [lq.scale_in, lq.scale_out, *lq.scale_params]
            assert all(math.isfinite(v) for v in values), (algo, lq)
        from calibrator.quant.simulate import Int8Simulator
        out = net.net(net.batches[0], overrides=Int8Simulator(net.fused, plan).overrides)
        assert all(torch.isfinite(v).all() for v in out.values())


# -- the other estimators --------------------------------------------------------------------

def stats_of(x: np.ndarray, batches: int = 1) -> TensorStats:
    """TensorStats of samples x, as the collector would fill them."""
    x = np.asarray(x, np.float32)
    absmax = float(np.abs(x).max())
    parts = np.array_split(x, batches)
    return TensorStats(absmax=absmax, minimum=float(x.min()), maximum=float(x.max()),
                       count=x.size, zeros=int((x == 0).sum()),
                       batch_absmax=[float(np.abs(p).max()) for p in parts],
                       hist=abs_histogram(torch.from_numpy(x), absmax).numpy())


def test_direct_is_the_absolute_maximum(gaussian):
    stats = stats_of(gaussian)
    assert threshold(stats, "DIRECT") == float(np.abs(gaussian).max())


@pytest.mark.parametrize("p", [50.0, 99.0, 99.99])
def test_percentile_within_a_bin_width(p):
    rng = np.random.default_rng(7)
    x = np.maximum(rng.standard_normal(N), 0).astype(np.float32)  # half the values are 0
    stats = stats_of(x)
    width = stats.absmax / NUM_BINS
    expected = np.percentile(np.abs(x).astype(np.float64), p)  # zeros included
    assert abs(threshold(stats, f"PERCENTILE{p:g}") - expected) <= width


def test_maxp_is_the_99_995th_percentile():
    x = np.random.default_rng(8).laplace(size=N).astype(np.float32)
    stats = stats_of(x)
    expected = np.percentile(np.abs(x).astype(np.float64), 99.995)
    assert abs(threshold(stats, "MAXP") - expected) <= stats.absmax / NUM_BINS
    assert threshold(stats, "MAXP") < 0.9 * stats.absmax


def test_mse_clips_outliers_of_a_gaussian():
    rng = np.random.default_rng(9)
    x = np.concatenate([rng.standard_normal(200_000), [40.0, -45.0, 50.0]]).astype(np.float32)
    stats = stats_of(x)
    t = threshold(stats, "MSE")
    assert t < 0.8 * stats.absmax

    def quantization_mse(t):  # empirical, symmetric s8: what the estimator minimises
        q = np.clip(np.rint(x.astype(np.float64) * 127 / t), -127, 127) * t / 127
        return float(np.mean((q - x) ** 2))

    grid = np.linspace(1, 50, 197)
    best = min(quantization_mse(g) for g in grid)
    assert quantization_mse(t) <= 1.05 * best
    assert quantization_mse(t) < 0.7 * quantization_mse(stats.absmax)


def test_moving_average_of_batch_maxima_by_hand():
    stats = TensorStats(absmax=8.0, minimum=-8.0, maximum=3.0, batch_absmax=[4.0, 2.0, 8.0],
                        hist=np.ones(NUM_BINS, np.int64))
    # v = 4; v = 0.5*4 + 0.5*2 = 3; v = 0.5*3 + 0.5*8 = 5.5
    assert threshold(stats, "MA") == 5.5


def test_moving_average_through_statistics_collection():
    text = (input_text((1, 2, 3, 3)) + conv_text("conv1", "data", "c1", 2, 1)
            + conv_text("conv2", "c1", "c2", 2, 1))
    batches = []
    for peak in (4.0, -2.0, 8.0):
        x = np.full((1, 2, 3, 3), 0.5, np.float32)
        x[0, 1, 2, 0] = peak
        batches.append({"data": x})
    net = TinyNet(text, batches=batches)
    net.calibrate(estimator="MA")
    stats = net.stats[net.fused.by_name["conv1"].input.key]
    assert stats.batch_absmax == [4.0, 2.0, 8.0]
    assert (stats.absmax, stats.minimum, stats.maximum) == (8.0, -2.0, 8.0)
    assert threshold(stats, "MA") == 5.5


def test_unknown_estimator_is_refused():
    from calibrator.errors import CalibratorError

    for bad in ("KLD", "PERCENTILE101", "PERCENTILEx"):
        with pytest.raises(CalibratorError):
            estimators.parse_estimator(bad)
    assert estimators.parse_estimator("percentile99.9") == "PERCENTILE99.9"


def test_build_plan_uses_the_named_estimator():
    text = (input_text((2, 3, 5, 5)) + conv_text("conv1", "data", "c1", 4, 3)
            + conv_text("conv2", "c1", "c2", 4, 3) + relu_text("relu2", "c2")
            + conv_text("conv3", "c2", "c3", 2, 1))
    net = TinyNet(text, seed=4)
    plan = net.calibrate(estimator="DIRECT")
    # conv2 reads conv1's FP32 output (signed): 127 / max|x|
    expected = 127 / net.absmax_after("conv1")
    assert plan.layers["conv2"].scale_in == pytest.approx(expected, rel=1e-6)


# -- one pass: the growing histogram against the two-pass method ---------------------------

def _two_pass_stats(batches) -> TensorStats:
    """The two-pass method, written here: max|x| over every batch first, then the
    2048-bin histogram of |x| over [0, max|x|]."""
    absmax = max(float(b.abs().max()) for b in batches)
    hist = sum(abs_histogram(b, absmax) for b in batches)
    return TensorStats(absmax=absmax, zeros=sum(int((b == 0).sum()) for b in batches),
                       count=sum(b.numel() for b in batches), hist=hist.numpy())


def _one_pass_stats(batches) -> TensorStats:
    from calibrator.quant.histogram import GrowingHistogram

    grow = GrowingHistogram()
    for b in batches:
        grow.add(b, float(b.abs().max()))
    absmax = max(float(b.abs().max()) for b in batches)
    return TensorStats(absmax=absmax, zeros=sum(int((b == 0).sum()) for b in batches),
                       count=sum(b.numel() for b in batches), hist=grow.rebin(absmax))


def _batches(kind: str, seed: int):
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        parts = [rng.normal(0, 1, 200_000) for _ in range(4)]
    elif kind == "laplacian":
        parts = [rng.laplace(0, 1, 200_000) for _ in range(4)]
    elif kind == "relu":
        parts = [np.maximum(rng.normal(0.2, 1, 200_000), 0) for _ in range(4)]
    elif kind == "growing":      # each batch's maximum far above the previous ones
        parts = [rng.normal(0, s, 100_000) for s in (0.1, 0.5, 3.0, 7.0)]
    else:                        # a few outliers arrive late
        parts = [rng.normal(0, 1, 200_000) for _ in range(3)] + [
            np.concatenate([rng.normal(0, 1, 200_000), [40.0, -55.0]])]
    return [torch.from_numpy(p.astype(np.float32)) for p in parts]


@pytest.mark.parametrize("kind", ["gaussian", "laplacian", "relu", "growing", "outliers"])
@pytest.mark.parametrize("estimator", ["KL", "MAXP", "MSE", "PERCENTILE99.9"])
def test_one_pass_thresholds_within_one_bin_of_the_two_pass_method(kind, estimator):
    batches = _batches(kind, seed=len(kind))
    two, one = _two_pass_stats(batches), _one_pass_stats(batches)
    assert one.absmax == two.absmax
    assert one.hist.sum() == pytest.approx(two.hist.sum())
    bin_width = two.absmax / NUM_BINS
    assert abs(threshold(one, estimator) - threshold(two, estimator)) <= bin_width * (1 + 1e-6)


def test_growing_histogram_doubles_its_range_exactly():
    from calibrator.quant.histogram import GrowingHistogram

    grow = GrowingHistogram(bins=8)
    grow.add(torch.tensor([0.5, 0.9, 1.0]), 1.0)          # bins of 0.125 over [0, 1]
    assert grow.counts.tolist() == [0, 0, 0, 0, 1, 0, 0, 2]
    grow.add(torch.tensor([3.0, 0.1]), 3.0)               # [0, 4]: bins of 0.5, merged pairs
    assert grow.range == 4.0
    assert grow.counts.tolist() == [1, 3, 0, 0, 0, 0, 1, 0]


def test_statistics_of_a_channels_last_blob_equal_those_of_its_nchw_copy():
    """The net hands its 4-D CPU blobs over in NHWC memory: the histogram and the figures
    read them in memory order (no copy) and count exactly what the NCHW tensor holds."""
    from calibrator.graph.net import in_memory_order
    from calibrator.quant.statistics import batch_figures

    x = torch.randn(3, 5, 7, 11)
    x[0, 1] = 0.0                                   # some exact zeros
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert in_memory_order(nhwc).data_ptr() == nhwc.data_ptr()          # a view, not a copy
    absmax = float(x.abs().max())
    assert torch.equal(abs_histogram(nhwc, absmax, 64), abs_histogram(x, absmax, 64))
    assert batch_figures(nhwc) == batch_figures(x)
    sliced = x[:, 1:4]                               # not dense: read through a copy
    assert torch.equal(abs_histogram(sliced, absmax, 64),
                       abs_histogram(sliced.contiguous(), absmax, 64))


def test_the_net_runs_its_convolutions_on_channels_last_blobs():
    net = TinyNet(input_text((2, 3, 9, 9)) + conv_text("c1", "data", "a", 8, 3, "pad: 1")
                  + relu_text("r1", "a"), seed=4)
    out = net.net(net.batches[0], outputs=["a"])["a"]
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not net.batches[0]["data"].is_contiguous(memory_format=torch.channels_last)
    w, b = (torch.from_numpy(v) for v in net.weights["c1"])
    expected = torch.relu(torch.nn.functional.conv2d(net.batches[0]["data"], w, b, padding=1))
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


# -- the kernel's filter ---------------------------------------------------------------------

def _kl_histograms(gaussian):
    rng = np.random.default_rng(11)
    heavy = np.abs(rng.standard_t(2, 200_000)).astype(np.float32)
    sparse = rng.integers(0, 1000, NUM_BINS)
    sparse[rng.random(NUM_BINS) < 0.6] = 0
    flat = np.full(NUM_BINS, 7)                   # every candidate alike: ties everywhere
    spike = np.zeros(NUM_BINS, np.int64)
    spike[[3, 900, 2047]] = [5000, 2, 1]
    return [abs_histogram(torch.from_numpy(gaussian), float(np.abs(gaussian).max())),
            abs_histogram(torch.from_numpy(heavy), float(heavy.max())),
            torch.from_numpy(sparse), torch.from_numpy(flat), torch.from_numpy(spike),
            torch.from_numpy(sparse * 1e200)]    # counts far beyond any tensor's


@pytest.mark.skipif(not native.available(), reason="no C compiler: no kernel to filter with")
@pytest.mark.parametrize("levels", [128, 64])
def test_kernel_filter_gives_the_tensor_codes_candidate(gaussian, levels, monkeypatch):
    """The kernel scores every candidate within the filter's margin of the tensor code (a
    thousand times tighter than the margin), and the filtered search picks the tensor code's
    own first minimal candidate, ties included; with the kernel's scores pushed to the edge
    of the margin (adversarial rounding), still the same candidate."""
    for hist in _kl_histograms(gaussian):
        candidates, divergence = kl_divergences(hist, levels)
        want = int(candidates[int(torch.argmin(divergence))])
        fast, size = native.kl_divergences(hist, levels, kl_module.SMOOTH_EPS,
                                           float(np.float32(kl_module.SMOOTH_EPS)))
        assert torch.all((fast - divergence).abs() <= 1e-3 * kl_module._FILTER_MARGIN * (1 + size))
        assert kl_module._best_candidate(hist, levels) == want
        real = native.kl_divergences
        wobble = torch.from_numpy(np.random.default_rng(levels).uniform(-0.9, 0.9, len(fast)))
        monkeypatch.setattr(native, "kl_divergences", lambda *a: (
            real(*a)[0] + wobble * kl_module._FILTER_MARGIN * (1 + real(*a)[1]), real(*a)[1]))
        assert kl_module._best_candidate(hist, levels) == want
        monkeypatch.setattr(native, "kl_divergences", real)


@pytest.mark.skipif(not native.available(), reason="no C compiler: no kernel to filter with")
def test_a_lone_candidate_within_the_margin_is_the_answer_unscored(gaussian, monkeypatch):
    """Where the kernel leaves one candidate within the margin of its minimum (each of
    these histograms), it is the tensor code's answer and the tensor code scores nothing;
    where a second candidate is within it (here the kernel's scores given a tie far from
    the answer), the tensor code decides, and gives its own answer."""
    hists = _kl_histograms(gaussian)
    wants = [int(c[int(torch.argmin(d))]) for c, d in (kl_divergences(h, 128) for h in hists)]
    real, scored = kl_module._chunk_divergences, []

    def counted(*args):
        scored.append(1)
        return real(*args)

    monkeypatch.setattr(kl_module, "_chunk_divergences", counted)
    assert [kl_module._best_candidate(h, 128) for h in hists] == wants
    assert scored == []
    kernel = native.kl_divergences

    def tied(*args):
        divergence, size = kernel(*args)
        far = (int(torch.argmin(divergence)) + 1000) % len(divergence)
        divergence[far] = divergence.min()
        return divergence, size

    monkeypatch.setattr(native, "kl_divergences", tied)
    assert [kl_module._best_candidate(h, 128) for h in hists] == wants
    assert len(scored) >= 2 * len(hists)   # (the two chunks holding the two candidates)


def test_without_the_kernel_the_tensor_code_decides(gaussian, monkeypatch):
    monkeypatch.setattr(native, "kl_divergences", lambda *a: None)
    hist = _kl_histograms(gaussian)[1]
    candidates, divergence = kl_divergences(hist, 128)
    assert kl_module._best_candidate(hist, 128) == int(candidates[int(torch.argmin(divergence))])
