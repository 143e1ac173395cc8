"""BatchNorm's moving-average factor, and Scale/Bias shape rules (axis, num_axes, second
bottom), by hand and against OpenCV dnn."""

import numpy as np
import pytest

from calibrator.errors import LayerError
from tests.layer_helpers import compare_with_opencv, make_layer, rand, run1


def test_batch_norm_divides_stored_sums_by_the_factor():
    factor = 999.982
    mean = np.array([1.0, -2.0], np.float32) * factor
    variance = np.array([4.0, 0.25], np.float32) * factor
    layer = make_layer('name: "bn" type: "BatchNorm" bottom: "x" top: "y" '
                       'batch_norm_param { eps: 0.001 }', [(1, 2, 1, 2)],
                       [mean, variance, [factor]])
    x = np.array([[3.0, 1.0], [0.0, -2.5]], np.float32).reshape(1, 2, 1, 2)
    expected = np.array([[(3 - 1) / np.sqrt(4.001), (1 - 1) / np.sqrt(4.001)],
                         [(0 + 2) / np.sqrt(0.251), (-2.5 + 2) / np.sqrt(0.251)]])
    np.testing.assert_allclose(run1(layer, x).reshape(2, 2), expected, rtol=1e-5, atol=1e-6)


def test_batch_norm_zero_factor_means_zero_statistics():
    layer = make_layer('name: "bn" type: "BatchNorm" bottom: "x" top: "y"', [(2, 3)],
                       [np.ones(3), np.ones(3), [0.0]])
    x = rand(2, 3)
    np.testing.assert_allclose(run1(layer, x), x / np.sqrt(1e-5), rtol=1e-5)


def test_batch_norm_intel_fused_relu():
    layer = make_layer('name: "bn" type: "BatchNorm" bottom: "x" top: "y" '
                       'batch_norm_param { relu: true eps: 0 }', [(1, 1, 3)],
                       [np.zeros(1), np.ones(1), [1.0]])
    np.testing.assert_array_equal(run1(layer, np.array([[[-1, 0, 2]]])).ravel(), [0, 0, 2])


def test_batch_norm_matches_opencv():
    mean, variance = rand(3, seed=1), rand(3, seed=2, low=0.5, high=2)
    compare_with_opencv('type: "BatchNorm" batch_norm_param { eps: 0.0001 }',
                        {"x": rand(2, 3, 4, 5)}, [mean * 7, variance * 7, np.array([7.0])])


def test_batch_norm_without_global_stats_uses_the_batch():
    layer = make_layer('name: "bn" type: "BatchNorm" bottom: "x" top: "y" '
                       'batch_norm_param { use_global_stats: false }', [(2, 2, 1, 2)],
                       [np.zeros(2), np.ones(2), [1.0]])
    x = np.array([1, 3, 5, 7, 10, 10, 10, 10], np.float32).reshape(2, 2, 1, 2).transpose(1, 0, 2, 3)
    x = np.ascontiguousarray(x)  # channel 0 holds 1, 3, 5, 7; channel 1 is constant
    y = run1(layer, x)
    channel0 = (np.array([1, 3, 5, 7]) - 4) / np.sqrt(5 + 1e-5)
    np.testing.assert_allclose(y[:, 0].ravel(), channel0, rtol=1e-5)
    np.testing.assert_allclose(y[:, 1], 0, atol=1e-6)


def test_scale_per_channel_with_bias_matches_opencv():
    compare_with_opencv('type: "Scale" scale_param { bias_term: true }', {"x": rand(2, 3, 4, 5)},
                        [rand(3, seed=1), rand(3, seed=2)])


def test_scale_axis_and_num_axes():
    x = rand(2, 3, 4, 5)
    two_axes = make_layer('name: "s" type: "Scale" bottom: "x" top: "y" '
                          'scale_param { axis: 1 num_axes: 2 }', [x.shape])
    assert two_axes.blob_shapes() == [(3, 4)]
    gamma = rand(3, 4, seed=3)
    two_axes.load_blobs([gamma])
    np.testing.assert_allclose(run1(two_axes, x), x * gamma[:, :, None], rtol=1e-6)

    to_the_end = make_layer('name: "s" type: "Scale" bottom: "x" top: "y" '
                            'scale_param { axis: -2 num_axes: -1 bias_term: true }', [x.shape])
    assert to_the_end.blob_shapes() == [(4, 5), (4, 5)]
    gamma, beta = rand(4, 5, seed=4), rand(4, 5, seed=5)
    to_the_end.load_blobs([gamma, beta])
    np.testing.assert_allclose(run1(to_the_end, x), x * gamma + beta, rtol=1e-6, atol=1e-7)

    scalar = make_layer('name: "s" type: "Scale" bottom: "x" top: "y" '
                        'scale_param { num_axes: 0 }', [x.shape], [np.array(2.5)])
    assert scalar.blob_shapes() == [()]
    np.testing.assert_allclose(run1(scalar, x), 2.5 * x, rtol=1e-6)


def test_scale_from_second_bottom_learns_only_the_bias():
    x, gamma = rand(2, 3, 4, 5), rand(2, 3, seed=6)
    layer = make_layer('name: "s" type: "Scale" bottom: "x" bottom: "g" top: "y" '
                       'scale_param { axis: 0 bias_term: true }', [x.shape, gamma.shape])
    assert layer.blob_shapes() == [(2, 3)]
    beta = rand(2, 3, seed=7)
    layer.load_blobs([beta])
    expected = x * gamma[:, :, None, None] + beta[:, :, None, None]
    np.testing.assert_allclose(run1(layer, x, gamma), expected, rtol=1e-6, atol=1e-7)


def test_bias_learned_and_from_second_bottom():
    x = rand(2, 3, 4)
    learned = make_layer('name: "b" type: "Bias" bottom: "x" top: "y" '
                         'bias_param { axis: 2 }', [x.shape], [rand(4, seed=8)])
    np.testing.assert_allclose(run1(learned, x), x + rand(4, seed=8), rtol=1e-6)
    second = make_layer('name: "b" type: "Bias" bottom: "x" bottom: "c" top: "y"',
                        [x.shape, (3, 4)])
    assert second.blob_shapes() == []
    other = rand(3, 4, seed=9)
    np.testing.assert_allclose(run1(second, x, other), x + other, rtol=1e-6)


@pytest.mark.parametrize("text, shapes", [
    ('type: "Scale" bottom: "x" scale_param { axis: 2 num_axes: 3 }', [(2, 3, 4, 5)]),
    ('type: "Scale" bottom: "x" scale_param { axis: 4 }', [(2, 3, 4, 5)]),
    ('type: "Scale" bottom: "x" bottom: "g" ', [(2, 3, 4, 5), (4,)]),
    ('type: "Bias" bottom: "x" bias_param { num_axes: -2 }', [(2, 3, 4, 5)]),
])
def test_scale_and_bias_reject_mismatched_shapes(text, shapes):
    with pytest.raises(LayerError):
        make_layer(f'name: "s" top: "y" {text}', shapes)
