"""A folder of images for deploy nets (no data layer), as caffe-int8-convert-tools feeds
them: every image sorted by file name, cv2.imread BGR, cv2.resize to the input size,
``(pixel - mean) * norm``; no label top."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from calibrator.data.sources import DataSource
from calibrator.data.transform import Transform
from calibrator.errors import CalibratorError, shorten
from calibrator.fileio import input_file
from calibrator.limits import check_blob

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(image_dir: Path) -> list[Path]:
    """Image files directly in ``image_dir``, sorted by name (case-insensitive extensions)."""
    try:
        if not image_dir.is_dir():
            raise CalibratorError(f"--images {shorten(image_dir)}: not a folder")
        names = sorted(entry.name for entry in os.scandir(image_dir)
                       if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
    except (OSError, ValueError) as exc:
        raise CalibratorError(f"--images {shorten(image_dir)}: cannot list the folder "
                              f"({getattr(exc, 'strerror', None) or exc})") from None
    if not names:
        raise CalibratorError(f"--images {shorten(image_dir)}: no "
                              f"{'/'.join(IMAGE_EXTENSIONS)} images")
    return [image_dir / name for name in names]


class ImageFolderSource(DataSource):
    """``constants``: other tops the source feeds with a constant, top -> (shape, value),
    a shape entry None standing for the batch size (a data layer's labels, DummyData)."""

    def __init__(self, paths: list[Path], input_name: str, channels: int,
                 size: tuple[int, int], transform: Transform, batch_size: int, *,
                 cache: bool = True, constants: dict | None = None):
        super().__init__([input_name], batch_size, transform, cache=cache)
        self._paths = paths
        self._size = size  # (height, width)
        self._imread_flag = cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE
        self._constants = dict(constants or {})

    def _constant_shape(self, shape) -> tuple[int, ...]:
        return tuple(self.batch_size if d is None else int(d) for d in shape)

    def top_shapes(self) -> dict[str, tuple]:
        shapes = super().top_shapes()
        shapes.update({top: self._constant_shape(shape)
                       for top, (shape, _) in self._constants.items()})
        return shapes

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        out = super().batch(index)
        for top, (shape, value) in self._constants.items():
            out[top] = torch.full(self._constant_shape(shape), float(value))
        return out

    def num_samples(self) -> int:
        return len(self._paths)

    def _describe(self, sample: int) -> str:
        return shorten(self._paths[sample])

    def input_files(self) -> list[Path]:
        return list(self._paths)

    def _decode(self, sample: int, raw) -> np.ndarray:
        input_file(self._paths[sample], "image")
        image = cv2.imread(str(self._paths[sample]), self._imread_flag)
        if image is None:
            raise self.error(f"cannot read image {self._describe(sample)}")
        height, width = self._size
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        return self._prepared(sample, self.transform.prepare_image, image)


def build_image_folder_source(image_dir: str | os.PathLike, input_name: str,
                              input_shape: Sequence[int], mean: Sequence[float], norm: float,
                              size: Sequence[int] | None = None, batch_size: int | None = None,
                              *, cache: bool = True, transform: Transform | None = None,
                              constants: dict | None = None) -> ImageFolderSource:
    """Feed the Input blob ``input_name`` of shape NxCxHxW (C = 3 for BGR, 1 for gray);
    ``size`` (H, W) overrides the input's spatial size, ``batch_size`` its N. A given
    ``transform`` replaces ``(pixel - mean) * norm`` (its pad is added to ``size``);
    ``constants`` are fed as ImageFolderSource says."""
    if len(input_shape) != 4 or input_shape[1] not in (1, 3):
        raise CalibratorError(f"--images: input '{input_name}' has shape "
                              f"{tuple(input_shape)}; images need N x 3 (BGR) or 1 x H x W")
    channels = int(input_shape[1])
    mean = [float(m) for m in mean]
    if channels == 1 and len(set(mean)) == 1:
        mean = mean[:1]  # --mean B G R with one value repeated, for a gray input
    if len(mean) not in (1, channels):
        raise CalibratorError(f"--mean: {len(mean)} values for input '{input_name}' with "
                              f"{channels} channel(s)")
    size = tuple(int(s) for s in (size or input_shape[2:]))
    if len(size) != 2 or min(size) < 1:
        raise CalibratorError(f"--size must be two positive numbers H W, got {size}")
    batch_size = int(input_shape[0] if batch_size is None else batch_size)
    if batch_size < 1:
        raise CalibratorError(f"--batch-size must be at least 1, got {batch_size}")
    check_blob((batch_size, channels, *size), f"--images: a batch (--batch-size {batch_size}, "
               f"--size {size[0]} {size[1]})")
    paths = list_images(Path(image_dir))
    if transform is None:
        transform = Transform(scale=norm, mean_values=mean)
    return ImageFolderSource(paths, input_name, channels, size, transform, batch_size,
                             cache=cache, constants=constants)
