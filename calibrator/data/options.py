"""How a deploy net (no data layer) is fed: a folder of images, or a detection list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass
class ImageFolderOptions:
    """Preprocessing for a deploy net fed from a folder of images (``--images``)."""

    folder: str
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    norm: float = 1.0
    size: Sequence[int] | None = None  # (H, W)
    batch_size: int | None = None


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
