"""Eltwise SUM with coefficients, PROD and MAX."""

import numpy as np
import pytest

from calibrator.errors import LayerError
from tests.layer_helpers import compare_with_opencv, make_layer, rand, run1

A = np.array([1.0, -2.0, 3.0, 0.5], np.float32).reshape(1, 4, 1, 1)
B = np.array([2.0, 2.0, -1.0, 0.5], np.float32).reshape(1, 4, 1, 1)
C = np.array([0.0, 5.0, 1.0, -4.0], np.float32).reshape(1, 4, 1, 1)


def eltwise(param: str, count: int = 3):
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(count))
    return make_layer(f'name: "e" type: "Eltwise" {bottoms} top: "y" eltwise_param {{ {param} }}',
                      [A.shape] * count)


@pytest.mark.parametrize("param, expected", [
    ("operation: SUM", [3, 5, 3, -3]),
    ("operation: SUM coeff: 1 coeff: -1 coeff: 0.5", [-1, -1.5, 4.5, -2]),
    ("operation: PROD", [0, -20, -3, -1]),
    ("operation: MAX", [2, 5, 3, 0.5]),
])
def test_eltwise_hand_values(param, expected):
    np.testing.assert_allclose(run1(eltwise(param), A, B, C).ravel(), expected, rtol=1e-6)


def test_eltwise_sum_with_coefficients_matches_opencv():
    compare_with_opencv('type: "Eltwise" eltwise_param { operation: SUM coeff: 0.5 coeff: -2 }',
                        {"a": rand(2, 3, 4, 5, seed=1), "b": rand(2, 3, 4, 5, seed=2)})


@pytest.mark.parametrize("param, count", [
    ("operation: SUM coeff: 1 coeff: 2", 3),  # one coefficient per bottom
    ("operation: PROD coeff: 1 coeff: 2", 2),  # only SUM takes coefficients
    ("operation: SUM", 1),  # at least two bottoms
])
def test_eltwise_rejects_what_caffe_rejects(param, count):
    with pytest.raises(LayerError):
        eltwise(param, count)
