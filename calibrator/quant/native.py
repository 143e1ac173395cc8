"""Small C kernels, built on first use with the machine's C compiler, each doing in one pass
over memory or in plain loops what tensor code does in many operations: the simulation's
requantization (:func:`requantize`), the statistics' histogram bin counts
(:func:`bin_counts`) and a tensor's min, max, max|x| and zeros (:func:`figures`; read by
the counting kernel on its way, and by a ReLU6's clamp, :func:`clamp_with_figures`: one
pass where there were two; the counting kernel may clamp too, counting the clamped values:
one pass where there were three), EasyQuant's cosine sums in float64 from the candidates'
float32 outputs (:func:`dot_square`, :func:`column_dot_square`: one read, no float64 copy;
:func:`depthwise_sums`, :func:`integer_sums`: the candidates' outputs made from the integers
and summed one candidate at a time, in cache, no tensor of them made; :func:`quantized_rows`:
a dense layer's int8 patches for every candidate scale in one write), and every KL
candidate's divergence up to rounding
(:func:`kl_divergences`, a filter within a stated bound of the tensor code of
:mod:`calibrator.quant.kl`, which scores again the candidates the bound cannot separate).
Each returns None where it cannot run; the caller's tensor code then gives the same
results.

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
counter; one where AVX-512 sets the zeros' keys apart, which are then counted at once, and
the runs of one bin that remain are rare), summed in int64 at the end: integers, the same
on any number of threads. The
comparisons are branch-free once the compiler may assume no floating-point traps
(``-fno-trapping-math``, which changes no value). On x86-64 with glibc the counting kernel is
built twice, for AVX2 and the baseline, and the CPU picks one when the library loads (GNU
``target_clones``; MobileNetV2's ``-q``: the bins 15% faster, the same counts; the other
kernels gained nothing from it). The requantization kernels are built for AVX-512 too
(on an AVX-512 Xeon: 27-28% faster than their AVX2 copies on a 50 x 144 x 56 x 56 blob,
with and without a residual; the counting kernel gained 3% and is not).

The figures compare float32 bit patterns as integers (the extremes as patterns mapped to
int32 in the order of the values, max|x| as the largest pattern without its sign bit), which
vectorises without a floating-point comparison and finds a NaN or an infinity on the way (a
pattern from ``0x7f800000`` up): the wrapper then answers None and the caller's tensor code
reports it. The values are ``torch.aminmax``'s and ``count_nonzero``'s; a zero extreme is
returned as +0 (which zero ``torch.aminmax`` reports depends on its reduction order).

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
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const float MAGIC = 12582912.0f;   /* 1.5 * 2^23 */
#define SPLIT (1 << 18)                      /* elements: below, one thread */

/* an AVX2 copy of a kernel beside the baseline one (WITH_AVX512: an AVX-512 copy too), the
   CPU choosing at load time (GNU ifunc: glibc on x86-64, a compiler that knows the
   attribute); elsewhere, or built with -DWITH_AVX2= -DWITH_AVX512= (the tests), the
   baseline alone. The same IEEE operations in each (no FMA: -ffp-contract=off), so the
   same results. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#ifndef WITH_AVX2
#define WITH_AVX2 __attribute__((target_clones("avx2", "default")))
#endif
#ifndef WITH_AVX512
#define WITH_AVX512 __attribute__((target_clones("avx512f", "avx2", "default")))
#define NONZERO_KEYS   /* (see nonzero_keys) */
#endif
#endif
#endif
#ifndef WITH_AVX2
#define WITH_AVX2
#endif
#ifndef WITH_AVX512
#define WITH_AVX512
#endif

static inline float saturate_round(float v, float lo, float hi)
{
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    return copysignf((v + MAGIC) - MAGIC, v);
}

/* rows x channels, channels innermost (channels-last blobs, inner-product outputs) */
WITH_AVX512
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
WITH_AVX512
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

/* ln x for a normal x > 0 (not subnormal, not infinite) without a division or a call:
   x = 2^e m, m in [1, 2) taken in 128 steps c_j = 1 + (j + 1/2) / 128, ln x = e ln 2 +
   ln c_j + ln(1 + r), r = m / c_j - 1, |r| <= 2^-8, by its series to r^5 (the rest below
   6e-16); table[j] = ln c_j, table[128 + j] = 1 / c_j (log_table). */
static void log_table(double *table)
{
    for (int j = 0; j < 128; j++) {
        const double c = 1.0 + (j + 0.5) / 128.0;
        table[j] = log(c);
        table[128 + j] = 1.0 / c;
    }
}

static inline double fast_log(double x, const double *table)
{
    union { double d; uint64_t u; } v = {x}, m;
    const int64_t e = (int64_t)(v.u >> 52) - 1023;
    const int j = (int)((v.u >> 45) & 127);
    m.u = (v.u & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL;
    const double r = m.d * table[128 + j] - 1.0;
    const double poly = r * (1.0 + r * (-0.5 + r * (1.0 / 3.0 + r * (-0.25 + r * 0.2))));
    return (double)e * 0.69314718055994530942 + table[j] + poly;
}

/* ln x for x > 0: fast_log, the C library's log where x is not a normal number */
static inline double any_log(double x, const double *table)
{
    return x >= DBL_MIN && x <= DBL_MAX ? fast_log(x, table) : log(x);
}

/* KL(P || Q) of every candidate i = levels ... bins - 1 of a histogram h of |x|
   (calibrator.quant.kl's definition: P the first i bins with the tail on bin i - 1, Q their
   merge into `levels` levels spread back over the nonzero bins, both smoothed with eps and
   normalised); div[i - levels] the divergence, mag[i - levels] the sum of the |terms|.
   The same formula as the tensor code, not its arithmetic: a filter, see kl.py. Each
   level's mass and support are differences of prefix sums at its edges (a bin split pro
   rata where an edge crosses it); Q is constant over the bins wholly inside a level, so
   its logarithms are taken once a level; the sums of P and Q from their nonzero counts;
   sum p ln(p / q * qsum / psum) as sum p (ln p - ln q + ln(qsum / psum)), the logs by
   fast_log (the C library's log where the value is not a normal number). P's bins are
   h - t (t the candidate's smoothing take, often 0): ln h is taken once a bin, and
   ln(h - t) = ln h + ln(1 - r), r = t / h, by its series to r^4 where r < 2^-9 (the rest
   below 4e-15 of r), fast_log otherwise. Where every r of a candidate is below 2^-9 (t
   times the largest 1 / h before bin i - 1: a prefix maximum), its bins before i - 1 run
   four at a time without a branch (GCC's vector extension; the terms as before, in four
   interleaved sums).
   Returns 0, or -1 where memory could not be had (div and mag then undefined). */
WITH_AVX2
int kl_all(const double *h, int64_t bins, int64_t levels, double eps, double given,
           double *div, double *mag)
{
    int failed = 0;
    /* prefix sums of h and of its nonzero bins, the tail sums */
    double *pre = malloc(((size_t)bins + 1) * 3 * sizeof(double));
    if (pre == NULL)
        return -1;
    double *nz = pre + bins + 1, *tail = nz + bins + 1;
    pre[0] = nz[0] = 0.0;
    for (int64_t k = 0; k < bins; k++) {
        pre[k + 1] = pre[k] + h[k];
        nz[k + 1] = nz[k] + (h[k] != 0.0);
    }
    tail[bins] = 0.0;
    for (int64_t k = bins - 1; k >= 0; k--)
        tail[k] = h[k] + tail[k + 1];
    double table[256];
    log_table(table);
    const double log_given = any_log(given, table);
    /* ln h, 1 / h (h > 0), the largest 1 / h of the bins before each bin */
    double *lh = malloc(((size_t)bins * 3 + 1) * sizeof(double));
    if (lh == NULL) {
        free(pre);
        return -1;
    }
    double *ih = lh + bins;
    for (int64_t k = 0; k < bins; k++) {
        lh[k] = h[k] > 0.0 ? any_log(h[k], table) : 0.0;
        ih[k] = h[k] > 0.0 ? 1.0 / h[k] : 0.0;
    }
    double *most = ih + bins;
    most[0] = 0.0;
    for (int64_t k = 0; k < bins; k++)
        most[k + 1] = ih[k] > most[k] ? ih[k] : most[k];
    #pragma omp parallel
    {
        double *q = malloc((size_t)bins * 2 * sizeof(double));   /* smoothed Q, its log */
        double *per_bin = malloc(((size_t)levels + 1) * 2 * sizeof(double));
        int64_t *border = malloc((size_t)levels * sizeof(int64_t));
        const int ready = q && per_bin && border;
        if (!ready) {
            #pragma omp atomic write
            failed = 1;
        }
        double *lq = q + bins, *part = per_bin + levels + 1;
        #pragma omp for schedule(dynamic, 16)
        for (int64_t i = levels; i < bins; i++) {
            if (!ready)
                continue;   /* (every thread must reach the loop; this one's share is lost) */
            /* Q: level l ends at edge (l + 1) i / levels, in bin f = floor(edge) (or at i),
               a fraction edge - f of that bin inside level l, the rest in level l + 1 */
            double mass_before = 0.0, support_before = 0.0;
            for (int64_t l = 0; l < levels; l++) {
                const double edge = (double)(l + 1) * (double)i / (double)levels;
                const int64_t f = (int64_t)edge < i ? (int64_t)edge : i;
                part[l] = f < i ? edge - (double)f : 0.0;
                border[l] = f;
                const double mass = f < i ? pre[f] + h[f] * part[l] : pre[i];
                const double support = f < i ? nz[f] + (h[f] != 0.0 ? part[l] : 0.0) : nz[i];
                per_bin[l] = support - support_before > 0.0
                    ? (mass - mass_before) / (support - support_before) : 0.0;
                mass_before = mass;
                support_before = support;
            }
            per_bin[levels] = 0.0;
            /* Q's nonzero bins and sum: whole levels from the nonzero counts, split bins */
            double qsum = 0.0;
            int64_t qnonzero = 0;
            for (int64_t l = 0, k = 0; l < levels; l++) {
                const int64_t f = border[l];
                if (per_bin[l] != 0.0) {
                    const double inside = nz[f] - nz[k];
                    qnonzero += (int64_t)inside;
                    qsum += inside * per_bin[l];
                }
                k = f;
                if (part[l] > 0.0) {
                    const double v = h[f] != 0.0
                        ? part[l] * per_bin[l] + (1.0 - part[l]) * per_bin[l + 1] : 0.0;
                    qnonzero += v != 0.0;
                    qsum += v;
                    k = f + 1;
                }
            }
            const double qtake = eps * (double)(i - qnonzero)
                                 / (double)(qnonzero > 0 ? qnonzero : 1);
            qsum = qsum - qtake * (double)qnonzero + given * (double)(i - qnonzero);
            /* smoothed Q and its log, bin by bin */
            for (int64_t l = 0, k = 0; l < levels; l++) {
                const int64_t f = border[l];
                const double v = per_bin[l] != 0.0 ? per_bin[l] - qtake : given;
                const double lv = v > 0.0 ? any_log(v, table) : 0.0;
                for (; k < f; k++) {
                    q[k] = h[k] != 0.0 ? v : given;
                    lq[k] = h[k] != 0.0 ? lv : log_given;
                }
                if (part[l] > 0.0) {
                    const double w = h[f] != 0.0
                        ? part[l] * per_bin[l] + (1.0 - part[l]) * per_bin[l + 1] : 0.0;
                    q[f] = w != 0.0 ? w - qtake : given;
                    lq[f] = q[f] > 0.0 ? any_log(q[f], table) : 0.0;
                    k = f + 1;
                }
            }
            /* P: the first i - 1 bins of h, then bin i - 1 with the tail */
            const double last = h[i - 1] + tail[i];
            const int64_t pnonzero = (int64_t)nz[i - 1] + (last != 0.0);
            const double ptake = eps * (double)(i - pnonzero)
                                 / (double)(pnonzero > 0 ? pnonzero : 1);
            double psum = pre[i - 1] + last - ptake * (double)pnonzero
                          + given * (double)(i - pnonzero);
            psum = psum > 1e-300 ? psum : 1e-300;
            qsum = qsum > 1e-300 ? qsum : 1e-300;
            const double shift = log(qsum / psum), share = 1.0 / psum;
            double kl = 0.0, size = 0.0;
            int64_t k = 0;
            if (ptake * most[i - 1] < 0x1p-9) {
                /* every r below 2^-9 (or 0: the series gives ln h itself): the bins
                   before i - 1 without a branch, in four interleaved sums */
                typedef double v4 __attribute__((vector_size(32)));
                typedef int64_t m4 __attribute__((vector_size(32)));
                #define PICK(m, a, b) ((v4)(((m4)(a) & (m)) | ((m4)(b) & ~(m))))
                const v4 zero = {0.0, 0.0, 0.0, 0.0}, one = zero + 1.0;
                const v4 vt = zero + ptake, vs = zero + share, vh = zero + shift;
                const v4 vg = zero + given, vlg = zero + log_given;
                v4 kls = zero, sizes = zero;
                for (; k + 4 <= i - 1; k += 4) {
                    v4 hk, ik, lk, qk, lqk;
                    memcpy(&hk, h + k, sizeof hk);
                    memcpy(&ik, ih + k, sizeof ik);
                    memcpy(&lk, lh + k, sizeof lk);
                    memcpy(&qk, q + k, sizeof qk);
                    memcpy(&lqk, lq + k, sizeof lqk);
                    const v4 r = vt * ik;
                    const m4 nz = hk != zero;
                    const v4 p = PICK(nz, hk - vt, vg);
                    const v4 lp = PICK(nz, lk - r * (one + r * (0.5 + r * (1.0 / 3.0
                                                                          + r * 0.25))), vlg);
                    const m4 used = (p > zero) & (qk > zero);
                    const v4 term = PICK(used, p * vs * (lp - lqk + vh), zero);
                    kls += term;
                    sizes += PICK(term < zero, -term, term);
                }
                #undef PICK
                kl = (kls[0] + kls[1]) + (kls[2] + kls[3]);
                size = (sizes[0] + sizes[1]) + (sizes[2] + sizes[3]);
            }
            for (; k < i; k++) {
                double p, lp;
                if (k < i - 1 && h[k] != 0.0) {
                    p = h[k] - ptake;
                    const double r = ptake * ih[k];
                    lp = r == 0.0 ? lh[k]
                        : r < 0x1p-9
                        ? lh[k] - r * (1.0 + r * (0.5 + r * (1.0 / 3.0 + r * 0.25)))
                        : p > 0.0 ? any_log(p, table) : 0.0;
                } else if (k < i - 1 || last == 0.0) {
                    p = given;   /* (its log taken once, for Q's empty bins too) */
                    lp = log_given;
                } else {
                    p = last - ptake;
                    lp = p > 0.0 ? any_log(p, table) : 0.0;
                }
                if (p > 0.0 && q[k] > 0.0) {
                    const double term = p * share * (lp - lq[k] + shift);
                    kl += term;
                    size += fabs(term);
                }
            }
            div[i - levels] = kl;
            mag[i - levels] = size;
        }
        free(q);
        free(per_bin);
        free(border);
    }
    free(pre);
    free(lh);
    return failed ? -1 : 0;
}

/* sum_j y[j] ref[j] and sum_j y[j]^2 over n values in float64 (each product exact:
   float32 x float32 fits in a double; y x ref rounds once), in eight interleaved partial
   sums (lane j % 8) added in lane order at the end */
WITH_AVX512
static void row_sums(const float *y, const double *ref, int64_t n, double *dot,
                     double *square)
{
    double d[8] = {0}, q[8] = {0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        for (int i = 0; i < 8; i++) {
            const double v = (double)y[j + i];
            d[i] += v * ref[j + i];
            q[i] += v * v;
        }
    }
    for (int i = 0; j < n; j++, i++) {
        const double v = (double)y[j];
        d[i] += v * ref[j];
        q[i] += v * v;
    }
    double a = 0.0, b = 0.0;
    for (int i = 0; i < 8; i++) {
        a += d[i];
        b += q[i];
    }
    *dot = a;
    *square = b;
}

/* the rows of y (float32, groups x per x n) against ref (float64, groups x n: the row's
   group's): dot[r] and square[r] of row_sums: one read of y, no float64 copy of it. The
   same order for every row, so rows of equal values give equal sums. */
WITH_AVX512
void dot_square(const float *y, const double *ref, int64_t groups, int64_t per, int64_t n,
                double *dot, double *square)
{
    #pragma omp parallel for schedule(static) if (groups * per * n >= SPLIT)
    for (int64_t r = 0; r < groups * per; r++)
        row_sums(y + r * n, ref + (r / per) * n, n, dot + r, square + r);
}

/* d[o] += y[o] ref[o] and q[o] += y[o]^2 in float64 (the products exact or rounded once):
   one position's row of column sums */
WITH_AVX512
static void column_sums(const float *y, const double *ref, int64_t n, double *d, double *q)
{
    for (int64_t o = 0; o < n; o++) {
        const double v = (double)y[o];
        d[o] += v * ref[o];
        q[o] += v * v;
    }
}

/* the columns of y (float32, groups x P x K x O) against ref (float64, groups x P x O):
   dot[g][k][o] = sum_p y[g][p][k][o] ref[g][p][o] and square[g][k][o] = sum_p
   y[g][p][k][o]^2 in float64 (the products exact or rounded once), summed over p in order:
   one read of y, no float64 copy of it */
WITH_AVX512
void column_dot_square(const float *y, const double *ref, int64_t groups, int64_t positions,
                       int64_t per, int64_t n, double *dot, double *square)
{
    #pragma omp parallel for collapse(2) schedule(static) \
        if (groups * positions * per * n >= SPLIT)
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t k = 0; k < per; k++) {
            double *d = dot + (g * per + k) * n, *q = square + (g * per + k) * n;
            for (int64_t o = 0; o < n; o++)
                d[o] = q[o] = 0.0;
            for (int64_t p = 0; p < positions; p++)
                column_sums(y + ((g * positions + p) * per + k) * n,
                            ref + (g * positions + p) * n, n, d, q);
        }
    }
}

/* a thread's buffer of n elements of size bytes, or NULL with *failed set (every thread
   must still reach the loop that follows: its share is then lost, and the call fails) */
static void *thread_buffer(size_t n, size_t size, int *failed)
{
    void *buffer = malloc(n * size);
    if (buffer == NULL) {
        #pragma omp atomic write
        *failed = 1;
    }
    return buffer;
}

/* y += r (r NULL: none), then the ReLU: relu 1: y < 0 ? 0 : y; relu 2: y > 0 ? y :
   f32(y * slope); 0: none (layerwise._finish's order) */
WITH_AVX512
static void residual_relu(float *y, const float *r, int64_t n, int relu, float slope)
{
    if (r != NULL)
        for (int64_t i = 0; i < n; i++)
            y[i] += r[i];
    if (relu == 1)
        for (int64_t i = 0; i < n; i++)
            y[i] = y[i] < 0.0f ? 0.0f : y[i];
    else if (relu == 2)
        for (int64_t i = 0; i < n; i++)
            y[i] = y[i] > 0.0f ? y[i] : y[i] * slope;
}

/* a depthwise unit's outputs for K input scales, each against its reference, summed as
   dot_square sums them (dot[g][k], square[g][k]: lane p % 8 of eight float64 sums, added in
   lane order), without the candidates' outputs in memory: at position p of group g,
       acc = sum_j f32(sat_round(f32(taps[g][j][p] * s[k]), lo, hi) * w[g][j])
   (j in order from +0; integers below 2^24: exact), then
       y = f32(f32(acc + q_bias[g][k]) / divisor[g][k]) [+ residual[g][p]]
   and the ReLU (relu 1: y < 0 ? 0 : y; relu 2: y > 0 ? y : f32(y * slope)): the tensor
   code's operations (layerwise._Unit._tap_sums, _requantized, _finish) in its order.
   Clamping every candidate equals clamping those that leave [lo, hi] (integer bounds). */
WITH_AVX512
static void depthwise_one(const float *tg, int64_t taps_n, int64_t positions, float s,
                          const float *wg, float b, float dv, const float *rg, int relu,
                          float slope, float lo, float hi, const double *fg, float *y,
                          double *dot, double *square)
{
    if (taps_n == 9) {   /* (3 x 3: the nine taps summed in a register, in the same order;
                            a fifth faster than nine passes over y) */
        for (int64_t p = 0; p < positions; p++) {
            float a = 0.0f;
            for (int64_t j = 0; j < 9; j++)
                a += saturate_round(tg[j * positions + p] * s, lo, hi) * wg[j];
            y[p] = a;
        }
    } else {
        for (int64_t p = 0; p < positions; p++)
            y[p] = 0.0f;
        for (int64_t j = 0; j < taps_n; j++) {
            const float *tj = tg + j * positions;
            const float w = wg[j];
            for (int64_t p = 0; p < positions; p++)
                y[p] += saturate_round(tj[p] * s, lo, hi) * w;
        }
    }
    for (int64_t p = 0; p < positions; p++)
        y[p] = (y[p] + b) / dv;
    residual_relu(y, rg, positions, relu, slope);
    row_sums(y, fg, positions, dot, square);
}

WITH_AVX512
int depthwise_sums(const float *taps, int64_t groups, int64_t taps_n, int64_t positions,
                   const float *scales, int64_t count, const float *weight,
                   const float *q_bias, const float *divisor, const float *residual,
                   int relu, float slope, float lo, float hi, const double *ref,
                   double *dot, double *square)
{
    int failed = 0;
    #pragma omp parallel if (groups * count * taps_n * positions >= SPLIT)
    {
        float *y = thread_buffer((size_t)positions, sizeof(float), &failed);
        #pragma omp for collapse(2) schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            for (int64_t k = 0; k < count; k++) {
                if (y == NULL)
                    continue;
                depthwise_one(taps + g * taps_n * positions, taps_n, positions, scales[k],
                              weight + g * taps_n, q_bias[g * count + k],
                              divisor[g * count + k],
                              residual ? residual + g * positions : NULL, relu, slope, lo, hi,
                              ref + g * positions, y, dot + g * count + k,
                              square + g * count + k);
            }
        }
        free(y);
    }
    return failed ? -1 : 0;
}

/* out[k][r][c] = sat_round(f32(x[r][c] * scales[k]), lo, hi) - offset as int8, for rows x
   cols of x and K scales: a dense unit's quantized patches for K input scales, as the
   tensor code makes them (layerwise._Unit._q_in, then _IntegerProduct.input) in one write
   of one byte each (lo - offset and hi - offset within int8) */
WITH_AVX512
void quantized_rows(const float *x, int64_t rows, int64_t cols, const float *scales,
                    int64_t count, float lo, float hi, int offset, int8_t *out)
{
    #pragma omp parallel for collapse(2) schedule(static) if (count * rows * cols >= SPLIT)
    for (int64_t k = 0; k < count; k++) {
        for (int64_t r = 0; r < rows; r++) {
            const float s = scales[k];
            const float *xr = x + r * cols;
            int8_t *o = out + (k * rows + r) * cols;
            for (int64_t c = 0; c < cols; c++)
                o[c] = (int8_t)((int32_t)saturate_round(xr[c] * s, lo, hi) - offset);
        }
    }
}

/* one row of integer_sums: y[o] of position p (see there) */
WITH_AVX512
static void integer_row(const int32_t *ap, int64_t outs, const int32_t *shift,
                        const float *bk, const float *dk, const float *rp, int relu,
                        float slope, float *y)
{
    if (shift != NULL)
        for (int64_t o = 0; o < outs; o++)
            y[o] = (float)(ap[o] + shift[o]);
    else
        for (int64_t o = 0; o < outs; o++)
            y[o] = (float)ap[o];
    for (int64_t o = 0; o < outs; o++)
        y[o] = (y[o] + bk[o]) / dk[o];
    residual_relu(y, rp, outs, relu, slope);
}

/* a dense unit's outputs for K input scales from its int32 accumulators acc (K x P x O, the
   integer product of quantized_rows' rows), each candidate's P x O outputs made into a
   buffer of the thread's and summed against the reference by row_sums: at (k, p, o)
       y = f32(f32(f32(acc + shift[o]) + q_bias[k][o]) / divisor[k][o]) [+ residual[p][o]]
   (shift: the int32 column sums times the input's offset, added in int32; NULL: none) and
   the ReLU, the tensor code's operations in its order (_IntegerProduct.__call__,
   _requantized, _finish). Returns 0, or -1 where memory could not be had. */
WITH_AVX512
int integer_sums(const int32_t *acc, int64_t count, int64_t positions, int64_t outs,
                 const int32_t *shift, const float *q_bias, const float *divisor,
                 const float *residual, int relu, float slope, const double *ref,
                 double *dot, double *square)
{
    int failed = 0;
    #pragma omp parallel if (count * positions * outs >= SPLIT)
    {
        float *y = thread_buffer((size_t)positions * (size_t)outs, sizeof(float), &failed);
        #pragma omp for schedule(static)
        for (int64_t k = 0; k < count; k++) {
            if (y == NULL)
                continue;
            for (int64_t p = 0; p < positions; p++)
                integer_row(acc + (k * positions + p) * outs, outs, shift,
                            q_bias + k * outs, divisor + k * outs,
                            residual ? residual + p * outs : NULL, relu, slope,
                            y + p * outs);
            row_sums(y, ref, positions * outs, dot + k, square + k);
        }
        free(y);
    }
    return failed ? -1 : 0;
}

/* integer_sums for the weight step: acc (P x K x O, the integer product of one input's
   quantized patches with K rows of weight scales' weights), each column (k, o) against its
   reference column, summed over p in order as column_dot_square sums it: dot[k][o],
   square[k][o]; shift (K x O) or NULL, q_bias, divisor (K x O), residual (P x O) or NULL as
   in integer_sums. Returns 0, or -1 where memory could not be had. */
WITH_AVX512
int integer_columns(const int32_t *acc, int64_t positions, int64_t count, int64_t outs,
                    const int32_t *shift, const float *q_bias, const float *divisor,
                    const float *residual, int relu, float slope, const double *ref,
                    double *dot, double *square)
{
    int failed = 0;
    #pragma omp parallel if (count * positions * outs >= SPLIT)
    {
        float *y = thread_buffer((size_t)outs, sizeof(float), &failed);
        #pragma omp for schedule(static)
        for (int64_t k = 0; k < count; k++) {
            if (y == NULL)
                continue;
            double *d = dot + k * outs, *q = square + k * outs;
            for (int64_t o = 0; o < outs; o++)
                d[o] = q[o] = 0.0;
            for (int64_t p = 0; p < positions; p++) {
                integer_row(acc + (p * count + k) * outs, outs,
                            shift ? shift + k * outs : NULL, q_bias + k * outs,
                            divisor + k * outs, residual ? residual + p * outs : NULL, relu,
                            slope, y);
                column_sums(y, ref + p * outs, outs, d, q);
            }
        }
        free(y);
    }
    return failed ? -1 : 0;
}

#define BLOCK 2048

/* float32 bit patterns as int32 in the order of the values (-0 just below +0, the
   infinities at the ends; NaNs beyond them); the map is its own inverse */
static inline int32_t ordered(uint32_t bits)
{
    const int32_t s = (int32_t)bits;
    return s ^ (int32_t)((uint32_t)(s >> 31) >> 1);
}

/* one value's bits into the running extremes: {min, max} as ordered() patterns and the
   largest |x| pattern (>= 0x7f800000: not finite) */
#define EXTEND(bits, lo, hi, top) do {                                        \
        const int32_t o_ = ordered(bits), a_ = (int32_t)((bits) & 0x7fffffffu); \
        lo = o_ < lo ? o_ : lo;                                                 \
        hi = o_ > hi ? o_ : hi;                                                 \
        top = a_ > top ? a_ : top;                                              \
    } while (0)

/* ext = {min, max, max|x|} (see EXTEND) merged with those of x[0 .. m - 1]; returns the
   zeros (either sign) */
static inline int64_t block_figures(const float *x, int64_t m, int32_t *ext)
{
    int32_t lo = ext[0], hi = ext[1], top = ext[2];
    int32_t zeros = 0;
    for (int64_t j = 0; j < m; j++) {
        uint32_t bits;
        memcpy(&bits, x + j, sizeof bits);
        EXTEND(bits, lo, hi, top);
        zeros += (bits & 0x7fffffffu) == 0;
    }
    ext[0] = lo;
    ext[1] = hi;
    ext[2] = top;
    return zeros;
}

static void merge_figures(int32_t *ext, const int32_t *mine)
{
    ext[0] = mine[0] < ext[0] ? mine[0] : ext[0];
    ext[1] = mine[1] > ext[1] ? mine[1] : ext[1];
    ext[2] = mine[2] > ext[2] ? mine[2] : ext[2];
}

/* x's extremes merged into ext (see block_figures) in one read; returns its zeros. With
   out (x itself for in place), min(max(x, lo), hi) written there on the way, each block
   while it is in the cache (lo <= hi; what torch's clamp gives, signed zeros and NaNs
   kept) */
WITH_AVX2
int64_t figures(const float *x, int64_t n, int32_t *ext, float *out, float lo, float hi)
{
    int64_t total = 0;
    #pragma omp parallel if (n >= SPLIT)
    {
        int32_t mine[3] = {ext[0], ext[1], ext[2]};
        #pragma omp for schedule(static) reduction(+: total)
        for (int64_t b = 0; b < n; b += BLOCK) {
            const int64_t m = n - b < BLOCK ? n - b : BLOCK;
            total += block_figures(x + b, m, mine);
            if (out != NULL) {
                for (int64_t j = 0; j < m; j++) {
                    const float v = x[b + j] < lo ? lo : x[b + j];
                    out[b + j] = v > hi ? hi : v;
                }
            }
        }
        #pragma omp critical
        merge_figures(ext, mine);
    }
    return total;
}
static const float TINY = 0x1p-123f;   /* from here up, e - 2^-149 rounds to e */

#ifdef NONZERO_KEYS
#include <immintrin.h>

/* the nonzero ones of key[0 .. m - 1], in order, into nz; returns how many. Counting only
   those (key 0, a zero, counted as m minus them) spares a table update for each zero, a
   third of MobileNetV2's activations (hist_count a twentieth faster on them). AVX-512's
   compress does it with no branch (a branch per key costs more than it spares); a CPU
   without it counts every key (can_skip_zeros) */
__attribute__((target("avx512f")))
static int64_t nonzero_keys(const int32_t *key, int64_t m, int32_t *nz)
{
    int64_t kept = 0, j = 0;
    for (; j + 16 <= m; j += 16) {
        const __m512i k = _mm512_loadu_si512((const void *)(key + j));
        const __mmask16 nonzero = _mm512_test_epi32_mask(k, k);
        _mm512_storeu_si512((void *)(nz + kept), _mm512_maskz_compress_epi32(nonzero, k));
        kept += __builtin_popcount((unsigned)nonzero);
    }
    for (; j < m; j++) {
        nz[kept] = key[j];
        kept += key[j] != 0;
    }
    return kept;
}

static int can_skip_zeros(void)
{
    return __builtin_cpu_supports("avx512f");
}
#else
static int can_skip_zeros(void)
{
    return 0;
}
#endif

/* one block's bin keys (see hist_count) of x[0 .. m - 1], its extremes merged into mine
   (before the clamp); with clamping (a constant where it is inlined, so each form is its
   own loop), each value first clamped to [clo, chi] into clamped[] and its zeros before the
   clamp added to *zeros. Returns whether a nonzero value below TINY was met. */
static inline int block_keys(const float *xb, int64_t m, int absolute, float fb, float width,
                             int32_t *mine, const int clamping, float clo, float chi,
                             float *clamped, int32_t *key, int64_t *zeros)
{
    int tiny = 0;
    int32_t found = 0;
    int32_t lo = mine[0], hi = mine[1], top = mine[2];
    for (int64_t j = 0; j < m; j++) {   /* (the extremes cost next to nothing here) */
        uint32_t bits;
        memcpy(&bits, xb + j, sizeof bits);
        EXTEND(bits, lo, hi, top);
        float v = xb[j];
        if (clamping) {
            found += (bits & 0x7fffffffu) == 0;
            v = v < clo ? clo : v;
            v = v > chi ? chi : v;
            clamped[j] = v;
        }
        const float e = absolute ? fabsf(v) : v;
        key[j] = e >= TINY ? (int32_t)((e * fb) / width) + 1 : 0;
        tiny |= (e < TINY) & (e != 0.0f);
    }
    mine[0] = lo;
    mine[1] = hi;
    mine[2] = top;
    if (clamping)
        *zeros += found;
    return tiny;
}

/* counts[0 .. bins + 1] += the bin keys' counts of |x| (absolute) or x; n < 2^32; with
   ext, x's extremes merged into it on the way (see block_figures). With out (x itself for
   in place), each value is first clamped to [clo, chi] (as figures clamps) and written
   there: the counts are the clamped values', ext gets x's extremes before the clamp and
   *zeros (not NULL then) gains x's zeros before it. A key past bins + 1 (a value above
   low + width) is counted in bins + 1; with past, its own key, floor(|x| * bins / width)
   + 1 from the same float32 operations (as int64), is also kept: *npast gains one for each
   and the first cap go to past[] (in no particular order); a value whose key cannot be had
   (negative, 2^62 or more, not finite) adds cap + 1 to *npast.
   Each block is read into keys, then counted: while it counts (no reads of x, so the
   hardware prefetcher sees no stream to follow), it prefetches the next block's lines (a
   batch's activations come from memory: a quarter less time on MobileNetV2's).
   Returns 0, or -1 where memory could not be had (counts, ext, out then undefined) */
WITH_AVX2
int hist_count(const float *x, int64_t n, int64_t bins, float low, float width,
               int absolute, int64_t *counts, int32_t *ext, float *out, float clo,
               float chi, int64_t *zeros, int64_t *past, int64_t cap, int64_t *npast)
{
    const float fb = (float)bins;
    const uint32_t last = (uint32_t)(bins + 1);
    const int skip_zeros = can_skip_zeros();
    int failed = 0;
    int64_t zero_total = 0;
    #pragma omp parallel if (n >= SPLIT) reduction(+: zero_total)
    {
        /* two tables, of even and odd positions, where zeros are counted one by one (a run
           of zeros then updates two counters in turn, not one counter whose updates wait on
           each other); one where they are not (half the cache lines: a tenth faster) */
        const int64_t tables = skip_zeros ? 1 : 2;
        uint32_t *even = calloc((size_t)tables * ((size_t)bins + 2), sizeof(uint32_t));
        uint32_t *odd = even != NULL ? even + (tables - 1) * (bins + 2) : NULL;
        int32_t key[BLOCK], nz[BLOCK];
        float clamped[BLOCK];
        int32_t mine[3] = {INT32_MAX, INT32_MIN, 0};
        if (ext != NULL) {
            mine[0] = ext[0];
            mine[1] = ext[1];
            mine[2] = ext[2];
        }
        if (even == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        int skip;   /* one thread without tables: none reads (or writes out) anything */
        #pragma omp atomic read
        skip = failed;
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < n; b += BLOCK) {
            if (skip)
                continue;   /* (every thread must reach the loop) */
            const int64_t m = n - b < BLOCK ? n - b : BLOCK;
            const float *xb = x + b;
            const int tiny = out == NULL
                ? block_keys(xb, m, absolute, fb, width, mine, 0, 0.0f, 0.0f, NULL, key, NULL)
                : block_keys(xb, m, absolute, fb, width, mine, 1, clo, chi, clamped, key,
                             &zero_total);
            if (out != NULL)   /* (clamped into the block's own buffer, which x cannot alias,
                                  so that the loop vectorises; copied out here) */
                memcpy(out + b, clamped, (size_t)m * sizeof(float));
            if (tiny) {
                const float *vb = out != NULL ? out + b : xb;   /* (the values counted) */
                for (int64_t j = 0; j < m; j++) {
                    const float e = absolute ? fabsf(vb[j]) : vb[j];
                    if (e < TINY && e != 0.0f)
                        key[j] = (int32_t)(((e - low) * fb) / width) + 1;
                }
            }
            /* the last key's counts before the block: a change, a key at or past it */
            const uint32_t even_at_last = even[last], odd_at_last = odd[last];
            const int32_t *counted = key;
            int64_t count = m;
#ifdef NONZERO_KEYS
            if (skip_zeros) {
                count = nonzero_keys(key, m, nz);
                even[0] += (uint32_t)(m - count);
                counted = nz;
            }
#endif
            const float *ahead = xb + BLOCK, *end = xb + BLOCK + m;   /* (the next block's
                                                 lines, one each 16 keys: see above) */
            int64_t j = 0;
            for (; j + 15 < count; j += 16) {   /* (a key past the last bin: last) */
                if (ahead < end) {
                    __builtin_prefetch(ahead);
                    ahead += 16;
                }
                for (int u = 0; u < 16; u += 2) {   /* (unrolled: a twentieth less time) */
                    const uint32_t k0 = (uint32_t)counted[j + u];
                    const uint32_t k1 = (uint32_t)counted[j + u + 1];
                    even[k0 > last ? last : k0]++;
                    odd[k1 > last ? last : k1]++;
                }
            }
            for (; j < count; j++) {
                const uint32_t k0 = (uint32_t)counted[j];
                even[k0 > last ? last : k0]++;
            }
            for (; ahead < end; ahead += 16)
                __builtin_prefetch(ahead);
            if (past != NULL && (even[last] != even_at_last || odd[last] != odd_at_last)) {
                /* (rare: a value at the high end or, in a batch past the range, beyond) */
                const float *vb = out != NULL ? out + b : xb;
                for (int64_t i = 0; i < m; i++) {
                    if ((uint32_t)key[i] <= last)
                        continue;
                    const float e = absolute ? fabsf(vb[i]) : vb[i];
                    const float q = (e * fb) / width;
                    if (!(q >= 0.0f && q < 0x1p62f)) {
                        #pragma omp atomic
                        *npast += cap + 1;
                        continue;
                    }
                    int64_t at;
                    #pragma omp atomic capture
                    at = (*npast)++;
                    if (at < cap)
                        past[at] = (int64_t)q + 1;
                }
            }
        }
        if (!skip) {
            #pragma omp critical
            {
                for (int64_t t = 0; t < tables; t++)
                    for (int64_t k = 0; k < bins + 2; k++)
                        counts[k] += even[t * (bins + 2) + k];
                if (ext != NULL)
                    merge_figures(ext, mine);
            }
        }
        free(even);
    }
    if (zeros != NULL)
        *zeros += zero_total;
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
                                  _POINTER, _POINTER, _POINTER, _FLOAT, _FLOAT, _POINTER,
                                  _POINTER, _INT, _POINTER]),
    "figures": (_INT, [_POINTER, _INT, _POINTER, _POINTER, _FLOAT, _FLOAT]),
    "kl_all": (ctypes.c_int, [_POINTER, _INT, _INT, _DOUBLE, _DOUBLE, _POINTER, _POINTER]),
    "dot_square": (None, [_POINTER, _POINTER, _INT, _INT, _INT, _POINTER, _POINTER]),
    "column_dot_square": (None, [_POINTER, _POINTER, _INT, _INT, _INT, _INT, _POINTER,
                                 _POINTER]),
    "quantized_rows": (None, [_POINTER, _INT, _INT, _POINTER, _INT, _FLOAT, _FLOAT,
                              ctypes.c_int, _POINTER]),
    "integer_sums": (ctypes.c_int, [_POINTER, _INT, _INT, _INT, _POINTER, _POINTER,
                                    _POINTER, _POINTER, ctypes.c_int, _FLOAT, _POINTER,
                                    _POINTER, _POINTER]),
    "integer_columns": (ctypes.c_int, [_POINTER, _INT, _INT, _INT, _POINTER, _POINTER,
                                       _POINTER, _POINTER, ctypes.c_int, _FLOAT, _POINTER,
                                       _POINTER, _POINTER]),
    "depthwise_sums": (ctypes.c_int, [_POINTER, _INT, _INT, _INT, _POINTER, _INT, _POINTER,
                                      _POINTER, _POINTER, _POINTER, ctypes.c_int, _FLOAT,
                                      _FLOAT, _FLOAT, _POINTER, _POINTER, _POINTER]),
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
#: the kernels' starting extremes: {min, max} as ordered patterns, and max|x|'s pattern
_NO_EXTREMES = (2 ** 31 - 1, -2 ** 31, 0)
_NOT_FINITE = 0x7f800000


def _extremes(ext: torch.Tensor) -> tuple[float, float, float] | None:
    """(min, max, max|x|) from the kernels' ordered patterns (see ``block_figures``); None
    where a value is not finite. A zero extreme is +0 (the sign of the zero that
    ``torch.aminmax`` reports depends on its reduction order)."""
    lo, hi, top = ext.tolist()
    if top >= _NOT_FINITE:
        return None
    bits = [(v ^ 0x7fffffff if v < 0 else v) & 0xffffffff for v in (lo, hi, top)]
    lo, hi, absmax = (v + 0.0 for v in struct.unpack("<3f", struct.pack("<3I", *bits)))
    return lo, hi, absmax


class Counted(NamedTuple):
    """:func:`bin_counts` with figures: what one read of a tensor gives."""
    #: int64 counts of the keys 0 ... bins + 1 (a key past bins + 1 counted in bins + 1)
    counts: torch.Tensor
    #: (min, max, max|x|) (before the clamp, with one); None where a value is not finite
    extremes: tuple[float, float, float] | None
    #: the zeros before the clamp (with one; else None)
    zeros: int | None
    #: the keys past bins + 1 themselves (int64, in no particular order, each also counted
    #: in ``counts[bins + 1]``); None without ``spill``, or where there were more than
    #: ``spill`` (or one could not be had: see the C source)
    past: torch.Tensor | None


def bin_counts(flat: torch.Tensor, bins: int, low: float, width: float, absolute: bool,
               with_figures: bool = False, clamp: tuple[float, float] | None = None,
               spill: int = 0):
    """int64 counts of the bin keys 0 ... ``bins`` + 1 of ``flat`` (1-D, float32, on the
    CPU), as the module's text says; None where the kernel is unavailable, ``flat`` is not
    such a tensor, or the kernel could not allocate its tables (the caller runs its tensor
    operations). ``with_figures``: a :class:`Counted`, read on the same pass, keeping up to
    ``spill`` keys past ``bins + 1``. ``clamp`` = (low, high) (with ``with_figures``):
    ``flat.clamp_(low, high)`` on the same pass, the counts those of the clamped values, the
    figures and zeros those before the clamp; where it returns None, ``flat`` is untouched.
    Without a clamp, None also where a value is not finite."""
    library = _flat_library(flat)
    if library is None:
        return None
    counts = torch.zeros(bins + 2, dtype=torch.int64)
    ext = torch.tensor(_NO_EXTREMES, dtype=torch.int32) if with_figures else None
    zeros = torch.zeros(1, dtype=torch.int64) if clamp is not None else None
    past = torch.empty(spill, dtype=torch.int64) if with_figures and spill > 0 else None
    npast = torch.zeros(1, dtype=torch.int64) if past is not None else None
    pieces = flat.split(_HIST_CALL)
    if clamp is not None and len(pieces) > 1:
        return None  # (a later piece without memory would leave the first ones clamped)
    for piece in pieces:
        if library.hist_count(piece.data_ptr(), piece.numel(), bins, low, width,
                              int(absolute), counts.data_ptr(),
                              None if ext is None else ext.data_ptr(),
                              *((None, 0.0, 0.0, None) if clamp is None else
                                (piece.data_ptr(), *clamp, zeros.data_ptr())),
                              *((None, 0, None) if past is None else
                                (past.data_ptr(), spill, npast.data_ptr()))) != 0:
            return None  # no memory for the kernel's tables: the tensor code counts
    if ext is None:
        return counts
    extremes = _extremes(ext)
    if clamp is None and extremes is None:
        return None
    kept = None if past is None else int(npast)
    return Counted(counts, extremes, None if zeros is None else int(zeros),
                   past[:kept] if kept is not None and kept <= spill else None)


def figures(flat: torch.Tensor) -> tuple[float, float, float, int] | None:
    """(min, max, max|x|, zeros) of ``flat`` (1-D, float32, contiguous, on the CPU) in one
    read: ``torch.aminmax``'s values (a zero extreme as +0) and
    ``flat.numel() - torch.count_nonzero(flat)``. None where the kernel is unavailable,
    ``flat`` is not such a tensor or holds a value that is not finite."""
    got = _figures(flat, None)
    return None if got is None or got[0] is None else (*got[0], got[1])


def clamp_with_figures(flat: torch.Tensor, low: float, high: float
                       ) -> tuple[tuple[float, float, float] | None, int] | None:
    """``flat.clamp_(low, high)`` (``low <= high``) and, read on the same pass, the
    (min, max, max|x|) of ``flat`` before it (None where a value is not finite) and its zeros.
    None where the kernel is unavailable or ``flat`` is not such a tensor (``flat`` is then
    untouched)."""
    return _figures(flat, (low, high))


def _figures(flat: torch.Tensor, clamp: tuple[float, float] | None):
    library = _flat_library(flat)
    if library is None or flat.numel() == 0:
        return None
    ext = torch.tensor(_NO_EXTREMES, dtype=torch.int32)
    out, low, high = (None, 0.0, 0.0) if clamp is None else (flat.data_ptr(), *clamp)
    zeros = int(library.figures(flat.data_ptr(), flat.numel(), ext.data_ptr(), out, low, high))
    return _extremes(ext), zeros


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


def dot_square(y: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(sum of y * ref, sum of y * y), each (G, K), over the last dimension of ``y`` (float32,
    contiguous, (G, K, n), on the CPU) against ``ref`` (float64, contiguous, (G, n): row
    (g, k) against ref[g]): float64 sums in one read of ``y`` (see the kernel; the values of
    ``y.double()``'s products summed, up to the summation order). None where the kernel is
    unavailable or the tensors are not such."""
    library = _library()
    if (library is None or y.device.type != "cpu" or y.dtype != torch.float32
            or ref.dtype != torch.float64 or y.dim() != 3 or not y.is_contiguous()
            or ref.shape != (y.shape[0], y.shape[2]) or not ref.is_contiguous()):
        return None
    groups, per, n = y.shape
    dot = torch.empty(groups, per, dtype=torch.float64)
    square = torch.empty(groups, per, dtype=torch.float64)
    library.dot_square(y.data_ptr(), ref.data_ptr(), groups, per, n, dot.data_ptr(),
                       square.data_ptr())
    return dot, square


