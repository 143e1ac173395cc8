"""CaffeNet -> ncnn layers, as tools/caffe/caffe2ncnn.cpp ``main`` converts a Caffe
prototxt + caffemodel (before ncnnoptimize; see :mod:`calibrator.ncnn.optimize`).

Blob naming follows caffe2ncnn: an in-place layer's top is renamed ``<top>_<layer>``, and a
blob read by several layers gets a ``Split`` layer ``splitncnn_<k>`` right after its producer
with tops ``<blob>_splitncnn_<j>`` (the first reader takes the highest j). Where caffe2ncnn
writes something ncnn then runs differently from Caffe, the Caffe semantics win and the
docstring of the mapping says so (Reshape, Pooling, PriorBox, DetectionOutput, InnerProduct
with ``transpose``).

Data layers become ``Input``; evaluation layers (Accuracy, losses, DetectionEvaluate) and
Silence are left out; a layer type without an ncnn counterpart raises LayerError.
"""

from __future__ import annotations

import numpy as np

from calibrator.errors import LayerError
from calibrator.graph.net import CaffeNet, Node
from calibrator.ncnn.model import NcnnGraph, NcnnLayer

#: evaluation-only layers: left out of an inference model
EVALUATION_TYPES = frozenset({"Accuracy", "SoftmaxWithLoss", "DetectionEvaluate", "Silence",
                              "EuclideanLoss", "MultiBoxLoss", "SigmoidCrossEntropyLoss",
                              "HingeLoss", "InfogainLoss", "ContrastiveLoss"})
FLT_MAX = float(np.finfo(np.float32).max)


def _f32(array) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32).reshape(-1))


def _tensor(value) -> np.ndarray:
    return _f32(value.detach().cpu().numpy())


def _error(node: Node, message: str) -> LayerError:
    return LayerError(node.name, node.type, message)


def _ncnn_dims(shape) -> list[int]:
    """Caffe (N, C, H, W) -> ncnn (w, h, c) param order: the batch axis dropped."""
    dims = list(shape[1:])
    return dims[::-1]


# -- one function per Caffe type: (ncnn type, params, arrays), weighted layers fill the rest --

