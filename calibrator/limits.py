"""What the machine can hold: every blob, batch and image buffer is sized before it is
allocated, and one that cannot fit is bad input naming what wanted it and how much.

The limit is the machine's physical memory (or the cgroup's limit, when lower), or
``CALIBRATOR_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix) when set."""

from __future__ import annotations

import math
import os
import re
from functools import lru_cache
from typing import Iterable

from calibrator.errors import CalibratorError
from calibrator.fileio import human_size

ENV = "CALIBRATOR_MEMORY_LIMIT"
FLOAT32 = 4
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            return int(text)
    return None


@lru_cache(maxsize=1)
def physical_memory() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a large machine
        total = 1 << 40
    cgroup = _cgroup_limit()
    return min(total, cgroup) if cgroup else total


def memory_limit() -> int:
    """Bytes one run may plan to hold at once."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return physical_memory()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise CalibratorError(f"{ENV}={text!r}: expected a size such as 4G or 512M")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def elements(shape: Iterable[int]) -> int:
    """The number of values of a blob of this shape (exact: Python integers)."""
    return math.prod(max(int(d), 0) for d in shape)


def check_memory(nbytes: int, what: str, error=CalibratorError) -> None:
    """``error(message)`` (a CalibratorError by default) when ``nbytes`` exceed the limit;
    ``what`` says what wanted them (``its top 'conv' of shape (2, 4, 9, 9)``)."""
    limit = memory_limit()
    if nbytes > limit:
        source = f"{ENV}" if os.environ.get(ENV, "").strip() else "this machine's memory"
        raise error(f"{what} needs {human_size(nbytes)} of memory, more than the "
                    f"{human_size(limit)} available ({source})")


def check_blob(shape, what: str, error=CalibratorError, itemsize: int = FLOAT32) -> None:
    """:func:`check_memory` for a float32 blob of ``shape``."""
    check_memory(elements(shape) * itemsize, f"{what} of shape {tuple(shape)}", error)
