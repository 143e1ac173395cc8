"""The TEST batches of a model, on its device: what every pass over the data iterates.

Under torchrun a pass may be sharded (``shard=True``): each rank reads only its own batches
(``index % world == rank``, see :mod:`calibrator.distributed`), and decodes only those."""

from __future__ import annotations

from typing import Iterator

import torch

from calibrator import distributed
from calibrator.errors import CalibratorError
from calibrator.progress import progress_bar


def batches(model, iterations: int, *, desc: str = "batches", quiet: bool = False,
            first: int = 0, shard: bool = False
            ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(index, feeds on ``model.device``) for TEST batches first..iterations-1 of
    ``model.source``; with ``shard``, only this rank's share of them (all of them in a
    single process). Progress bars show on rank 0 only."""
    if iterations < 1:
        raise CalibratorError(f"-i/--iterations must be at least 1, got {iterations}")
    if model.source is None:
        raise CalibratorError(f"{model.prototxt}: nothing feeds the net (no data layer; "
                              "give --images for a deploy net)")
    indices = [index for index in (distributed.shard(iterations) if shard
                                   else range(iterations)) if index >= first]
    prefetch_some = getattr(model.source, "prefetch_batches", None)
    # a bad image fails here, before any output is written
    if shard and distributed.world() > 1 and prefetch_some is not None:
        prefetch_some(indices)
    else:
        model.source.prefetch(iterations)
    quiet = quiet or not distributed.is_main()
    for index in progress_bar(indices, desc=desc, quiet=quiet):
        feeds = model.source.batch(index)
        yield index, {k: v.to(model.device, non_blocking=True) for k, v in feeds.items()}
