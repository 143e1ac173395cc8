"""Our quantization plan as an ncnn calibration table, and what tools/quantize/ncnn2int8.cpp
does with such a table: int8 weights, weight_data_int8_scales, bottom_blob_int8_scales,
int8_scale_term, the requantize fusion, fp16 storage for the layers left in float.

Table convention (tools/quantize/ncnn2table.cpp ``QuantNet::quantize_KL``): ``<layer>_param_0``
with one weight scale per output channel (per group for ConvolutionDepthWise), then
``<layer> <scale>`` with the bottom blob's scale 127/T. Like ncnn2table, a 3x3 stride-1
dilation-1 Convolution gets 6-bit weight scales (31/max|W| instead of 127/max|W|): ncnn runs
those convolutions with int8 Winograd F(4,3) (src/layer/x86/convolution_x86.cpp
``create_pipeline_int8_x86``), whose int16 kernel transform and int32 sums need the headroom.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibrator.fileio import atomic_write
from calibrator.ncnn.arith import float2int8_np
from calibrator.ncnn.model import CONV_TYPES, INT8_TYPES, Int8Weights, NcnnGraph, NcnnLayer
from calibrator.quant.scales import QuantPlan

F32 = np.float32
WINOGRAD_WEIGHT_FACTOR = 31.0 / 127.0


@dataclass
class NcnnScales:
    weight_scales: np.ndarray  # float32
    bottom_scale: np.float32


def winograd_int8(layer: NcnnLayer) -> bool:
    """ncnn2table's ``quant_6bit`` condition: a Convolution with a 3x3 kernel, stride 1,
    dilation 1 (the Winograd F(4,3) candidates of Convolution_x86)."""
    p = layer.params
    kw, dw, sw = p.get(1), p.get(2, 1), p.get(3, 1)
    return (layer.type == "Convolution" and (kw, p.get(11, kw)) == (3, 3)
            and (dw, p.get(12, dw)) == (1, 1) and (sw, p.get(13, sw)) == (1, 1))


def bottom_scale(lq) -> np.float32:
    """ncnn runs signed int8 only: 127/T (``2^(bits-1) - 1`` over the input threshold), the
    table writer's convention (calibrator/writers/outputs.py ``write_table``)."""
    limit = 2 ** (lq.bits - 1) - 1
    return F32(limit / lq.input_threshold) if lq.input_threshold > 0 else F32(1.0)


def scales_from_plan(graph: NcnnGraph, plan: QuantPlan, *, winograd: bool = True
                     ) -> dict[str, NcnnScales]:
    """The table entries for every ncnn Convolution/ConvolutionDepthWise/InnerProduct that
    the plan quantizes (matched by layer name). Weight scales are the plan's per-channel
    ``scale_params``; for Winograd convolutions (``winograd``) times 31/127, ncnn2table's
    6-bit convention; for a ConvolutionDepthWise with several channels per group, the
    smallest channel scale of each group (ncnn keeps one scale per group)."""
    out = {}
    for layer in graph.live():
        lq = plan.layers.get(layer.name)
        if lq is None or layer.type not in INT8_TYPES:
            continue
        scales = np.asarray(lq.scale_params, np.float64)
        if winograd and winograd_int8(layer):
            scales = scales * WINOGRAD_WEIGHT_FACTOR
        if layer.type == "ConvolutionDepthWise":
            scales = scales.reshape(layer.group, -1).min(axis=1)
        out[layer.name] = NcnnScales(scales.astype(F32), bottom_scale(lq))
    return out


def table_text(scales: dict[str, NcnnScales]) -> str:
    """ncnn2table's layout: all weight lines, then all bottom-scale lines (%.9g keeps every
    float32 bit; ncnn2int8 reads them with sscanf %f)."""
    lines = [f"{name}_param_0 " + " ".join(f"{v:.9g}" for v in s.weight_scales)
             for name, s in scales.items()]
    lines += [f"{name} {s.bottom_scale:.9g}" for name, s in scales.items()]
    return "\n".join(lines) + "\n"


def write_ncnn_table(path: str | Path, scales: dict[str, NcnnScales]) -> Path:
    return atomic_write(path, table_text(scales))


def read_ncnn_table(text: str) -> dict[str, NcnnScales]:
    """ncnn2int8's ``read_int8scale_table`` (keys with ``_param_`` are weight scales)."""
    weights, blobs = {}, {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        values = np.asarray([float(v) for v in parts[1:]], F32)
        (weights if "_param_" in parts[0] else blobs)[parts[0]] = values
    return {name: NcnnScales(weights[f"{name}_param_0"], F32(value[0]))
            for name, value in blobs.items() if f"{name}_param_0" in weights}


def quantize_layer(layer: NcnnLayer, scales: NcnnScales) -> None:
    """NetQuantize::quantize_convolution / quantize_convolutiondepthwise /
    quantize_innerproduct: ``quantize_to_int8`` of the float32 weights, per output channel
    (per group for depthwise), with ncnn's float2int8."""
    weight = layer.weight.astype(F32)
    rows = layer.group if layer.type == "ConvolutionDepthWise" else layer.params[0]
    w = weight.reshape(rows, -1)
    q = float2int8_np(w * scales.weight_scales.reshape(-1, 1))
    layer.int8 = Int8Weights(q.reshape(-1), scales.weight_scales.astype(F32),
                             F32(scales.bottom_scale))


def _first_reader(graph: NcnnGraph, i: int, top: str, types) -> NcnnLayer | None:
    for layer in graph.layers[i + 1:]:
        if not layer.fused and layer.type in types and layer.bottoms == [top]:
            return layer
    return None


def fuse_requantize(graph: NcnnGraph) -> None:
    """NetQuantize::fuse_requantize: an int8 Convolution/ConvolutionDepthWise whose top goes
    straight into an int8 Convolution/ConvolutionDepthWise (or into a Split whose every top
    goes into one) outputs int8 at the bottom scale of that reader (of the Split's first
    top's reader), int8_scale_term + 100."""
    layers = graph.layers
    for i, layer in enumerate(layers):
        if layer.fused or layer.type not in CONV_TYPES:
            continue
        reader = _first_reader(graph, i, layer.tops[0], CONV_TYPES)
        if reader is not None and layer.int8 is not None and reader.int8 is not None:
            layer.int8.top_scale = reader.int8.bottom_scale
    for i, layer in enumerate(layers):
        if layer.fused or layer.type not in CONV_TYPES:
            continue
        split = _first_reader(graph, i, layer.tops[0], ("Split",))
        if split is None:
            continue
        j = layers.index(split)
        readers = [_first_reader(graph, j, top, CONV_TYPES) for top in split.tops]
        if any(r is None or r.int8 is None for r in readers):
            continue
        first = graph.consumers(split.tops[0])[0]
        if layer.int8 is not None and first.int8 is not None:
            layer.int8.top_scale = first.int8.bottom_scale


def quantize(graph: NcnnGraph, scales: dict[str, NcnnScales], *, fp16: bool = True
             ) -> NcnnGraph:
    """ncnn2int8's ``main``: quantize the layers in the table, fuse requantization, and (its
    storage_type = 1) store the weights of every layer left in float as fp16."""
    for layer in graph.live():
        if layer.type in INT8_TYPES and layer.name in scales:
            quantize_layer(layer, scales[layer.name])
    fuse_requantize(graph)
    for layer in graph.live():
        if layer.weighted and layer.int8 is None:
            layer.fp16_weight = fp16
    return graph
