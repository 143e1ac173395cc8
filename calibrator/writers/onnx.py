"""``onnx``: the quantized net as an ONNX QDQ model carrying exactly these scales."""

from __future__ import annotations

from pathlib import Path

from calibrator.export.qdq import export_onnx
from calibrator.writers.base import OutputContext, Writer


class OnnxWriter(Writer):
    name = "onnx"
    option = "--export-onnx"
    help = ("also write the quantized net as an ONNX model with QuantizeLinear/"
            "DequantizeLinear pairs carrying these scales (needs onnx)")

    def write(self, path: Path, context: OutputContext) -> Path:
        return export_onnx(context.model, context.fused, context.plan, path).path
