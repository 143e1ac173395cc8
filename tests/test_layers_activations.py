"""Element-wise activations against hand-written formulas and OpenCV dnn."""

import numpy as np
import pytest

from calibrator.errors import LayerError
from tests.layer_helpers import compare_with_opencv, make_layer, rand, run1

X = np.array([[-3.0, -1.0, -0.25, 0.0], [0.5, 1.0, 2.0, 7.0]], np.float32).reshape(1, 2, 2, 2)


def activation(type_and_param: str, shape=X.shape, blobs=None):
    return make_layer(f'name: "a" bottom: "x" top: "y" type: {type_and_param}', [shape], blobs)


@pytest.mark.parametrize("layer_text, formula", [
    ('"ReLU"', lambda x: np.maximum(x, 0)),
    ('"ReLU" relu_param { negative_slope: 0.1 }', lambda x: np.where(x > 0, x, 0.1 * x)),
    ('"ReLU6"', lambda x: np.clip(x, 0, 6)),
    ('"Clip" clip_param { min: -0.5 max: 1.5 }', lambda x: np.clip(x, -0.5, 1.5)),
    ('"Sigmoid"', lambda x: 1 / (1 + np.exp(-x))),
    ('"TanH"', np.tanh),
    ('"AbsVal"', np.abs),
    ('"ELU" elu_param { alpha: 0.5 }', lambda x: np.where(x > 0, x, 0.5 * (np.exp(x) - 1))),
    ('"BNLL"', lambda x: np.log1p(np.exp(x))),
    ('"Threshold" threshold_param { threshold: 0.5 }', lambda x: (x > 0.5).astype(np.float32)),
    ('"Power" power_param { power: 2 scale: 0.5 shift: 1 }', lambda x: (1 + 0.5 * x) ** 2),
    ('"Power" power_param { power: 0 scale: 3 }', lambda x: np.ones_like(x)),
    ('"Power" power_param { power: 3 scale: 0 shift: 2 }', lambda x: np.full_like(x, 8)),
    ('"Exp"', np.exp),
    ('"Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', lambda x: 2.0 ** (1 + 0.5 * x)),
    ('"Log" log_param { base: 10 scale: 2 shift: 7 }', lambda x: np.log10(7 + 2 * x)),
    ('"Log" log_param { shift: 4 }', lambda x: np.log(4 + x)),
])
def test_activation_formula(layer_text, formula):
    expected = formula(X.astype(np.float64))
    np.testing.assert_allclose(run1(activation(layer_text), X), expected, rtol=1e-6, atol=1e-7)


def test_prelu_per_channel_and_shared():
    slopes = np.array([0.1, 0.2], np.float32)
    layer = activation('"PReLU"', blobs=[slopes])
    assert layer.blob_shapes() == [(2,)]
    expected = np.where(X > 0, X, X * slopes.reshape(1, 2, 1, 1))
    np.testing.assert_allclose(run1(layer, X), expected, rtol=1e-6)
    shared = activation('"PReLU" prelu_param { channel_shared: true }', blobs=[[0.3]])
    assert shared.blob_shapes() == [(1,)]
    np.testing.assert_allclose(run1(shared, X), np.where(X > 0, X, 0.3 * X), rtol=1e-6)


def test_prelu_and_leaky_relu_match_opencv():
    x = rand(2, 3, 4, 5)
    compare_with_opencv('type: "PReLU"', {"x": x}, [np.array([0.1, -0.2, 0.5], np.float32)])
    compare_with_opencv('type: "ReLU" relu_param { negative_slope: 0.2 }', {"x": x})
    compare_with_opencv('type: "Power" power_param { power: 2 scale: 0.5 shift: 0.1 }', {"x": x})


def test_activations_reject_bad_parameters():
    with pytest.raises(LayerError):
        activation('"Exp" exp_param { base: -2 }')
    with pytest.raises(LayerError):
        activation('"Log" log_param { base: 0 }')
    with pytest.raises(LayerError):
        activation('"Clip" clip_param { min: 0 }')
