"""``force_u8``: with ``-fu``, the first conv fed u8 (:mod:`calibrator.quant.force_u8`):
``<output>_force_u8.prototxt`` and, beside it, ``<weights>_new.caffemodel`` (Intel writes
the caffemodel beside ``-w``; beside the prototxt a read-only weights folder works too)."""

from __future__ import annotations

from pathlib import Path

from calibrator.backends import record_line
from calibrator.caffe.prototxt import net_to_text
from calibrator.fileio import atomic_write
from calibrator.quant.force_u8 import force_u8
from calibrator.writers.base import OutputContext, Writer
from calibrator.writers.prototxt import quantized_prototxt_path, rebase_paths


def force_u8_paths(prototxt: str | Path, weights: str | Path,
                   given: str | Path | None = None) -> tuple[Path, Path]:
    """(force-u8 prototxt, new caffemodel): ``given`` or ``<prototxt>_force_u8.prototxt``,
    and ``<weights stem>_new.caffemodel`` in the same folder."""
    path = Path(given) if given else quantized_prototxt_path(prototxt, "_force_u8")
    weights = Path(weights)
    stem = weights.name[:-len(".caffemodel")] if weights.name.endswith(".caffemodel") \
        else weights.stem
    return path, path.with_name(f"{stem}_new.caffemodel")


class ForceU8Writer(Writer):
    name = "force_u8"
    option = "--force-u8-output"
    metavar = "PROTOTXT"
    help = ("with -fu: the force-u8 prototxt (default <output>_force_u8.prototxt); "
            "<weights>_new.caffemodel is written beside it")

    def write(self, path: Path, context: OutputContext) -> Path:
        model = context.model
        result = context.force_u8
        if result is None:
            result = force_u8(model, context.fused, context.plan,
                              context.plan.options.cascade_lake)
        path, weights_path = force_u8_paths(path, model.weights_path, path)
        net = result.net_param
        rebase_paths(net, Path(model.prototxt).parent, path.parent)
        header = record_line(context.backend) if context.backend is not None else None
        text = net_to_text(net)
        atomic_write(weights_path, result.weights.SerializeToString())
        return atomic_write(path, f"{header}\n{text}" if header else text)
