"""Small C kernels, built on first use with the machine's C compiler, each doing in one pass
over memory or in plain loops what tensor code does in many operations: the simulation's
requantization (:func:`requantize`), the statistics' histogram bin counts
(:func:`bin_counts`) and zero counts (:func:`count_zeros`), and every KL candidate's
divergence up to rounding (:func:`kl_divergences`, a filter whose answer the tensor code of
:mod:`calibrator.quant.kl` confirms). Each returns None where it cannot run; the caller's
tensor code then gives the same results.

The requantization does in one loop what the tensor code does in three to six elementwise
passes (multiply, residual sum, saturate, round; each a full read and write of a conv output
that does not fit in the caches).

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

The bin counts are those of :mod:`calibrator.quant.counting`'s tensor route, which are
``torch.histc``'s: an element ``e`` (|x| or x, finite, 0 <= e <= high) goes to bin
``1 + floor(f32(f32((e - low) * bins) / width))`` with ``low`` = 2^-149, the smallest
subnormal, so that an exact zero falls in bin 0, below the range (its quotient lies in
[-1, 0) on the ranges that route takes). Subtracting a subnormal takes the CPU's slow path
for subnormal operands on every element, so the kernel does not: from 2^-123 up, ``e - low``
rounds to ``e`` itself (half an ulp of ``e`` exceeds 2^-149), so the key is
``1 + (int)(f32(e * bins) / width)`` (the quotient is >= 0: truncation is the floor); an exact
zero (either sign) is bin 0; only a nonzero element below 2^-123 takes the subtraction, in a
scalar loop that runs for the blocks holding one. Each thread counts into its own
uint32 tables (two, alternating elements, so that runs of one bin do not serialise on one
counter), summed in int64 at the end: integers, the same on any number of threads. The
comparisons are branch-free once the compiler may assume no floating-point traps
(``-fno-trapping-math``, which changes no value). On x86-64 with glibc the counting kernel is
built twice, for AVX2 and the baseline, and the CPU picks one when the library loads (GNU
``target_clones``; MobileNetV2's ``-q``: the bins 15% faster, the same counts; the other
kernels gained nothing from it).

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
#include <stdlib.h>

static const float MAGIC = 12582912.0f;   /* 1.5 * 2^23 */
#define SPLIT (1 << 18)                      /* elements: below, one thread */

/* an AVX2 copy of a kernel beside the baseline one, the CPU choosing at load time (GNU
   ifunc: glibc on x86-64, a compiler that knows the attribute); elsewhere, or built with
   -DWITH_AVX2= (the tests), the baseline alone. The same IEEE operations in each (no FMA:
   -ffp-contract=off), so the same results. */
#ifndef WITH_AVX2
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define WITH_AVX2 __attribute__((target_clones("avx2", "default")))
#endif
#endif
#endif
#ifndef WITH_AVX2
#define WITH_AVX2
#endif

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

/* KL(P || Q) of every candidate i = levels ... bins - 1 of a histogram h of |x|
   (calibrator.quant.kl's definition: P the first i bins with the tail on bin i - 1, Q their
   merge into `levels` levels spread back over the nonzero bins, both smoothed with eps and
   normalised); div[i - levels] the divergence, mag[i - levels] the sum of the |terms|.
   The same formula as the tensor code, not its summation order: a filter, see kl.py.
   Returns 0, or -1 where memory could not be had (div and mag then undefined). */
int kl_all(const double *h, int64_t bins, int64_t levels, double eps, double given,
           double *div, double *mag)
{
    int failed = 0;
    double *tail = malloc(((size_t)bins + 1) * sizeof(double));
    if (tail == NULL)
        return -1;
    tail[bins] = 0.0;
    for (int64_t k = bins - 1; k >= 0; k--)
        tail[k] = h[k] + tail[k + 1];
    #pragma omp parallel
    {
        double *p = malloc((size_t)bins * sizeof(double));
        double *q = malloc((size_t)bins * sizeof(double));
        double *mass = malloc(((size_t)levels + 1) * sizeof(double));
        double *support = malloc(((size_t)levels + 1) * sizeof(double));
        double *edge = malloc(((size_t)levels + 1) * sizeof(double));
        double *first = malloc((size_t)bins * sizeof(double));
        int64_t *level = malloc((size_t)bins * sizeof(int64_t));
        const int ready = p && q && mass && support && edge && first && level;
        if (!ready) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 16)
        for (int64_t i = levels; i < bins; i++) {
            if (!ready)
                continue;   /* (every thread must reach the loop; this one's share is lost) */
            int64_t nonzero = 0;
            for (int64_t k = 0; k < i - 1; k++) {
                p[k] = h[k];
                nonzero += h[k] != 0.0;
            }
            p[i - 1] = h[i - 1] + tail[i];
            nonzero += p[i - 1] != 0.0;
            double take = eps * (double)(i - nonzero) / (double)(nonzero > 0 ? nonzero : 1);
            double psum = 0.0;
            for (int64_t k = 0; k < i; k++) {
                p[k] = p[k] != 0.0 ? p[k] - take : given;
                psum += p[k];
            }
            for (int64_t l = 0; l <= levels; l++) {
                mass[l] = support[l] = 0.0;
                edge[l] = (double)(l + 1) * (double)i / (double)levels;  /* level l's end */
            }
            /* bin k starts in level floor(k * levels / i), which grows by at most one a bin */
            for (int64_t k = 0, l = 0, end = i; k < i; k++) {
                if (k * levels >= end) {
                    l++;
                    end += i;
                }
                const double inside = edge[l] - (double)k;
                level[k] = l;
                first[k] = inside > 1.0 ? 1.0 : inside;
            }
            for (int64_t k = 0; k < i; k++) {
                const int64_t next = level[k] + 1 > levels ? levels : level[k] + 1;
                mass[level[k]] += h[k] * first[k];
                mass[next] += h[k] * (1.0 - first[k]);
                if (h[k] != 0.0) {
                    support[level[k]] += first[k];
                    support[next] += 1.0 - first[k];
                }
            }
            for (int64_t l = 0; l <= levels; l++)
                mass[l] = support[l] > 0.0 ? mass[l] / support[l] : 0.0;
            nonzero = 0;
            for (int64_t k = 0; k < i; k++) {
                const int64_t next = level[k] + 1 > levels ? levels : level[k] + 1;
                q[k] = h[k] != 0.0 ? first[k] * mass[level[k]] + (1.0 - first[k]) * mass[next]
                                   : 0.0;
                nonzero += q[k] != 0.0;
            }
            take = eps * (double)(i - nonzero) / (double)(nonzero > 0 ? nonzero : 1);
            double qsum = 0.0;
            for (int64_t k = 0; k < i; k++) {
                q[k] = q[k] != 0.0 ? q[k] - take : given;
                qsum += q[k];
            }
            psum = psum > 1e-300 ? psum : 1e-300;
            qsum = qsum > 1e-300 ? qsum : 1e-300;
            /* p/psum * log((p/psum) / (q/qsum)), rearranged: one division a bin */
            const double share = 1.0 / psum, ratio = qsum / psum;
            double kl = 0.0, size = 0.0;
            for (int64_t k = 0; k < i; k++) {
                if (p[k] > 0.0 && q[k] > 0.0) {
                    const double term = p[k] * share * log(p[k] * ratio / q[k]);
                    kl += term;
                    size += fabs(term);
                }
            }
            div[i - levels] = kl;
            mag[i - levels] = size;
        }
        free(p);
        free(q);
        free(mass);
        free(support);
        free(edge);
        free(first);
        free(level);
    }
    free(tail);
    return failed ? -1 : 0;
}

#define BLOCK 2048

/* the number of zeros (either sign) in x */
int64_t count_zeros(const float *x, int64_t n)
{
    int64_t total = 0;
    #pragma omp parallel for schedule(static) reduction(+: total) if (n >= SPLIT)
    for (int64_t b = 0; b < n; b += BLOCK) {
        const int64_t m = n - b < BLOCK ? n - b : BLOCK;
        int32_t zeros = 0;
        for (int64_t j = 0; j < m; j++)
            zeros += x[b + j] == 0.0f;
        total += zeros;
    }
    return total;
}
static const float TINY = 0x1p-123f;   /* from here up, e - 2^-149 rounds to e */

/* counts[0 .. bins + 1] += the bin keys' counts of |x| (absolute) or x; n < 2^32.
   Returns 0, or -1 where memory could not be had (counts then undefined) */
WITH_AVX2
int hist_count(const float *x, int64_t n, int64_t bins, float low, float width,
               int absolute, int64_t *counts)
{
    const float fb = (float)bins;
    const uint32_t last = (uint32_t)(bins + 1);
    int failed = 0;
    #pragma omp parallel if (n >= SPLIT)
    {
        uint32_t *even = calloc(2 * ((size_t)bins + 2), sizeof(uint32_t));
        uint32_t *odd = even != NULL ? even + bins + 2 : NULL;
        int32_t key[BLOCK];
        if (even == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < n; b += BLOCK) {
            if (even == NULL)
                continue;   /* (every thread must reach the loop; this one's share is lost) */
            const int64_t m = n - b < BLOCK ? n - b : BLOCK;
            const float *xb = x + b;
            int tiny = 0;
            for (int64_t j = 0; j < m; j++) {
                const float e = absolute ? fabsf(xb[j]) : xb[j];
                key[j] = e >= TINY ? (int32_t)((e * fb) / width) + 1 : 0;
                tiny |= (e < TINY) & (e != 0.0f);
            }
            if (tiny) {
                for (int64_t j = 0; j < m; j++) {
                    const float e = absolute ? fabsf(xb[j]) : xb[j];
                    if (e < TINY && e != 0.0f)
                        key[j] = (int32_t)(((e - low) * fb) / width) + 1;
                }
            }
            int64_t j = 0;
            for (; j + 1 < m; j += 2) {   /* (a key past the last bin, never expected: last) */
                const uint32_t k0 = (uint32_t)key[j], k1 = (uint32_t)key[j + 1];
                even[k0 > last ? last : k0]++;
                odd[k1 > last ? last : k1]++;
            }
            if (j < m) {
                const uint32_t k0 = (uint32_t)key[j];
                even[k0 > last ? last : k0]++;
            }
        }
        if (even != NULL) {
            #pragma omp critical
            for (int64_t k = 0; k < bins + 2; k++)
                counts[k] += (int64_t)even[k] + odd[k];
        }
        free(even);
    }
    return failed ? -1 : 0;
}
"""

