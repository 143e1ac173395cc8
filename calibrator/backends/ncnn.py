"""``--runtime ncnn``: the INT8 ncnn model ``--ncnn`` writes, as ncnn's x86 kernels run it.

ncnn quantizes every INT8 layer's input s8 at 127/T (also after a ReLU), rounds half away
from zero, dequantizes in float32 and keeps residual adds and most layers between the INT8
convolutions in FP32; 3x3 stride-1 convolutions run as exact int8 Winograd with 6-bit weight
scales (see :mod:`calibrator.ncnn` and its source citations). ncnn's x86 int8 kernels widen
to 16 bits before multiplying, so no ``--target`` arithmetic applies."""

from __future__ import annotations

from calibrator.backends.base import Backend
from calibrator.ncnn import NcnnSimulator


class NcnnBackend(Backend):
    name = "ncnn"
    description = ("the --ncnn model as ncnn's x86 INT8 kernels run it: s8 inputs at 127/T, "
                   "float32 dequantization, FP32 residual adds, Winograd 6-bit weights")

    def simulator(self, fused, plan, *, saturation: dict | None = None):
        return NcnnSimulator(fused, plan)
