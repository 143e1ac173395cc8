"""Layers that move data: shapes and element placement checked by hand."""

import numpy as np
import pytest

from calibrator.errors import LayerError
from tests.layer_helpers import compare_with_opencv, make_layer, rand, run, run1


def ramp(*shape):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def layer(text: str, shapes):
    return make_layer(f'name: "l" {text}', shapes)


def test_concat_axis_and_legacy_concat_dim():
    a, b = ramp(2, 3, 2), ramp(2, 1, 2) + 100
    for param in ("concat_param { axis: 1 }", "concat_param { concat_dim: 1 }",
                  "concat_param { axis: -2 }"):
        concat = layer(f'type: "Concat" bottom: "a" bottom: "b" top: "y" {param}',
                       [a.shape, b.shape])
        np.testing.assert_array_equal(run1(concat, a, b), np.concatenate([a, b], axis=1))
    with pytest.raises(LayerError):
        layer('type: "Concat" bottom: "a" bottom: "b" top: "y"', [(2, 3, 2), (2, 3, 3)])


def test_slice_points_and_equal_split():
    x = ramp(2, 6, 2)
    sliced = layer('type: "Slice" bottom: "x" top: "a" top: "b" top: "c" '
                   'slice_param { axis: 1 slice_point: 1 slice_point: 4 }', [x.shape])
    a, b, c = run(sliced, x)
    np.testing.assert_array_equal(a, x[:, :1])
    np.testing.assert_array_equal(b, x[:, 1:4])
    np.testing.assert_array_equal(c, x[:, 4:])
    equal = layer('type: "Slice" bottom: "x" top: "a" top: "b" slice_param { slice_dim: 2 }',
                  [x.shape])
    a, b = run(equal, x)
    np.testing.assert_array_equal(a, x[:, :, :1])
    np.testing.assert_array_equal(b, x[:, :, 1:])
    for bad in ("slice_point: 2", "slice_point: 4 slice_point: 2", "slice_point: 0 slice_point: 3"):
        with pytest.raises(LayerError):
            layer(f'type: "Slice" bottom: "x" top: "a" top: "b" top: "c" slice_param {{ {bad} }}',
                  [x.shape])
    with pytest.raises(LayerError):  # 6 does not split into 4 equal parts
        layer('type: "Slice" bottom: "x" top: "a" top: "b" top: "c" top: "d"', [x.shape])


def test_split_shares_the_bottom():
    import torch

    split = layer('type: "Split" bottom: "x" top: "a" top: "b" top: "c"', [(1, 2)])
    x = torch.ones(1, 2)
    tops = split(x)
    assert len(tops) == 3 and all(t is x for t in tops)


def test_flatten():
    x = ramp(2, 3, 4, 5)
    assert run1(layer('type: "Flatten" bottom: "x" top: "y"', [x.shape]), x).shape == (2, 60)
    middle = layer('type: "Flatten" bottom: "x" top: "y" flatten_param { axis: 1 end_axis: 2 }',
                   [x.shape])
    np.testing.assert_array_equal(run1(middle, x), x.reshape(2, 12, 5))


@pytest.mark.parametrize("param, expected", [
    ("shape { dim: 0 dim: -1 }", (2, 60)),
    ("shape { dim: 0 dim: 3 dim: -1 dim: 5 }", (2, 3, 4, 5)),
    ("shape { dim: -1 dim: 6 dim: 0 }", (5, 6, 4)),  # the 0 copies axis 2
    ("shape { dim: 2 dim: 2 } axis: 2 num_axes: 1", (2, 3, 2, 2, 5)),
    ("shape { dim: -1 } axis: 1", (2, 60)),
    ("shape { dim: 1 } axis: 0 num_axes: 0", (1, 2, 3, 4, 5)),
    ("shape { dim: 1 } axis: -1 num_axes: 0", (2, 3, 4, 5, 1)),
])
def test_reshape_copy_and_infer(param, expected):
    x = ramp(2, 3, 4, 5)
    reshape = layer(f'type: "Reshape" bottom: "x" top: "y" reshape_param {{ {param} }}', [x.shape])
    np.testing.assert_array_equal(run1(reshape, x), x.reshape(expected))