def _convolution(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``Convolution``/``ConvolutionDepthwise``: group != 1 -> ConvolutionDepthWise
    with 7=group; weights (O, I/g, kh, kw) as stored, bias raw."""
    m = node.module
    if m.fused_relu_slope is not None:
        raise _error(node, "Intel's fused convolution_param.relu has no ncnn counterpart")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel, m.stride, m.pad, m.dilation
    weight, bias = m.weight_bias()
    layer.type = "Convolution" if m.group == 1 else "ConvolutionDepthWise"
    layer.params = {0: m.num_output, 1: kw, 11: kh, 2: dw, 12: dh, 3: sw, 13: sh, 4: pw, 14: ph,
                    5: int(bias is not None), 6: int(weight.numel()), 7: m.group}
    layer.weight = _tensor(weight)
    layer.bias = None if bias is None else _tensor(bias)


def _deconvolution(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``Deconvolution``: weights reordered from (I, O/g, kh, kw) to
    (g, O/g, I/g, kh, kw) per group."""
    m = node.module
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel, m.stride, m.pad, m.dilation
    weight = m.weight.detach().cpu().numpy()
    channels, per_group_out = weight.shape[:2]
    g = m.group
    w = weight.reshape(g, channels // g, per_group_out, kh * kw).transpose(0, 2, 1, 3)
    layer.type = "Deconvolution" if g == 1 else "DeconvolutionDepthWise"
    layer.params = {0: m.num_output, 1: kw, 11: kh, 2: dw, 12: dh, 3: sw, 13: sh, 4: pw, 14: ph,
                    5: int(m.bias is not None), 6: int(weight.size), 7: g}
    layer.weight = _f32(w)
    layer.bias = None if m.bias is None else _tensor(m.bias)


def _inner_product(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``InnerProduct``; the weight is written (num_output, K) also for
    ``transpose: true`` (caffe2ncnn writes the stored blob as is there)."""
    m = node.module
    if m.axis != 1:
        raise _error(node, f"axis {m.axis}: ncnn's InnerProduct flattens everything but the "
                           "batch (axis 1)")
    weight, bias = m.weight_bias()
    layer.params = {0: int(weight.shape[0]), 1: int(bias is not None), 2: int(weight.numel())}
    layer.weight = _tensor(weight)
    layer.bias = None if bias is None else _tensor(bias)


def _batch_norm(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``BatchNorm``: slope 1, mean * (1/factor), var * (1/factor) + eps (float32),
    bias 0; ncnn's own eps stays 0."""
    m = node.module
    if not m.use_global_stats or m.fused_relu:
        raise _error(node, "only a BatchNorm with stored statistics and no fused ReLU maps "
                           "to ncnn")
    mean = _tensor(m.mean)
    var = (_tensor(m.variance) + np.float32(m.eps)).astype(np.float32)
    layer.params = {0: m.channels}
    layer.arrays = [np.ones_like(mean), mean, var, np.zeros_like(mean)]


def _scale(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``Scale``: 0=size (or -233 with the scale as second bottom), 1=bias_term."""
    m = node.module
    if len(node.bottoms) == 2:
        # ncnn multiplies by the second bottom per channel: (C,) at axis 1, or (N, C) at axis
        # 0, which loses its batch axis in ncnn
        if m.axis not in (0, 1) or len(m.operand_shape) != 1 + (m.axis == 0):
            raise _error(node, "only a per-channel second bottom maps to ncnn's Scale")
        layer.params = {0: -233, 1: int(m.bias_term)}
        layer.arrays = [_tensor(m.beta)] if m.bias_term else []
        return
    if m.axis != 1 or len(m.operand_shape) != 1:
        raise _error(node, "only a per-channel Scale (axis 1, one axis) maps to ncnn")
    layer.params = {0: int(m.operand_shape[0]), 1: int(m.bias_term)}
    layer.arrays = [_tensor(m.gamma)] + ([_tensor(m.beta)] if m.bias_term else [])


def _bias(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn writes ``Bias`` without params; here 0=size and the learned bias (ncnn's
    src/layer/bias.cpp), for a per-channel Bias only."""
    m = node.module
    if len(node.bottoms) != 1 or m.axis != 1 or len(m.operand_shape) != 1:
        raise _error(node, "only a learned per-channel Bias maps to ncnn")
    layer.params = {0: int(m.operand_shape[0])}
    layer.arrays = [_tensor(m.beta)]


def _pooling(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``Pooling`` writes pad_mode 0 (ncnn's "full padding": ceil, src/layer/
    pooling.cpp ``make_padding``), which gives Caffe's window count unless Caffe drops a
    last window that starts in the padding; then pad_mode 1 with an explicit bottom/right
    pad gives Caffe's count. AVE: ncnn divides by the real pixels of the window
    (avgpool_count_include_pad 0) or by the kernel area (1); Caffe by the window clipped to
    the padded border. Without padding the first is Caffe's rule; with padding the second
    is, when no window crosses the padded border; other AVE layers raise LayerError."""
    m = node.module
    mode = 0 if m.method == m.MAX else 1
    if m.global_pooling:
        layer.params = {0: mode, 4: 1}
        return
    (kh, kw), (sh, sw), (ph, pw) = m.kernel, m.stride, m.pad
    h, w = node.bottom_shapes[0][2:]
    out_h, out_w = node.top_shapes[0][2:]
    params = {0: mode, 1: kw, 11: kh, 2: sw, 12: sh, 3: pw, 14: pw, 13: ph, 15: ph}
    full = [(n + 2 * p - k + (s - (n + 2 * p - k) % s) % s) // s + 1
            for n, k, p, s in ((h, kh, ph, sh), (w, kw, pw, sw))]
    tail_h = (out_h - 1) * sh + kh - h - 2 * ph
    tail_w = (out_w - 1) * sw + kw - w - 2 * pw
    if full != [out_h, out_w]:
        params[5] = 1  # valid padding with the tail written out: Caffe's window count
        params[14], params[15] = pw + max(tail_w, 0), ph + max(tail_h, 0)
    if mode == 1 and (ph or pw):
        if tail_h > 0 or tail_w > 0:
            raise _error(node, "AVE pooling with padding whose last window passes the padded "
                               "border: ncnn's Pooling has no such divisor")
        params[5] = 1
        params[6] = 1
    layer.params = params


def _eltwise(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``Eltwise``: 0=operation (PROD 0, SUM 1, MAX 2 in both), -23301 coefficients."""
    m = node.module
    layer.params = {0: int(m.operation)}
    if m.operation == m.SUM and any(c != 1.0 for c in m.coeffs):
        layer.params[1] = [float(c) for c in m.coeffs]


def _concat(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``Concat``: 0=axis-1 (ncnn blobs have no batch axis)."""
    axis = node.module.axis
    if axis == 0:
        raise _error(node, "concatenation along the batch axis has no ncnn counterpart")
    layer.params = {0: axis - 1}


def _slice(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``Slice``: -23300 slice sizes (last -233), 1=axis-1."""
    m = node.module
    if m.axis == 0:
        raise _error(node, "slicing along the batch axis has no ncnn counterpart")
    layer.params = {0: [int(s) for s in m.sizes[:-1]] + [-233], 1: m.axis - 1}


def _softmax(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``Softmax``: 0=axis-1, 1=1 (fixbug0)."""
    axis = node.module.axis
    if axis == 0:
        raise _error(node, "softmax over the batch axis has no ncnn counterpart")
    layer.params = {0: axis - 1, 1: 1}


def _relu(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``ReLU``: 0=negative_slope when non-zero."""
    slope = node.module.negative_slope
    layer.params = {0: slope} if slope != 0 else {}


def _relu6(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn: ``ReLU6`` -> ``Clip`` 0=0 1=6."""
    layer.type = "Clip"
    layer.params = {0: 0.0, 1: 6.0}


def _clip(node: Node, layer: NcnnLayer) -> None:
    """``Clip`` 0=min 1=max (caffe2ncnn has no Clip branch and would write ncnn's +-FLT_MAX
    defaults)."""
    layer.params = {0: node.module.low, 1: node.module.high}


def _prelu(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``PReLU``: 0=number of slopes, the slopes."""
    slope = _tensor(node.module.slope)
    layer.params = {0: int(slope.size)}
    layer.arrays = [slope]


def _elu(node, layer):
    """caffe2ncnn ``ELU``: 0=alpha."""
    layer.params = {0: node.module.alpha}


def _power(node, layer):
    """caffe2ncnn ``Power``: 0=power 1=scale 2=shift."""
    m = node.module
    layer.params = {0: m.power, 1: m.scale, 2: m.shift}


def _exp_log(node, layer):
    """``Exp``/``Log`` 0=base 1=scale 2=shift (src/layer/exp.cpp, log.cpp: Caffe's formulas)."""
    p = node.param.exp_param if node.type == "Exp" else node.param.log_param
    layer.params = {0: float(p.base), 1: float(p.scale), 2: float(p.shift)}


def _threshold(node, layer):
    """caffe2ncnn ``Threshold``: 0=threshold."""
    layer.params = {0: node.module.threshold}


def _flatten(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``Flatten`` (no params): ncnn flattens the whole sample."""
    m = node.module
    ndim = len(node.bottom_shapes[0])
    if m.start != 1 or m.end != ndim - 1:
        raise _error(node, "ncnn's Flatten merges every axis but the batch (axis 1 to -1)")


def _reshape(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn maps ``reshape_param.shape`` dims to w/h/c; here the dims are Caffe's
    inferred top shape (batch dropped), -1 kept where Caffe infers the axis, so the ncnn
    blob has the Caffe shape whatever 0/-1/axis the prototxt used."""
    top = node.top_shapes[0]
    bottom = node.bottom_shapes[0]
    if len(top) < 2 or len(top) > 4 or top[0] != bottom[0]:
        raise _error(node, f"top shape {top}: ncnn reshapes within one sample (2 to 4 axes)")
    dims = _ncnn_dims(top)
    m = node.module
    start = m.axis if m.axis >= 0 else len(bottom) + m.axis + 1
    if -1 in m.dims:
        inferred = start + m.dims.index(-1)
        if inferred >= 1:
            dims[len(top) - 1 - inferred] = -1
    layer.params = dict(zip((0, 1, 2), dims))


_PERMUTE_4D = {(0, 1, 2, 3): 0, (0, 1, 3, 2): 1, (0, 2, 1, 3): 2, (0, 2, 3, 1): 3,
               (0, 3, 1, 2): 4, (0, 3, 2, 1): 5}
_PERMUTE_3D = {(0, 1, 2): 0, (0, 2, 1): 1}


def _permute(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn's order_type table (4-D Caffe blobs), plus the 3-D transpose."""
    order = tuple(node.module.order)
    table = _PERMUTE_4D if len(order) == 4 else _PERMUTE_3D if len(order) == 3 else {}
    if order not in table:
        raise _error(node, f"order {order} has no ncnn Permute order_type")
    layer.params = {0: table[order]}


def _lrn(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``LRN``: 0=region 1=local_size 2=alpha 3=beta, plus 4=k when not 1 (caffe2ncnn
    leaves k out)."""
    m = node.module
    layer.params = {0: m.region, 1: m.size, 2: m.alpha, 3: m.beta}
    if m.k != 1.0:
        layer.params[4] = m.k


def _mvn(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``MVN``: 0=normalize_variance 1=across_channels 2=eps."""
    m = node.module
    layer.params = {0: int(m.normalize_variance), 1: int(m.across_channels), 2: m.eps}


def _normalize(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``Normalize``: eps_mode 0 (x / sqrt(sum x^2 + eps)), Caffe-SSD's rule."""
    m = node.module
    scale = _tensor(m.scale)
    layer.params = {0: int(m.across_spatial), 1: int(m.channel_shared), 2: m.eps,
                    3: int(scale.size)}
    layer.arrays = [scale]


def _prior_box(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``PriorBox``, with min/max sizes truncated to int and the aspect ratios
    de-duplicated as Caffe-SSD's prior_box_layer.cpp does (ncnn takes them as given)."""
    m = node.module
    p = node.param.prior_box_param
    ratios = []
    for ar in p.aspect_ratio:
        ar = float(np.float32(ar))
        if abs(ar - 1.0) < 1e-6 or any(abs(ar - r) < 1e-6 for r in ratios):
            continue
        ratios.append(ar)
    variances = m.variance * 4 if len(m.variance) == 1 else m.variance
    image_w = m.img_w if m.img_w else -233
    image_h = m.img_h if m.img_h else -233
    step_w = m.step_w if m.step_w else -233.0
    step_h = m.step_h if m.step_h else -233.0
    layer.params = {0: [float(int(s)) for s in m.min_sizes],
                    1: [float(int(s)) for s in m.max_sizes],
                    2: ratios, 3: variances[0], 4: variances[1], 5: variances[2],
                    6: variances[3], 7: int(p.flip), 8: int(m.clip), 9: image_w, 10: image_h,
                    11: float(step_w), 12: float(step_h), 13: m.offset}


def _detection_output(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``DetectionOutput``. ncnn decodes CENTER_SIZE boxes with shared locations
    and the prior's variances, background class 0 (src/layer/detectionoutput.cpp); other
    settings raise LayerError. An unset nms top_k / keep_top_k -1 (no limit in Caffe) is
    written as the number of candidates (caffe2ncnn would write -1, which ncnn mishandles);
    an unset confidence_threshold as -FLT_MAX."""
    m = node.module
    if not m.share_location or m.code_type != 2 or m.variance_encoded_in_target \
            or m.background_label_id != 0 or m.eta != 1.0:
        raise _error(node, "ncnn's DetectionOutput decodes only CENTER_SIZE boxes with shared "
                           "locations, variances from the priors, background 0, eta 1")
    candidates = m.num_priors * m.num_classes
    layer.params = {0: m.num_classes, 1: m.nms_threshold,
                    2: m.top_k if m.top_k >= 0 else candidates,
                    3: m.keep_top_k if m.keep_top_k >= 0 else candidates,
                    4: m.confidence_threshold if m.confidence_threshold > -FLT_MAX else -FLT_MAX}


def _dropout(node: Node, layer: NcnnLayer) -> None:
    """caffe2ncnn ``Dropout``: 0=scale only for ``scale_train: false`` (ncnnoptimize then
    eliminates it, or folds it into an InnerProduct)."""
    scale = node.module.test_scale
    layer.params = {0: scale} if scale != 1.0 else {}


def _shuffle_channel(node, layer):
    """caffe2ncnn ``ShuffleChannel``: 0=group."""
    layer.params = {0: node.module.group}


def _none(node, layer):
    """caffe2ncnn's default branch: the type name, no params (Split, Sigmoid, TanH, ...)."""
    layer.params = {}


MAPPING = {
    "Convolution": _convolution, "ConvolutionDepthwise": _convolution,
    "DepthwiseConvolution": _convolution, "Deconvolution": _deconvolution,
    "InnerProduct": _inner_product, "BatchNorm": _batch_norm, "Scale": _scale, "Bias": _bias,
    "Pooling": _pooling, "Eltwise": _eltwise, "Concat": _concat, "Slice": _slice,
    "Split": _none, "Softmax": _softmax, "ReLU": _relu, "ReLU6": _relu6, "Clip": _clip,
    "PReLU": _prelu, "ELU": _elu, "Sigmoid": _none, "TanH": _none, "AbsVal": _none,
    "BNLL": _none, "Power": _power, "Exp": _exp_log, "Log": _exp_log,
    "Threshold": _threshold, "Flatten": _flatten, "Reshape": _reshape, "Permute": _permute,
    "LRN": _lrn, "MVN": _mvn, "Normalize": _normalize, "PriorBox": _prior_box,
    "DetectionOutput": _detection_output, "Dropout": _dropout,
    "ShuffleChannel": _shuffle_channel,
}


def convert(net: CaffeNet) -> NcnnGraph:
    """The ncnn layers caffe2ncnn writes for ``net`` (TEST phase), Split layers included."""
    current: dict[str, str] = {}   # Caffe blob name -> ncnn name of its latest version
    version: dict[str, str] = {}
    layers: list[NcnnLayer] = []
    kept = [n for n in net.nodes if n.type not in EVALUATION_TYPES]
    needed = {b for n in kept for b in n.bottoms}
    inputs = {}
    for param in net.data_layers:
        for top in param.top:
            if top not in needed or top not in net.input_shapes:
                continue
            shape = net.input_shapes[top]
            if not 2 <= len(shape) <= 4:
                raise LayerError(param.name, param.type, f"input shape {shape}: ncnn takes "
                                 "2 to 4 axes (batch included)")
            layer = NcnnLayer("Input", top if len(param.top) > 1 else param.name, [], [top])
            layer.params = dict(zip((0, 1, 2), _ncnn_dims(shape)))
            layers.append(layer)
            current[top] = version[f"-1:{top}"] = inputs[top] = top
    for node in kept:
        convert_one = MAPPING.get(node.type)
        if convert_one is None:
            raise _error(node, f"no ncnn counterpart for layer type '{node.type}'")
        bottoms = []
        for b in node.bottoms:
            if b not in current:
                raise _error(node, f"bottom '{b}' comes from a layer left out of the ncnn "
                                   "model")
            bottoms.append(current[b])
        if len(node.bottoms) == 1 and len(node.tops) == 1 and node.bottoms[0] == node.tops[0]:
            tops = [f"{node.tops[0]}_{node.name}"]
        else:
            tops = list(node.tops)
        layer = NcnnLayer(node.type, node.name, bottoms, tops, nodes=[node.index])
        convert_one(node, layer)
        layers.append(layer)
        for caffe_top, top in zip(node.tops, tops):
            current[caffe_top] = version[f"{node.index}:{caffe_top}"] = top
    graph = NcnnGraph(layers, inputs=inputs, blob_of_version=version)
    # the model's outputs: latest versions no kept layer reads (with the evaluation layers
    # gone, what fed them is an output now)
    read = {b for layer in layers for b in layer.bottoms}
    graph.outputs = {name: blob for name, blob in current.items()
                     if blob not in read and name not in inputs}
    _insert_splits(graph)
    return graph


def _insert_splits(graph: NcnnGraph) -> None:
    """caffe2ncnn: a blob read by several layers is split right after its producer; the
    first reader takes ``<blob>_splitncnn_<n-1>``, the last ``_0``."""
    readers: dict[str, int] = {}
    for layer in graph.layers:
        for b in layer.bottoms:
            readers[b] = readers.get(b, 0) + 1
    remaining = {b: n for b, n in readers.items() if n > 1}
    out: list[NcnnLayer] = []
    count = 0
    for layer in graph.layers:
        renamed = []
        for b in layer.bottoms:
            if b in remaining:
                remaining[b] -= 1
                b = f"{b}_splitncnn_{remaining[b]}"
            renamed.append(b)
        layer.bottoms = renamed
        out.append(layer)
        for top in layer.tops:
            n = readers.get(top, 0)
            if n > 1:
                out.append(NcnnLayer("Split", f"splitncnn_{count}", [top],
                                     [f"{top}_splitncnn_{j}" for j in range(n)]))
                count += 1
    graph.layers = out
