"""Plans to and from Intel Caffe's ``quantization_param`` (LayerParameter field 158)."""

from __future__ import annotations

from calibrator.caffe import caffe_pb2
from calibrator.errors import LayerError
from calibrator.quant.fusion import FusedGraph
from calibrator.quant.scales import LayerQuant, QuantOptions, QuantPlan, activation_threshold


def to_proto(lq: LayerQuant) -> caffe_pb2.QuantizationParameter:
    """The quantization_param Intel's calibrator writes for one layer."""
    param = caffe_pb2.QuantizationParameter()
    param.bw_layer_in = lq.bits
    param.bw_layer_out = lq.bw_layer_out
    param.bw_params = lq.bits
    param.scale_in.append(lq.scale_in)
    param.scale_out.append(lq.scale_out)
    # per-tensor weights: one value, as Intel's calibrator writes for -c single
    same = not lq.per_channel and len(set(lq.scale_params)) == 1
    param.scale_params.extend(lq.scale_params[:1] if same else lq.scale_params)
    if lq.is_negative_input:
        param.is_negative_input = True
    if lq.force_u8_input:
        param.force_u8_input = True
    return param


def annotate(net_param, plan: QuantPlan) -> caffe_pb2.NetParameter:
    """A copy of the whole net (every phase) with quantization_param on the quantized layers
    Intel Caffe should run in INT8 (not on ``plan.excluded``) and none elsewhere."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    for layer in out.layer:
        layer.ClearField("quantization_param")
        if layer.name in plan.layers and layer.name not in plan.excluded:
            layer.quantization_param.CopyFrom(to_proto(plan.layers[layer.name]))
    return out


def has_quantization(net_param) -> bool:
    return any(layer.HasField("quantization_param") for layer in net_param.layer)


def from_proto(fused: FusedGraph) -> QuantPlan:
    """The plan a quantized prototxt describes (e.g. one Intel's calibrator wrote)."""
    layers = {}
    for unit in fused.units:
        param = unit.layer.param
        if not param.HasField("quantization_param"):
            continue
        q = param.quantization_param
        if not len(q.scale_in) or not len(q.scale_params):
            raise LayerError(param.name, param.type,
                             "quantization_param needs scale_in and scale_params")
        bits = q.bw_params or 8
        scale_params = list(q.scale_params)
        channels = unit.layer.module.weight_bias()[0].shape[0]
        if len(scale_params) == 1:
            scale_params = scale_params * channels
        if len(scale_params) != channels:
            raise LayerError(param.name, param.type,
                             f"{len(q.scale_params)} scale_params for {channels} output channels")
        output_int8 = q.bw_layer_out != 32 if q.HasField("bw_layer_out") else True
        scale_in = float(q.scale_in[0])
        scale_out = float(q.scale_out[0]) if len(q.scale_out) else 1.0
        input_unsigned = not q.is_negative_input
        layers[unit.name] = LayerQuant(
            name=unit.name, scale_in=scale_in, scale_out=scale_out,
            scale_params=[float(s) for s in scale_params],
            input_unsigned=input_unsigned,
            output_unsigned=unit.output_unsigned, output_int8=output_int8,
            force_u8_input=q.force_u8_input, bits=bits, estimator="given",
            per_channel=len(q.scale_params) > 1,
            # the thresholds the scales stand for (T = qmax / scale): what a writer for a
            # runtime with other data types (ncnn's s8 at 127/T) starts from; -fu keeps the
            # first conv's s8 scale_in (first_conv_force_u8.py)
            input_threshold=activation_threshold(
                scale_in, input_unsigned and not q.force_u8_input, bits),
            output_threshold=(activation_threshold(scale_out, unit.output_unsigned, bits)
                              if output_int8 else None))
    for param in fused.net.net_param.layer:
        if param.HasField("quantization_param") and param.name not in {u.name for u in
                                                                        fused.units}:
            raise LayerError(param.name, param.type, "carries quantization_param but is not "
                             "a Convolution/InnerProduct that can run in INT8")
    return QuantPlan(layers, QuantOptions(quantize_fc=True), {})
