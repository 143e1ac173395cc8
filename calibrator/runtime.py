"""Process-wide settings for the command-line process (the CLI calls them; a library caller
decides for itself)."""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> None:
    """Keep freed activation buffers in the heap instead of returning them to the OS.

    glibc serves large allocations with mmap and gives them back on free, so every layer's
    80 MB output costs fresh page faults; raising the thresholds lets the next layer reuse
    the memory (a 3-6x faster forward pass for batch-50 CNNs on the CPU)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