def column_dot_square(y: torch.Tensor, ref: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(sum over P of y * ref, sum over P of y * y), each (G, K, O), of ``y`` (float32,
    contiguous, (G, P, K, O), on the CPU) against ``ref`` (float64, contiguous, (G, P, O),
    the same for every K): float64 sums in one read of ``y`` (see the kernel; the values of
    ``y.double()``'s products summed, up to the summation order). None where the kernel is
    unavailable or the tensors are not such."""
    library = _library()
    if (library is None or y.device.type != "cpu" or y.dtype != torch.float32
            or ref.dtype != torch.float64 or y.dim() != 4 or not y.is_contiguous()
            or ref.shape != (y.shape[0], y.shape[1], y.shape[3]) or not ref.is_contiguous()):
        return None
    groups, positions, per, n = y.shape
    dot = torch.empty(groups, per, n, dtype=torch.float64)
    square = torch.empty(groups, per, n, dtype=torch.float64)
    library.column_dot_square(y.data_ptr(), ref.data_ptr(), groups, positions, per, n,
                              dot.data_ptr(), square.data_ptr())
    return dot, square


def _laid_out(expected) -> bool:
    """Whether each (tensor, shape, dtype) of ``expected`` is such a tensor, contiguous, on
    the CPU."""
    return all(t.device.type == "cpu" and t.dtype == dtype and t.shape == shape
               and t.is_contiguous() for t, shape, dtype in expected)


def _relu_code(slope: float | None) -> int:
    """The kernels' ReLU argument: 0 none, 1 max(y, 0), 2 leaky (``slope``)."""
    return 0 if slope is None else 1 if slope == 0 else 2


def depthwise_sums(taps: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor,
                   q_bias: torch.Tensor, divisor: torch.Tensor, residual: torch.Tensor | None,
                   relu_slope: float | None, bounds: tuple[float, float], ref: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A depthwise unit's INT8 outputs for K input scales, summed against the reference as
    :func:`dot_square` sums them, one at a time in cache: (dot, square), each (G, K)
    float64, the same bits as :func:`dot_square` of the tensor code's outputs (see the
    kernel). ``taps`` (G, C, P) float32: the unit's patches, tap-major; ``scales`` (K,);
    ``weight`` (G, C): the integer weights; ``q_bias``, ``divisor`` (G, K); ``residual``
    (G, P) or None; ``relu_slope``: None (no ReLU), 0 or a leaky slope; ``bounds``: the
    input's integer range; ``ref`` (G, P) float64. None where the kernel is unavailable or
    a tensor is not such (contiguous, on the CPU, float32 but ``ref``)."""
    library = _library()
    groups, taps_n, positions = taps.shape
    count = scales.numel()
    expected = ((taps, (groups, taps_n, positions), torch.float32),
                (scales, (count,), torch.float32), (weight, (groups, taps_n), torch.float32),
                (q_bias, (groups, count), torch.float32),
                (divisor, (groups, count), torch.float32),
                (ref, (groups, positions), torch.float64))
    if residual is not None:
        expected += ((residual, (groups, positions), torch.float32),)
    if library is None or not _laid_out(expected):
        return None
    dot = torch.empty(groups, count, dtype=torch.float64)
    square = torch.empty(groups, count, dtype=torch.float64)
    relu = _relu_code(relu_slope)
    if library.depthwise_sums(taps.data_ptr(), groups, taps_n, positions, scales.data_ptr(),
                              count, weight.data_ptr(), q_bias.data_ptr(), divisor.data_ptr(),
                              None if residual is None else residual.data_ptr(), relu,
                              float(relu_slope or 0.0), float(bounds[0]), float(bounds[1]),
                              ref.data_ptr(), dot.data_ptr(), square.data_ptr()) != 0:
        return None  # no memory for a thread's outputs: the tensor code runs
    return dot, square


def quantized_rows(x: torch.Tensor, scales: torch.Tensor, bounds: tuple[float, float],
                   offset: int) -> torch.Tensor | None:
    """(K * R, C) int8: ``sat(rne(x * scales[k])) - offset`` of ``x`` (R, C) float32 for
    each of the K ``scales`` (float32), ``bounds`` integers and within int8 once ``offset``
    is taken off; the tensor code's ``(x * s).round_().clamp_(*bounds).sub_(offset)
    .to(torch.int8)``, the same bytes, in one write. None where the kernel is unavailable or
    a tensor is not such (contiguous, on the CPU)."""
    library = _library()
    if library is None or x.dim() != 2 or scales.dim() != 1 or not _laid_out(
            ((x, x.shape, torch.float32), (scales, scales.shape, torch.float32))):
        return None
    rows, cols = x.shape
    out = torch.empty(scales.numel() * rows, cols, dtype=torch.int8)
    library.quantized_rows(x.data_ptr(), rows, cols, scales.data_ptr(), scales.numel(),
                           float(bounds[0]), float(bounds[1]), int(offset), out.data_ptr())
    return out


def integer_sums(acc: torch.Tensor, shift: torch.Tensor | None, q_bias: torch.Tensor,
                 divisor: torch.Tensor, residual: torch.Tensor | None,
                 relu_slope: float | None, ref: torch.Tensor, columns: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A dense unit's INT8 outputs from its int32 accumulators, summed against the reference
    one candidate at a time (no tensor of outputs), the same bits as the tensor code's
    outputs summed by :func:`dot_square` or :func:`column_dot_square` (see the kernels).
    ``acc`` (K, P, O):
    K input scales, each candidate a row of P x O values: (dot, square), each (K,)
    (:func:`dot_square`'s sums); ``columns``: ``acc`` (P, K, O), K rows of weight scales,
    each column (k, o) summed over P: each (K, O) (:func:`column_dot_square`'s). ``shift``
    int32 added to every accumulator, (O,) or with ``columns`` (K, O) (None: none);
    ``q_bias``, ``divisor`` (K, O) float32; ``residual`` (P, O) float32 or None;
    ``relu_slope``: None, 0 or a leaky slope; ``ref`` (P, O) float64. None where the kernel
    is unavailable or a tensor is not such (contiguous, on the CPU)."""
    library = _library()
    if columns:
        positions, count, outs = acc.shape
    else:
        count, positions, outs = acc.shape
    expected = ((acc, tuple(acc.shape), torch.int32),
                (q_bias, (count, outs), torch.float32),
                (divisor, (count, outs), torch.float32),
                (ref, (positions, outs), torch.float64))
    if shift is not None:
        expected += ((shift, (count, outs) if columns else (outs,), torch.int32),)
    if residual is not None:
        expected += ((residual, (positions, outs), torch.float32),)
    if library is None or not _laid_out(expected):
        return None
    shape = (count, outs) if columns else (count,)
    dot = torch.empty(shape, dtype=torch.float64)
    square = torch.empty(shape, dtype=torch.float64)
    relu = _relu_code(relu_slope)
    kernel = library.integer_columns if columns else library.integer_sums
    sizes = (positions, count, outs) if columns else (count, positions, outs)
    if kernel(acc.data_ptr(), *sizes, None if shift is None else shift.data_ptr(),
              q_bias.data_ptr(), divisor.data_ptr(),
              None if residual is None else residual.data_ptr(), relu,
              float(relu_slope or 0.0), ref.data_ptr(), dot.data_ptr(),
              square.data_ptr()) != 0:
        return None  # no memory for a thread's row: the tensor code runs
    return dot, square
