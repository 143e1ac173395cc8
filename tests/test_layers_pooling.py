"""Pooling: Caffe's ceil output size, the last-window rule and the AVE divisor, by hand and
against OpenCV dnn."""

import numpy as np
import pytest

from calibrator.errors import LayerError
from tests.layer_helpers import compare_with_opencv, make_layer, rand, run, run1

FLT_MAX = np.finfo(np.float32).max


def pooling(pool_param: str, shape, tops: int = 1):
    top_text = " ".join(f'top: "t{i}"' for i in range(tops))
    return make_layer(f'name: "p" type: "Pooling" bottom: "x" {top_text} '
                      f'pooling_param {{ {pool_param} }}', [shape])


@pytest.mark.parametrize("height, kernel, stride, pad, expected", [
    (7, 3, 2, 1, 4),  # ceil(6 / 2) + 1 = 4, last window starts at 5 < 7 + 1
    (6, 3, 2, 1, 4),  # ceil(5 / 2) + 1 = 4 (PyTorch's floor gives 3)
    (5, 2, 2, 1, 3),  # ceil(5 / 2) + 1 = 4, but the 4th window starts at 6 >= 5 + 1: dropped
    (6, 3, 2, 0, 3),  # ceil(3 / 2) + 1 = 3 without padding
    (5, 1, 3, 0, 3),  # no padding, so no rule: the 3rd window starts beyond the input
])
def test_output_size_ceil_and_last_window_rule(height, kernel, stride, pad, expected):
    layer = pooling(f"pool: MAX kernel_size: {kernel} stride: {stride} pad: {pad}",
                    (1, 1, height, height))
    assert run1(layer, rand(1, 1, height, height)).shape == (1, 1, expected, expected)


def test_round_mode_floor():
    layer = pooling("pool: AVE kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR", (1, 1, 6, 6))
    assert run1(layer, rand(1, 1, 6, 6)).shape == (1, 1, 3, 3)
    # floor(5 / 2) + 1 = 3 windows on 8 pixels: the last pixel row and column are unused.
    x = rand(1, 1, 8, 8)
    for method, reduce in (("MAX", np.max), ("AVE", np.mean)):
        layer = pooling(f"pool: {method} kernel_size: 3 stride: 2 round_mode: FLOOR", x.shape)
        expected = [[reduce(x[0, 0, 2 * i:2 * i + 3, 2 * j:2 * j + 3]) for j in range(3)]
                    for i in range(3)]
        np.testing.assert_allclose(run1(layer, x)[0, 0], expected, rtol=1e-6)


def test_ave_divisor_counts_padding_but_not_beyond_it():
    # H = 6, k = 3, s = 2, p = 1: windows start at -1, 1, 3, 5 and are clipped to [-1, 7):
    # divisors 3, 3, 3, 2; the image rows they cover number 2, 3, 3, 1.
    layer = pooling("pool: AVE kernel_size: 3 stride: 2 pad: 1", (1, 1, 6, 6))
    y = run1(layer, np.ones((1, 1, 6, 6), np.float32))[0, 0]
    per_axis = np.array([2 / 3, 3 / 3, 3 / 3, 1 / 2])
    np.testing.assert_allclose(y, np.outer(per_axis, per_axis), rtol=1e-6)
    # H = 7: windows start at -1, 1, 3, 5, all within [-1, 8): divisor 3 everywhere.
    layer = pooling("pool: AVE kernel_size: 3 stride: 2 pad: 1", (1, 1, 7, 7))
    y = run1(layer, np.ones((1, 1, 7, 7), np.float32))[0, 0]
    per_axis = np.array([2 / 3, 1, 1, 2 / 3])
    np.testing.assert_allclose(y, np.outer(per_axis, per_axis), rtol=1e-6)


