"""Caffe mean files: a binary ``BlobProto`` of shape 1xCxHxW (what compute_image_mean writes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from calibrator.caffe import caffe_pb2
from calibrator.errors import CalibratorError, shorten
from calibrator.fileio import read_bytes


def load_mean_file(path: Path) -> np.ndarray:
    """The mean image as float32 CxHxW; a file that is not a 1xCxHxW BlobProto is an error."""
    raw = read_bytes(path, "mean file")
    path = shorten(path)
    blob = caffe_pb2.BlobProto()
    try:
        blob.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        raise CalibratorError(f"mean file {path}: not a binary BlobProto (.binaryproto)") from None
    if len(blob.shape.dim):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:  # legacy 4-D fields
        shape = (blob.num, blob.channels, blob.height, blob.width)
    values = (np.array(blob.double_data, dtype=np.float64).astype(np.float32)
              if len(blob.double_data) else np.array(blob.data, dtype=np.float32))
    if len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
        raise CalibratorError(f"mean file {path}: shape {_text(shape)} is not 1xCxHxW")
    if values.size != int(np.prod(shape, dtype=object)):
        raise CalibratorError(f"mean file {path}: {values.size} values for shape {_text(shape)}")
    if not np.isfinite(values).all():
        raise CalibratorError(f"mean file {path}: holds values that are not finite numbers")
    return values.reshape(shape[1:])


def _text(shape) -> str:
    return "x".join(str(d) for d in shape) or "(empty)"
