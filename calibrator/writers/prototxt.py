"""``prototxt``: the quantized prototxt, Intel Caffe's format (``quantization_param``)."""

from __future__ import annotations

import os
from pathlib import Path

from calibrator.backends import record_line
from calibrator.caffe.prototxt import net_to_text
from calibrator.fileio import atomic_write
from calibrator.quant.params import annotate
from calibrator.writers.base import OutputContext, Writer
from calibrator.writers.weights import with_bias_terms

#: Path fields of data and evaluation layers that Caffe resolves relative to where it runs.
PATH_FIELDS = (("image_data_param", "source"), ("image_data_param", "root_folder"),
               ("data_param", "source"), ("transform_param", "mean_file"),
               ("annotated_data_param", "label_map_file"),
               ("detection_evaluate_param", "name_size_file"))


def quantized_prototxt_path(model: str | Path, suffix: str = "_quantized") -> Path:
    """``<model>_quantized.prototxt`` beside the model: only the file's last extension is
    replaced, so dots in folder names (or in the file name) are kept."""
    model = Path(model)
    stem = model.name[:-len(model.suffix)] if model.suffix else model.name
    return model.with_name(f"{stem}{suffix}.prototxt")


def rebase_paths(net_param, source_dir: Path, target_dir: Path) -> None:
    """Rewrite relative data paths that resolve beside the source prototxt so that they
    resolve beside the written one (an --output in another folder keeps working)."""
    if source_dir.resolve() == target_dir.resolve():
        return
    for layer in net_param.layer:
        for message_name, field in PATH_FIELDS:
            if message_name not in layer.DESCRIPTOR.fields_by_name \
                    or not layer.HasField(message_name):
                continue
            message = getattr(layer, message_name)
            value = getattr(message, field, "")
            if not value or Path(value).is_absolute():
                continue
            original = source_dir / value
            if not original.exists():
                continue
            rebased = os.path.relpath(original.resolve(), target_dir.resolve())
            if value.endswith("/") and not rebased.endswith("/"):
                rebased += "/"
            setattr(message, field, rebased)


def write_quantized_prototxt(path: str | Path, net_param, plan, source_dir: Path | None = None,
                             header: str | None = None) -> Path:
    """The whole net in protobuf's canonical text format with quantization_param, after an
    optional comment line ``header``."""
    net = annotate(net_param, plan)
    if source_dir is not None:
        rebase_paths(net, Path(source_dir), Path(path).parent)
    text = net_to_text(net)
    return atomic_write(path, f"{header}\n{text}" if header else text)


class PrototxtWriter(Writer):
    name = "prototxt"
    option = "--output"
    metavar = "PROTOTXT"
    help = "quantized prototxt path (default <model>_quantized.prototxt beside -m)"

    def write(self, path: Path, context: OutputContext) -> Path:
        header = record_line(context.backend) if context.backend is not None else None
        net_param = with_bias_terms(context.model.net_param, context.fused, context.plan)
        return write_quantized_prototxt(path, net_param, context.plan,
                                        source_dir=Path(context.model.prototxt).parent,
                                        header=header)
