"""A quantized Caffe net as an ONNX model in QDQ form, with exactly our scales.

Each quantized unit (``calibrator.quant.fusion``) becomes

    x -> QuantizeLinear(1/scale_in) -> DequantizeLinear          activation, uint8
    W' -> int8 initializer -> DequantizeLinear(1/scale_params, axis 0)   folded weights
    b' -> int32 initializer rne(b' * f32(scale_in * scale_params)) -> DequantizeLinear
    (weights and bias rounded as Intel's reorders do: ``quant.simulate.intel_constants``)
    Conv (or Flatten + Gemm) [-> Q/DQ -> Add residual] [-> Relu / LeakyRelu]
    -> QuantizeLinear(1/scale_out) -> DequantizeLinear             INT8 outputs only

so that ONNX Runtime's graph optimizer fuses them into QLinearConv / QGemm / QLinearAdd and
runs its INT8 kernels. ONNX's scale is the reciprocal of ours (x = (q - zp) * scale).

Activation type. Every activation is ``uint8``: zero point 0 for our u8 tensors and zero
point 128 for our s8 ones. Q(x, s, zp=128) in uint8 is clamp(round(x/s), -128, 127) + 128,
i.e. exactly our s8 grid and clamp, and it keeps each QLinearConv's input and output of one
type (ORT fuses DQ -> Conv -> Q only when both are uint8 or both int8; MobileNetV2 mixes u8
inputs with s8 outputs). It is also what MLAS does internally with int8 activations on x86
(shift by 128, compensate): the arithmetic of the kernels is the same either way.
``signed_type="int8"`` writes int8 with zero point 0 instead.

Differences from the simulation, all deliberate and reported by ``calibrator verify``:

* A unit that absorbed an Eltwise SUM: Intel's kernel adds the residual to the float
  accumulator and quantizes once; ORT has no fused conv + sum, so by default
  (``residual="requant"``) the conv output is quantized first (s8 grid at 127/T_out, T_out the
  unit's output threshold as scale_out stores it, recorded in ``ExportResult.mid_scales``;
  a unit with FP32 output keeps a float conv and add) so the conv runs as
  QLinearConv, and the Add then runs as QLinearAdd. ``calibrator verify`` simulates that
  (``calibrator.backends.ort``).
  ``residual="float"`` keeps Intel's arithmetic (the conv then runs in FP32 on dequantized
  weights).
* Which convs ORT runs as INT8 kernels is decided by its graph optimizer (a Q must follow the
  conv, possibly after a Relu/Clip it can drop): ``calibrator.backends.ort`` asks ORT
  rather than guessing. A unit with FP32 output followed by ReLU6 and the next
  unit's input Q, for instance, does become a QLinearConv.
* 7-bit plans: a Clip to the 7-bit range is inserted before each activation Q.
* ORT requantizes in float32 (scales multiplied in float32); Intel's rule, and so the
  simulation by default, in float64. ``calibrator verify`` gives the simulation ORT's
  constants (``calibrator.backends.ort``) so that it runs ORT's integers.

Layers without an ONNX form here (PriorBox, DetectionOutput, Accuracy, losses, ...) and
everything downstream of them are left out: the ONNX outputs are the tensors they read, and
``calibrator.verify`` runs the rest in PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from calibrator.errors import CalibratorError
from calibrator.fileio import atomic_write
from calibrator.quant.folding import folded_weights
from calibrator.quant.fusion import FusedGraph, FusedUnit
from calibrator.quant.scales import QuantPlan
from calibrator.quant.simulate import intel_constants

OPSET = 13
IR_VERSION = 8  # onnxruntime refuses IR versions newer than it knows; 8 goes with opset 13
FLT_MAX = float(np.finfo(np.float32).max)


class Unsupported(Exception):
    """This layer has no ONNX form here; it runs in PyTorch after the ONNX part."""


@dataclass
class ExportResult:
    model: object                      # onnx.ModelProto
    inputs: list[str]                  # fed blobs (ONNX input name == blob name)
    outputs: dict[str, tuple[int, str]]  # ONNX output -> (producing node index, top name)
    exported: set[int]                 # node indices inside the ONNX graph
    unit_outputs: dict[str, tuple] = field(default_factory=dict)
    #: unit name -> (ONNX name of its quantized output, our scale_out, zero point, is int8)
    left_out: list[str] = field(default_factory=list)   # "layer (type)" run in PyTorch
    #: residual units -> scale of the s8 grid their conv output is rounded to before the Add
    mid_scales: dict[str, float] = field(default_factory=dict)
    #: quantized unit -> name of its Conv/Gemm node (to find it in ORT's optimized graph)
    unit_kernels: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    path: Path | None = None


def _onnx():
    """The optional ``onnx`` package (imported here, not at the top: it is an extra)."""
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:  # pragma: no cover - depends on the environment
        raise CalibratorError("ONNX export needs the 'onnx' package: pip install onnx") from None
    return onnx, helper, numpy_helper


def load_onnx(path):
    """An ONNX model from a file (needs the optional ``onnx`` package)."""
    onnx, _, _ = _onnx()
    return onnx.load(str(path))


class _Exporter:
    def __init__(self, net, fused: FusedGraph, plan: QuantPlan | None, *, residual: str,
                 signed_type: str, unit_outputs: bool):
        self.onnx, self.helper, self.numpy_helper = _onnx()
        self.net = net
        self.fused = fused
        self.plan = plan
        self.residual = residual
        self.signed_type = signed_type
        self.want_unit_outputs = unit_outputs
        self.nodes = []
        self.initializers = []
        self.names: dict[tuple[int, str], str] = {}   # blob version -> ONNX float tensor
        self.latest: dict[str, tuple[int, str]] = {}  # blob name -> current version
        self.used_names: set[str] = set()
        self.conv_out: dict[str, str] = {}
        self.exported: set[int] = set()
        self.left_out: list[str] = []
        self.notes: list[str] = []
        self.unit_outputs: dict[str, tuple] = {}
        self.mid_scales: dict[str, float] = {}
        self.unit_kernels: dict[str, str] = {}
        self.inputs: list[str] = []

    # -- naming and emission ---------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        name, i = hint, 1
        while name in self.used_names:
            i += 1
            name = f"{hint}#{i}"
        self.used_names.add(name)
        return name

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        array = np.asarray(array)
        array = array if array.flags.c_contiguous else array.copy(order="C")
        self.initializers.append(self.numpy_helper.from_array(array, name))
        return name

    def emit(self, op: str, inputs: list[str], hint: str, outputs: int = 1, domain: str = "",
             **attrs) -> list[str]:
        names = [self.fresh(hint if outputs == 1 else f"{hint}:{i}") for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op, inputs, names, name=self.fresh(f"n:{hint}"),
                                                domain=domain or None, **attrs))
        return names


    def read(self, node, bottom_index: int) -> str:
        ref = self.fused.input_of(node, bottom_index)
        name = self.names.get((ref.producer, ref.name))
        if name is None:
            raise Unsupported(f"its input '{ref.name}' is not in the ONNX graph")
        return name

    def ref_name(self, ref) -> str:
        name = self.names.get((ref.producer, ref.name))
        if name is None:
            raise Unsupported(f"'{ref.name}' is not in the ONNX graph")
        return name

    def shape_of(self, index: int, top: str) -> list:
        """The shape of a blob version with a symbolic batch axis."""
        node = self.net.nodes[index]
        shape = list(node.top_shapes[node.tops.index(top)])
        return ["N"] + shape[1:] if shape else shape

    def write(self, node, values: list[str]) -> None:
        for top, value in zip(node.tops, values):
            self.names[(node.index, top)] = value

    # -- quantization helpers -------------------------------------------------------------
    def zero_point(self, unsigned: bool):
        if unsigned:
            return np.array(0, np.uint8)
        if self.signed_type == "int8":
            return np.array(0, np.int8)
        return np.array(128, np.uint8)

    def qdq(self, x: str, scale: float, unsigned: bool, hint: str, bits: int = 8):
        """x -> Q(1/scale) -> DQ; returns (quantized name, dequantized name, zero point)."""
        if scale <= 0:
            scale = 1.0
        if bits < 8:
            low = 0 if unsigned else -(2 ** (bits - 1))
            high = 2 ** bits - 1 if unsigned else 2 ** (bits - 1) - 1
            lo = self.const(f"{hint}:lo", np.array(low / scale, np.float32))
            hi = self.const(f"{hint}:hi", np.array(high / scale, np.float32))
            x = self.emit("Clip", [x, lo, hi], f"{hint}:clip{bits}")[0]
        s = self.const(f"{hint}:scale", np.array(1.0 / scale, np.float32))
        zp_value = self.zero_point(unsigned)
        zp = self.const(f"{hint}:zp", zp_value)
        q = self.emit("QuantizeLinear", [x, s, zp], f"{hint}:q")[0]
        dq = self.emit("DequantizeLinear", [q, s, zp], f"{hint}:dq")[0]
        return q, dq, int(zp_value)

    # -- the walk -------------------------------------------------------------------------
    def run(self):
        for name in self.net.input_shapes:
            self.names[(-1, name)] = name
        for node in self.net.nodes:
            try:
                self.visit(node)
                self.exported.add(node.index)
            except Unsupported as why:
                self.left_out.append(f"{node.name} ({node.type}): {why}")

    def visit(self, node) -> None:
        unit = self.fused.unit_of_node.get(node.index)
        if unit is not None:
            if node is unit.layer:
                self.unit_start(unit)
            elif unit.layer.index not in self.exported:
                raise Unsupported(f"part of unit '{unit.name}', which is not exported")
            if node is unit.last:
                self.unit_finish(unit, node)
            return
        handler = getattr(self, "op_" + node.type, None)
        if handler is None:
            raise Unsupported("no ONNX form")
        bottoms = [self.read(node, i) for i in range(len(node.bottoms))]
        self.write(node, handler(node, bottoms))

    # -- units ----------------------------------------------------------------------------
    def unit_start(self, unit: FusedUnit) -> None:
        node = unit.layer
        x = self.ref_name(unit.input)
        lq = self.plan.layers.get(unit.name) if self.plan is not None else None
        weight, bias = folded_weights(unit, lq.bias_shift if lq is not None else None)
        weight = weight.detach().double().cpu()
        bias = bias.detach().double().cpu()
        hint = unit.name
        if lq is None:
            w = self.const(f"{hint}:W", weight.float().numpy())
            b = self.const(f"{hint}:B", bias.float().numpy())
        else:
            scale_in = 1.0 if lq.force_u8_input else lq.scale_in
            _, x, _ = self.qdq(x, scale_in, lq.input_unsigned or lq.force_u8_input,
                               f"{hint}:in", lq.bits)
            scales = torch.tensor(lq.scale_params, dtype=torch.float64)
            # the integers Intel's reorders give (the simulation uses the same ones)
            q_w, q_b, _ = intel_constants(weight, bias, lq, "cpu")
            q_w, q_b = q_w.double(), q_b.double()
            zero = scales <= 0
            q_w[zero] = 0
            q_b[zero] = 0  # the simulation's dequant is 0 for a zero scale: output 0
            w_scale = np.where(zero.numpy(), 1.0, 1.0 / scales.clamp(min=1e-300).numpy())
            w_scale = w_scale.astype(np.float32)
            x_scale = np.float32(1.0 / scale_in)
            b_scale = (x_scale * w_scale).astype(np.float32)
            q_b = q_b.clamp(-2 ** 31, 2 ** 31 - 1)
            wq = self.const(f"{hint}:Wq", q_w.numpy().astype(np.int8))
            ws = self.const(f"{hint}:Ws", w_scale)
            wz = self.const(f"{hint}:Wz", np.zeros(len(w_scale), np.int8))
            w = self.emit("DequantizeLinear", [wq, ws, wz], f"{hint}:W", axis=0)[0]
            bq = self.const(f"{hint}:Bq", q_b.numpy().astype(np.int32))
            bs = self.const(f"{hint}:Bs", b_scale)
            bz = self.const(f"{hint}:Bz", np.zeros(len(w_scale), np.int32))
            b = self.emit("DequantizeLinear", [bq, bs, bz], f"{hint}:B", axis=0)[0]
        module = node.module
        if unit.kind == "conv":
            if getattr(module, "fused_relu_slope", None) is not None:
                raise Unsupported("a ReLU inside convolution_param is not exported")
            ph, pw = module.pad
            out = self.emit("Conv", [x, w, b], f"{hint}:conv", kernel_shape=list(module.kernel),
                            strides=list(module.stride), pads=[ph, pw, ph, pw],
                            dilations=list(module.dilation), group=module.group)[0]
        else:
            if module.axis != 1:
                raise Unsupported(f"InnerProduct axis {module.axis} is not exported")
            flat = self.emit("Flatten", [x], f"{hint}:flat", axis=1)[0]
            out = self.emit("Gemm", [flat, w, b], f"{hint}:gemm", transB=1)[0]
        self.conv_out[unit.name] = out
        if lq is not None:
            self.unit_kernels[unit.name] = self.nodes[-1].name

    def unit_finish(self, unit: FusedUnit, last) -> None:
        y = self.conv_out[unit.name]
        lq = self.plan.layers.get(unit.name) if self.plan is not None else None
        hint = unit.name
        if unit.eltwise is not None:
            residual = self.ref_name(unit.residual)
            if lq is not None and self.residual == "requant":
                if lq.output_int8:
                    # the output threshold as the prototxt stores it (scale_out), so that a
                    # plan read back from the prototxt exports the very same model
                    full = 2 ** lq.bits - 1 if lq.output_unsigned else 2 ** (lq.bits - 1) - 1
                    mid = (2 ** (lq.bits - 1) - 1) * lq.scale_out / full
                    _, y, _ = self.qdq(y, mid, False, f"{hint}:mid", lq.bits)
                    self.mid_scales[unit.name] = mid
                else:
                    self.notes.append(f"{unit.name}: FP32 output, residual conv in FP32")
            y = self.emit("Add", [y, residual], f"{hint}:add")[0]
        if unit.relu is not None:
            slope = unit.relu_slope
            y = (self.emit("Relu", [y], f"{hint}:relu")[0] if not slope
                 else self.emit("LeakyRelu", [y], f"{hint}:relu", alpha=slope)[0])
        if lq is not None and lq.output_int8:
            q, y, zp = self.qdq(y, lq.scale_out, lq.output_unsigned, f"{hint}:out", lq.bits)
            signed_int8 = not lq.output_unsigned and self.signed_type == "int8"
            self.unit_outputs[unit.name] = (q, lq.scale_out, zp, signed_int8)
        self.names[(last.index, unit.output.name)] = y

    # -- plain layers (each returns the ONNX names of its tops) ------------------------
    def op_ReLU(self, node, x):
        slope = node.module.negative_slope
        if slope == 0:
            return self.emit("Relu", x, node.name)
        return self.emit("LeakyRelu", x, node.name, alpha=slope)

    def op_ReLU6(self, node, x):
        lo = self.const(f"{node.name}:lo", np.array(0.0, np.float32))
        hi = self.const(f"{node.name}:hi", np.array(6.0, np.float32))
        return self.emit("Clip", [x[0], lo, hi], node.name)

    def op_Clip(self, node, x):
        lo = self.const(f"{node.name}:lo", np.array(node.module.low, np.float32))
        hi = self.const(f"{node.name}:hi", np.array(node.module.high, np.float32))
        return self.emit("Clip", [x[0], lo, hi], node.name)

    def op_Sigmoid(self, node, x):
        return self.emit("Sigmoid", x, node.name)

    def op_TanH(self, node, x):
        return self.emit("Tanh", x, node.name)

    def op_Dropout(self, node, x):
        scale = node.module.test_scale
        if scale == 1:
            return x
        s = self.const(f"{node.name}:s", np.array(scale, np.float32))
        return self.emit("Mul", [x[0], s], node.name)

    def op_Split(self, node, x):
        return x * len(node.tops)

    def op_Silence(self, node, x):
        return []

    def _affine(self, node, x, multiplier, offset):
        shape = (1, -1) + (1,) * (len(node.bottom_shapes[0]) - 2)
        a = self.const(f"{node.name}:a", multiplier.detach().float().cpu().numpy().reshape(shape))
        c = self.const(f"{node.name}:c", offset.detach().float().cpu().numpy().reshape(shape))
        y = self.emit("Mul", [x[0], a], f"{node.name}:mul")[0]
        return self.emit("Add", [y, c], node.name)

    def op_BatchNorm(self, node, x):
        try:
            a, c = node.module.channel_affine()
        except Exception:
            raise Unsupported("BatchNorm with batch statistics") from None
        return self._affine(node, x, a, c)

    def op_Scale(self, node, x):
        if len(node.bottoms) != 1:
            raise Unsupported("Scale with a second bottom")
        try:
            a, c = node.module.channel_affine()
        except Exception:
            raise Unsupported("only a learned per-channel Scale is exported") from None
        return self._affine(node, x, a, c)

    def op_Eltwise(self, node, x):
        module = node.module
        if module.operation == module.PROD:
            op = "Mul"
        elif module.operation == module.MAX:
            op = "Max"
        else:
            terms = []
            for i, (coeff, name) in enumerate(zip(module.coeffs, x)):
                if coeff != 1:
                    c = self.const(f"{node.name}:c{i}", np.array(coeff, np.float32))
                    name = self.emit("Mul", [name, c], f"{node.name}:t{i}")[0]
                terms.append(name)
            x, op = terms, "Add"
        y = x[0]
        for i, other in enumerate(x[1:]):
            hint = node.name if i == len(x) - 2 else f"{node.name}:{i}"
            y = self.emit(op, [y, other], hint)[0]
        return [y]

    def op_Concat(self, node, x):
        return self.emit("Concat", x, node.name, axis=node.module.axis)

    def op_Softmax(self, node, x):
        return self.emit("Softmax", x, node.name, axis=node.module.axis)

    def op_Flatten(self, node, x):
        module = node.module
        shape = list(node.bottom_shapes[0])
        target = [0] * module.start + [-1] + shape[module.end + 1:]
        if module.start == 0:
            target = [-1] + shape[module.end + 1:]
        s = self.const(f"{node.name}:shape", np.array(target, np.int64))
        return self.emit("Reshape", [x[0], s], node.name)

    def op_Reshape(self, node, x):
        module = node.module
        if module.axis != 0 or module.num_axes != -1:
            raise Unsupported("Reshape with axis/num_axes")
        s = self.const(f"{node.name}:shape", np.array(module.dims, np.int64))
        return self.emit("Reshape", [x[0], s], node.name)

    def op_Permute(self, node, x):
        return self.emit("Transpose", x, node.name, perm=list(node.module.order))

    def op_Normalize(self, node, x):
        module = node.module
        axes = [1, 2, 3] if module.across_spatial else [1]
        if len(node.bottom_shapes[0]) != 4:
            raise Unsupported("Normalize of a non 4-D bottom")
        sq = self.emit("ReduceSumSquare", x, f"{node.name}:sq", axes=axes, keepdims=1)[0]
        eps = self.const(f"{node.name}:eps", np.array(module.eps, np.float32))
        norm = self.emit("Sqrt", [self.emit("Add", [sq, eps], f"{node.name}:eps")[0]],
                         f"{node.name}:norm")[0]
        one = self.const(f"{node.name}:one", np.array(1.0, np.float32))
        inv = self.emit("Div", [one, norm], f"{node.name}:inv")[0]
        y = self.emit("Mul", [x[0], inv], f"{node.name}:unit")[0]
        scale = module.scale.detach().float().cpu().numpy()
        scale = scale.reshape(1, -1, 1, 1) if scale.size > 1 else scale.reshape(1)
        s = self.const(f"{node.name}:scale", scale)
        return self.emit("Mul", [y, s], node.name)

    def op_Pooling(self, node, x):
        module = node.module
        if module.with_mask:
            raise Unsupported("MAX pooling with a mask top")
        ave = module.method == module.AVE
        if module.global_pooling:
            return self.emit("GlobalAveragePool" if ave else "GlobalMaxPool", x, node.name)
        height, width = node.bottom_shapes[0][2:]
        pooled = module._pooled((height, width))
        kernel, stride, pad = module.kernel, module.stride, module.pad
        bottom = (pooled[0] - 1) * stride[0] + kernel[0] - height - pad[0]
        right = (pooled[1] - 1) * stride[1] + kernel[1] - width - pad[1]
        if min(bottom, right) < 0:
            raise Unsupported("pooling windows that crop the bottom")
        pads = [pad[0], pad[1], bottom, right]
        if not ave:
            return self.emit("MaxPool", x, node.name, kernel_shape=list(kernel),
                             strides=list(stride), pads=pads)
        if not any(pads):
            return self.emit("AveragePool", x, node.name, kernel_shape=list(kernel),
                             strides=list(stride))
        # Caffe: sum of real pixels / window clipped to [-pad, size + pad)
        pad_spec = self.const(f"{node.name}:pads",
                              np.array([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]], np.int64))
        padded = self.emit("Pad", [x[0], pad_spec], f"{node.name}:pad")[0]
        mean = self.emit("AveragePool", [padded], f"{node.name}:mean", kernel_shape=list(kernel),
                         strides=list(stride))[0]
        divisors = []
        for length, k, p, s, n in zip((height, width), kernel, pad, stride, pooled):
            start = np.arange(n) * s - p
            end = np.minimum(start + k, length + p)
            divisors.append((end - start).astype(np.float64))
        factor = (kernel[0] * kernel[1]) / (divisors[0][:, None] * divisors[1][None, :])
        f = self.const(f"{node.name}:factor", factor.astype(np.float32)[None, None])
        return self.emit("Mul", [mean, f], node.name)

    def op_InnerProduct(self, node, x):  # an FP32 InnerProduct outside any unit
        module = node.module
        if module.axis != 1:
            raise Unsupported(f"InnerProduct axis {module.axis}")
        weight, bias = module.weight_bias()
        w = self.const(f"{node.name}:W", weight.detach().float().cpu().numpy())
        inputs = [self.emit("Flatten", x, f"{node.name}:flat", axis=1)[0], w]
        if bias is not None:
            inputs.append(self.const(f"{node.name}:B", bias.detach().float().cpu().numpy()))
        return self.emit("Gemm", inputs, node.name, transB=1)

    # -- the model ------------------------------------------------------------------------
    def build(self, extra_outputs: bool) -> ExportResult:
        self.run()
        exported = self.exported
        helper = self.helper
        onnx = self.onnx
        # fed blobs the ONNX part reads
        used = {i for n in self.nodes for i in n.input}
        inputs = [name for name in self.net.input_shapes if name in used]
        # boundary versions: read by a node left out, or final net outputs
        wanted: dict[str, tuple[int, str]] = {}
        outputs_final = set(self.net.output_names)
        last_version: dict[str, int] = {}
        for node in self.net.nodes:
            if node.index in exported:
                for top in node.tops:
                    last_version[top] = node.index
        for node in self.net.nodes:
            if node.index in exported:
                continue
            for i, bottom in enumerate(node.bottoms):
                ref = self.fused.input_of(node, i)
                if ref.producer in exported and (ref.producer, ref.name) in self.names:
                    wanted[self.names[(ref.producer, ref.name)]] = (ref.producer, ref.name)
        for name in outputs_final:
            index = last_version.get(name)
            if index is not None and (index, name) in self.names:
                wanted[self.names[(index, name)]] = (index, name)
        # an output that is a graph input or an initializer needs an Identity
        outputs = {}
        for onnx_name, version in wanted.items():
            if onnx_name in self.net.input_shapes or onnx_name not in {
                    o for n in self.nodes for o in n.output}:
                onnx_name = self.emit("Identity", [onnx_name], f"{version[1]}@{version[0]}")[0]
            outputs[onnx_name] = version
        graph_outputs = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                       self.shape_of(*version))
                         for name, version in outputs.items()]
        if extra_outputs:
            for unit, (q, _, _, signed_int8) in self.unit_outputs.items():
                elem = onnx.TensorProto.INT8 if signed_int8 else onnx.TensorProto.UINT8
                ref = self.fused.by_name[unit].output
                graph_outputs.append(helper.make_tensor_value_info(
                    q, elem, self.shape_of(ref.producer, ref.name)))
        graph_inputs = []
        for name in inputs:
            shape = list(self.net.input_shapes[name])
            dims = ["N"] + shape[1:]
            graph_inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
        graph = helper.make_graph(self.nodes, "calibrator", graph_inputs, graph_outputs,
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="calibrator", ir_version=IR_VERSION)
        return ExportResult(model, inputs, outputs, exported,
                            unit_outputs=dict(self.unit_outputs), left_out=list(self.left_out),
                            mid_scales=dict(self.mid_scales),
                            unit_kernels=dict(self.unit_kernels), notes=list(self.notes))


def build_onnx(net, fused: FusedGraph, plan: QuantPlan | None, *, residual: str = "requant",
               signed_type: str = "uint8", unit_outputs: bool = False) -> ExportResult:
    """The ONNX model of ``net`` (a CaffeNet) quantized by ``plan`` (None: FP32)."""
    if residual not in ("requant", "float"):
        raise ValueError("residual must be 'requant' or 'float'")
    if signed_type not in ("uint8", "int8"):
        raise ValueError("signed_type must be 'uint8' or 'int8'")
    exporter = _Exporter(net, fused, plan, residual=residual, signed_type=signed_type,
                         unit_outputs=unit_outputs)
    result = exporter.build(unit_outputs)
    if not result.outputs:
        raise CalibratorError("nothing of this net can be exported to ONNX: "
                              + "; ".join(result.left_out[:3]))
    return result


def export_onnx(model, fused: FusedGraph, plan: QuantPlan | None, path, **options
                ) -> ExportResult:
    """Write the quantized TEST net of ``model`` (calibrator.model.Model) as ONNX at
    ``path`` (see ``build_onnx`` for the options) and check it with onnx.checker."""
    onnx, _, _ = _onnx()
    result = build_onnx(model.net, fused, plan, **options)
    onnx.checker.check_model(result.model)
    path = Path(path)
    atomic_write(path, result.model.SerializeToString())
    result.path = path
    return result
