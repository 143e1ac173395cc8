"""The data-source base class and the layer-type registry.

A source hands out batches the way Caffe's TEST-phase data layers do: batch ``b`` holds
samples ``b*N .. b*N+N-1`` modulo the list length (Caffe wraps to the start of the list).
Each sample is decoded, resized and cropped once and kept as uint8 (not float: 4x smaller),
so the dozens of evaluation passes of the accuracy search only redo the cheap mean/scale.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from calibrator.caffe.types import DATA_LAYER_TYPES
from calibrator.data.transform import SampleError, Transform
from calibrator.errors import CalibratorError, LayerError, shorten
from calibrator.limits import check_blob, check_memory

_BUILDERS: dict[str, Callable] = {}


def register(type_name: str):
    """Class decorator: ``build_data_source`` builds ``type_name`` layers with
    ``cls.from_layer``."""
    def decorate(cls):
        _BUILDERS[type_name] = cls.from_layer
        return cls
    return decorate


def is_data_layer(type_name: str) -> bool:
    """True for Caffe layer types that feed the net from outside (supported or not)."""
    return type_name in DATA_LAYER_TYPES


def build_data_source(layer_param, base_dir: str | os.PathLike, *, cache: bool = True):
    """The source for a TEST-phase ImageData or Data (LMDB) layer; relative paths in it are
    looked up in ``base_dir`` (the prototxt's folder) first, then in the working directory."""
    builder = _BUILDERS.get(layer_param.type)
    if builder is None:
        supported = ", ".join(sorted(_BUILDERS))
        what = ("data layer type is not supported" if is_data_layer(layer_param.type)
                else "is not a data layer")
        raise LayerError(layer_param.name, layer_param.type,
                         f"{what} (supported: {supported})")
    return builder(layer_param, Path(base_dir), cache=cache)


def _worker_count() -> int:
    return min(16, os.cpu_count() or 4)


class DataSource:
    """Batches of float32 NCHW data (and float32 labels of shape (N,)) for named tops.

    Subclasses implement ``num_samples``, ``_decode`` (sample -> CHW uint8/float32 array,
    already resized and cropped, run in worker threads), ``_label`` and ``_describe``;
    ``_read`` may fetch raw bytes in the calling thread first (for non-thread-safe stores).
    """

    def __init__(self, tops: list[str], batch_size: int, transform: Transform, *,
                 cache: bool = True, layer: tuple[str, str] | None = None):
        self.tops = list(tops)
        self.batch_size = int(batch_size)
        self.transform = transform
        self._layer = layer  # (name, type) for error messages; None for image folders
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    # --- subclass hooks ------------------------------------------------------------------
    def num_samples(self) -> int | None:
        raise NotImplementedError

    def _read(self, sample: int):
        """Raw input for ``_decode``, fetched in the calling thread (default: nothing)."""
        return None

    def _decode(self, sample: int, raw) -> np.ndarray:
        raise NotImplementedError

    def _label(self, sample: int) -> float:
        raise NotImplementedError

    def _describe(self, sample: int) -> str:
        """Where a sample comes from, for error messages (``list.txt:12 (a.jpg)``)."""
        return f"sample {sample}"

    def _prepared(self, sample: int, prepare, array: np.ndarray) -> np.ndarray:
        """``prepare`` (a Transform method) with its complaint naming the sample."""
        try:
            return prepare(array)
        except SampleError as exc:
            raise self.error(f"{self._describe(sample)}: {exc}") from None

    def _sample_at(self, position: int) -> int:
        """The sample at stream position ``position`` (Caffe wraps to the list start)."""
        return position % self.num_samples()

    def input_files(self) -> list:
        """Every file this source reads (outputs must not overwrite any of them)."""
        return self.transform.input_files()

    # --- public API ----------------------------------------------------------------------
    def error(self, message: str) -> CalibratorError:
        if self._layer is None:
            return CalibratorError(message)
        return LayerError(self._layer[0], self._layer[1], message)

    def top_shapes(self) -> dict[str, tuple]:
        """Shapes as Caffe sets them at setup: from the first sample of the stream."""
        (first,) = self._images([self._sample_at(0)])
        shapes = {self.tops[0]: (self.batch_size, *first.shape)}
        check_blob(shapes[self.tops[0]], f"a batch of its top '{shorten(self.tops[0])}'",
                   self.error)
        if len(self.tops) > 1:
            shapes[self.tops[1]] = (self.batch_size,)
        return shapes

    def prefetch(self, batches: int) -> None:
        """Decode every sample of batches 0..batches-1 now (in parallel, into the cache), so
        that a missing or unreadable image stops a run before anything is computed or
        written. Does nothing without the cache."""
        self.prefetch_batches(range(batches))

    def prefetch_batches(self, indices) -> None:
        """:meth:`prefetch` for the batches ``indices`` only (a torchrun rank's share)."""
        if self._cache is None:
            return
        indices = list(indices)
        samples: dict[int, None] = {}
        for index in indices:
            for position in range(index * self.batch_size, (index + 1) * self.batch_size):
                samples.setdefault(self._sample_at(position), None)
        if not samples:
            return
        ordered = list(samples)
        first = self._images([ordered[0]])[0]
        check_memory(len(ordered) * first.nbytes, f"keeping the {len(ordered)} decoded "
                     f"samples of {len(indices)} batch(es) in memory", self.error)
        self._images(ordered)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        start = index * self.batch_size
        samples = [self._sample_at(p) for p in range(start, start + self.batch_size)]
        images = self._images(samples)
        shape = images[0].shape
        for sample, image in zip(samples, images):
            if image.shape != shape:
                raise self.error(
                    f"images of one batch differ in size: {self._describe(samples[0])} gives "
                    f"{_shape_text(shape)}, {self._describe(sample)} gives "
                    f"{_shape_text(image.shape)} (Caffe needs one size per batch: set a "
                    "crop_size or new_height/new_width)")
        data = self.transform.normalize(torch.from_numpy(np.stack(images)))
        out = {self.tops[0]: data}
        if len(self.tops) > 1:
            out[self.tops[1]] = torch.tensor([self._label(s) for s in samples],
                                             dtype=torch.float32)
        return out

    # --- decoding with cache and thread pool ---------------------------------------------
    def _images(self, samples: list[int]) -> list[np.ndarray]:
        """Decoded samples in the given order; new ones are decoded in parallel, in a
        deterministic order of results whatever the thread timing."""
        store = self._cache if self._cache is not None else {}
        missing = list(dict.fromkeys(s for s in samples if s not in store))
        if len(missing) == 1:
            store[missing[0]] = self._decode(missing[0], self._read(missing[0]))
        elif missing:
            raws = [self._read(s) for s in missing]
            with ThreadPoolExecutor(max_workers=min(len(missing), _worker_count())) as pool:
                store.update(zip(missing, pool.map(self._decode, missing, raws)))
        return [store[s] for s in samples]


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape)

