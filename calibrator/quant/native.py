"""The simulation's requantization in one pass over memory: a small C kernel, built on first
use with the machine's C compiler, doing in one loop what the tensor code does in three to six
elementwise passes (multiply, residual sum, saturate, round; each a full read and write of a
conv output that does not fit in the caches).

Per element, the same IEEE operations in the same order as :mod:`calibrator.quant.simulate`'s
tensor code (``_intel_finish``, ``quantize``, ``PendingReLU6.quantize``)::

    v = f32(f32(x * m) * t)                      m: float32, per channel or one for all;
                                                 t: a second factor (1: none, exactly)
    v = f32(f64(v) + rs * f64(r))                with a residual r (Intel's fma, exact in f64)
    v = min(max(v, lo), hi)                      saturation (the ReLU where lo = 0)
    q = copysign(f32(f32(v + 1.5 * 2^23) - 1.5 * 2^23), v)

The last line rounds half to even (|v| <= 2^22 after the saturation, and the addition's
rounding is the round to the nearest integer), keeping the sign of a zero as ``torch.round``
does (``round(-0.3)`` is ``-0.0``). Saturating before rounding equals rounding before it
for integer bounds (rounding is monotone and fixes integers); where a bound is not an integer
(``PendingReLU6``'s 6 s) the tensor code saturates first too. Compiled without fast-math and
without contracting multiply-adds (``-ffp-contract=off``), so every operation rounds as
written: the results are the tensor code's bit for bit, signed zeros included
(``tests/test_quant_native.py`` compares their int32 views, in both memory layouts, with and
without a residual, ties included).

The library goes to ``$CALIBRATOR_CACHE`` (default ``$XDG_CACHE_HOME/calibrator`` or
``~/.cache/calibrator``) under a name that hashes the source, the flags and the machine, built
into a temporary file and renamed (concurrent processes agree). Without a C compiler, where
the build fails, or with ``CALIBRATOR_NATIVE=0``, :func:`available` is False and the
simulation runs its tensor operations: the same results, slower. A large tensor is shared
among OpenMP threads: linked against ``libgomp.so.1``, the kernel joins the OpenMP runtime
torch has loaded (its own ``libgomp.so.1``), so it runs on torch's thread team and thread
count (``torch.set_num_threads``) instead of competing with it; ctypes releases the GIL."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <math.h>
#include <stdint.h>

static const float MAGIC = 12582912.0f;   /* 1.5 * 2^23 */
#define SPLIT (1 << 18)                      /* elements: below, one thread */

static inline float saturate_round(float v, float lo, float hi)
{
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    return copysignf((v + MAGIC) - MAGIC, v);
}

/* rows x channels, channels innermost (channels-last blobs, inner-product outputs) */
void rq_last(const float *x, float *out, int64_t rows, int64_t channels, const float *m,
             float t, const float *res, double rs, float lo, float hi)
{
    #pragma omp parallel for schedule(static) if (rows * channels >= SPLIT)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * channels;
        float *o = out + r * channels;
        if (res) {
            const float *rr = res + r * channels;
            for (int64_t c = 0; c < channels; c++)
                o[c] = saturate_round(
                    (float)((double)(xr[c] * m[c] * t) + rs * (double)rr[c]), lo, hi);
        } else {
            for (int64_t c = 0; c < channels; c++)
                o[c] = saturate_round(xr[c] * m[c] * t, lo, hi);
        }
    }
}

/* blocks of `inner` elements, block b in channel b % channels (NCHW blobs) */
void rq_first(const float *x, float *out, int64_t blocks, int64_t channels, int64_t inner,
              const float *m, float t, const float *res, double rs, float lo, float hi)
{
    #pragma omp parallel for schedule(static) if (blocks * inner >= SPLIT)
    for (int64_t b = 0; b < blocks; b++) {
        const float mc = m[b % channels];
        const float *xb = x + b * inner;
        float *o = out + b * inner;
        if (res) {
            const float *rb = res + b * inner;
            for (int64_t j = 0; j < inner; j++)
                o[j] = saturate_round((float)((double)(xb[j] * mc * t) + rs * (double)rb[j]),
                                      lo, hi);
        } else {
            for (int64_t j = 0; j < inner; j++)
                o[j] = saturate_round(xb[j] * mc * t, lo, hi);
        }
    }
}
"""

