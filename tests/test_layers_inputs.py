"""Input declares shapes for the runner; DummyData makes constant tops."""

import numpy as np
import pytest

from calibrator.errors import LayerError
from tests.layer_helpers import make_layer, run


def test_input_declares_one_shape_per_top_or_one_for_all():
    layer = make_layer('name: "in" type: "Input" top: "a" top: "b" '
                       'input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } '
                       'shape { dim: 1 dim: 2 } }', [])
    assert type(layer).is_input
    assert layer.input_shapes() == [(1, 3, 8, 8), (1, 2)]
    shared = make_layer('name: "in" type: "Input" top: "a" top: "b" '
                        'input_param { shape { dim: 2 dim: 5 } }', [])
    assert shared.input_shapes() == [(2, 5), (2, 5)]
    with pytest.raises(LayerError):
        layer()  # the runner feeds Input tops
    with pytest.raises(LayerError):
        make_layer('name: "in" type: "Input" top: "a" top: "b" top: "c" '
                   'input_param { shape { dim: 1 } shape { dim: 2 } }', [])


def test_dummy_data_constant_fillers_and_legacy_dims():
    layer = make_layer('name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { '
                       'shape { dim: 2 dim: 3 } shape { dim: 4 } '
                       'data_filler { type: "constant" value: 1.5 } '
                       'data_filler { value: -2 } }', [])
    assert type(layer).is_input
    a, b = run(layer)
    np.testing.assert_array_equal(a, np.full((2, 3), 1.5))
    np.testing.assert_array_equal(b, np.full((4,), -2))
    legacy = make_layer('name: "d" type: "DummyData" top: "a" dummy_data_param { '
                        'num: 2 channels: 3 height: 4 width: 5 }', [])
    (zeros,) = run(legacy)
    assert zeros.shape == (2, 3, 4, 5) and not zeros.any()
    with pytest.raises(LayerError):
        make_layer('name: "d" type: "DummyData" top: "a" dummy_data_param { shape { dim: 2 } '
                   'data_filler { type: "gaussian" } }', [])
