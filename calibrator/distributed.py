"""Data parallelism across processes: ``torchrun --nproc-per-node N -m calibrator ...``.

Every pass over TEST batches is sharded by whole batches (Caffe's batches are fixed by their
index): rank ``r`` of ``W`` reads the batches whose index ``i`` has ``i % W == r``. What the
ranks compute is then combined exactly, so that N ranks produce the bytes one process
produces:

* per-batch results (metric outcomes, the first statistics pass's min/max/|max|/counts) are
  gathered to every rank and put back in batch order (:func:`gather_batches`): the code
  after the pass sees exactly the single-process list;
* the histograms of the second statistics pass are summed (:func:`all_reduce`, int64, exact
  in any order), over the common range the first pass's reduction fixed;
* decisions taken from floating-point values computed on each rank (the probe's
  sensitivities, a time budget) are rank 0's, broadcast (:func:`agree`), so ranks can never
  diverge, even on mixed hardware;
* rank 0 alone writes files (:func:`is_main`); the command line silences the others.

Errors: a rank's failure must not leave the others waiting in a collective. Every collective
here is an object exchange that carries a status, and raw tensor reductions only follow a
successful exchange with nothing that can fail in between. A rank that fails hands its error
to the next exchange the others are in (:func:`settle`), so every rank raises
:class:`SharedError` with the same message and exits with the same code; a rank that dies
or hangs trips the process group's timeout (``CALIBRATOR_DIST_TIMEOUT`` seconds, default
1800) instead of blocking the others for ever.

Without torchrun's variables (``WORLD_SIZE`` unset or 1) everything here is a no-op: rank 0
of 1, passes unsharded, nothing exchanged.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from calibrator.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, CalibratorError, one_line

T = TypeVar("T")
DEFAULT_TIMEOUT = 1800.0  # seconds a collective may wait for the slowest rank


class SharedError(CalibratorError):
    """A failure every rank ends with: ``line`` is printed as is, ``code`` is the exit code."""

    def __init__(self, line: str, code: int, rank: int):
        super().__init__(line)
        self.line = line
        self.code = code
        self.rank = rank  # the rank it happened on


class GroupError(RuntimeError):
    """A collective itself failed (a rank died, the timeout passed): no more exchanges."""


@dataclass
class _Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False
    owned: bool = False   # we created the default process group (and destroy it)
    broken: bool = False


_GROUP = _Group()


def failure(exc: BaseException) -> tuple[int, str]:
    """(exit code, the one stderr line) the command line reports for ``exc``."""
    if isinstance(exc, SharedError):
        return exc.code, exc.line
    if isinstance(exc, CalibratorError):
        return EXIT_BAD_INPUT, one_line(f"calibrator: error: {exc}")
    if isinstance(exc, GroupError):
        return EXIT_INTERNAL, one_line(f"calibrator: error: {exc}")
    text = str(exc).splitlines()[0] if str(exc).strip() else ""
    return EXIT_INTERNAL, one_line(
        f"calibrator: internal error (a bug in calibrator, not in your input: please report "
        f"it with the traceback --debug prints): {type(exc).__name__}: {text}")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise CalibratorError(f"environment variable {name}={value!r} is not an integer "
                              "(set by torchrun)") from None


def launched() -> tuple[int, int, int]:
    """(rank, world size, local rank) torchrun's environment describes ((0, 1, 0) without)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise CalibratorError(f"torchrun environment: RANK={rank} of WORLD_SIZE={world}, "
                              f"LOCAL_RANK={local} make no sense")
    return rank, world, local


def init(cuda: bool = False) -> None:
    """Join the process group torchrun's environment describes (gloo; with ``cuda``, NCCL
    for CUDA tensors and gloo for the exchanges); nothing without torchrun. Reuses a default
    process group the caller already initialised. Idempotent."""
    if _GROUP.active:
        return
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world > 1:
            _GROUP.__init__(dist.get_rank(), world, _env_int("LOCAL_RANK", dist.get_rank()),
                            True, False)
        return
    rank, world, local = launched()
    if world == 1:
        return
    if not dist.is_available():
        raise CalibratorError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    timeout = float(os.environ.get("CALIBRATOR_DIST_TIMEOUT") or DEFAULT_TIMEOUT)
    backend = "cpu:gloo,cuda:nccl" if cuda and torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout),
                                rank=rank, world_size=world)
    except (RuntimeError, ValueError) as exc:
        raise CalibratorError(f"rank {rank}: cannot join the {world} torchrun ranks "
                              f"({str(exc).splitlines()[0] if str(exc) else exc})") from None
    _GROUP.__init__(rank, world, local, True, True)


def close() -> bool:
    """Wait for every rank (so that all have printed), then leave the process group. True
    when this process was a rank of a group: it should then end with ``os._exit`` once its
    output is flushed. (Gloo's worker threads release the last collective's buffers a moment
    after the collective returns, and need the interpreter for it: an interpreter shutting
    down at that moment aborts the process. Nothing is left to finalise by then: outputs
    are written atomically and closed.)"""
    if not _GROUP.active:
        return False
    try:
        if not _GROUP.broken:
            try:
                _all_gather(("ok", None))
            except GroupError:
                pass
        if _GROUP.owned and dist.is_initialized():
            dist.destroy_process_group()
    finally:
        _GROUP.__init__()
    return True


