"""Exports of a quantized net to other formats: :mod:`~calibrator.export.qdq` writes the ONNX
QDQ model (QuantizeLinear/DequantizeLinear pairs carrying exactly our scales)."""
