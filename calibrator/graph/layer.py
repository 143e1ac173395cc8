"""The contract every Caffe layer implements, and the registry that maps type names to it.

A layer is a ``torch.nn.Module`` built from its ``LayerParameter`` and the shapes of its
bottoms. It states the shapes of the learned blobs it expects (so a caffemodel that does not
fit is reported before anything runs), receives those blobs once, and maps bottom tensors to
top tensors in ``forward``. Adding a Caffe layer means adding one small module under
``calibrator/graph/layers/`` that subclasses :class:`Layer` and is decorated with
:func:`register`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from calibrator.errors import LayerError

Shape = tuple[int, ...]

_REGISTRY: dict[str, type["Layer"]] = {}


def register(*type_names: str) -> Callable[[type["Layer"]], type["Layer"]]:
    """Class decorator: make a Layer subclass the implementation of these Caffe types."""

    def wrap(cls: type[Layer]) -> type[Layer]:
        for name in type_names:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise RuntimeError(f"layer type {name!r} registered twice")
            _REGISTRY[name] = cls
        cls.caffe_types = tuple(type_names)
        return cls

    return wrap


def layer_class(type_name: str) -> type["Layer"] | None:
    """The implementation of a Caffe layer type, or None if there is none (the package
    ``calibrator.graph`` imports every layer module, which registers them)."""
    return _REGISTRY.get(type_name)


class Layer(torch.nn.Module):
    """One Caffe layer.

    Subclasses read what they need from ``param`` (a ``caffe_pb2.LayerParameter``) in
    ``__init__`` and keep plain Python values or buffers: the graph never hands the proto to
    ``forward``. Raise :meth:`error` for a parameter combination Caffe would reject.
    """

    caffe_types: tuple[str, ...] = ()
    #: True for layers that only exist for training or bookkeeping and may be skipped when
    #: their tops are not needed (Silence, Dropout are still run: they are cheap).
    num_tops: int | None = None

    def __init__(self, param, bottom_shapes: Sequence[Shape]):
        super().__init__()
        self.layer_name = param.name
        self.layer_type = param.type
        self.bottom_shapes = [tuple(s) for s in bottom_shapes]

    # -- learned blobs -------------------------------------------------------------------
    def blob_shapes(self) -> list[Shape]:
        """Shapes of the learned blobs this layer expects, in caffemodel order.

        Optional trailing blobs (a bias that the caffemodel may omit) are not listed here
        but accepted through :meth:`optional_blob_count`."""
        return []

    def optional_blob_count(self) -> int:
        """How many of the trailing expected blobs may be missing (default none)."""
        return 0

    def load_blobs(self, blobs: list[np.ndarray]) -> None:
        """Receive the learned blobs, already reshaped to :meth:`blob_shapes` (float32)."""
        if blobs:
            raise self.error(f"takes no learned blobs, found {len(blobs)}")

    #: one top of the first bottom's shape (elementwise layers): the rule of top_shapes
    keeps_shape = False

    def top_shapes(self) -> list[Shape] | None:
        """The tops' shapes where they follow from the bottoms' by a rule this layer states
        (its forward computes the same: ``tests/test_graph_shapes.py`` checks every rule
        against the layer run on meta tensors); None: the graph runs the layer to learn
        them. A rule spares the process torch's meta kernels for its ops, whose first use
        costs seconds of imports."""
        return [self.bottom_shapes[0]] if self.keeps_shape else None

    def workspace_bytes(self) -> int:
        """Memory ``forward`` needs beyond its tops (a padded copy, an im2col buffer), so
        that the graph can refuse a layer the machine cannot run before running it."""
        return 0

    # -- helpers ---------------------------------------------------------------------------
    def error(self, message: str) -> LayerError:
        return LayerError(self.layer_name, self.layer_type, message)

    def extra_repr(self) -> str:
        return f"name={self.layer_name!r}, type={self.layer_type!r}"

    def forward(self, *bottoms: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover
        raise NotImplementedError


def as_parameter(array: np.ndarray) -> torch.nn.Parameter:
    """A frozen float32 parameter from a numpy blob."""
    return torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)),
                              requires_grad=False)
