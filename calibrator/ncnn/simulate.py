"""ncnn's INT8 inference (x86), simulated on the Caffe graph as ``CaffeNet.forward`` overrides.

Each ncnn Convolution / ConvolutionDepthWise / InnerProduct layer of the written model runs
on its main Caffe node; the Caffe nodes ncnnoptimize fused into it (BatchNorm, Scale, the
activation, an eliminated Dropout or Split) are skipped, and the last of them writes the
result. For an int8 layer (src/layer/x86/convolution_x86.cpp ``forward_int8_x86``,
convolutiondepthwise_x86.cpp, innerproduct_x86.cpp):

  q_in  = float2int8(x * bottom_scale)            (skipped when x is already int8)
  acc   = sum q_in * q_w                           exact int32
  scale = 1 / (bottom_scale * weight_scale[o])     float32 division; rcpps for the packed
                                                   depthwise path (see ``reciprocal``)
  y     = float(acc) * scale + bias                one rounding (fma) or two, per kernel:
                                                   see ``dequantize_rule``
  y     = activation(y)                            ReLU / leaky / Clip, as ncnn's fused ones
  out   = y, or float2int8(y * top_scale) when ncnn2int8 fused the requantization

An int8 output (requantized for the next convolution) is passed on as its integers (a
float32 tensor of integer values): hooks and ``keep_all`` see those integers there.
Layers ncnn keeps in float run in float32 with the weights the model stores (fp16-rounded
after ncnn2int8); everything else (Eltwise, Pooling, Softmax, ...) runs as the Caffe layer.
Those float parts agree with ncnn to float32 rounding, not bit for bit (ncnn sums in another
order); the int8 layers are exact.

Exact accumulation reuses ``calibrator.quant.simulate._digit_bits``: one float32 pass while
127 x (largest per-channel sum of |q_w|) < 2^24, else the input is split into digits that are
each accumulated exactly (the loop of ``_UnitKernel.exact_accumulate``, duplicated here
because that one is bound to an Intel unit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from calibrator.ncnn.arith import fma_f32, float2int8, reciprocal_scale, to_fp16
from calibrator.ncnn.model import NcnnGraph, NcnnLayer
from calibrator.ncnn.runtime import ncnn_available, probe_reciprocal
from calibrator.ncnn.serialize import FLT_MIN
from calibrator.ncnn.writer import build_ncnn_graph
from calibrator.quant.simulate import _digit_bits

F32 = np.float32


def dequantize_rule(layer: NcnnLayer) -> str:
    """How the layer's x86 int8 kernel turns ``acc`` into float: ``"fma"`` (one rounding:
    Dequantize_x86 / Requantize_x86 use ``_mm512_fmadd_ps``, and GCC contracts the scalar
    ``*outptr += (float)sum * scale`` of convolutiondepthwise_3x3_int8.h) or ``"mul_add"``
    (``_mm_add_ps(_mm_mul_ps(...), bias)`` and scalar ``sum * scale_in; += bias``, left
    uncontracted: the packed depthwise path, the generic elempack-1 depthwise loop,
    InnerProduct_x86::forward_int8_x86). Measured against the ncnn package on every path:
    the other rule disagrees in 10-40 % of the outputs, this one in none."""
    if layer.type == "InnerProduct":
        return "mul_add"
    if layer.type == "ConvolutionDepthWise" and layer.group == layer.params[0]:
        if packed_depthwise(layer):
            return "mul_add"
        p = layer.params
        kw, dw, sw = p.get(1), p.get(2, 1), p.get(3, 1)
        special = ((kw, p.get(11, kw)) == (3, 3) and (dw, p.get(12, dw)) == (1, 1)
                   and sw == p.get(13, sw) and sw in (1, 2) and layer.activation_type in (0, 1))
        return "fma" if special else "mul_add"
    return "fma"  # Convolution, and grouped ConvolutionDepthWise (per-group Convolution ops)


def packed_depthwise(layer: NcnnLayer) -> bool:
    """Whether ConvolutionDepthWise_x86 runs this layer's int8 forward on the elempack-8
    path (channels == group == num_output, a multiple of 8, packing layout on), the one
    that dequantizes with ``_mm_rcp_ps``."""
    return (layer.type == "ConvolutionDepthWise" and layer.group == layer.params[0]
            and layer.group % 8 == 0)


def loaded_float(values: np.ndarray, fp16: bool) -> np.ndarray:
    """A float weight as ncnn holds it after loading our file: fp16-rounded when stored as
    fp16, denormals zeroed (tools/modelwriter.h replace_denormals_with_zero)."""
    values = np.asarray(values, F32)
    if fp16:
        return to_fp16(values)
    out = values.copy()
    out[np.abs(out) < FLT_MIN] = 0
    return out


@dataclass
class _Kernel:
    layer: NcnnLayer
    module: object              # the Caffe layer (its run_with runs the convolution)
    weight: torch.Tensor        # int8 values or float weights, in the Caffe weight shape
    bias: torch.Tensor | None   # float32
    scale_in: torch.Tensor | None     # float32 per output channel (int8 layers)
    int8_input: bool = False
    split: int | None = None
    rule: str = "fma"

    @property
    def int8(self):
        return self.layer.int8

    def accumulate(self, q: torch.Tensor) -> torch.Tensor:
        """conv(q, q_w) exactly, as float64 integers: the int32 sums of ncnn's
        convolution_im2col_gemm_int8 / convolution_packed_int8 / conv3x3s1_winograd43_int8
        (src/layer/x86/*.h), depthwise and innerproduct loops."""
        run = self.module.run_with
        if self.split is None:
            return run(q, self.weight, None).double()
        if self.split == 0:
            return run(q.double(), self.weight.double(), None)
        base, rest, acc = 2 ** self.split, q, None
        digits = -(-8 // self.split)
        for k in range(digits):
            high = torch.div(rest, base, rounding_mode="floor") if k < digits - 1 else None
            digit = rest if high is None else rest - base * high
            part = run(digit, self.weight, None).double() * float(base ** k)
            acc = part if acc is None else acc + part
            rest = high
        return acc


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape((1, -1) + (1,) * (like.dim() - 2))


def activate(y: torch.Tensor, activation_type: int, params) -> torch.Tensor:
    """ncnn's fused activations (src/layer/x86/x86_activation.h ``activation_avx512``)."""
    if activation_type == 1:
        return y.clamp_min(0)
    if activation_type == 2:
        return torch.where(y > 0, y, y * F32(params[0]))
    if activation_type == 3:
        return y.clamp_min(F32(params[0])).clamp_max(F32(params[1]))
    if activation_type == 4:
        return torch.sigmoid(y)
    return y


class NcnnSimulator:
    """Overrides for ``CaffeNet.forward`` that compute what ncnn computes with the model
    :func:`calibrator.ncnn.writer.write_ncnn_model` writes for the same net and plan.

    ``reciprocal``: how to compute rcpps for packed depthwise layers: ``"auto"`` (ask
    ncnn on this CPU when the package is installed, else the exact reciprocal), ``"ncnn"``,
    ``"exact"``, or a function from float32 array to float32 array."""

    def __init__(self, fused, plan=None, *, graph: NcnnGraph | None = None,
                 reciprocal="auto", device=None):
        net = getattr(fused, "net", fused)
        self.net = net
        self.plan = plan
        self.graph = graph if graph is not None else build_ncnn_graph(net, plan)
        self.reciprocal = _reciprocal_function(reciprocal)
        device = device or net.device
        self.kernels: dict[str, _Kernel] = {}
        self.overrides = {}
        int8_blobs = self._int8_blobs()
        for layer in self.graph.live():
            if not layer.weighted or not layer.nodes:
                continue
            if layer.int8 is None and not layer.fp16_weight and len(layer.nodes) == 1:
                continue  # the Caffe layer itself computes the same float32 function
            kernel = self._kernel(layer, device, layer.bottoms[0] in int8_blobs)
            self.kernels[layer.name] = kernel
            for index in layer.nodes:
                self.overrides[index] = _skip
            first, last = layer.nodes[0], max(layer.nodes)
            self.overrides[first] = self._start(kernel, single=first == last)
            if last != first:
                self.overrides[last] = self._finish(kernel)
        for layer in self.graph.live():
            if layer.type == "Pooling" and layer.params.get(4, 0) and layer.params.get(0) == 1:
                self.overrides[layer.nodes[0]] = _global_average  # a fused Flatten still runs

    # -- construction ------------------------------------------------------------------------
    def _int8_blobs(self) -> set[str]:
        """ncnn blobs that hold int8 values: requantized outputs and the Split tops of one."""
        blobs = set()
        for layer in self.graph.live():
            if layer.int8 is not None and layer.int8.top_scale is not None:
                blobs.add(layer.tops[0])
        for layer in self.graph.live():
            if layer.type == "Split" and layer.bottoms[0] in blobs:
                blobs.update(layer.tops)
        return blobs

    def _kernel(self, layer: NcnnLayer, device, int8_input: bool) -> _Kernel:
        module = self.net.nodes[layer.nodes[0]].module
        q = layer.int8
        if layer.type.startswith("Deconvolution"):
            # ncnn's (g, O/g, I/g, k) back to Caffe's (I, O/g, kh, kw) (convert._deconvolution)
            shape = tuple(module.weight.shape)
            g = layer.group
            w = loaded_float(layer.weight, layer.fp16_weight).reshape(
                g, shape[1], shape[0] // g, shape[2] * shape[3]).transpose(0, 2, 1, 3)
            weight = torch.from_numpy(np.ascontiguousarray(w).reshape(shape)).to(device)
        elif q is not None:
            shape = tuple(module.weight_bias()[0].shape)
            weight = torch.from_numpy(q.weight.astype(F32).reshape(shape)).to(device)
        else:
            shape = tuple(module.weight_bias()[0].shape)
            weight = torch.from_numpy(loaded_float(layer.weight, layer.fp16_weight)
                                      .reshape(shape)).to(device)
        bias = None
        if layer.bias is not None:
            bias = torch.from_numpy(loaded_float(layer.bias, False)).to(device)
        scale_in, split = None, None
        if q is not None:
            per_out = np.repeat(q.weight_scales, layer.params[0] // len(q.weight_scales))
            if packed_depthwise(layer):
                products = (F32(q.bottom_scale) * per_out.astype(F32)).astype(F32)
                scale_in = np.where(per_out != 0, self.reciprocal(products), F32(0))
            else:
                scale_in = np.asarray([reciprocal_scale(q.bottom_scale, s) for s in per_out])
            scale_in = torch.from_numpy(scale_in.astype(F32)).to(device)
            weight_l1 = float(weight.abs().reshape(shape[0], -1).sum(1).max())
            split = _digit_bits(weight_l1, 127)
        return _Kernel(layer, module, weight, bias, scale_in, int8_input, split,
                       dequantize_rule(layer))

    # -- running -----------------------------------------------------------------------------
    def _start(self, kernel: _Kernel, single: bool):
        key = f"\0ncnn:{kernel.layer.name}"

        def start(node, blobs):
            y = self.compute(kernel, blobs[node.bottoms[0]])
            if single:
                return (y,) * len(node.tops)
            blobs[key] = y
            return None

        return start

    def _finish(self, kernel: _Kernel):
        key = f"\0ncnn:{kernel.layer.name}"

        def finish(node, blobs):
            return (blobs.pop(key),) * len(node.tops)

        return finish

    def compute(self, kernel: _Kernel, x: torch.Tensor) -> torch.Tensor:
        """One ncnn layer on its (batched) bottom."""
        layer = kernel.layer
        q = kernel.int8
        if q is None:
            m = kernel.module
            if layer.type.startswith("Deconvolution"):
                y = F.conv_transpose2d(x.float(), kernel.weight, kernel.bias, m.stride, m.pad, 0,
                                       m.group, m.dilation)
            else:
                y = m.run_with(x.float(), kernel.weight, kernel.bias)
            return activate(y, layer.activation_type, layer.activation_params)
        if kernel.int8_input:
            q_in = x.float()
        else:
            q_in = float2int8(x.float() * torch.tensor(F32(q.bottom_scale)))
        acc = kernel.accumulate(q_in).float()
        scale = _per_channel(kernel.scale_in, acc)
        if kernel.bias is None:
            y = acc * scale
        elif kernel.rule == "fma":
            y = fma_f32(acc, scale, _per_channel(kernel.bias, acc))
        else:
            y = acc * scale + _per_channel(kernel.bias, acc)
        y = activate(y, layer.activation_type, layer.activation_params)
        if q.top_scale is not None:
            y = float2int8(y * torch.tensor(F32(q.top_scale)))
        return y


def _skip(node, blobs):
    return None


def _global_average(node, blobs):
    """Global AVE pooling as Pooling_x86 computes it (src/layer/x86/pooling_x86.cpp
    ``forward``): per channel a float32 sum in pixel order, then times ``1.f / size`` on the
    packed layout (channels a multiple of 4), divided by size unpacked (Pooling::forward)."""
    x = blobs[node.bottoms[0]].float()
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    total = torch.zeros(n, c, dtype=torch.float32, device=x.device)
    for i in range(flat.shape[2]):
        total = total + flat[:, :, i]
    size = flat.shape[2]
    out = total * torch.tensor(F32(1) / F32(size)) if c % 4 == 0 else total / F32(size)
    return (out.reshape(n, c, 1, 1),) * len(node.tops)


def _reciprocal_function(choice):
    if callable(choice):
        return choice
    if choice == "exact":
        return _exact_reciprocal
    if choice == "ncnn" or (choice == "auto" and ncnn_available()):
        return probe_reciprocal
    if choice == "auto":
        return _exact_reciprocal
    raise ValueError(f"unknown reciprocal '{choice}' (auto, ncnn, exact or a function)")


def _exact_reciprocal(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return (F32(1) / np.asarray(values, F32)).astype(F32)