def test_reshape_follows_the_batch_size():
    reshape = layer('type: "Reshape" bottom: "x" top: "y" '
                    'reshape_param { shape { dim: 0 dim: -1 } }', [(1, 3, 2)])
    assert run1(reshape, ramp(4, 3, 2)).shape == (4, 6)


@pytest.mark.parametrize("param", [
    "shape { dim: -1 dim: -1 }",
    "shape { dim: 7 dim: -1 }",  # 120 is not divisible by 7
    "shape { dim: 0 dim: 0 dim: 0 dim: 0 dim: 0 }",  # no axis 4 to copy
    "shape { dim: 3 dim: 3 }",
])
def test_reshape_rejects_impossible_shapes(param):
    with pytest.raises(LayerError):
        layer(f'type: "Reshape" bottom: "x" top: "y" reshape_param {{ {param} }}', [(2, 3, 4, 5)])


def test_permute_pads_the_order_with_the_remaining_axes():
    x = ramp(2, 3, 4, 5)
    permute = layer('type: "Permute" bottom: "x" top: "y" permute_param { order: 0 order: 2 }',
                    [x.shape])
    assert permute.order == (0, 2, 1, 3)
    np.testing.assert_array_equal(run1(permute, x), x.transpose(0, 2, 1, 3))
    ssd = layer('type: "Permute" bottom: "x" top: "y" permute_param { order: 0 order: 2 order: 3 '
                'order: 1 }', [x.shape])
    np.testing.assert_array_equal(run1(ssd, x), x.transpose(0, 2, 3, 1))
    with pytest.raises(LayerError):
        layer('type: "Permute" bottom: "x" top: "y" permute_param { order: 0 order: 0 }', [x.shape])


def test_permute_matches_opencv():
    compare_with_opencv('type: "Permute" permute_param { order: 0 order: 2 order: 3 order: 1 }',
                        {"x": rand(2, 3, 4, 5)})


def test_crop_single_and_per_axis_offsets():
    x, reference = ramp(2, 3, 6, 7), np.zeros((1, 1, 3, 4), np.float32)
    crop = layer('type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { offset: 2 }',
                 [x.shape, reference.shape])
    np.testing.assert_array_equal(run1(crop, x, reference), x[:, :, 2:5, 2:6])
    per_axis = layer('type: "Crop" bottom: "x" bottom: "r" top: "y" '
                     'crop_param { axis: 1 offset: 1 offset: 3 offset: 0 }',
                     [x.shape, reference.shape])
    np.testing.assert_array_equal(run1(per_axis, x, reference), x[:, 1:2, 3:6, 0:4])
    with pytest.raises(LayerError):  # offset 4 + size 4 > 7
        layer('type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { offset: 4 }',
              [x.shape, reference.shape])
    with pytest.raises(LayerError):  # two offsets for three axes
        layer('type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { axis: 1 offset: 1 '
              'offset: 1 }', [x.shape, reference.shape])


def test_shuffle_channel():
    x = ramp(1, 6, 1, 1)
    shuffle = layer('type: "ShuffleChannel" bottom: "x" top: "y" '
                    'shuffle_channel_param { group: 2 }', [x.shape])
    np.testing.assert_array_equal(run1(shuffle, x).ravel(), [0, 3, 1, 4, 2, 5])


def test_tile_repeats_the_whole_block():
    x = ramp(2, 2, 3)
    tile = layer('type: "Tile" bottom: "x" top: "y" tile_param { axis: 1 tiles: 2 }', [x.shape])
    np.testing.assert_array_equal(run1(tile, x), np.concatenate([x, x], axis=1))


def test_dropout_is_identity_and_silence_has_no_tops():
    x = rand(2, 3)
    dropout = layer('type: "Dropout" bottom: "x" top: "y" dropout_param { dropout_ratio: 0.3 }',
                    [x.shape])
    np.testing.assert_array_equal(run1(dropout, x), x)
    silence = layer('type: "Silence" bottom: "x" bottom: "z"', [x.shape, x.shape])
    assert run(silence, x, x) == ()
