"""ncnn's scalar rounding rules (calibrator.ncnn.arith) against exact rational arithmetic
and the C expressions they stand for."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch

from calibrator.ncnn.arith import float2int8, fma_f32, parse_param_float, param_float


def nearest_f32(value: Fraction) -> np.float32:
    guess = np.float32(float(value))
    candidates = [guess, np.nextafter(guess, np.float32(-np.inf)),
                  np.nextafter(guess, np.float32(np.inf))]
    best = min(abs(Fraction(float(c)) - value) for c in candidates)
    ties = [c for c in candidates if abs(Fraction(float(c)) - value) == best]
    return min(ties, key=lambda c: int(np.float32(c).view(np.int32)) & 1)


def test_fma_rounds_once_also_where_double_rounding_would_not():
    rng = np.random.default_rng(0)
    a = rng.integers(-2 ** 20, 2 ** 20, 3000).astype(np.float32)
    b = rng.uniform(1e-5, 1e-2, 3000).astype(np.float32)
    c = rng.normal(0, 1, 3000).astype(np.float32)
    # and sums that float64 rounds exactly halfway between two float32: 3y (26 bits) on a
    # float32 midpoint plus +-2^-60, far below float64's precision at 3y
    y = rng.uniform(1, 2, 3000).astype(np.float32)
    p = 3.0 * y.astype(np.float64)
    y = y[(p.view(np.int64) & ((1 << 29) - 1)) == (1 << 28)]
    x = np.full_like(y, 3.0)
    z = (rng.choice([-1.0, 1.0], len(y)) * 2.0 ** -60).astype(np.float32)
    assert len(y) > 300
    for a_, b_, c_ in ((a, b, c), (x, y, z)):
        got = fma_f32(torch.from_numpy(a_), torch.from_numpy(b_), torch.from_numpy(c_)).numpy()
        want = np.array([nearest_f32(Fraction(float(i)) * Fraction(float(j)) + Fraction(float(k)))
                         for i, j, k in zip(a_, b_, c_)], np.float32)
        assert np.array_equal(got, want)
    # the halfway cases are real: plain float64-then-float32 gets some of them wrong
    naive = (x.astype(np.float64) * y + z).astype(np.float32)
    assert not np.array_equal(naive, fma_f32(torch.from_numpy(x), torch.from_numpy(y),
                                             torch.from_numpy(z)).numpy())


def test_float2int8_is_the_simd_half_trick():
    below_half = np.nextafter(np.float32(0.5), np.float32(0))  # 0.5 - 2^-25
    v = torch.tensor([0.5, -0.5, 1.5, -2.5, 126.5, 127.6, -127.6, -300.0, 2.4999998,
                      float(below_half), -float(below_half)])
    # C round() (half away from zero), saturated to [-127, 127] -- except 0.5 - 2^-25, whose
    # float32 sum with 0.5 rounds up to 1.0 before the truncation
    assert float2int8(v).tolist() == [1, -1, 2, -3, 127, 127, -127, -127, 2, 1, -1]


def test_param_floats_read_back_as_ncnn_parses_them():
    assert parse_param_float("6.000000e+00") == np.float32(6)
    assert parse_param_float("-3.402823e+38") == np.float32(-3.402823e38)
    assert parse_param_float("1.000000e-01") == np.float32(0.1)
    assert param_float(0.123456789) == np.float32(0.1234568)  # %e: 7 significant digits
