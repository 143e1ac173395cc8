"""``--runtime intel``: Intel Caffe's fused MKL-DNN INT8 kernels."""

from __future__ import annotations

from calibrator.backends.base import Backend


class IntelBackend(Backend):
    """BatchNorm/Scale folded, ReLU and residual adds fused into the convolution, one
    requantization per unit (see :mod:`calibrator.quant.simulate`): what the quantized
    prototxt is for."""

    name = "intel"
    description = "Intel Caffe's fused INT8 kernels (MKL-DNN), what the prototxt is for"

    def simulator(self, fused, plan, *, saturation: dict | None = None):
        return self.layer_simulator(fused, plan, saturation=saturation)
