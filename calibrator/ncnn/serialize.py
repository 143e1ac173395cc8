"""``.param`` text and ``.bin`` weights, in the format tools/modelwriter.h ``ModelWriter::save``
writes (magic 7767517; ``key=value`` params, arrays as ``-233xx=n,v,...``; weights with a
storage tag, then raw float32 bias and int8 scales, each padded to 4 bytes).
"""

from __future__ import annotations

import io
import struct

import numpy as np

from calibrator.ncnn.arith import format_param_float
from calibrator.ncnn.model import NcnnGraph, NcnnLayer

MAGIC = 7767517
TAG_FP32, TAG_FP16, TAG_INT8 = 0, 0x01306B47, 0x000D4B38
FLT_MIN = np.finfo(np.float32).tiny


def _value(value) -> str:
    if isinstance(value, (bool, int, np.integer)):
        return "%d" % int(value)
    return format_param_float(value)


def _param_text(key: int, value) -> str:
    if isinstance(value, (list, tuple)):
        items = "".join("," + _value(v) for v in value)
        return f" {-23300 - key}={len(value)}{items}"
    return f" {key}={_value(value)}"


def weighted_params(layer: NcnnLayer) -> dict[int, object]:
    """Params of a Convolution/ConvolutionDepthWise/Deconvolution/InnerProduct in
    modelwriter's order, values equal to ncnn's defaults left out as modelwriter does."""
    p = layer.params
    if layer.type == "InnerProduct":
        out = {0: p[0], 1: p.get(1, 0), 2: p[2], 8: layer.int8_scale_term,
               9: layer.activation_type}
        defaults = {0: 0, 1: 0, 2: 0, 8: 0, 9: 0}
    else:
        kw, dw, sw, pw = p[1], p.get(2, 1), p.get(3, 1), p.get(4, 0)
        kh, dh, sh, ph = p.get(11, kw), p.get(12, dw), p.get(13, sw), p.get(14, pw)
        out = {0: p[0], 1: kw, 11: kh, 2: dw, 12: dh, 3: sw, 13: sh, 4: pw, 14: ph,
               5: p.get(5, 0), 6: p[6], 7: p.get(7, 1), 8: layer.int8_scale_term,
               9: layer.activation_type}
        defaults = {0: 0, 1: 0, 11: kw, 2: 1, 12: dw, 3: 1, 13: sw, 4: 0, 14: pw, 5: 0, 6: 0,
                    7: 1, 8: 0, 9: 0}
        if layer.type in ("Convolution", "Deconvolution"):
            out.pop(7)
        if layer.type.startswith("Deconvolution"):
            out.pop(8)
    out = {k: v for k, v in out.items() if v != defaults.get(k)}
    if layer.activation_params:
        out[10] = [float(v) for v in layer.activation_params]
    return out


def param_text(graph: NcnnGraph) -> str:
    live = graph.live()
    lines = [str(MAGIC), f"{len(live)} {len(graph.blob_names())}"]
    for layer in live:
        line = (f"{layer.type:<24} {layer.name:<24} {len(layer.bottoms)} {len(layer.tops)}"
                + "".join(" " + b for b in layer.bottoms) + "".join(" " + t for t in layer.tops))
        params = weighted_params(layer) if layer.weighted else layer.params
        line += "".join(_param_text(k, v) for k, v in params.items())
        lines.append(line)
    return "\n".join(lines) + "\n"


def _no_denormals(values: np.ndarray) -> np.ndarray:
    """modelwriter's replace_denormals_with_zero for float32 data."""
    values = np.asarray(values, np.float32).reshape(-1).copy()
    values[np.abs(values) < FLT_MIN] = 0
    return values


def _pad4(buffer: io.BytesIO, start: int) -> None:
    written = buffer.tell() - start
    buffer.write(b"\0" * (-written % 4))


def _tagged(buffer: io.BytesIO, values: np.ndarray, fp16: bool) -> None:
    """fwrite_weight_tag_data: storage tag, data, padding."""
    start = buffer.tell()
    if values.dtype == np.int8:
        buffer.write(struct.pack("<i", TAG_INT8))
        buffer.write(values.tobytes())
    elif fp16:
        buffer.write(struct.pack("<i", TAG_FP16))
        buffer.write(np.asarray(values, np.float32).astype("<f2").tobytes())
    else:
        buffer.write(struct.pack("<i", TAG_FP32))
        buffer.write(_no_denormals(values).astype("<f4").tobytes())
    _pad4(buffer, start)


def _raw(buffer: io.BytesIO, values) -> None:
    """fwrite_weight_data: raw float32, denormals zeroed, padding."""
    start = buffer.tell()
    buffer.write(_no_denormals(values).astype("<f4").tobytes())
    _pad4(buffer, start)


def bin_bytes(graph: NcnnGraph) -> bytes:
    buffer = io.BytesIO()
    for layer in graph.live():
        if layer.weighted:
            q = layer.int8
            _tagged(buffer, q.weight if q is not None else layer.weight, layer.fp16_weight)
            if layer.bias is not None:
                _raw(buffer, layer.bias)
            if q is not None:
                _raw(buffer, q.weight_scales)
                _raw(buffer, [q.bottom_scale])
                if q.top_scale is not None:
                    _raw(buffer, [q.top_scale])
        else:
            for array in layer.arrays:
                _raw(buffer, array)
    return buffer.getvalue()
