"""Softmax, LRN (both regions, against OpenCV dnn), MVN and ArgMax (ties, layouts)."""

import numpy as np
import pytest

from calibrator.errors import LayerError
from tests.layer_helpers import compare_with_opencv, make_layer, rand, run1


def test_softmax_axis():
    x = rand(2, 3, 4)
    for axis in (1, 2, -1):
        softmax = make_layer(f'name: "s" type: "Softmax" bottom: "x" top: "y" '
                             f'softmax_param {{ axis: {axis} }}', [x.shape])
        e = np.exp(x.astype(np.float64))
        np.testing.assert_allclose(run1(softmax, x), e / e.sum(axis=axis, keepdims=True), rtol=1e-6)
    compare_with_opencv('type: "Softmax"', {"x": rand(2, 5, 3, 3)})


@pytest.mark.parametrize("lrn_param", [
    "local_size: 5 alpha: 0.0001 beta: 0.75",
    "local_size: 3 alpha: 2 beta: 0.5",  # OpenCV reads no k (always 1): see the hand test
    "local_size: 3 alpha: 1.5 beta: 0.75 norm_region: WITHIN_CHANNEL",
    "local_size: 5 alpha: 3 beta: 0.6 norm_region: WITHIN_CHANNEL",
])
def test_lrn_matches_opencv(lrn_param):
    compare_with_opencv(f'type: "LRN" lrn_param {{ {lrn_param} }}',
                        {"x": rand(2, 7, 6, 5, low=-2, high=2)})


def test_lrn_across_channels_by_hand():
    x = np.array([1.0, 2.0, 3.0], np.float32).reshape(1, 3, 1, 1)
    lrn = make_layer('name: "n" type: "LRN" bottom: "x" top: "y" '
                     'lrn_param { local_size: 3 alpha: 3 beta: 1 k: 1 }', [x.shape])
    # windows of squares, zero padded: {0, 1, 4}, {1, 4, 9}, {4, 9, 0}; alpha / n = 1
    expected = [1 / (1 + 5), 2 / (1 + 14), 3 / (1 + 13)]
    np.testing.assert_allclose(run1(lrn, x).ravel(), expected, rtol=1e-6)
    lrn = make_layer('name: "n" type: "LRN" bottom: "x" top: "y" '
                     'lrn_param { local_size: 3 alpha: 3 beta: 0.5 k: 2 }', [x.shape])
    expected = [1 / np.sqrt(2 + 5), 2 / np.sqrt(2 + 14), 3 / np.sqrt(2 + 13)]
    np.testing.assert_allclose(run1(lrn, x).ravel(), expected, rtol=1e-6)
    with pytest.raises(LayerError):
        make_layer('name: "n" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 4 }',
                   [x.shape])


def test_mvn_against_numpy():
    x = rand(2, 3, 4, 5).astype(np.float64)
    for param, axes in (("", (2, 3)), ("across_channels: true", (1, 2, 3))):
        mvn = make_layer(f'name: "m" type: "MVN" bottom: "x" top: "y" mvn_param {{ {param} }}',
                         [x.shape])
        centred = x - x.mean(axis=axes, keepdims=True)
        expected = centred / (np.sqrt((centred ** 2).mean(axis=axes, keepdims=True)) + 1e-9)
        np.testing.assert_allclose(run1(mvn, x), expected, rtol=1e-5, atol=1e-6)


def argmax(param: str, shape):
    return make_layer(f'name: "a" type: "ArgMax" bottom: "x" top: "y" argmax_param {{ {param} }}',
                      [shape])


def test_argmax_without_axis_flattens_each_sample_and_prefers_later_ties():
    x = np.array([[3, 1, 3, 2], [0, 5, 4, 5]], np.float32).reshape(2, 2, 2)
    y = run1(argmax("", x.shape), x)
    assert y.shape == (2, 1, 1)
    np.testing.assert_array_equal(y.ravel(), [2, 3])  # ties go to the higher index
    y = run1(argmax("top_k: 3 out_max_val: true", x.shape), x)
    assert y.shape == (2, 2, 3)
    np.testing.assert_array_equal(y[0], [[2, 0, 3], [3, 3, 2]])
    np.testing.assert_array_equal(y[1], [[3, 1, 2], [5, 5, 4]])
    assert run1(argmax("", (2, 5)), rand(2, 5)).shape == (2, 1, 1)
    assert run1(argmax("top_k: 2", (2, 3, 2, 2)), rand(2, 3, 2, 2)).shape == (2, 1, 2, 1)


def test_argmax_along_an_axis():
    x = np.array([[1, 9, 4], [7, 9, 2]], np.float32).reshape(1, 2, 3)
    y = run1(argmax("axis: 1", x.shape), x)
    np.testing.assert_array_equal(y, [[[1, 1, 0]]])  # column 1 ties: the later row wins
    y = run1(argmax("axis: 2 top_k: 2 out_max_val: true", x.shape), x)
    np.testing.assert_array_equal(y, [[[9, 4], [9, 7]]])
    with pytest.raises(LayerError):
        argmax("axis: 1 top_k: 3", x.shape)