def test_ave_hand_values_with_rectangular_settings():
    # kernel 2x3, stride 2x2, pad 1x0 on a 3x5 ramp.
    x = np.arange(15, dtype=np.float32).reshape(1, 1, 3, 5)
    layer = pooling("pool: AVE kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 2 pad_h: 1 "
                    "pad_w: 0", x.shape)
    y = run1(layer, x)[0, 0]
    # rows: ceil((3 + 2 - 2) / 2) + 1 = 3; (3 - 1) * 2 = 4 >= 3 + 1, so 2 row windows:
    # [-1, 1) -> row 0 (divisor 2) and [1, 3) -> rows 1, 2 (divisor 2).
    # cols: ceil((5 - 3) / 2) + 1 = 2; the rule also applies (pad_h > 0): (2-1)*2 = 2 < 5.
    expected = np.array([
        [(0 + 1 + 2) / 6, (2 + 3 + 4) / 6],
        [(5 + 6 + 7 + 10 + 11 + 12) / 6, (7 + 8 + 9 + 12 + 13 + 14) / 6],
    ])
    np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_max_ignores_padding_and_empty_windows_give_minus_flt_max():
    x = -np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)  # all negative
    layer = pooling("pool: MAX kernel_size: 2 stride: 2 pad: 1", x.shape)
    np.testing.assert_array_equal(run1(layer, x)[0, 0], [[-1, -2], [-4, -5]])
    layer = pooling("pool: MAX kernel_size: 1 stride: 3", (1, 1, 5, 5))
    y = run1(layer, rand(1, 1, 5, 5))[0, 0]
    assert (y[2, :] == -FLT_MAX).all() and (y[:, 2] == -FLT_MAX).all()


def test_max_second_top_is_the_argmax_mask():
    x = np.array([[1, 5, 2], [7, 3, 3], [0, 9, 4]], np.float32).reshape(1, 1, 3, 3)
    layer = pooling("pool: MAX kernel_size: 2 stride: 2", x.shape, tops=2)
    top, mask = run(layer, x)
    # ceil((3 - 2) / 2) + 1 = 2 windows per axis, the last ones clipped to the image.
    np.testing.assert_array_equal(top[0, 0], [[7, 3], [9, 4]])
    np.testing.assert_array_equal(mask[0, 0], [[3, 5], [7, 8]])


@pytest.mark.parametrize("pool_param, shape", [
    ("pool: MAX kernel_size: 3 stride: 2", (2, 3, 8, 9)),
    ("pool: MAX kernel_size: 3 stride: 2 pad: 1", (2, 3, 7, 6)),
    ("pool: AVE kernel_size: 3 stride: 2 pad: 1", (2, 3, 7, 6)),
    ("pool: AVE kernel_size: 2 stride: 2", (1, 2, 7, 7)),
    ("pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 1", (1, 2, 6, 7)),
    ("pool: AVE global_pooling: true", (2, 4, 5, 3)),
    ("pool: MAX global_pooling: true", (2, 4, 5, 3)),
])
def test_pooling_matches_opencv(pool_param, shape):
    compare_with_opencv(f'type: "Pooling" pooling_param {{ {pool_param} }}', {"x": rand(*shape)})


def test_global_pooling_follows_the_actual_spatial_size():
    layer = pooling("pool: AVE global_pooling: true", (1, 2, 4, 4))
    x = rand(3, 2, 6, 5)
    np.testing.assert_allclose(run1(layer, x), x.mean(axis=(2, 3), keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("pool_param", [
    "pool: STOCHASTIC kernel_size: 2",
    "pool: MAX kernel_size: 2 pad: 2",  # pad must be smaller than the kernel
    "pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2",
    "pool: MAX kernel_h: 2",
    "pool: AVE global_pooling: true kernel_size: 2",
    "pool: AVE global_pooling: true stride: 2",
    "pool: MAX kernel_size: 2 pad: 1 pad_h: 1 pad_w: 1",
])
def test_pooling_rejects_what_caffe_rejects(pool_param):
    with pytest.raises(LayerError):
        pooling(pool_param, (1, 1, 6, 6))


def test_ave_pooling_has_no_mask_top():
    with pytest.raises(LayerError):
        pooling("pool: AVE kernel_size: 2", (1, 1, 4, 4), tops=2)
