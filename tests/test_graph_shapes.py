"""Each layer's shape rule (``Layer.top_shapes``) against the layer itself: the shapes its
forward produces on zeros of the bottom shapes, over every branch of the rules (strides,
padding, dilation, ceil and floor pooling, global pooling, masks, axes, slice points), and
on every layer of the shared real and zoo prototxts."""

from __future__ import annotations

import pytest
import torch

from calibrator.caffe.prototxt import read_net
from calibrator.graph.net import CaffeNet, _run_symbolic
from tests.layer_helpers import make_layer

N4 = (2, 6, 11, 9)

CASES = [
    ('type: "ReLU"', [N4]),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', [N4]),
    ('type: "ReLU6"', [N4]),
    ('type: "Sigmoid"', [(3, 5)]),
    ('type: "PReLU"', [N4]),
    ('type: "Power" power_param { power: 2 scale: 3 }', [N4]),
    ('type: "BatchNorm"', [N4]),
    ('type: "Scale" scale_param { bias_term: true }', [N4]),
    ('type: "Scale" scale_param { axis: 0 num_axes: 2 }', [N4]),
    ('type: "Scale"', [N4, (6, 11)]),
    ('type: "Bias"', [N4]),
    ('type: "Eltwise" eltwise_param { operation: SUM coeff: 1 coeff: -1 }', [N4, N4]),
    ('type: "Eltwise" eltwise_param { operation: MAX }', [N4, N4, N4]),
    ('type: "Softmax"', [(2, 10)]),
    ('type: "Softmax" softmax_param { axis: -1 }', [N4]),
    ('type: "LRN" lrn_param { local_size: 3 }', [N4]),
    ('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [N4]),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 }', [N4]),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 }',
     [N4]),
    ('type: "Convolution" convolution_param { num_output: 3 kernel_h: 3 kernel_w: 1 '
     'stride_h: 2 stride_w: 3 pad_h: 2 pad_w: 0 group: 3 }', [N4]),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 dilation: 2 }',
     [N4]),
    ('type: "ConvolutionDepthwise" convolution_param { num_output: 6 kernel_size: 3 '
     'stride: 2 }', [N4]),
    ('type: "Deconvolution" convolution_param { num_output: 5 kernel_size: 4 stride: 2 '
     'pad: 1 }', [N4]),
    ('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 }', [N4]),
    ('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }', [N4]),
    ('type: "Pooling" pooling_param { pool: AVE kernel_size: 2 stride: 3 pad: 1 }', [N4]),
    ('type: "Pooling" pooling_param { pool: AVE global_pooling: true }', [N4]),
    ('type: "Pooling" pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 '
     'stride_w: 1 }', [N4]),
    ('type: "InnerProduct" inner_product_param { num_output: 7 }', [N4]),
    ('type: "InnerProduct" inner_product_param { num_output: 7 axis: 2 }', [N4]),
    ('type: "Concat"', [N4, (2, 3, 11, 9)]),
    ('type: "Concat" concat_param { axis: 0 }', [N4, (1, 6, 11, 9), N4]),
    ('type: "Concat" concat_param { axis: -1 }', [N4, (2, 6, 11, 4)]),
    ('type: "Concat"', [N4]),
    ('type: "Flatten"', [N4]),
    ('type: "Flatten" flatten_param { axis: 2 }', [N4]),
    ('type: "Flatten" flatten_param { axis: 1 end_axis: 2 }', [N4]),
]

MULTI_TOP = [
    ('type: "Split"', [N4], 3),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 }',
     [N4, N4], 2),
    ('type: "Slice" slice_param { axis: 1 slice_point: 1 slice_point: 4 }', [N4], 3),
    ('type: "Slice" slice_param { axis: 2 }', [(2, 6, 12, 9)], 2),
    ('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }', [N4], 2),
    ('type: "Accuracy"', [(4, 10), (4,)], 1),
    ('type: "Accuracy" accuracy_param { top_k: 3 }', [(4, 10), (4,)], 2),
]


def _layer(text: str, bottoms, tops: int = 1):
    bottom_text = "".join(f'bottom: "b{i}" ' for i in range(len(bottoms)))
    top_text = "".join(f'top: "t{i}" ' for i in range(tops))
    layer = make_layer(f'name: "x" {bottom_text}{top_text}{text}', bottoms)
    blobs = [torch.rand(shape).numpy() + 0.5 for shape in layer.blob_shapes()]
    if blobs:
        layer.load_blobs(blobs)
    return layer


def _forward_shapes(layer, bottoms) -> list[tuple]:
    with torch.no_grad():
        tops = layer(*(torch.zeros(shape) for shape in bottoms))
    return [tuple(t.shape) for t in tops]


@pytest.mark.parametrize("text,bottoms,tops",
                         [(t, b, 1) for t, b in CASES] + MULTI_TOP)
def test_rule_gives_the_shapes_forward_produces(text, bottoms, tops):
    layer = _layer(text, bottoms, tops)
    rule = layer.top_shapes()
    assert rule is not None, f"{text}: no rule"
    assert [tuple(s) for s in rule] == _forward_shapes(layer, bottoms)


@pytest.mark.parametrize("path", [
    "models/mobilenet_v2/deploy.prototxt",
    "models/res10_ssd/deploy.prototxt",
    "models/zoo/squeezenet_v1.0/deploy.prototxt",
    "models/zoo/squeezenet_v1.1/deploy.prototxt",
    "models/zoo/shicai_mobilenet_v1/mobilenet_deploy.prototxt",
    "models/zoo/shicai_mobilenet_v2/mobilenet_v2_deploy.prototxt",
    "models/zoo/chuanqi305_mobilenet_ssd/deploy.prototxt",
])
def test_rules_agree_with_the_layers_on_real_nets(shared, path):
    """Every layer of a real net that states a rule: the rule's shapes are those of the
    layer run on meta tensors (the graph's route for layers without a rule)."""
    net = CaffeNet(read_net(shared / path), {}, require_weights=False)
    ruled = 0
    for node in net.nodes:
        rule = node.module.top_shapes()
        if rule is None:
            continue
        symbolic = _run_symbolic(node)
        assert symbolic is not None, node.name
        assert [tuple(s) for s in rule] == [tuple(t.shape) for t in symbolic], node.name
        ruled += 1
    assert ruled >= 0.7 * len(net.nodes), (ruled, len(net.nodes))