FLAGS = ["-O3", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off", "-std=c99",
         "-fopenmp"]
_POINTER, _INT, _DOUBLE, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, \
    ctypes.c_float


def _cache_folder() -> Path:
    if os.environ.get("CALIBRATOR_CACHE"):
        return Path(os.environ["CALIBRATOR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "calibrator"


def _build(compiler: str) -> Path:
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, compiler, platform.machine(),
                                    platform.system()]).encode()).hexdigest()[:16]
    folder = _cache_folder()
    target = folder / f"requant-{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        source = Path(tmp) / "requant.c"
        source.write_text(SOURCE)
        built = Path(tmp) / "requant.so"
        subprocess.run([compiler, *FLAGS, str(source), "-o", str(built), "-lm"], check=True,
                       capture_output=True, timeout=120)
        os.replace(built, target)     # atomic: a concurrent build writes the same file
    return target


@functools.lru_cache(maxsize=1)
def _library():
    """The loaded kernel, or None (see the module's text)."""
    if os.environ.get("CALIBRATOR_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("native requantization unavailable (%s): tensor operations instead", exc)
        return None
    library.rq_last.argtypes = [_POINTER, _POINTER, _INT, _INT, _POINTER, _FLOAT, _POINTER,
                                _DOUBLE, _FLOAT, _FLOAT]
    library.rq_first.argtypes = [_POINTER, _POINTER, _INT, _INT, _INT, _POINTER, _FLOAT,
                                 _POINTER, _DOUBLE, _FLOAT, _FLOAT]
    library.rq_last.restype = library.rq_first.restype = None
    return library


def available() -> bool:
    return _library() is not None


def _layout(x: torch.Tensor) -> tuple[str, int, int] | None:
    """("last", rows, channels) or ("first", blocks, inner) for a tensor the kernel reads
    in place, None for any other (the caller's tensor code runs)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and \
            not x.is_contiguous():
        return "last", x.shape[0] * x.shape[2] * x.shape[3], x.shape[1]
    if x.is_contiguous() and x.dim() >= 2:
        inner = x[0, 0].numel()
        return ("last", x.shape[0], x.shape[1]) if inner == 1 else \
            ("first", x.shape[0] * x.shape[1], inner)
    return None


def requantize(x: torch.Tensor, multiplier: torch.Tensor | float, low: float, high: float, *,
               then: float = 1.0, residual: torch.Tensor | None = None,
               residual_scale: float = 0.0, out: torch.Tensor | None = None
               ) -> torch.Tensor | None:
    """``sat(rne(x * multiplier * then [+ residual_scale * residual]))`` into ``out``
    (default a new tensor; ``x`` itself for in place), as the module's text says;
    ``multiplier``: float32 per channel (dim 1) or one number; ``then``: one number, applied
    after it (two float32 products, as two tensor multiplications). None where the kernel
    is unavailable or the tensors are not laid out for it: the caller runs its tensor
    operations."""
    library = _library()
    if library is None or x.device.type != "cpu" or x.dtype != torch.float32 or \
            x.numel() == 0:
        return None
    layout = _layout(x)
    if layout is None:
        return None
    channels = x.shape[1]
    if isinstance(multiplier, torch.Tensor):
        m = multiplier.to(torch.float32).reshape(-1).contiguous()
        if m.numel() != channels or m.device.type != "cpu":
            return None
    else:
        m = torch.full((channels,), multiplier, dtype=torch.float32)
    if residual is not None and (residual.dtype != torch.float32 or residual.shape != x.shape
                                 or residual.stride() != x.stride()):
        return None
    if out is None:
        out = torch.empty_like(x)
    elif out.stride() != x.stride() or out.shape != x.shape:
        return None
    kind, rows, inner = layout
    res = residual.data_ptr() if residual is not None else None
    if kind == "last":
        library.rq_last(x.data_ptr(), out.data_ptr(), rows, channels, m.data_ptr(), then, res,
                        residual_scale, float(low), float(high))
    else:
        library.rq_first(x.data_ptr(), out.data_ptr(), rows, channels, inner, m.data_ptr(),
                         then, res, residual_scale, float(low), float(high))
    return out
