"""``-fu``: the first convolution fed u8, as Intel's ``scripts/first_conv_force_u8.py``
(``first_conv_u8_input``) rewrites a quantized net once its plan is final.

With s_in = the first conv's ``scale_in`` (127/T, s8) and the data layer's ``scale`` sigma
and ``mean_value`` m_c:

* data layer: ``scale' = s_in * sigma``, ``mean_value'_c = m_c - 128 / scale'``,
  ``pad`` = the first conv's old ``pad``: the transformer then writes
  ``v = nearbyint((p - m') * scale') = nearbyint(s_in (p - m) sigma + 128)``, a u8 value
  whose real value is ``(v - 128) / s_in``; the border is not a zero padding but the image
  around the crop, raw on the top/left, normalized on the off-by-one bottom/right
  (``data_transformer.cpp`` :1062-1124; see :mod:`calibrator.data.transform`);
* first conv: ``pad: 0``, ``force_u8_input: true``, no ``is_negative_input``, ``scale_in``
  kept (Intel uses it for the output and bias scales; only the input reorder uses 1.0,
  ``mkldnn_convolution_layer.cpp`` :485-490); ``scale_params`` halved unless ``-clx``
  (without VNNI the u8 x s8 pair sums must stay below 32767: 2 * 255 * 64 < 32767);
* weights (the first conv needs a bias, its own or from a folded BatchNorm): Intel saves its compiled net (``net.save``), so BatchNorm/Scale are folded into
  every convolution (W', b'), and the first conv's bias becomes
  ``b''_o = b'_o - (128 / s_in) * sum(W'_o)`` over input channels and kernel positions
  (numpy float32 sum, the rest in float64, stored as float32, as the script computes it);
  a bias correction of the plan (``--weights-out``'s) is in the biases too.

Intel's script needs a ``Data`` layer with three mean values; this also takes ImageData
and an Input fed by ``--images`` (the preprocessing then goes into the Input layer's
``transform_param``, which Intel's Input layer ignores and ``calibrator test --images``
applies), and one or no mean value. What the rule cannot express is refused with a
:class:`~calibrator.errors.CalibratorError`: a mean file, ``pad_h``/``pad_w`` or two pad
values, a first conv not fed by the data layer directly, a raw-Datum LMDB with padding (Intel
pads only decoded images), a first conv that is FP32 in the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibrator.caffe import caffe_pb2
from calibrator.caffe.netstate import layer_included, make_state
from calibrator.errors import CalibratorError
from calibrator.quant.folding import folded_weights
from calibrator.quant.fusion import FusedGraph
from calibrator.quant.params import annotate
from calibrator.quant.scales import QuantPlan, first_conv

DATA_TYPES = ("Data", "ImageData", "Input")


@dataclass
class ForceU8:
    """The two files ``-fu`` writes, and what changed."""

    net_param: caffe_pb2.NetParameter   # the _force_u8 prototxt (every phase)
    weights: caffe_pb2.NetParameter     # the _new.caffemodel (compiled TEST layers + blobs)
    conv: str
    data_layer: str
    scale_in: float
    scale: float                        # the data layer's new scale
    mean: list[float]                   # its new mean values
    pad: int
    halved: bool                        # scale_params halved (no -clx)


def new_preprocessing(scale_in: float, scale: float, means: list[float]
                      ) -> tuple[float, list[float]]:
    """(scale', mean') as first_conv_force_u8.py computes them (double arithmetic on the
    float32 values the prototxt holds; the prototxt then stores float32)."""
    new_scale = float(scale_in) * float(scale)
    return new_scale, [float(m) - 128.0 / new_scale for m in means]


def new_first_bias(weight: np.ndarray, bias: np.ndarray, scale_in: float) -> np.ndarray:
    """b''_o = b'_o - (128 / s_in) * sum(W'_o), per output channel, as the script does it."""
    bias_scale = 128.0 / float(scale_in)
    out = np.zeros(bias.shape, np.float64)
    for o in range(bias.shape[0]):
        out[o] = float(bias[o]) - bias_scale * float(np.sum(weight[o], dtype=np.float32))
    return out.astype(np.float32)


def _fail(message: str) -> CalibratorError:
    return CalibratorError(f"-fu/--first_conv_force_u8: {message}")


def _test_layer(net_param, name: str, type_name: str):
    """The layer of the whole net the TEST phase runs under that name."""
    state = make_state(net_param)
    for layer in net_param.layer:
        if layer.name == name and layer.type == type_name and layer_included(layer, state):
            return layer
    raise _fail(f"layer '{name}' not found in the TEST phase")  # pragma: no cover


def _check_conv(param) -> int:
    conv = param.convolution_param
    if conv.HasField("pad_h") or conv.HasField("pad_w"):
        raise _fail(f"the first convolution '{param.name}' sets pad_h/pad_w; Intel's rule "
                    "moves one pad value into the data layer")
    if len(conv.pad) > 1 and len(set(conv.pad)) > 1:
        raise _fail(f"the first convolution '{param.name}' has different pads "
                    f"{list(conv.pad)}; Intel's rule moves one pad value")
    if len(conv.pad) > 1:
        raise _fail(f"the first convolution '{param.name}' repeats pad; give it once")
    return int(conv.pad[0]) if len(conv.pad) else 0


def _compiled_weights(model, fused: FusedGraph, plan: QuantPlan, first: str, scale_in: float
                      ) -> tuple[caffe_pb2.NetParameter, list[str]]:
    """The TEST net as Intel compiles it (BatchNorm/Scale folded into their convs, which
    gain a bias and write the folded layers' top), full layer definitions with blobs, the
    plan's bias correction in the INT8 units' biases; and the layers given a bias they did
    not have (their prototxt needs ``bias_term: true``)."""
    out = caffe_pb2.NetParameter(name=model.test_param.name)
    folded = {n.name for unit in fused.units for n in unit.folded}
    units = {unit.name: unit for unit in fused.units}
    new_bias = []
    for layer in model.test_param.layer:
        if layer.name in folded:
            continue
        copy = out.layer.add()
        copy.CopyFrom(layer)
        copy.ClearField("blobs")
        copy.ClearField("quantization_param")
        unit = units.get(layer.name)
        lq = plan.layers.get(layer.name)
        shift = (lq.bias_shift if lq is not None and layer.name not in plan.excluded
                 else None)
        if unit is not None and (unit.folded or unit.name == first or shift is not None):
            weight, bias = folded_weights(unit, shift)
            weight = weight.detach().cpu().numpy().astype(np.float32)
            bias = bias.detach().cpu().numpy().astype(np.float32)
            if unit.name == first:
                bias = new_first_bias(weight, bias, scale_in)
            if unit.folded:
                copy.top[0] = unit.folded[-1].tops[0]
            elif unit.layer.module.weight_bias()[1] is None:
                new_bias.append(layer.name)
            param = (copy.convolution_param if unit.kind == "conv"
                     else copy.inner_product_param)
            param.bias_term = True
            blobs = [weight, bias]
        else:
            blobs = model.weights.get(layer.name, [])
        for array in blobs:
            blob = copy.blobs.add()
            blob.shape.dim.extend(int(d) for d in array.shape)
            blob.data.extend(np.asarray(array, np.float32).ravel())
    return out, new_bias


def check_force_u8(model, fused: FusedGraph):
    """(first conv unit, its data layer, the conv's pad) when Intel's rule applies to this
    net; a CalibratorError naming what stops it otherwise (checked before calibrating)."""
    unit = first_conv(fused)
    if unit is None:
        raise _fail("the net has no convolution")
    pad = _check_conv(unit.layer.param)
    data = next((l for l in model.net.data_layers if unit.input.producer < 0
                 and len(l.top) and l.top[0] == unit.input.name), None)
    if data is None:
        raise _fail(f"the first convolution '{unit.name}' does not read the data layer's "
                    "top directly")
    if data.type not in DATA_TYPES:
        raise _fail(f"the data layer '{data.name}' is {data.type}; Intel's rule rewrites "
                    f"the transform_param of {', '.join(DATA_TYPES[:2])} (or an Input fed by "
                    "--images)")
    if data.type == "Input" and getattr(model.source, "transform", None) is None:
        raise _fail(f"the Input '{data.name}' is not fed from --images")
    transform = model.source.transform
    if transform.mean_image is not None:
        raise _fail(f"the data layer '{data.name}' uses a mean_file; Intel's rule needs "
                    "mean_value")
    if transform.pad:
        raise _fail(f"the data layer '{data.name}' already has a pad")
    if pad and data.type == "Data" and not model.source.encoded():
        raise _fail(f"the LMDB of '{data.name}' holds raw (not encoded) Datum: Intel Caffe "
                    "pads only decoded images, so the first conv would lose its padding")
    if not unit.folded and unit.layer.module.weight_bias()[1] is None:
        raise _fail(f"the first convolution '{unit.name}' has no bias, and no BatchNorm to "
                    "fold gives it one: Intel's script corrects the bias blob")
    return unit, data, pad


def force_u8(model, fused: FusedGraph, plan: QuantPlan, cascade_lake: bool) -> ForceU8:
    """The -fu files for ``plan`` (a final plan whose first conv is INT8 with s8 input)."""
    unit, data, pad = check_force_u8(model, fused)
    lq = plan.layers.get(unit.name)
    if lq is None or unit.name in plan.excluded:
        raise _fail(f"the first convolution '{unit.name}' is FP32 in the final plan")
    transform = model.source.transform
    channels = int(model.net.input_shapes[unit.input.name][1])
    means = [float(m) for m in transform.mean_values]
    means = means * channels if len(means) == 1 else means or [0.0] * channels
    scale, mean = new_preprocessing(lq.scale_in, transform.scale, means)

    weights, new_bias = _compiled_weights(model, fused, plan, unit.name, lq.scale_in)
    net_param = annotate(model.net_param, plan)
    for layer in net_param.layer:          # a bias correction gave these a bias blob
        if layer.name in new_bias:
            (layer.inner_product_param if layer.type == "InnerProduct"
             else layer.convolution_param).bias_term = True
    conv = _test_layer(net_param, unit.name, unit.layer.type)
    if len(conv.convolution_param.pad):
        conv.convolution_param.pad[0] = 0
    q = conv.quantization_param
    q.ClearField("is_negative_input")
    q.force_u8_input = True
    if not cascade_lake:
        halved = [float(np.float32(s) * 0.5) for s in q.scale_params]
        del q.scale_params[:]
        q.scale_params.extend(halved)
    target = _test_layer(net_param, data.name, data.type)
    param = target.transform_param
    param.scale = scale
    del param.mean_value[:]
    param.mean_value.extend(mean)
    param.pad = pad
    if data.type == "Input" and pad:
        for shape in target.input_param.shape:
            if len(shape.dim) == 4:
                shape.dim[2] += 2 * pad
                shape.dim[3] += 2 * pad
    return ForceU8(net_param, weights,
                   unit.name, data.name, float(lq.scale_in), float(np.float32(scale)),
                   [float(np.float32(m)) for m in mean], pad, not cascade_lake)
