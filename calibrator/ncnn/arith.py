"""ncnn's scalar arithmetic, reproduced bit for bit in float32 (numpy and torch).

Each helper names the ncnn source it mirrors (paths relative to Tencent/ncnn).
"""

from __future__ import annotations

import numpy as np
import torch

INT8_MAX = 127  # ncnn saturates to [-127, 127], never -128


def float2int8(v: torch.Tensor) -> torch.Tensor:
    """``float2int8_avx512`` / ``float2int8_avx`` / ``float2int8_sse``
    (src/layer/x86/x86_usability.h): ``trunc(v + copysign(0.5f, v))`` with the addition
    rounded to float32, then saturated to [-127, 127]. This equals C ``round()`` (half away
    from zero, ``float2int8`` in src/layer/convolution.cpp) except for v = +-(0.5 - 2^-25),
    where the float32 sum rounds up to 1. Returns integer values in a float32 tensor."""
    v = v.float()
    # v + copysign(0.5f, v): -0.0 + 0.5 and -0.0 - 0.5 both truncate to 0
    return torch.where(v < 0, v - 0.5, v + 0.5).trunc_().clamp_(-INT8_MAX, INT8_MAX)


def float2int8_np(v: np.ndarray) -> np.ndarray:
    """:func:`float2int8` on a numpy float32 array, returned as int8 (the weight quantizer:
    ``ncnn::quantize_to_int8`` -> ``Quantize_x86``, src/layer/x86/quantize_x86.cpp)."""
    v = np.asarray(v, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        s = v + np.copysign(np.float32(0.5), v).astype(np.float32)
    return np.clip(np.trunc(s), -INT8_MAX, INT8_MAX).astype(np.int8)


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add, ``_mm512_fmadd_ps(a, b, c)``: a*b + c rounded once
    (b and c may broadcast against a).

    a*b of two float32 is exact in float64; rounding the float64 sum to float32 then rounds
    twice, which differs from one rounding only where the float64 sum lies exactly halfway
    between two float32 (its low 29 mantissa bits are 1000...0) while the exact sum does
    not. There the error of the float64 sum (TwoSum) says which neighbour is nearer."""
    c64 = c.double()
    p = a.double() * b.double()                # exact
    s = p + c64
    r = s.float()
    bits = s.view(torch.int64)
    halfway = (bits & ((1 << 29) - 1)) == (1 << 28)
    if bool(halfway.any()):
        z = s - p                              # TwoSum: p + c == s + err exactly
        err = (p - (s - z)) + (c64 - z)
        away = (err != 0) & ((err > 0) == (s > 0))
        toward = (err != 0) & ~away
        magnitude_up = (bits + (1 << 28)).view(torch.float64).float()
        magnitude_down = (bits - (1 << 28)).view(torch.float64).float()
        r = torch.where(halfway & away, magnitude_up, r)
        r = torch.where(halfway & toward, magnitude_down, r)
    return r


def reciprocal_scale(bottom_scale, weight_scale) -> np.float32:
    """``scale_in = 1.f / (bottom_blob_int8_scales[0] * weight_data_int8_scales[p])``, 0
    for a zero weight scale (Convolution_x86::create_pipeline_int8_x86,
    src/layer/x86/convolution_x86.cpp; InnerProduct_x86 likewise)."""
    bottom_scale, weight_scale = np.float32(bottom_scale), np.float32(weight_scale)
    if weight_scale == 0:
        return np.float32(0)
    with np.errstate(over="ignore", divide="ignore"):
        return np.float32(1) / np.float32(bottom_scale * weight_scale)


def to_fp16(values: np.ndarray) -> np.ndarray:
    """float32 -> float16 -> float32 as ``ncnn::cast_float32_to_float16`` (F16C
    ``_mm*_cvtps_ph`` with _MM_ROUND_NEAREST, src/layer/x86/cast_fp16.h) when ncnn2int8 or
    ncnnoptimize store weights in fp16 (tools/modelwriter.h fwrite_weight_tag_data)."""
    return np.asarray(values, np.float32).astype(np.float16).astype(np.float32)


def parse_param_float(text: str) -> np.float32:
    """The float32 ncnn's ``vstr_to_float`` (src/paramdict.cpp) reads from ``text``: integer
    and fraction digits in unsigned int, the exponent applied as powers of ten in double."""
    p = 0
    sign = text[p:p + 1] != "-"
    if text[p:p + 1] in "+-" and text[p:p + 1]:
        p += 1
    v1 = 0
    while p < len(text) and text[p].isdigit():
        v1 = (v1 * 10 + int(text[p])) & 0xFFFFFFFF
        p += 1
    v = float(v1)
    if p < len(text) and text[p] == ".":
        p += 1
        pow10, v2 = 1, 0
        while p < len(text) and text[p].isdigit():
            v2 = (v2 * 10 + int(text[p])) & 0xFFFFFFFF
            pow10 = (pow10 * 10) & 0xFFFFFFFF
            p += 1
        v += v2 / float(pow10)
    if p < len(text) and text[p] in "eE":
        p += 1
        fact = text[p:p + 1] != "-"
        if text[p:p + 1] in "+-" and text[p:p + 1]:
            p += 1
        expon = 0
        while p < len(text) and text[p].isdigit():
            expon = expon * 10 + int(text[p])
            p += 1
        scale = 1.0
        while expon >= 8:
            scale *= 1e8
            expon -= 8
        while expon > 0:
            scale *= 10.0
            expon -= 1
        v = v * scale if fact else v / scale
    return np.float32(v if sign else -v)


def format_param_float(value: float) -> str:
    """A float param value as ncnn's tools print it (``%e``, tools/modelwriter.h)."""
    return "%e" % float(value)


def param_float(value: float) -> np.float32:
    """The float32 ncnn ends up with for a float param we write with ``%e``."""
    return parse_param_float(format_param_float(value))
