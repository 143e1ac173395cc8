"""``--runtime ort``: the ``--export-onnx`` model as ONNX Runtime runs it.

What ONNX Runtime makes of an exported QDQ model: which quantized units run as INT8
kernels, and the exact float32 requantization of each, read off ORT's own optimized graph.

ORT's graph optimizer fuses ``DQ -> Conv -> Q`` into QLinearConv (dropping a Relu/Clip before
the Q when the Q's range makes it redundant) and ``DQ -> Add -> Q`` into QLinearAdd; a conv
with no Q after it stays a float Conv on dequantized int8 values. Its kernels (MLAS)
requantize in float32 (checked bit for bit against ORT's outputs in the tests):

    QuantizeLinear   q = clamp(rint(f32(x / x_scale)) + zp)
    QLinearConv      q = clamp(rint(f32(acc) * f32(f32(x_scale * w_scale[o]) / y_scale)) + zp)
    QLinearAdd       q = clamp(rint(f32(f32(a_scale * (a - za) + b_scale * (b - zb)) / c_scale))
                               + zc)

so a simulation given these constants (``calibrator.quant.simulate.RuntimeRequant``) runs the
integers ORT runs, not only the same arithmetic up to rounding ties. The optimized graph is
the same on every x86 CPU (only the kernels differ), so it is read here even when ORT itself
runs through ``--ort-command``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibrator.backends.base import Backend
from calibrator.errors import CalibratorError
from calibrator.export.qdq import ExportResult, build_onnx, load_onnx
from calibrator.ort_worker import make_session
from calibrator.quant.simulate import Int8Simulator, RuntimeRequant

FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


@dataclass
class OrtGraph:
    float_units: set[str] = field(default_factory=set)   # quantized, but float convs in ORT
    requant: dict[str, RuntimeRequant] = field(default_factory=dict)  # unit -> ORT's rule
    int8_kernels: int = 0                                 # QLinearConv nodes


def _optimized_graph(model_bytes: bytes):
    with tempfile.TemporaryDirectory(prefix="calibrator-ort-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        try:
            make_session(model_bytes, optimized_path=str(path), layout=False)
        except ImportError:
            raise CalibratorError("ONNX Runtime is needed to read its graph (verify, "
                                  "--runtime ort): pip install onnxruntime") from None
        return load_onnx(path).graph


def _exported_q(exported: dict, unit: str, which: str):
    """(scale, zero point) of the exported QuantizeLinear ``<unit>:<which>``, or None
    (``exported``: the export's initializers by name)."""
    scale, zp = exported.get(f"{unit}:{which}:scale"), exported.get(f"{unit}:{which}:zp")
    if scale is None or zp is None:
        return None
    return float(np.float32(scale)), zp


def _input_rule(exported: dict, unit: str) -> RuntimeRequant | None:
    """Only the input QuantizeLinear of a unit ORT runs as a float conv."""
    q = _exported_q(exported, unit, "in")
    if q is None:
        return None
    info = np.iinfo(q[1].dtype)
    return RuntimeRequant(x_scale=q[0], x_zero_point=int(q[1]), qmin=int(info.min),
                          qmax=int(info.max))


def read_ort_graph(export: ExportResult, model_bytes: bytes | None = None) -> OrtGraph:
    """The units ORT runs in float and the requantization constants of the others."""
    from onnx import numpy_helper  # optional dependency (the verify/ort extras)

    graph = _optimized_graph(model_bytes or export.model.SerializeToString())
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    exported = {init.name: numpy_helper.to_array(init)
                for init in export.model.graph.initializer if init.dims == []}
    by_kernel = {kernel: unit for unit, kernel in export.unit_kernels.items()}
    out = OrtGraph()

    def scalar(name):
        return values[name].reshape(-1)[0] if name in values else None

    adds = {}
    for node in graph.node:
        if node.op_type == "QLinearAdd" and node.name.startswith("n:") and \
                node.name.endswith(":add"):
            adds[node.name[2:-4]] = node
    for node in graph.node:
        unit = by_kernel.get(node.name)
        if unit is None:
            continue
        if node.op_type in FLOAT_KERNELS:
            out.float_units.add(unit)
            rule = _input_rule(exported, unit)
            if rule is not None:
                out.requant[unit] = rule
            continue
        if node.op_type != "QLinearConv":
            continue
        out.int8_kernels += 1
        x_scale, x_zp = scalar(node.input[1]), scalar(node.input[2])
        w_scale, y_scale, y_zp = values.get(node.input[4]), scalar(node.input[6]), \
            scalar(node.input[7])
        if any(v is None for v in (x_scale, x_zp, w_scale, y_scale, y_zp)):
            continue  # constants ORT computes at run time: leave this unit approximate
        info = np.iinfo(y_zp.dtype)
        multiplier = (np.float32(x_scale) * w_scale.astype(np.float32).reshape(-1)
                      ).astype(np.float32) / np.float32(y_scale)
        add = None
        if unit in adds:
            # QLinearAdd(A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp): A the conv
            # output, B the residual
            constants = [scalar(name) for name in adds[unit].input[1:3] + adds[unit].input[4:8]]
            if all(v is not None for v in constants):
                add = tuple(float(np.float32(v)) if i % 2 == 0 else int(v)
                            for i, v in enumerate(constants))
        sum_q = None
        if add is None:  # a float Add (residual not quantized), then the unit's output Q
            sum_q = _exported_q(exported, unit, "out")
            sum_q = None if sum_q is None else (sum_q[0], int(sum_q[1]))
        out.requant[unit] = RuntimeRequant(
            x_scale=float(np.float32(x_scale)), x_zero_point=int(x_zp),
            multiplier=tuple(float(m) for m in multiplier.astype(np.float32)),
            y_scale=float(np.float32(y_scale)), y_zero_point=int(y_zp),
            qmin=int(info.min), qmax=int(info.max), add=add, out=sum_q)
    return out


def graph_simulator(fused, plan, graph: OrtGraph, target=None,
                    saturation: dict | None = None) -> Int8Simulator:
    """An Int8Simulator running what ORT runs: ``graph``'s requantization, and exact
    accumulation in the units ORT leaves as float convs; the INT8 kernels accumulate as
    ``target`` (a name or Target; None: exact)."""
    return Int8Simulator(fused, plan, requant=graph.requant, target=target,
                         exact_units=graph.float_units, saturation=saturation)


class OrtBackend(Backend):
    """The exported QDQ model as ONNX Runtime's CPU kernels run it, integer for integer
    (its optimized graph read once per plan)."""

    name = "ort"
    description = ("the --export-onnx model as ONNX Runtime runs it: float32 "
                   "requantization, residual adds as QLinearAdd, the convs it keeps in float "
                   "(needs onnxruntime)")

    def simulator(self, fused, plan, *, saturation: dict | None = None) -> Int8Simulator:
        graph = read_ort_graph(build_onnx(fused.net, fused, plan))
        return graph_simulator(fused, plan, graph, self.target, saturation)


__all__ = ["OrtGraph", "OrtBackend", "read_ort_graph", "graph_simulator", "FLOAT_KERNELS"]
