"""The tools/ncnnoptimize.cpp passes that apply to a converted Caffe net, in ``main``'s
order, with ncnn's float32 arithmetic for the folds.

Like ncnn, a pass looks for the first later layer whose only bottom is this layer's top
(caffe2ncnn's Split layers make that the blob's only reader) and marks the absorbed layer
fused; the survivor takes over the absorbed layer's top name.
"""

from __future__ import annotations

import numpy as np

from calibrator.ncnn.arith import param_float
from calibrator.ncnn.model import NcnnGraph, NcnnLayer

F32 = np.float32


def _reader(graph: NcnnGraph, i: int, types: tuple[str, ...]) -> NcnnLayer | None:
    """``for (j = i + 1; ...) if (type in types && bottoms.size() == 1 && bottoms[0] ==
    top) break;`` of every ncnnoptimize fuse pass."""
    layers = graph.layers
    top = layers[i].tops[0]
    for layer in layers[i + 1:]:
        if layer.fused or layer.type not in types:
            continue
        if len(layer.bottoms) == 1 and layer.bottoms[0] == top:
            return layer
    return None


def _absorb(survivor: NcnnLayer, absorbed: NcnnLayer) -> None:
    survivor.tops[0] = absorbed.tops[0]
    survivor.nodes.extend(absorbed.nodes)
    absorbed.fused = True


def fuse_batchnorm_scale(graph: NcnnGraph) -> None:
    """NetOptimize::fuse_batchnorm_scale: slope *= s; bias = bias * s + b (float32)."""
    for i, layer in enumerate(graph.layers):
        if layer.fused or layer.type != "BatchNorm":
            continue
        scale = _reader(graph, i, ("Scale",))
        if scale is None or scale.params.get(0) == -233:
            continue
        slope, mean, var, bias = layer.arrays
        s = scale.arrays[0]
        layer.arrays = [slope * s, mean, var,
                        (bias * s + scale.arrays[1]).astype(F32) if scale.params.get(1)
                        else (bias * s).astype(F32)]
        _absorb(layer, scale)


def _fold_batchnorm(layer: NcnnLayer, batchnorm: NcnnLayer) -> None:
    """NetOptimize::fuse_convolution_batchnorm (and the depthwise, deconvolution and
    innerproduct twins): b = slope / sqrt(var + eps), a = bias - slope * mean / sqrt(var +
    eps); weight *= b per output channel, bias = bias * b + a, all float32 (eps 0: caffe2ncnn
    folded it into var)."""
    slope, mean, var, bn_bias = batchnorm.arrays
    eps = F32(batchnorm.params.get(1, 0.0))
    sqrt_var = np.sqrt((var + eps).astype(F32)).astype(F32)
    a = (bn_bias - (slope * mean).astype(F32) / sqrt_var).astype(F32)
    b = (slope / sqrt_var).astype(F32)
    channels = b.size
    if layer.bias is None:
        layer.bias = np.zeros(channels, F32)
        layer.params[5 if layer.type != "InnerProduct" else 1] = 1
    weight = layer.weight.reshape(channels, -1)
    layer.weight = (weight * b[:, None]).astype(F32).reshape(-1)
    layer.bias = ((layer.bias * b).astype(F32) + a).astype(F32)


def fuse_weighted_batchnorm(graph: NcnnGraph, types: tuple[str, ...]) -> None:
    for i, layer in enumerate(graph.layers):
        if layer.fused or layer.type not in types:
            continue
        batchnorm = _reader(graph, i, ("BatchNorm",))
        if batchnorm is None:
            continue
        _fold_batchnorm(layer, batchnorm)
        _absorb(layer, batchnorm)


def fuse_innerproduct_dropout(graph: NcnnGraph) -> None:
    """NetOptimize::fuse_innerproduct_dropout: weights and bias times the dropout scale."""
    for i, layer in enumerate(graph.layers):
        if layer.fused or layer.type != "InnerProduct":
            continue
        dropout = _reader(graph, i, ("Dropout",))
        if dropout is None:
            continue
        scale = param_float(dropout.params.get(0, 1.0))
        if scale != 1:
            layer.weight = (layer.weight * scale).astype(F32)
            if layer.bias is not None:
                layer.bias = (layer.bias * scale).astype(F32)
        _absorb(layer, dropout)


ACTIVATIONS = {
    "Convolution": ("ReLU", "Clip", "Sigmoid"),
    "ConvolutionDepthWise": ("ReLU", "Clip", "Sigmoid"),
    "Deconvolution": ("ReLU", "Clip", "Sigmoid"),
    "DeconvolutionDepthWise": ("ReLU", "Clip", "Sigmoid"),
    "InnerProduct": ("ReLU", "Clip", "Sigmoid"),
}


def fuse_activation(graph: NcnnGraph, layer_type: str) -> None:
    """NetOptimize::fuse_convolution_activation and twins: ReLU -> activation_type 1 (slope
    0) or 2 [slope]; Clip -> 3 [min, max]; Sigmoid -> 4."""
    for i, layer in enumerate(graph.layers):
        if layer.fused or layer.type != layer_type:
            continue
        activation = _reader(graph, i, ACTIVATIONS[layer_type])
        if activation is None:
            continue
        if activation.type == "ReLU":
            slope = float(param_float(activation.params.get(0, 0.0)))
            layer.activation_type, layer.activation_params = (1, []) if slope == 0 \
                else (2, [slope])
        elif activation.type == "Clip":
            layer.activation_type = 3
            layer.activation_params = [float(param_float(activation.params[0])),
                                       float(param_float(activation.params[1]))]
        else:
            layer.activation_type, layer.activation_params = 4, []
        _absorb(layer, activation)


