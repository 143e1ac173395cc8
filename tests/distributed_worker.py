"""One rank of tests/test_distributed.py's checks of :mod:`calibrator.distributed`, started
with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT):

    python -m tests.distributed_worker OUT_DIR SCENARIO

Writes ``OUT_DIR/rank<r>.json``: what this rank saw, and the (exit code, line) it ended
with if it failed."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from calibrator import distributed
from calibrator.errors import CalibratorError


def collectives(record: dict, rank: int) -> None:
    ran = []

    def compute():
        ran.extend(distributed.shard(5))
        return {index: f"batch {index} on rank {rank}" for index in distributed.shard(5)}

    record["gathered"] = distributed.gather_batches(compute)
    record["ran"] = ran
    counts = distributed.check(lambda: torch.tensor([rank + 1, 2 ** 40 * (rank + 1)],
                                                    dtype=torch.int64))
    record["sum"] = distributed.all_reduce(counts, "sum").tolist()
    record["max"] = distributed.all_reduce(torch.tensor([rank * 0.5, -rank * 1.0],
                                                        dtype=torch.float64), "max").tolist()
    record["agree"] = distributed.agree(f"decided by rank {rank}")
    record["on_main"] = distributed.on_main(lambda: f"read by rank {rank}")
    record["code"] = distributed.finish(10 + rank)


def fail_before_any_collective(record: dict, rank: int) -> None:
    """Rank 1 fails at once; rank 0 is already in a pass's gather."""
    if rank == 1:
        raise CalibratorError("rank 1: cannot read its batches")
    distributed.gather_batches(lambda: {0: "batch 0"})
    record["passed the gather"] = True


def fail_at_the_end(record: dict, rank: int) -> None:
    """Rank 0 fails after the others finished (writing the outputs, say)."""
    distributed.gather_batches(lambda: {rank: rank})
    if rank == 0:
        raise OSError("disk full")
    distributed.finish(0)
    record["finished"] = True


def both_fail(record: dict, rank: int) -> None:
    """Both ranks fail in the same pass: the lowest rank's error wins."""
    distributed.gather_batches(lambda: (_ for _ in ()).throw(
        CalibratorError(f"bad image in rank {rank}'s shard")))


def die(record: dict, rank: int) -> None:
    """Rank 1 vanishes (a crash, a kill): rank 0 must not wait for ever."""
    if rank == 1:
        os._exit(7)
    distributed.gather_batches(lambda: {0: "batch 0"})


def stall(record: dict, rank: int) -> None:
    """Rank 1 hangs past the timeout: rank 0 gives up."""
    if rank == 1:
        time.sleep(float(os.environ["STALL_SECONDS"]))
    distributed.gather_batches(lambda: {rank: rank})


SCENARIOS = {f.__name__: f for f in (collectives, fail_before_any_collective, fail_at_the_end,
                                     both_fail, die, stall)}


def main(out: str, scenario: str) -> int:
    distributed.init()
    rank = distributed.rank()
    record = {"rank": rank, "world": distributed.world(), "is_main": distributed.is_main()}
    code = 0
    try:
        SCENARIOS[scenario](record, rank)
    except Exception as exc:
        code, line = distributed.settle(exc)
        record["error"] = [code, line]
    started = time.time()
    ranked = distributed.close()
    record["close_seconds"] = round(time.time() - started, 1)
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    if ranked:  # as the command line ends a torchrun worker (see distributed.close)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
