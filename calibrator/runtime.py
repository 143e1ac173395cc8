"""Process-wide settings that make CPU inference fast and results reproducible."""

from __future__ import annotations

import ctypes
import sys

import torch

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


def exact_arithmetic() -> None:
    """No TF32 on CUDA: the INT8 simulation's integer accumulations must stay exact."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
