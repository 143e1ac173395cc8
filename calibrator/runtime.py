"""Process-wide settings for the command-line process (the CLI calls them; a library caller
decides for itself)."""

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


#: what :func:`deterministic_cuda` sets: (owner, attribute, value)
CUDA_SETTINGS = ((torch.backends.cuda.matmul, "allow_tf32", False),
                 (torch.backends.cudnn, "allow_tf32", False),
                 (torch.backends.cudnn, "benchmark", False),
                 (torch.backends.cudnn, "deterministic", True))


def deterministic_cuda() -> None:
    """CUDA as the command line runs it (``--gpu``): the same bits on every run and every
    rank, and FP32 convolutions and matrix products in full float32 as Caffe computes them.

    * no TF32 (cuDNN convolutions and cuBLAS matrix products alike): TF32 rounds the
      operands to 10-bit mantissas;
    * ``cudnn.deterministic`` and no ``cudnn.benchmark``: cuDNN picks its algorithm by fixed
      heuristics, the same for the same shapes on the same GPU model, so one process and
      N ranks (which run whole batches of the same shape) compute identical FP32 outputs.

    ``torch.use_deterministic_algorithms`` is deliberately not switched on: the only
    order-dependent CUDA kernels the calibrator uses add integers (``histc`` counts in
    float32, below 2^24 per chunk; the pair-saturation corrections of
    ``quant.targets.pairs`` added with ``index_add_`` in float64, far below 2^53), which are
    exact in any order, and the flag would make ``histc`` raise. The INT8 simulation's own
    exactness (no TF32, no cuDNN inside its integer accumulations) is
    ``quant.simulate.exact_arithmetic``'s business."""
    for owner, name, value in CUDA_SETTINGS:
        setattr(owner, name, value)
