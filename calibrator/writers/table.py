"""``table``: the ncnn / caffe-int8-convert-tools calibration table."""

from __future__ import annotations

from pathlib import Path

from calibrator.fileio import atomic_write
from calibrator.writers.base import OutputContext, Writer


def _number(value: float) -> str:
    return f"{value:.9g}"


def write_table(path: str | Path, plan, fused) -> Path:
    """Weight lines ``<layer>_param_0 s0 s1 ...`` (one scale per output channel), then blob
    lines ``<layer> s_in`` keyed by the consuming layer. ncnn runs signed INT8, so the blob
    scale is 127/T of the layer's input threshold."""
    order = [u.name for u in fused.units if u.name in plan.layers]
    lines = []
    for name in order:
        lq = plan.layers[name]
        lines.append(f"{name}_param_0 " + " ".join(_number(s) for s in lq.scale_params))
    for name in order:
        lq = plan.layers[name]
        limit = 2 ** (lq.bits - 1) - 1
        scale = limit / lq.input_threshold if lq.input_threshold > 0 else 1.0
        if lq.force_u8_input:
            scale = 1.0
        lines.append(f"{name} {_number(scale)}")
    return atomic_write(path, "\n".join(lines) + "\n")


class TableWriter(Writer):
    name = "table"
    option = "--table"
    help = "also write an ncnn calibration table"

    def write(self, path: Path, context: OutputContext) -> Path:
        return write_table(path, context.plan, context.fused)
