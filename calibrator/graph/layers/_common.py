"""Small helpers shared by the layer modules: Caffe's axis rules, blob loading, count checks.

Kept here so every layer rejects the same malformed parameters with the same words.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from calibrator.graph.layer import Layer, as_parameter


def canonical_axis(layer: Layer, axis: int, num_axes: int) -> int:
    """Caffe's ``Blob::CanonicalAxisIndex``: negative axes count from the end."""
    if not -num_axes <= axis < num_axes:
        raise layer.error(f"axis {axis} out of range for a {num_axes}-D bottom")
    return axis + num_axes if axis < 0 else axis


def count(shape: Sequence[int], start: int = 0, end: int | None = None) -> int:
    """Caffe's ``Blob::count(start, end)``: the product of the dims in [start, end)."""
    return math.prod(shape[start:end])


def check_io(layer: Layer, param, bottoms: tuple[int, int | None], tops: tuple[int, int | None]):
    """Reject a layer wired with a number of bottoms or tops Caffe would refuse."""
    for what, have, (low, high) in (("bottom", len(layer.bottom_shapes), bottoms),
                                    ("top", len(param.top), tops)):
        if have < low or (high is not None and have > high):
            want = str(low) if low == high else (f"at least {low}" if high is None
                                                 else f"{low} to {high}")
            raise layer.error(f"takes {want} {what}(s), got {have}")


def has_field(message, name: str) -> bool:
    """Whether this caffe.proto defines ``name`` and it was set (fork fields may be absent)."""
    return name in message.DESCRIPTOR.fields_by_name and message.HasField(name)


def field_or(message, name: str, default):
    """The value of a field that only some Caffe forks define, or ``default``."""
    if name in message.DESCRIPTOR.fields_by_name:
        return getattr(message, name)
    return default


def sub_param(layer: Layer, param, name: str):
    """A fork-specific sub-message such as ``permute_param``, or an error naming it."""
    if name not in param.DESCRIPTOR.fields_by_name:
        raise layer.error(f"this caffe.proto has no {name}")
    return getattr(param, name)


def load_named(layer: Layer, names: Sequence[str], blobs: list[np.ndarray]) -> None:
    """Store blobs as frozen parameters under ``names`` (caffemodel order), checking shapes.

    Trailing optional blobs that are absent stay ``None``."""
    expected = layer.blob_shapes()
    least = len(expected) - layer.optional_blob_count()
    if not least <= len(blobs) <= len(expected):
        raise layer.error(f"expects {len(expected)} learned blob(s), found {len(blobs)}")
    for name, shape, blob in zip(names, expected, blobs):
        if tuple(blob.shape) != tuple(shape):
            raise layer.error(f"blob {name} has shape {tuple(blob.shape)}, expected {tuple(shape)}")
        parameter = as_parameter(blob)
        parameter.data = parameter.data.reshape(shape)  # as_parameter makes 0-D blobs 1-D
        setattr(layer, name, parameter)
