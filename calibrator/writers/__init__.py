"""Output files: a registry of writers the pipeline iterates.

``prototxt`` (:mod:`~calibrator.writers.prototxt`)   the quantized prototxt (always written)
``table`` (:mod:`~calibrator.writers.table`)         ncnn calibration table (``--table``)
``json`` (:mod:`~calibrator.writers.json_record`)    the JSON record (``--json``)
``onnx`` (:mod:`~calibrator.writers.onnx`)           ONNX QDQ model (``--export-onnx``)
``ncnn`` (:mod:`~calibrator.writers.ncnn`)           the INT8 ncnn model (``--ncnn``)
``weights`` (:mod:`~calibrator.writers.weights`)     the bias-corrected caffemodel
                                                     (``--weights-out``)
``performance`` (:mod:`~calibrator.writers.performance`)  ``-p``'s speed-only prototxt
``force_u8`` (:mod:`~calibrator.writers.force_u8`)   ``-fu``'s u8-input prototxt + caffemodel

Adding an output is one module with a :class:`~calibrator.writers.base.Writer` subclass and
one ``register_writer`` call; a writer with an ``option`` gets its command-line option.
Every writer is deterministic (same plan, same bytes) and writes atomically."""

from __future__ import annotations

from calibrator.writers.base import OutputContext, Writer
from calibrator.writers.force_u8 import ForceU8Writer, force_u8_paths
from calibrator.writers.json_record import JsonWriter, plan_record, write_json
from calibrator.writers.ncnn import NcnnWriter
from calibrator.writers.onnx import OnnxWriter
from calibrator.writers.performance import PerformanceWriter
from calibrator.writers.prototxt import (PrototxtWriter, quantized_prototxt_path,
                                         write_quantized_prototxt)
from calibrator.writers.table import TableWriter, write_table
from calibrator.writers.weights import WeightsWriter

_WRITERS: dict[str, Writer] = {}


def register_writer(writer: Writer) -> Writer:
    if not writer.name or writer.name in _WRITERS:
        raise ValueError(f"writer '{writer.name}' registered twice or unnamed")
    _WRITERS[writer.name] = writer
    return writer


for _writer in (PrototxtWriter(), TableWriter(), JsonWriter(), OnnxWriter(), NcnnWriter(),
                WeightsWriter(), PerformanceWriter(), ForceU8Writer()):
    register_writer(_writer)


def writers() -> list[Writer]:
    """Every registered writer, in registration order (the order outputs are written)."""
    return list(_WRITERS.values())


def get_writer(name: str) -> Writer:
    if name not in _WRITERS:
        raise KeyError(f"no writer named '{name}' (registered: {', '.join(_WRITERS)})")
    return _WRITERS[name]


__all__ = ["OutputContext", "Writer", "register_writer", "writers", "get_writer",
           "quantized_prototxt_path", "force_u8_paths", "write_quantized_prototxt", "write_table",
           "write_json", "plan_record"]
