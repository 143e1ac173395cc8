"""``ncnn`` (``--ncnn OUT_PREFIX``): ``OUT_PREFIX.param`` and ``OUT_PREFIX.bin``, the INT8 ncnn
model itself (what caffe2ncnn, ncnnoptimize and ncnn2int8 would write with our table)."""

from __future__ import annotations

from pathlib import Path

from calibrator.ncnn import write_ncnn_model
from calibrator.writers.base import OutputContext, Writer


class NcnnWriter(Writer):
    name = "ncnn"
    option = "--ncnn"
    metavar = "OUT_PREFIX"
    help = ("also write the INT8 ncnn model OUT_PREFIX.param and OUT_PREFIX.bin (ncnn's "
            "caffe2ncnn + ncnnoptimize + ncnn2int8 with these scales)")

    def write(self, path: Path, context: OutputContext) -> Path:
        return write_ncnn_model(context.model.net, context.plan, path).param_path
