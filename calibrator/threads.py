"""Work shared among torch's CPU threads, each on one core.

Some of the calibrator's work is many small torch operations on independent pieces (the bin
counts of a tensor's slices, :mod:`calibrator.quant.counting`): torch runs each operation on
all its threads but gains little on pieces that small, and some (``torch.bincount``) run on
one. :func:`on_cores` hands the pieces to as many Python threads as torch has (torch releases
the GIL inside its operations), each running its operations on one core. The results are
each piece's own, so they do not depend on the number of threads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[int, ThreadPoolExecutor] = {}
_NAME = "calibrator-cores"


def on_cores(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(item) for item in items]``, the calls shared among torch's threads, each
    thread's torch operations on one core while they run (torch's setting is restored)."""
    items = list(items)
    outer = torch.get_num_threads()
    threads = min(outer, len(items))
    if threads <= 1 or threading.current_thread().name.startswith(_NAME):  # (nested: here)
        return [fn(item) for item in items]
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(threads, _NAME)
    torch.set_num_threads(1)
    try:
        return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(outer)
