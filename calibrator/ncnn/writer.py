"""``PREFIX.param`` + ``PREFIX.bin``: what caffe2ncnn -> ncnnoptimize (-> ncnn2int8 with our
table) would write for a Caffe net, without ncnn's C++ tools."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from calibrator.fileio import atomic_write
from calibrator.graph.net import CaffeNet
from calibrator.ncnn.convert import convert
from calibrator.ncnn.model import NcnnGraph
from calibrator.ncnn.optimize import optimize
from calibrator.ncnn.quantize import NcnnScales, quantize, scales_from_plan, write_ncnn_table
from calibrator.ncnn.serialize import bin_bytes, param_text
from calibrator.quant.scales import QuantPlan


def build_ncnn_graph(net: CaffeNet, plan: QuantPlan | None = None, *,
                     scales: dict[str, NcnnScales] | None = None, winograd: bool = True,
                     fp16: bool | None = None) -> NcnnGraph:
    """The ncnn model of ``net`` in memory: caffe2ncnn + ncnnoptimize (fp32 storage, its
    flag 0), then with a ``plan`` (or explicit table ``scales``) ncnn2int8, whose float
    layers keep fp16 weights unless ``fp16`` is False."""
    graph = optimize(convert(net))
    if plan is not None and scales is None:
        scales = scales_from_plan(graph, plan, winograd=winograd)
    graph.__dict__["scales"] = scales or {}
    if scales:
        quantize(graph, scales, fp16=True if fp16 is None else fp16)
    elif fp16:
        for layer in graph.live():
            if layer.weighted:
                layer.fp16_weight = True
    return graph


@dataclass
class NcnnModel:
    """Where the model went and how to feed it: Caffe blob -> ncnn blob names."""

    param_path: Path
    bin_path: Path
    graph: NcnnGraph
    table_path: Path | None = None

    @property
    def inputs(self) -> dict[str, str]:
        return dict(self.graph.inputs)

    @property
    def outputs(self) -> dict[str, str]:
        return dict(self.graph.outputs)


def write_ncnn_model(net: CaffeNet, plan: QuantPlan | None, prefix: str | Path,
                     table: str | Path | None = None, *, winograd: bool = True,
                     fp16: bool | None = None) -> NcnnModel:
    """Write ``PREFIX.param`` and ``PREFIX.bin`` for ``net`` (FP32 when ``plan`` is None,
    else INT8 with the plan's scales), and with ``table`` the ncnn calibration table the
    INT8 model was made from (the file ncnn2int8 would take)."""
    graph = build_ncnn_graph(net, plan, winograd=winograd, fp16=fp16)
    prefix = str(prefix)
    param_path = atomic_write(prefix + ".param", param_text(graph))
    bin_path = atomic_write(prefix + ".bin", bin_bytes(graph))
    table_path = None
    if table is not None:
        if plan is None:
            raise ValueError("a calibration table needs a quantization plan")
        table_path = write_ncnn_table(table, graph.__dict__["scales"])
    return NcnnModel(Path(param_path), Path(bin_path), graph, table_path)
