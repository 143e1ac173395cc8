"""Convolution, Deconvolution and InnerProduct against OpenCV dnn and hand computations."""

import numpy as np
import pytest

from calibrator.errors import LayerError
from tests.layer_helpers import compare_with_opencv, make_layer, rand, run, run1


@pytest.mark.parametrize("conv_param, in_channels, out_channels, group", [
    ("num_output: 4 kernel_size: 3", 3, 4, 1),
    ("num_output: 6 kernel_size: 3 pad: 2 dilation: 2 group: 2", 4, 6, 2),
    ("num_output: 4 kernel_size: 3 kernel_size: 2 stride: 2 stride: 1 pad: 1 pad: 0", 3, 4, 1),
    ("num_output: 4 kernel_h: 1 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 0 pad_w: 1", 2, 4, 1),
    ("num_output: 8 kernel_size: 3 pad: 1 stride: 2 group: 4 bias_term: false", 8, 8, 4),
])
def test_convolution_matches_opencv(conv_param, in_channels, out_channels, group):
    layer_text = f'type: "Convolution" convolution_param {{ {conv_param} }}'
    probe = make_layer(f'name: "c" bottom: "x" top: "y" {layer_text}', [(2, in_channels, 9, 8)])
    shapes = probe.blob_shapes()
    assert shapes[0][:2] == (out_channels, in_channels // group)
    blobs = [rand(*s, seed=i + 1) for i, s in enumerate(shapes)]
    compare_with_opencv(layer_text, {"x": rand(2, in_channels, 9, 8)}, blobs)


def test_convolution_output_size_and_hand_value():
    # 1x1 input channel, 2x2 kernel of ones, stride 2, pad 1 on a 3x3 ramp.
    layer = make_layer('name: "c" type: "Convolution" bottom: "x" top: "y" '
                       'convolution_param { num_output: 1 kernel_size: 2 stride: 2 pad: 1 }',
                       [(1, 1, 3, 3)], [np.ones((1, 1, 2, 2)), np.array([0.5])])
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    y = run1(layer, x)
    # (3 + 2 - 2) // 2 + 1 = 2 per axis; windows start at -1 and 1.
    expected = np.array([[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]], np.float32) + 0.5
    np.testing.assert_array_equal(y[0, 0], expected)


def test_depthwise_aliases_use_one_group_per_channel():
    for type_name in ("ConvolutionDepthwise", "DepthwiseConvolution"):
        layer_text = (f'type: "{type_name}" convolution_param {{ num_output: 3 kernel_size: 3 '
                      f'pad: 1 }}')
        layer = make_layer(f'name: "d" bottom: "x" top: "y" {layer_text}', [(1, 3, 5, 5)])
        assert layer.blob_shapes() == [(3, 1, 3, 3), (3,)]
    weight, bias = rand(3, 1, 3, 3, seed=1), rand(3, seed=2)
    x = rand(1, 3, 5, 5)
    depthwise = make_layer('name: "d" type: "ConvolutionDepthwise" bottom: "x" top: "y" '
                           'convolution_param { num_output: 3 kernel_size: 3 pad: 1 }',
                           [x.shape], [weight, bias])
    grouped = compare_with_opencv('type: "Convolution" convolution_param { num_output: 3 '
                                  'kernel_size: 3 pad: 1 group: 3 }', {"x": x}, [weight, bias])
    np.testing.assert_allclose(run1(depthwise, x), grouped, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("conv_param, in_channels, group", [
    ("num_output: 3 kernel_size: 4 stride: 2 pad: 1", 2, 1),
    ("num_output: 4 kernel_size: 3 stride: 2 group: 2 bias_term: false", 4, 2),
    ("num_output: 2 kernel_size: 5 stride: 3 pad: 2", 3, 1),
])
def test_deconvolution_matches_opencv(conv_param, in_channels, group):
    layer_text = f'type: "Deconvolution" convolution_param {{ {conv_param} }}'
    probe = make_layer(f'name: "d" bottom: "x" top: "y" {layer_text}', [(2, in_channels, 5, 6)])
    shapes = probe.blob_shapes()
    assert shapes[0][0] == in_channels  # (C_in, O / group, kh, kw)
    blobs = [rand(*s, seed=i + 3) for i, s in enumerate(shapes)]
    compare_with_opencv(layer_text, {"x": rand(2, in_channels, 5, 6)}, blobs)


def test_deconvolution_output_size():
    layer = make_layer('name: "d" type: "Deconvolution" bottom: "x" top: "y" '
                       'convolution_param { num_output: 1 kernel_size: 4 stride: 2 pad: 1 }',
                       [(1, 1, 5, 7)], [np.ones((1, 1, 4, 4)), np.zeros(1)])
    # (H - 1) * s - 2p + k
    assert run1(layer, np.ones((1, 1, 5, 7))).shape == (1, 1, 10, 14)


def test_dilated_deconvolution_is_the_adjoint_of_convolution():
    # OpenCV ignores dilation in deconvolution, so check <conv(x), y> == <x, deconv(y)>:
    # a Caffe deconvolution is the transpose of the convolution with the same weight blob.
    params = "kernel_size: 3 stride: 2 pad: 2 dilation: 2 group: 2 bias_term: false"
    weight = rand(4, 3, 3, 3, seed=7)  # conv: (O=4, C/g=3); deconv: (C_in=4, O/g=3)
    conv = make_layer(f'name: "c" type: "Convolution" bottom: "x" top: "y" '
                      f'convolution_param {{ num_output: 4 {params} }}', [(1, 6, 11, 9)], [weight])
    x = rand(1, 6, 11, 9, seed=8)
    conv_x = run1(conv, x)
    deconv = make_layer(f'name: "d" type: "Deconvolution" bottom: "y" top: "x" '
                        f'convolution_param {{ num_output: 6 {params} }}', [conv_x.shape], [weight])
    y = rand(*conv_x.shape, seed=9)
    deconv_y = run1(deconv, y)
    assert deconv_y.shape == x.shape  # (H-1)*s - 2p + d*(k-1) + 1 recovers 11 x 9
    np.testing.assert_allclose(np.vdot(conv_x, y), np.vdot(x, deconv_y), rtol=1e-5)


def test_convolution_runs_each_bottom_with_shared_weights():
    layer = make_layer('name: "c" type: "Convolution" bottom: "a" bottom: "b" top: "p" top: "q" '
                       'convolution_param { num_output: 1 kernel_size: 1 }',
                       [(1, 1, 2, 2), (1, 1, 2, 2)], [np.full((1, 1, 1, 1), 2.0), np.ones(1)])
    p, q = run(layer, np.ones((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))
    assert (p == 3).all() and (q == 1).all()


def test_intel_fused_relu_flag():
    layer = make_layer('name: "c" type: "Convolution" bottom: "x" top: "y" '
                       'convolution_param { num_output: 1 kernel_size: 1 relu: true } '
                       'relu_param { negative_slope: 0.5 }', [(1, 1, 1, 3)],
                       [np.ones((1, 1, 1, 1)), np.zeros(1)])
    np.testing.assert_array_equal(run1(layer, np.array([[[[-2, 0, 3]]]])).ravel(), [-1, 0, 3])


@pytest.mark.parametrize("conv_param", [
    "num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3",  # both spellings
    "num_output: 2",  # no kernel
    "num_output: 2 kernel_h: 3",  # kernel_w missing
    "num_output: 3 kernel_size: 1 group: 2",  # group does not divide
    "num_output: 2 kernel_size: 1 kernel_size: 1 kernel_size: 1",  # three spatial values
])
def test_convolution_rejects_what_caffe_rejects(conv_param):
    with pytest.raises(LayerError):
        make_layer(f'name: "c" type: "Convolution" bottom: "x" top: "y" '
                   f'convolution_param {{ {conv_param} }}', [(1, 4, 5, 5)])


def test_inner_product_matches_matmul_and_opencv():
    x = rand(3, 2, 3, 4)
    weight, bias = rand(5, 24, seed=1), rand(5, seed=2)
    layer = make_layer('name: "fc" type: "InnerProduct" bottom: "x" top: "y" '
                       'inner_product_param { num_output: 5 }', [x.shape], [weight, bias])
    np.testing.assert_allclose(run1(layer, x), x.reshape(3, 24) @ weight.T + bias,
                               rtol=1e-5, atol=1e-5)
    compare_with_opencv('type: "InnerProduct" inner_product_param { num_output: 5 }',
                        {"x": x}, [weight, bias])


def test_inner_product_transpose_and_axis():
    x = rand(2, 3, 4, seed=5)
    weight_kn = rand(4, 6, seed=6)  # transpose: stored (K, N)
    layer = make_layer('name: "fc" type: "InnerProduct" bottom: "x" top: "y" '
                       'inner_product_param { num_output: 6 axis: 2 transpose: true '
                       'bias_term: false }', [x.shape], [weight_kn])
    assert layer.blob_shapes() == [(4, 6)]
    y = run1(layer, x)
    assert y.shape == (2, 3, 6)
    np.testing.assert_allclose(y, x @ weight_kn, rtol=1e-5, atol=1e-5)
