"""Helpers for the quantization tests: tiny nets from prototxt text, calibration in memory,
and *independent* numpy references (BatchNorm/Scale folding, integer convolution)."""

from __future__ import annotations

import numpy as np
import torch

from calibrator.graph.net import CaffeNet
from calibrator.quant.fusion import analyze
from calibrator.quant.scales import QuantOptions, build_plan
from calibrator.quant.statistics import collect
from tests.netutil import parse_net, random_weights


def conv_text(name, bottom, top, num_output, kernel=1, extra="", type_name="Convolution"):
    return (f'layer {{ name: "{name}" type: "{type_name}" bottom: "{bottom}" top: "{top}" '
            f'convolution_param {{ num_output: {num_output} kernel_size: {kernel} '
            f'pad: {kernel // 2} {extra} }} }}\n')


def relu_text(name, blob, slope=None):
    param = f"relu_param {{ negative_slope: {slope} }}" if slope is not None else ""
    return f'layer {{ name: "{name}" type: "ReLU" bottom: "{blob}" top: "{blob}" {param} }}\n'


def bn_scale_text(prefix, blob):
    return (f'layer {{ name: "{prefix}_bn" type: "BatchNorm" bottom: "{blob}" top: "{blob}" }}\n'
            f'layer {{ name: "{prefix}_scale" type: "Scale" bottom: "{blob}" top: "{blob}" '
            f'scale_param {{ bias_term: true }} }}\n')


def input_text(shape, name="data"):
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'layer {{ name: "input" type: "Input" top: "{name}" '
            f'input_param {{ shape {{ {dims} }} }} }}\n')


class TinyNet:
    """A net built from text with random weights, plus a fixed list of calibration feeds."""

    def __init__(self, text: str, seed: int = 0, weights=None, batches=None,
                 nonnegative_input: bool = False):
        self.net_param = parse_net(text)
        self.weights = weights if weights is not None else random_weights(self.net_param,
                                                                           seed=seed)
        self.net = CaffeNet(self.net_param, self.weights).eval()
        if batches is None:
            rng = np.random.default_rng(seed + 100)
            batches = []
            for _ in range(2):
                feeds = {}
                for name, shape in self.net.input_shapes.items():
                    x = rng.normal(0, 1, shape).astype(np.float32)
                    feeds[name] = np.abs(x) if nonnegative_input else x
                batches.append(feeds)
        self.batches = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}
                        for b in batches]

    def calibrate(self, quantize_fc=False, **options):
        options = QuantOptions(quantize_fc=quantize_fc, **options)
        self.fused = analyze(self.net, quantize_fc=quantize_fc)
        self.stats = collect(self.net, self.fused, iter(self.batches))
        self.plan = build_plan(self.fused, self.stats, options)
        return self.plan

    def versions(self) -> list[dict[int, dict[str, np.ndarray]]]:
        """Per batch: node index -> {top name: FP32 value written by that node}; -1 holds
        the feeds. Every version of an in-place blob is kept."""
        if getattr(self, "_versions", None) is None:
            self._versions = self._run_versions()
        return self._versions

    def _run_versions(self):
        out = []
        for feeds in self.batches:
            seen = {-1: {k: v.numpy().copy() for k, v in feeds.items()}}

            def hook(node, tops, seen=seen):
                seen[node.index] = {t: v.detach().numpy().copy() for t, v in zip(node.tops, tops)}

            with torch.no_grad():
                self.net(feeds, hook=hook)
            out.append(seen)
        return out

    def node_index(self, name: str) -> int:
        return self.net.node(name).index

    def absmax_after(self, layer: str, blob: str | None = None) -> float:
        """max |x| over every batch of what ``layer`` wrote (its first top by default)."""
        index = self.node_index(layer)
        blob = blob or self.net.node(layer).tops[0]
        return max(float(np.abs(v[index][blob]).max()) for v in self.versions())


# -- numpy references ----------------------------------------------------------------------

def fold_bn_scale(weight, bias, bn_blobs, scale_blobs, eps=1e-5):
    """Caffe BatchNorm (running sums / factor, eps) then Scale (gamma, beta) folded into a
    convolution, in float64: W' = W * a, b' = b * a + c."""
    weight = np.asarray(weight, np.float64)
    bias = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, np.float64)
    factor = float(bn_blobs[2][0])
    mean = np.asarray(bn_blobs[0], np.float64) * (0 if factor == 0 else 1 / factor)
    var = np.asarray(bn_blobs[1], np.float64) * (0 if factor == 0 else 1 / factor)
    a = 1 / np.sqrt(var + eps)
    weight, bias = weight * a[:, None, None, None], (bias - mean) * a
    gamma = np.asarray(scale_blobs[0], np.float64)
    beta = np.asarray(scale_blobs[1], np.float64) if len(scale_blobs) > 1 else 0
    return weight * gamma[:, None, None, None], bias * gamma + beta


