"""How a deploy net (no data layer) is fed: a folder of images, or a detection list."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from calibrator.errors import CalibratorError


def check_feed(mean, norm, size, batch_size) -> None:
    """The preprocessing options of a deploy net: finite numbers, positive sizes."""
    values = list(mean)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise CalibratorError(f"--mean must be finite numbers, got {' '.join(map(str, values))}")
    if not (isinstance(norm, (int, float)) and math.isfinite(norm)):
        raise CalibratorError(f"--norm must be a finite number, got {norm}")
    if size is not None and (len(size) != 2 or min(int(s) for s in size) < 1):
        raise CalibratorError(f"--size must be two positive numbers H W, got "
                              f"{' '.join(map(str, size))}")
    if batch_size is not None and batch_size < 1:
        raise CalibratorError(f"--batch-size must be at least 1, got {batch_size}")


@dataclass
class ImageFolderOptions:
    """Preprocessing for a deploy net fed from a folder of images (``--images``)."""

    folder: str
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    norm: float = 1.0
    size: Sequence[int] | None = None  # (H, W)
    batch_size: int | None = None

    def __post_init__(self):
        check_feed(self.mean, self.norm, self.size, self.batch_size)


@dataclass
class DetectionListOptions:
    """A deploy detector evaluated on a create_annoset-style list (``--det-list``), with
    its preprocessing."""

    list_path: str
    labelmap: str
    name_size: str | None = None
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    norm: float = 1.0
    size: Sequence[int] | None = None  # (H, W)
    batch_size: int | None = None

    def __post_init__(self):
        check_feed(self.mean, self.norm, self.size, self.batch_size)