FLAGS = ["-O3", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off", "-fno-trapping-math",
         "-std=c99", "-fopenmp"]
_POINTER, _INT, _DOUBLE, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, \
    ctypes.c_float


#: each kernel's C signature: (return type, argument types)
_SIGNATURES = {
    "rq_last": (None, [_POINTER, _POINTER, _INT, _INT, _POINTER, _FLOAT, _POINTER, _DOUBLE,
                       _FLOAT, _FLOAT]),
    "rq_first": (None, [_POINTER, _POINTER, _INT, _INT, _INT, _POINTER, _FLOAT, _POINTER,
                        _DOUBLE, _FLOAT, _FLOAT]),
    "hist_count": (ctypes.c_int, [_POINTER, _INT, _INT, _FLOAT, _FLOAT, ctypes.c_int,
                                  _POINTER]),
    "count_zeros": (_INT, [_POINTER, _INT]),
    "kl_all": (ctypes.c_int, [_POINTER, _INT, _INT, _DOUBLE, _DOUBLE, _POINTER, _POINTER]),
}


def _cache_folder() -> Path:
    if os.environ.get("CALIBRATOR_CACHE"):
        return Path(os.environ["CALIBRATOR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "calibrator"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str, extra: tuple[str, ...] = ()) -> Path:
    """The library built from SOURCE with FLAGS and ``extra`` (cached: see the module)."""
    flags = [*FLAGS, *extra]
    key = hashlib.sha256("\0".join([SOURCE, *flags, compiler, platform.machine(),
                                    platform.system()]).encode()).hexdigest()[:16]
    folder = _cache_folder()
    target = folder / f"kernels-{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        source = Path(tmp) / "kernels.c"
        source.write_text(SOURCE)
        built = Path(tmp) / "kernels.so"
        subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"], check=True,
                       capture_output=True, timeout=120)
        os.replace(built, target)     # atomic: a concurrent build writes the same file
    return target


@functools.lru_cache(maxsize=1)
def _library():
    """The loaded kernel, or None (see the module's text)."""
    if os.environ.get("CALIBRATOR_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("native kernels unavailable (%s): tensor operations instead", exc)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = restype, argtypes
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


def _flat_library(flat: torch.Tensor):
    """The kernels where they are built and ``flat`` is what the flat kernels read (1-D,
    float32, contiguous, on the CPU); None otherwise."""
    if flat.device.type != "cpu" or flat.dtype != torch.float32 or flat.dim() != 1 or \
            not flat.is_contiguous():
        return None
    return _library()


#: elements per kernel call: each thread's uint32 counts stay exact
_HIST_CALL = 1 << 31


def bin_counts(flat: torch.Tensor, bins: int, low: float, width: float,
               absolute: bool) -> torch.Tensor | None:
    """int64 counts of the bin keys 0 ... ``bins`` + 1 of ``flat`` (1-D, float32, on the
    CPU), as the module's text says; None where the kernel is unavailable, ``flat`` is not
    such a tensor, or the kernel could not allocate its tables (the caller runs its tensor
    operations)."""
    library = _flat_library(flat)
    if library is None:
        return None
    counts = torch.zeros(bins + 2, dtype=torch.int64)
    for piece in flat.split(_HIST_CALL):
        if library.hist_count(piece.data_ptr(), piece.numel(), bins, low, width,
                              int(absolute), counts.data_ptr()) != 0:
            return None  # no memory for the kernel's tables: the tensor code counts
    return counts


def count_zeros(flat: torch.Tensor) -> int | None:
    """The zeros of ``flat`` (1-D, float32, contiguous, on the CPU) in one read: what
    ``flat.numel() - torch.count_nonzero(flat)`` gives. None where the kernel is unavailable
    or ``flat`` is not such a tensor."""
    library = _flat_library(flat)
    return None if library is None else int(library.count_zeros(flat.data_ptr(),
                                                                 flat.numel()))


def kl_divergences(hist: torch.Tensor, levels: int, eps: float, given: float
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(divergence, sum of |terms|) of every candidate ``levels`` ... ``len(hist) - 1``
    (float64), by the formula of :mod:`calibrator.quant.kl` in plain loops: the same values
    up to rounding (another summation order, the C library's log). None where the kernel is
    unavailable or could not allocate its buffers."""
    library = _library()
    if library is None:
        return None
    h = hist.to(torch.float64).cpu().contiguous()
    count = h.numel() - levels
    divergence = torch.empty(count, dtype=torch.float64)
    size = torch.empty(count, dtype=torch.float64)
    if library.kl_all(h.data_ptr(), h.numel(), levels, eps, given, divergence.data_ptr(),
                      size.data_ptr()) != 0:
        return None  # no memory for the kernel's buffers: the tensor code scores
    return divergence, size