def _eliminate_into_producer(graph: NcnnGraph, i: int) -> bool:
    """``Any - X`` eliminations: the producer of X's bottom takes X's top name."""
    layer = graph.layers[i]
    bottom = layer.bottoms[0]
    for any_layer in reversed(graph.layers[:i]):
        if any_layer.fused:
            continue
        if bottom in any_layer.tops:
            any_layer.tops[any_layer.tops.index(bottom)] = layer.tops[0]
            any_layer.nodes.extend(layer.nodes)
            layer.fused = True
            _aliases(graph)[bottom] = layer.tops[0]
            return True
    return False


def eliminate_dropout(graph: NcnnGraph) -> None:
    """NetOptimize::eliminate_dropout (scale 1 only)."""
    for i, layer in enumerate(graph.layers):
        if not layer.fused and layer.type == "Dropout" and param_float(
                layer.params.get(0, 1.0)) == 1:
            _eliminate_into_producer(graph, i)


def eliminate_pooling1x1(graph: NcnnGraph) -> None:
    """NetOptimize::eliminate_pooling1x1: 1x1 stride-1 unpadded non-global pooling."""
    for i, layer in enumerate(graph.layers):
        p = layer.params
        if layer.fused or layer.type != "Pooling" or p.get(4, 0):
            continue
        if (p.get(1), p.get(11, p.get(1)), p.get(2, 1), p.get(12, p.get(2, 1))) != (1, 1, 1, 1):
            continue
        if any(p.get(k, 0) for k in (3, 13, 14, 15)):
            continue
        _eliminate_into_producer(graph, i)


def eliminate_split(graph: NcnnGraph) -> None:
    """NetOptimize::eliminate_split: a Split with at most one read top disappears."""
    for i, layer in enumerate(graph.layers):
        if layer.fused or layer.type != "Split":
            continue
        read = [t for t in layer.tops if graph.consumers(t)]
        if len(read) > 1:
            continue
        keep = read[0] if read else layer.tops[0]
        layer.tops = [keep] + [t for t in layer.tops if t != keep]
        _eliminate_into_producer(graph, i)


def eliminate_after_global_pooling(graph: NcnnGraph) -> None:
    """NetOptimize::eliminate_flatten_after_global_pooling and
    eliminate_reshape_after_global_pooling (a Reshape to 1-D)."""
    for kind in ("Flatten", "Reshape"):
        for i, layer in enumerate(graph.layers):
            if layer.fused or layer.type != "Pooling" or not layer.params.get(4, 0):
                continue
            follower = _reader(graph, i, (kind,))
            if follower is None:
                continue
            if kind == "Reshape" and (follower.params.get(1, -233) != -233
                                      or follower.params.get(2, -233) != -233):
                continue
            _absorb(layer, follower)


def replace_convolution_with_innerproduct(graph: NcnnGraph) -> None:
    """NetOptimize::replace_convolution_with_innerproduct_after_global_pooling and
    ..._after_innerproduct: such a Convolution becomes an InnerProduct (same weights)."""
    changed = True
    while changed:
        changed = False
        for i, layer in enumerate(graph.layers):
            if layer.fused or not (layer.type == "InnerProduct" or (
                    layer.type == "Pooling" and layer.params.get(4, 0))):
                continue
            conv = _reader(graph, i, ("Convolution",))
            if conv is None:
                continue
            conv.type = "InnerProduct"
            conv.params = {0: conv.params[0], 1: conv.params.get(5, 0), 2: conv.params[6]}
            changed = layer.type == "InnerProduct"


def eliminate_flatten_after_innerproduct(graph: NcnnGraph) -> None:
    """NetOptimize::eliminate_flatten_after_innerproduct."""
    for i, layer in enumerate(graph.layers):
        if layer.fused or layer.type != "InnerProduct":
            continue
        flatten = _reader(graph, i, ("Flatten",))
        if flatten is not None:
            _absorb(layer, flatten)


def optimize(graph: NcnnGraph) -> NcnnGraph:
    """ncnnoptimize's ``main`` sequence (the passes that can apply to a Caffe net)."""
    fuse_batchnorm_scale(graph)
    for kind in ("Convolution", "ConvolutionDepthWise", "Deconvolution",
                 "DeconvolutionDepthWise", "InnerProduct"):
        fuse_weighted_batchnorm(graph, (kind,))
    fuse_innerproduct_dropout(graph)
    for kind in ACTIVATIONS:
        fuse_activation(graph, kind)
    eliminate_dropout(graph)
    eliminate_pooling1x1(graph)
    eliminate_split(graph)
    eliminate_after_global_pooling(graph)
    replace_convolution_with_innerproduct(graph)
    eliminate_flatten_after_innerproduct(graph)
    _rename_outputs(graph)
    return graph


def _aliases(graph: NcnnGraph) -> dict[str, str]:
    return graph.__dict__.setdefault("_aliases", {})


def _rename_outputs(graph: NcnnGraph) -> None:
    """Keep the Caffe-blob -> ncnn-blob maps on live names: a blob renamed by an identity
    elimination (Dropout, Split, 1x1 pooling) follows the new name; a blob a fusion made
    internal (a convolution's output before its BatchNorm) is dropped from the map."""
    live = set(graph.blob_names())
    aliases = _aliases(graph)
    for mapping in (graph.outputs, graph.blob_of_version):
        for key, blob in list(mapping.items()):
            seen = set()
            while blob not in live and blob in aliases and blob not in seen:
                seen.add(blob)
                blob = aliases[blob]
            if blob in live:
                mapping[key] = blob
            else:
                del mapping[key]