def conv_int64(x, w, stride=(1, 1), pad=(0, 0), dilation=(1, 1), group=1):
    """Integer 2-D convolution by explicit im2col, all in int64 (Caffe's cross-correlation,
    zero padding)."""
    x = np.asarray(x, np.int64)
    w = np.asarray(w, np.int64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    assert c == cg * group and o % group == 0
    padded = np.zeros((n, c, h + 2 * pad[0], wd + 2 * pad[1]), np.int64)
    padded[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + wd] = x
    oh = (h + 2 * pad[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * pad[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = np.zeros((n, c, kh, kw, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilation[0], j * dilation[1]
            cols[:, :, i, j] = padded[:, :, r0:r0 + stride[0] * (oh - 1) + 1:stride[0],
                                      c0:c0 + stride[1] * (ow - 1) + 1:stride[1]]
    out = np.zeros((n, o, oh, ow), np.int64)
    og = o // group
    for g in range(group):
        part = cols[:, g * cg:(g + 1) * cg]
        out[:, g * og:(g + 1) * og] = np.einsum("nckluv,ockl->nouv", part,
                                                w[g * og:(g + 1) * og])
    return out


def quantize_input(x, scale, unsigned, bits=8):
    """What the runtime's reorder does with float32 activations: float32 product with the
    float32 scale, round half to even, saturate."""
    lo, hi = (0, 2 ** bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    product = np.asarray(x, np.float32) * np.float32(scale)
    return np.clip(np.rint(product), lo, hi).astype(np.int64)


def quantize_weights(w, scales, bits=8):
    """Intel's weight reorder (simple_q10n.hpp): float32 product with the float32 scale,
    round half to even, saturate to s8."""
    limit = 2 ** (bits - 1) - 1
    w = np.asarray(w, np.float32)
    scales = np.asarray(scales, np.float32).reshape((-1,) + (1,) * (w.ndim - 1))
    return np.clip(np.rint(w * scales), -limit - 1, limit).astype(np.int64)


def quantize_bias(b, scale_in, scales):
    """Intel's bias reorder (mkldnn_convolution_layer.cpp :537-554): scale
    f32(scale_in * scale_params[o]) (1 for a zero weight scale), float32 product, rint,
    saturated to s32."""
    scales = np.asarray(scales, np.float32)
    product = np.float32(scale_in) * scales
    product = np.where(scales == 0, np.float32(1), product).astype(np.float32)
    q = np.rint((np.asarray(b, np.float32) * product).astype(np.float64))
    return np.clip(q, -2 ** 31, 2 ** 31 - 1).astype(np.int64)


def intel_output(acc, q_bias, scale_in, scales, scale_out, dtype, slope=None, q_res=None,
                 res_scale=None, bits=8, coeff=(1.0, 1.0)):
    """Intel's conv/inner-product epilogue (jit_avx512_core_x8s8s32x_conv_kernel.cpp
    store_output), written from the kernel: y = (f32(acc) + f32(bias)) * f32(m[o]) with
    m = f32(s_out / f32(s_in * s_w)) * coeff(1) in float32; a fused sum adds
    f32(f32(s_out / s_res) * coeff(0)) * f32(q_res) with one rounding (vfmadd231ps); ReLU
    (y * slope below 0); u8: max(0); then round half to even and saturate. ``dtype``
    "u8"/"s8" gives the integers, None the float32 y. ``coeff``: the absorbed Eltwise's
    (residual, conv) coefficients (mkldnn_convolution_layer.cpp :340-392)."""
    scales = np.asarray(scales, np.float32).reshape(1, -1, 1, 1)
    product = np.float32(scale_in) * scales
    m = np.where(scales == 0, np.float32(scale_out),
                 np.float32(scale_out) / np.where(scales == 0, np.float32(1), product))
    m = (m.astype(np.float32) * np.float32(coeff[1])).astype(np.float32)
    y = np.asarray(acc).astype(np.float32) + np.asarray(q_bias).astype(np.float32).reshape(
        1, -1, 1, 1)
    y = (y * m.astype(np.float32)).astype(np.float32)
    if q_res is not None:
        sum_scale = np.float32(np.float32(np.float32(scale_out) / np.float32(res_scale))
                               * np.float32(coeff[0]))
        y = (y.astype(np.float64) + np.float64(sum_scale) * np.asarray(q_res, np.float64)
             ).astype(np.float32)
    if slope is not None:
        y = np.where(y > 0, y, y * np.float32(slope)).astype(np.float32)
    if dtype is None:
        return y
    lo, hi = (0, 2 ** bits - 1) if dtype == "u8" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return np.clip(np.rint(y), lo, hi).astype(np.int64)


def dequantized(q, scale_out) -> np.ndarray:
    """What the next layer reads from INT8 memory: f32(q) * f32(1 / scale)."""
    return (np.asarray(q, np.float32) * (np.float32(1) / np.float32(scale_out))).astype(
        np.float32)


def as_integers(values, scale_out) -> np.ndarray:
    """The integers behind simulated INT8 output (float value * scale_out), checked to be
    integers up to the float32 storage of the dequantized value."""
    scaled = np.asarray(values, np.float64) * scale_out
    rounded = np.rint(scaled)
    assert np.abs(scaled - rounded).max(initial=0) < 1e-3, "not INT8 values"
    return rounded.astype(np.int64)