def abandon() -> None:
    """No more collectives (an interrupt): :func:`close` only leaves the group."""
    _GROUP.broken = True


def rank() -> int:
    return _GROUP.rank


def world() -> int:
    return _GROUP.world


def local_rank() -> int:
    return _GROUP.local_rank


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return _GROUP.rank == 0


def active() -> bool:
    return _GROUP.active


def shard(count: int) -> list[int]:
    """The batch indices among ``0 .. count-1`` this rank reads: ``i % world == rank``."""
    return list(range(_GROUP.rank, count, _GROUP.world))


# -- exchanges -----------------------------------------------------------------------------

def _lost(exc: Exception) -> GroupError:
    """The group is unusable (a peer died, the timeout passed): say so in one line."""
    _GROUP.broken = True
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0].rstrip(".")  # gloo's source path
    return GroupError(f"rank {_GROUP.rank}: lost contact with the other ranks ({text})")


def _all_gather(item) -> list:
    replies = [None] * _GROUP.world
    try:
        dist.all_gather_object(replies, item)
    except Exception as exc:
        raise _lost(exc) from None
    return replies


def _raise_shared(replies: list) -> None:
    for source, (status, value) in enumerate(replies):
        if status == "error":
            code, line = value
            raise SharedError(line, code, source)


def _exchange_outcome(compute: Callable[[], T]) -> tuple[T, list]:
    """Run ``compute()`` here, then exchange its result (or its failure) with every rank:
    (this rank's result, every rank's). Raises :class:`SharedError` on every rank when any
    rank's ``compute`` failed (the lowest failing rank's)."""
    cause = None
    try:
        local = compute()
        item = ("ok", local)
    except (GroupError, SharedError, KeyboardInterrupt):
        raise
    except Exception as exc:
        local, item, cause = None, ("error", failure(exc)), exc
    replies = _all_gather(item)
    try:
        _raise_shared(replies)
    except SharedError as shared:
        raise shared from cause
    return local, [value for _, value in replies]


def gather_batches(compute: Callable[[], dict[int, T]], *, sharded: bool = True) -> list[T]:
    """One pass: ``compute()`` runs this rank's batches and returns batch index -> result;
    the answer is every batch's result in index order, the same list on every rank (what
    one process computing every batch would return). Not ``sharded``: every rank computed
    every batch; its own results are kept and the exchange only shares failures."""
    if not _GROUP.active:
        local = compute()
        return [local[index] for index in sorted(local)]
    if not sharded:
        local = check(compute)
        return [local[index] for index in sorted(local)]
    _, parts = _exchange_outcome(compute)
    merged: dict[int, T] = {}
    for part in parts:
        merged.update(part)
    return [merged[index] for index in sorted(merged)]


def check(compute: Callable[[], T]) -> T:
    """``compute()`` here, then make sure every rank's succeeded (else every rank raises the
    first failure); its result stays local. Put it right before a raw tensor reduction."""
    if not _GROUP.active:
        return compute()
    holder = {}

    def run():
        holder["value"] = compute()
        return None

    _exchange_outcome(run)
    return holder["value"]


def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """``op`` ("sum" or "max") of ``tensor`` over the ranks, in place (gloo on the CPU, NCCL
    on CUDA). Only right after a successful :func:`check` or exchange."""
    if not _GROUP.active:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    try:
        dist.all_reduce(tensor, op=reduce_op)
    except Exception as exc:
        raise _lost(exc) from None
    return tensor


def agree(value: T) -> T:
    """Rank 0's ``value`` on every rank: a decision taken from numbers every rank computed
    (identical on identical hardware) is taken once, so the ranks never diverge."""
    if not _GROUP.active:
        return value
    _, values = _exchange_outcome(lambda: value)
    return values[0]


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only (reading a file beside the outputs, say); every rank gets its
    result, or raises its error."""
    if not _GROUP.active:
        return fn()
    _, values = _exchange_outcome(fn if _GROUP.rank == 0 else (lambda: None))
    return values[0]


def finish(code: int) -> int:
    """The command's end: rank 0's exit code on every rank (after every rank got there)."""
    if not _GROUP.active:
        return code
    _, codes = _exchange_outcome(lambda: code)
    return codes[0]


def settle(exc: BaseException) -> tuple[int, str]:
    """(exit code, line) to end this rank with after ``exc``: the same on every rank. A
    local failure is handed to the exchange the other ranks are in (or will reach next);
    when several ranks failed at once, the lowest rank's failure wins."""
    if isinstance(exc, SharedError) or not _GROUP.active or _GROUP.broken:
        return failure(exc)
    try:
        replies = _all_gather(("error", failure(exc)))
    except GroupError as lost:
        return failure(lost)
    for status, value in replies:
        if status == "error":
            return tuple(value)
    return failure(exc)


__all__ = ["DEFAULT_TIMEOUT", "GroupError", "SharedError", "abandon", "active", "agree",
           "all_reduce", "check", "close", "failure", "finish", "gather_batches", "init",
           "is_main", "launched", "local_rank", "on_main", "rank", "settle", "shard", "world"]
