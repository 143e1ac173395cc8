"""Reading and writing prototxt files (text-format NetParameter, LabelMap, ...)."""

from __future__ import annotations

import os
from pathlib import Path

from google.protobuf import text_format

from calibrator.caffe import caffe_pb2
from calibrator.caffe.upgrade import upgrade_net
from calibrator.errors import CalibratorError, shorten
from calibrator.fileio import atomic_write, read_bytes


def parse_text(text: str, message, source: str):
    """Merge prototxt ``text`` into ``message``; a syntax error names ``source:line:column``."""
    try:
        text_format.Merge(text, message)
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        # ParseError's own text starts with "line:col : "; keep only the reason.
        reason = str(exc).split(" : ", 1)[-1] if line else str(exc)
        where = f"{shorten(source)}:{line}:{column}" if line else shorten(source)
        raise CalibratorError(f"{where}: {shorten(reason)}") from None
    except RecursionError:
        raise CalibratorError(f"{shorten(source)}: messages nested too deeply") from None
    return message


def read_text_message(path: str | os.PathLike, message, what: str):
    data = read_bytes(path, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CalibratorError(f"{shorten(path)}: {what} is not a text file (binary caffemodel "
                              "given where a prototxt was expected?)") from None
    return parse_text(text, message, str(path))


def read_net(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    """A prototxt as a V2 NetParameter: V1 ``layers`` and ``input:`` headers upgraded."""
    net = read_text_message(path, caffe_pb2.NetParameter(), "prototxt")
    return upgrade_net(net, source=str(path))


def read_label_map(path: str | os.PathLike) -> caffe_pb2.LabelMap:
    return read_text_message(path, caffe_pb2.LabelMap(), "label map")


def net_to_text(net) -> str:
    """protobuf's canonical text format: deterministic, what Caffe itself writes."""
    return text_format.MessageToString(net)


def write_net(path: str | os.PathLike, net) -> Path:
    return atomic_write(path, net_to_text(net))
