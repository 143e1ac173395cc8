"""The TEST batches of a model, on its device: what every pass over the data iterates."""

from __future__ import annotations

from typing import Iterator

import torch

from calibrator.errors import CalibratorError
from calibrator.progress import progress_bar


def batches(model, iterations: int, *, desc: str = "batches", quiet: bool = False,
            first: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(index, feeds on ``model.device``) for TEST batches first..iterations-1 of
    ``model.source``."""
    if iterations < 1:
        raise CalibratorError(f"-i/--iterations must be at least 1, got {iterations}")
    if model.source is None:
        raise CalibratorError(f"{model.prototxt}: nothing feeds the net (no data layer; "
                              "give --images for a deploy net)")
    model.source.prefetch(iterations)  # a bad image fails here, before any output is written
    for index in progress_bar(range(first, iterations), desc=desc, quiet=quiet):
        feeds = model.source.batch(index)
        yield index, {k: v.to(model.device, non_blocking=True) for k, v in feeds.items()}
