"""An independent numpy reference of Intel Caffe 1.1.6 + MKL-DNN v0.18 INT8 data movement,
written from Intel's sources (not from our simulator), for the kernel-rule and -fu tests:
reorders between INT8 memories, Concat, AVE pooling, the standalone Eltwise and the data
transformer's pad. The convolution itself (integer accumulation, weight and bias reorders,
the float32 epilogue) is in ``tests/quant_helpers.py`` (``conv_int64``,
``quantize_weights``, ``quantize_bias``, ``intel_output``). Integers are numpy int64;
``rint`` rounds half to even, as ``vcvtps2dq {rn-sae}`` and ``nearbyintf``.
"""

from __future__ import annotations

import numpy as np

F = np.float32
BOUNDS = {"u8": (0, 255), "s8": (-128, 127)}


def sat(q, dtype: str):
    low, high = BOUNDS[dtype]
    return np.clip(q, low, high)


def quantize(x, scale: float, dtype: str):
    """f32 data into an INT8 memory at ``scale`` (the usr->prv reorder)."""
    return sat(np.rint(F(x) * F(scale)), dtype).astype(np.int64)


def reorder(q, s_from: float, s_to: float, dtype: str):
    """INT8 -> INT8 at another scale (extprv reorder: output scale s_to / s_from)."""
    if F(s_from) == F(s_to):
        return sat(q, dtype).astype(np.int64)
    factor = F(F(s_to) / F(s_from))
    return sat(np.rint(F(q) * factor), dtype).astype(np.int64)


def dequantize(q, scale: float):
    """What Caffe reads from INT8 memory: f32(q) * f32(1 / scale)."""
    return F(q) * F(F(1.0) / F(scale))


def ave_pool(q, kernel: int, stride: int, dtype: str):
    """AVE pooling on INT8 (no padding, windows inside): rint(f32(sum) * f32(1 / n))."""
    n, c, h, w = q.shape
    oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    total = np.zeros((n, c, oh, ow), np.int64)
    for i in range(kernel):
        for j in range(kernel):
            total += q[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
    return sat(np.rint(F(total) * F(F(1) / F(kernel * kernel))), dtype).astype(np.int64)


def concat(parts, dtype: str):
    """Intel's Concat of INT8 inputs (q, scale) of one data type: every input reordered to
    the smallest scale (1.0 = unset: relabelled), output at that scale."""
    scales = [s for _, s in parts if s != 1.0]
    smallest = min(scales) if scales else 1.0
    out = [q if s in (smallest, 1.0) else reorder(q, s, smallest, dtype) for q, s in parts]
    return np.concatenate(out, axis=1), smallest


def eltwise(parts, dtype: str, coeffs=None):
    """Intel's standalone Eltwise SUM of INT8 inputs (q, scale) of one data type: each
    reordered to scale 1.0, then MKL-DNN's ref_sum, d = sat(rint(c_i q_i' + d)); scale 1."""
    coeffs = coeffs or [1.0] * len(parts)
    total = None
    for (q, s), c in zip(parts, coeffs):
        q1 = reorder(q, s, 1.0, dtype)
        term = F(q1) * F(c)
        total = sat(np.rint(term if total is None else term + F(total)), dtype)
    return total.astype(np.int64)


def force_u8_data(hwc_u8, mean, scale, pad, crop=0):
    """DataTransformer::Transform(cv::Mat) with Intel's pad (data_transformer.cpp
    :1062-1124) on an OpenCV image (H x W x C uint8): the center crop is a ROI, and
    copyMakeBorder on a ROI takes the border from the image around it (OpenCV extends a ROI
    into its parent), 0 beyond; then a pixel at (h, w) of the padded H' x W' image stays raw
    where h < pad or w < pad or h > H' - pad or w > W' - pad, and is
    nearbyint((p - mean) * scale) elsewhere (row H' - pad and column W' - pad included:
    Intel's off-by-one)."""
    image = np.asarray(hwc_u8).transpose(2, 0, 1)
    _, height, width = image.shape
    crop_h, crop_w = (crop, crop) if crop else (height, width)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    framed = np.zeros((image.shape[0], height + 2 * pad, width + 2 * pad), image.dtype)
    framed[:, pad:pad + height, pad:pad + width] = image        # the parent image, 0 outside
    padded = framed[:, top:top + crop_h + 2 * pad, left:left + crop_w + 2 * pad].astype(F)
    mean = np.asarray(mean, F).reshape(-1, 1, 1)
    value = (padded - mean) * F(scale)
    value = np.rint(value) if pad else value
    _, out_h, out_w = padded.shape
    h = np.arange(out_h).reshape(-1, 1)
    w = np.arange(out_w).reshape(1, -1)
    border = (h < pad) | (w < pad) | (h > out_h - pad) | (w > out_w - pad)
    return np.where(border[None], padded, value).astype(F)
