"""``calibrator verify``: export a quantized net to ONNX with QuantizeLinear/DequantizeLinear
pairs carrying exactly our scales, run it on ONNX Runtime's real INT8 CPU kernels, and compare
with the simulation for each target (``calibrator.quant.targets``).

This package must stay importable without torch: ``calibrator.verify.ort_worker`` runs ONNX
Runtime alone (e.g. under an emulated CPU) and imports only numpy and onnxruntime."""
