"""Fused numba kernels for the native task-vector methods (float32 work).

One pass per chunk does every elementwise step of a method, in blocks of ``BLOCK`` elements whose
loops vectorise, reading the inputs as stored (bfloat16 bits or float32, widened in the loop): for
task_arithmetic, ties and dare_ties the task vectors, TIES's trim or DARE's drop, the scales and
weights, the sign election, the sums, the division, lambda and the base, in the same float32
operations and order as the numpy reference in ``soupkit.merge.methods`` (``_keep``, ``_combine32``),
so the bits are the same; for slerp, task_slerp and model_stock the output pass likewise, given the
same statistics. ``tests/merge/test_kernels.py`` checks both. The statistics passes are fused too:
TIES's cut is one pass over a window a sample brackets (``ties_cuts``), with a two-pass radix select
on the bits of |d| (a histogram of the high 16 bits, then of the low 16 bits inside the chosen bin)
where the sample misleads, instead of a partition of a full copy; DARE's L1 norms are
exact (``methods.l1_histogram``'s representation); the dot products behind SLERP's angle and Model
Stock's cosine are float64 sums, reassociated (a few float64 ulps from numpy's).

This module imports numba (~0.2-0.35 s), so ``soupkit.merge.methods`` imports it only when a
task-vector method runs; ``SOUPKIT_JIT=0`` keeps the numpy reference. Kernels compile on first use
and are cached on disk by numba (``cache=True``). They release the GIL (``nogil``): the engine's
``Lookahead`` runs the statistics passes of the coming tensors on a second thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor

import numpy as np
from numba import njit, types
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import overload

from soupkit.merge.methods import (
    GTA_METHODS,
    L1_BINS,
    Cut,
    TensorJob,
    dare_key,
    dare_threshold,
    l1_scales,
    slerp_family_coefficients,
    stock_pairs,
    stock_rows,
    stock_t,
)

BLOCK = 4096
"""Elements per inner block of the statistics kernels (their scratch stays in the L1 cache)."""

G = np.uint64(0x9E3779B97F4A7C15)
M1 = np.uint64(0xBF58476D1CE4E5B9)
M2 = np.uint64(0x94D049BB133111EB)
S30, S27, S31, S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)

KEEP_ALL, TRIM, DROP = 0, 1, 2
"""Per-model modes: keep every element, TIES's magnitude trim, DARE's random drop."""


@njit(cache=True, nogil=True, error_model="numpy")
def _mix(z):
    """splitmix64's finaliser (uint64 -> uint64)."""
    z = (z ^ (z >> S30)) * M1
    z = (z ^ (z >> S27)) * M2
    return z ^ (z >> S31)


@njit(cache=True, nogil=True, error_model="numpy")
def _factors(mode, b, x, value, left, i, key, thresh, first, f):
    """``f[k]`` = 1 where element k of the task vector x - b (element ``first + k`` of the tensor) is
    kept, else 0 (float32); ``left[i]`` counts down the elements equal to TIES's cut still to keep
    (earliest first). Every argument array is one block (a 1-D view: loops over them vectorise)."""
    m = b.size
    if mode == TRIM:
        for k in range(m):
            f[k] = np.float32(abs(x[k] - b[k]) > value)
        if left[i] > 0:
            hits = 0
            for k in range(m):
                hits += abs(x[k] - b[k]) == value
            if hits:
                _keep_first_equal(b, x, value, left, i, f, True, np.float32(1), np.float32(1))
    elif mode == DROP:
        for k in range(m):
            z = key + np.uint64(first + k + 1) * G
            f[k] = np.float32((_mix(z) >> S11) < thresh)
    else:
        for k in range(m):
            f[k] = np.float32(1)


@njit(cache=True, nogil=True, error_model="numpy")
def _elect(d, weights, total, mixed, divisor):
    """TIES's sign election over one block: ``mixed`` = the sum of the weighted deltas ``d[i]`` whose
    sign is their total's, ``divisor`` = the sum of their weights (0 when none agrees: ``_finish``
    divides by 1 there)."""
    zero = np.float32(0)
    m = total.size
    d0, w = d[0][:m], weights[0]
    for k in range(m):
        positive = total[k] >= zero
        agree = np.float32(((d0[k] > zero) & positive) | ((d0[k] < zero) & (positive ^ True)))
        mixed[k] = d0[k] * agree
        divisor[k] = zero + agree * w
    for i in range(1, d.shape[0]):
        di, w = d[i][:m], weights[i]
        for k in range(m):
            positive = total[k] >= zero
            agree = np.float32(((di[k] > zero) & positive) | ((di[k] < zero) & (positive ^ True)))
            mixed[k] = mixed[k] + di[k] * agree
            divisor[k] = divisor[k] + agree * w


@njit(cache=True, nogil=True, error_model="numpy")
def _finish(mixed, divisor, normalize, lam, use_lam, b, o):
    """``o`` = b + lambda * mixed [/ divisor, 1 where it is 0] (one loop per case: each vectorises)."""
    m = b.size
    one, zero = np.float32(1), np.float32(0)
    if normalize and use_lam:
        for k in range(m):
            o[k] = mixed[k] / (divisor[k] if divisor[k] != zero else one) * lam + b[k]
    elif normalize:
        for k in range(m):
            o[k] = mixed[k] / (divisor[k] if divisor[k] != zero else one) + b[k]
    elif use_lam:
        for k in range(m):
            o[k] = mixed[k] * lam + b[k]
    else:
        for k in range(m):
            o[k] = mixed[k] + b[k]


@njit(cache=True, nogil=True, error_model="numpy")
def _finish_all(mixed, divisor, normalize, lam, use_lam, b, o):
    """``_finish`` with one divisor for every element (task_arithmetic); ``mixed`` is scratch."""
    if normalize:
        for k in range(b.size):
            mixed[k] = mixed[k] / divisor
    _finish(mixed, mixed, False, lam, use_lam, b, o)


def _load(src, dst, bits):
    """Widen one block of stored elements to float32 (``dst``; ``bits`` is its uint32 view)."""
    raise NotImplementedError  # compiled by numba from the overload below


@overload(_load, jit_options={"cache": True, "nogil": True})
def _load_overload(src, dst, bits):
    if src.dtype == types.uint16:  # bfloat16: the upper half of a float32 (exact)
        def widen_bf16(src, dst, bits):
            for k in range(src.size):
                bits[k] = np.uint32(src[k]) << np.uint32(16)
        return widen_bf16

    def copy(src, dst, bits):
        for k in range(src.size):
            dst[k] = src[k]
    return copy


@njit(cache=True, nogil=True, error_model="numpy")
def _delta(mode, b, x, value, left, i, key, thresh, first, scale, w, d):
    """``d`` = the trimmed (or dropped), rescaled, weighted task vector x - b over one block, in one
    loop. TIES keeps |x - b| > cut, and the first ``left[i]`` elements equal to it (counted down):
    a block whose equal elements are all still to keep keeps |x - b| >= cut in that loop; only the
    block where the count runs out is redone, keeping its earliest equal elements."""
    m = b.size
    if mode == KEEP_ALL:
        for k in range(m):
            d[k] = (x[k] - b[k]) * w
    elif mode == DROP:
        for k in range(m):
            z = key + np.uint64(first + k + 1) * G
            d[k] = (x[k] - b[k]) * np.float32((_mix(z) >> S11) < thresh) * scale * w
    else:
        if left[i] > 0:
            hits = 0
            for k in range(m):
                diff = x[k] - b[k]
                d[k] = diff * np.float32(abs(diff) >= value) * scale * w
                hits += abs(diff) == value
            if hits <= left[i]:
                left[i] -= hits
                return
        for k in range(m):
            diff = x[k] - b[k]
            d[k] = diff * np.float32(abs(diff) > value) * scale * w
        if left[i] > 0:
            _keep_first_equal(b, x, value, left, i, d, False, scale, w)


@njit(cache=True, nogil=True, error_model="numpy")
def _keep_first_equal(b, x, value, left, i, out, factor, scale, w):
    """Keep the first ``left[i]`` elements of the block whose |x - b| equals the cut (counted down):
    ``out[k]`` = 1 (``factor``: a block of keep factors) or the kept, rescaled, weighted x - b (a
    block of task vectors). A bit mask of the equal ones per 64 elements (it vectorises) is walked
    in order."""
    remaining = left[i]
    for g in range(0, b.size, 64):
        if remaining == 0:
            break
        xs, bs = x[g: g + 64], b[g: g + 64]
        equal = np.uint64(0)
        for k in range(xs.size):
            equal |= np.uint64(abs(xs[k] - bs[k]) == value) << np.uint64(k)
        while equal and remaining > 0:
            k = g + trailing_zeros(equal)
            out[k] = np.float32(1) if factor else (x[k] - b[k]) * np.float32(1) * scale * w
            remaining -= 1
            equal &= equal - np.uint64(1)
    left[i] = remaining


@njit(cache=True, nogil=True, error_model="numpy")
def gta_chunk(base, models, out, modes, values, left, keys, thresh, start, scales, weights, consensus,
              normalize, divisor_all, lam, use_lam):
    """One output chunk of task_arithmetic / ties / dare_ties into ``out`` (float32), block by block:
    each model's weighted, trimmed task vector (``_delta``), then the sum (with TIES's sign election),
    the division, lambda and the base, each step an L1-resident loop in ``methods._combine32``'s order.
    ``base`` and ``models`` are stored elements (float32, or bfloat16 as uint16)."""
    count = len(models)
    d = np.empty((count, BLOCK), np.float32)
    total, mixed, divisor = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    base_bits, x_bits = np.empty(BLOCK, np.uint32), np.empty(BLOCK, np.uint32)
    base_block, x_block = base_bits.view(np.float32), x_bits.view(np.float32)
    for s in range(0, base.size, BLOCK):
        e = min(s + BLOCK, base.size)
        m = e - s
        b = base_block[:m]
        _load(base[s:e], b, base_bits[:m])
        for i in range(count):
            x = x_block[:m]
            _load(models[i][s:e], x, x_bits[:m])
            di = d[i][:m]
            _delta(modes[i], b, x, values[i], left, i, keys[i], thresh[i], start + s, scales[i], weights[i], di)
        t, d0 = total[:m], d[0][:m]
        if count == 1:
            for k in range(m):
                t[k] = d0[k]
        else:
            d1 = d[1][:m]
            for k in range(m):
                t[k] = d0[k] + d1[k]
            for i in range(2, count):
                di = d[i][:m]
                for k in range(m):
                    t[k] = t[k] + di[k]
        if consensus:
            _elect(d, weights, t, mixed[:m], divisor[:m])
            _finish(mixed[:m], divisor[:m], normalize, lam, use_lam, b, out[s:e])
        else:
            _finish_all(t, divisor_all, normalize, lam, use_lam, b, out[s:e])


@njit(cache=True, nogil=True, error_model="numpy")
def _model_magnitudes(x, b, x_block, x_bits, mags):
    """Widen one block of a model's stored elements ``x`` into ``x_block`` and set ``mags`` to
    |x - b|, ``b`` the base's block already widened (once for all models)."""
    m = b.size
    _load(x, x_block[:m], x_bits[:m])
    for k in range(m):
        mags[k] = abs(x_block[k] - b[k])


@njit(cache=True, nogil=True, error_model="numpy")
def cut_histogram(base, models, active, bins, hist):
    """The radix select's passes over one chunk: ``bins[i]`` < 0: ``hist[i, bits(|d_i|) >> 16] += 1``
    (pass 1); else the low 16 bits of the |d_i| whose high 16 bits are ``bins[i]`` (pass 2). Counts
    go to int32 bins first (half the cache footprint; a chunk holds < 2^31 elements)."""
    base_bits, x_bits, mag_bits = np.empty(BLOCK, np.uint32), np.empty(BLOCK, np.uint32), np.empty(BLOCK, np.uint32)
    base_block, x_block, mags = base_bits.view(np.float32), x_bits.view(np.float32), mag_bits.view(np.float32)
    counts = np.zeros((len(models), 1 << 16), np.int32)
    n = base.size
    for s in range(0, n, BLOCK):
        e = min(s + BLOCK, n)
        m = e - s
        _load(base[s:e], base_block[:m], base_bits[:m])
        for i in range(len(models)):
            if not active[i]:
                continue
            _model_magnitudes(models[i][s:e], base_block[:m], x_block, x_bits, mags)
            _count(mag_bits[:m], bins[i], counts[i])
    for i in range(len(models)):
        for j in range(1 << 16):
            hist[i, j] += counts[i, j]


@njit(cache=True, nogil=True, error_model="numpy")
def _count(bits, target, counts):
    """``target`` < 0: count the high 16 bits; else the low 16 bits of those whose high bits are it."""
    if target < 0:
        for k in range(bits.size):
            counts[bits[k] >> 16] += 1
        return
    hits = 0
    for k in range(bits.size):
        hits += (bits[k] >> 16) == target
    if hits:
        for k in range(bits.size):
            if (bits[k] >> 16) == target:
                counts[bits[k] & 0xFFFF] += 1


@njit(cache=True, nogil=True, error_model="numpy")
def sample_magnitudes(base, x, starts, run, out):
    """The float32 bits of |x - base| at elements ``starts[r] + [0, run)`` into ``out[r * run:]``;
    ``base`` and ``x`` are whole stored tensors (float32, or bfloat16 as uint16)."""
    base_bits, x_bits, mag_bits = np.empty(BLOCK, np.uint32), np.empty(BLOCK, np.uint32), np.empty(BLOCK, np.uint32)
    base_block, x_block, mags = base_bits.view(np.float32), x_bits.view(np.float32), mag_bits.view(np.float32)
    for r in range(starts.size):
        for s in range(starts[r], starts[r] + run, BLOCK):
            e = min(s + BLOCK, starts[r] + run)
            _load(base[s:e], base_block[:e - s], base_bits[:e - s])
            _model_magnitudes(x[s:e], base_block[:e - s], x_block, x_bits, mags)
            o = out[r * run + s - starts[r]: r * run + e - starts[r]]
            for k in range(e - s):
                o[k] = mag_bits[k]


@njit(cache=True, nogil=True, error_model="numpy")
def window_count(base, models, active, lo, hi, counts, cand, fill):
    """One chunk of the windowed select: per active model i, with u the float32 bits of |d_i|,
    ``counts[i]`` += (#(u > hi[i]), #(u == hi[i]), #(u == lo[i])) (the middle one 0 when hi = lo), and
    each u strictly between lo[i] and hi[i] is appended to ``cand[i]`` (``fill[i]`` counts them, past
    the row's end too: overflow). The counts vectorise, and so does a bit mask of the candidates per
    64 elements, which the appending walks."""
    base_bits, x_bits, mag_bits = np.empty(BLOCK, np.uint32), np.empty(BLOCK, np.uint32), np.empty(BLOCK, np.uint32)
    base_block, x_block, mags = base_bits.view(np.float32), x_bits.view(np.float32), mag_bits.view(np.float32)
    n = base.size
    for s in range(0, n, BLOCK):
        e = min(s + BLOCK, n)
        m = e - s
        _load(base[s:e], base_block[:m], base_bits[:m])
        for i in range(len(models)):
            if not active[i]:
                continue
            _model_magnitudes(models[i][s:e], base_block[:m], x_block, x_bits, mags)
            fill[i] = _count_and_append(mag_bits[:m], lo[i], hi[i], cand[i], fill[i], counts[i])


@njit(cache=True, nogil=True, error_model="numpy")
def _count_and_append(u, low, h, row, f, counts):
    """``window_count`` for one model and block, 64 elements at a time; returns the new ``f``."""
    cap = row.size
    a, at_h, at_low = np.int32(0), np.int32(0), np.int32(0)
    if h == low:
        for k in range(u.size):
            a += np.int32(u[k] > h)
            at_low += np.int32(u[k] == low)
    else:
        for g in range(0, u.size, 64):
            group = u[g: g + 64]
            inside = np.uint64(0)  # bit k: element k of the group lies strictly inside the window
            for k in range(group.size):
                a += np.int32(group[k] > h)
                at_h += np.int32(group[k] == h)
                at_low += np.int32(group[k] == low)
                inside |= np.uint64((group[k] > low) & (group[k] < h)) << np.uint64(k)
            while inside:
                k = trailing_zeros(inside)
                if f < cap:
                    row[f] = group[k]
                f += 1
                inside &= inside - np.uint64(1)
    counts[0] += a
    counts[1] += at_h
    counts[2] += at_low
    return f


@njit(cache=True, nogil=True, error_model="numpy")
def l1_histograms(base, models, modes, values, left, keys, thresh, start, before, after):
    """Exact L1 norms of each task vector before and after its trim/drop, as ``methods.L1_BINS``
    histograms (``before[i]``, ``after[i]``; int64; ``methods.l1_norm`` reads them); a model kept
    whole is skipped (its histograms stay 0: rescale 1, never applied to it)."""
    base_bits, x_bits, mag_bits = np.empty(BLOCK, np.uint32), np.empty(BLOCK, np.uint32), np.empty(BLOCK, np.uint32)
    base_block, x_block, mags = base_bits.view(np.float32), x_bits.view(np.float32), mag_bits.view(np.float32)
    f = np.empty(BLOCK, np.float32)
    n = base.size
    for s in range(0, n, BLOCK):
        e = min(s + BLOCK, n)
        m = e - s
        b = base_block[:m]
        _load(base[s:e], b, base_bits[:m])
        for i in range(len(models)):
            if modes[i] == KEEP_ALL:  # before = after: its rescale is 1
                continue
            _model_magnitudes(models[i][s:e], b, x_block, x_bits, mags)
            x = x_block[:m]
            _factors(modes[i], b, x, values[i], left, i, keys[i], thresh[i], start + s, f[:m])
            _l1_block(mag_bits[:m], f[:m], before[i], after[i])


@njit(cache=True, nogil=True, error_model="numpy")
def _l1_block(bits, f, before, after):
    """Add one block of magnitudes (float32 bits), all and those with ``f`` = 1, to the histograms.
    Where the block's nonzero exponents span at most 26 (the usual case), each significand is shifted
    onto the lowest one and summed in int64 (at most 2^50 each, 2^62 for 4096: exact), in a loop that
    vectorises; else one bin per element."""
    lo, hi = 255, 0
    for k in range(bits.size):
        ex = np.int64(bits[k] >> 23)
        lo = min(lo, max(ex, 1) if bits[k] != 0 else 255)
        hi = max(hi, ex)
    if hi < 255 and hi - lo <= 26:
        total, kept = np.int64(0), np.int64(0)
        for k in range(bits.size):
            ex = np.int64(bits[k] >> 23)
            sig = np.int64(bits[k] & 0x7FFFFF) | (np.int64(0x800000) if ex > 0 else np.int64(0))
            shifted = sig << max(max(ex, 1) - lo, 0)
            total += shifted
            kept += shifted * np.int64(f[k] != 0)
        low = (np.int64(1) << 26) - 1
        before[lo] += total & low
        before[lo + 26] += total >> 26
        after[lo] += kept & low
        after[lo + 26] += kept >> 26
        return
    for k in range(bits.size):
        ex = np.int64(bits[k] >> 23)
        if ex == 255:
            before[before.size - 1] += 1
            after[after.size - 1] += np.int64(f[k] != 0)
            continue
        sig = np.int64(bits[k] & 0x7FFFFF) | (np.int64(0x800000) if ex > 0 else np.int64(0))
        before[max(ex, 1)] += sig
        after[max(ex, 1)] += sig * np.int64(f[k] != 0)


@njit(cache=True, nogil=True, error_model="numpy")
def _vectors(base, models, delta, s, e, base_block, base_bits, x_block, x_bits, vectors):
    """Elements [s, e) of the vectors of ``dots_chunk`` as float64 rows of ``vectors``."""
    m = e - s
    b = base_block[:m]
    _load(base[s:e], b, base_bits[:m])
    if not delta:
        v = vectors[0][:m]
        for k in range(m):
            v[k] = b[k]
    for i in range(len(models)):
        x = x_block[:m]
        _load(models[i][s:e], x, x_bits[:m])
        v = vectors[i if delta else i + 1][:m]
        if delta:
            for k in range(m):
                v[k] = x[k] - b[k]
        else:
            for k in range(m):
                v[k] = x[k]


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
def dots_chunk(base, models, delta, width, pairs, dots):
    """``dots[r, p]`` += the float64 dot product over row r (``width`` elements) of the vectors
    ``pairs[p]``: the task vectors x_i - base (``delta``) or (base, x_1, ...). Each product of two
    float32 is exact in float64; the sums are reassociated (vectorised), so they differ from numpy's
    in the last bits."""
    count = len(models) if delta else len(models) + 1
    vectors = np.empty((count, BLOCK), np.float64)
    base_bits, x_bits = np.empty(BLOCK, np.uint32), np.empty(BLOCK, np.uint32)
    base_block, x_block = base_bits.view(np.float32), x_bits.view(np.float32)
    for r in range(base.size // width):
        for s in range(r * width, (r + 1) * width, BLOCK):
            e = min(s + BLOCK, (r + 1) * width)
            m = e - s
            _vectors(base, models, delta, s, e, base_block, base_bits, x_block, x_bits, vectors)
            for p in range(pairs.shape[0]):
                va, vb = vectors[pairs[p, 0]][:m], vectors[pairs[p, 1]][:m]
                acc = 0.0
                for k in range(m):
                    acc += va[k] * vb[k]
                dots[r, p] += acc


@njit(cache=True, nogil=True, error_model="numpy")
def slerp_chunk(base, models, coefficients, offset, out):
    """slerp (``offset`` False): c_0 base + c_1 x_1; task_slerp: base + sum_i c_i (x_i - base), summed
    left to right in float32 as ``methods._slerp_numpy``."""
    base_bits, x_bits = np.empty(BLOCK, np.uint32), np.empty(BLOCK, np.uint32)
    base_block, x_block = base_bits.view(np.float32), x_bits.view(np.float32)
    acc = np.empty(BLOCK, np.float32)
    for s in range(0, base.size, BLOCK):
        e = min(s + BLOCK, base.size)
        m = e - s
        b, x, o = base_block[:m], x_block[:m], out[s:e]
        _load(base[s:e], b, base_bits[:m])
        if not offset:
            _load(models[0][s:e], x, x_bits[:m])
            c0, c1 = coefficients[0], coefficients[1]
            for k in range(m):
                o[k] = c0 * b[k] + c1 * x[k]
            continue
        for i in range(len(models)):
            _load(models[i][s:e], x, x_bits[:m])
            c = coefficients[i]
            if i == 0:
                for k in range(m):
                    acc[k] = c * (x[k] - b[k])
            else:
                for k in range(m):
                    acc[k] = acc[k] + c * (x[k] - b[k])
        for k in range(m):
            o[k] = b[k] + acc[k]


@njit(cache=True, nogil=True, error_model="numpy")
def stock_chunk(base, models, t, width, out):
    """Model Stock: t_r * mean(x_i) + (1 - t_r) * base, row r (``width`` elements) at ``t[r]``."""
    base_bits, x_bits = np.empty(BLOCK, np.uint32), np.empty(BLOCK, np.uint32)
    base_block, x_block = base_bits.view(np.float32), x_bits.view(np.float32)
    acc = np.empty(BLOCK, np.float32)
    count = np.float32(len(models))
    for r in range(base.size // width):
        tt = t[r]
        rest = np.float32(1) - tt
        for s in range(r * width, (r + 1) * width, BLOCK):
            e = min(s + BLOCK, (r + 1) * width)
            m = e - s
            b, x, a = base_block[:m], x_block[:m], acc[:m]
            _load(base[s:e], b, base_bits[:m])
            for i in range(len(models)):
                _load(models[i][s:e], x, x_bits[:m])
                if i == 0:
                    for k in range(m):
                        a[k] = x[k]
                else:
                    for k in range(m):
                        a[k] = a[k] + x[k]
            o = out[s:e]
            for k in range(m):
                o[k] = tt * (a[k] / count) + rest * b[k]


@njit(cache=True, nogil=True, error_model="numpy")
def narrow_bf16(src, out):
    """float32 -> bfloat16 bits in one pass: ``engine.round_bf16``'s (nearest, ties to even; NaN ->
    0x7FC0), which takes five numpy passes."""
    bits = src.view(np.uint32)
    for k in range(src.size):
        u = bits[k]
        rounded = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        out[k] = np.uint16(0x7FC0) if src[k] != src[k] else rounded


# ---------------------------------------------------------------------------------------------
# drivers: the statistics, then the output chunk by chunk


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only view (every input of a kernel call has one numba type, whatever its origin)."""
    v = a.view()
    v.flags.writeable = False
    return v


def _chunk(job: TensorJob, s: int, e: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Elements [s, e) of the base and the models as stored (bfloat16 bits or float32) when the job
    can read them so, else widened to float32."""
    read = job.stored or job.read
    return _frozen(read(0, s, e)), tuple(_frozen(read(i + 1, s, e)) for i in range(job.count))


SAMPLE_MIN, SAMPLE_MAX, SAMPLE_RUN = 1 << 16, 1 << 20, 256
"""TIES's windowed select first reads |d| at runs of ``SAMPLE_RUN`` elements spread evenly, a sixteenth
of the tensor within [SAMPLE_MIN, SAMPLE_MAX] elements (a tensor up to SAMPLE_MIN: all of it)."""
WINDOW_SIGMAS = 8.0
"""Half-width of the window around the sample's estimate of the cut, in binomial standard deviations."""
WINDOW_MAX = 0.08
"""A window expected to hold more than this fraction of a tensor goes straight to the radix select (the
candidates it collects take 4 bytes each: at most ~0.5 byte per element of the tensor and model)."""


def _cut_from(bits: np.ndarray, k: int, greater: int = 0) -> Cut:
    """The cut at the ``k``-th largest of ``bits`` (float32 bits of magnitudes), ``greater`` more
    elements known to be larger."""
    order = np.sort(bits)  # numpy's SIMD sort: faster than its partition on many equal values
    value = order[bits.size - k]
    above = greater + bits.size - int(np.searchsorted(order, value, side="right"))
    return Cut(float(np.array(value, np.uint32).view(np.float32)), greater + k - above)


def ties_cuts(job: TensorJob, densities: list[float]) -> list[Cut | None]:
    """Every model's TIES cut, as ``methods.magnitude_cut`` (the same value and count of equal
    elements kept), mostly in one pass: a sample of |d| (``sample_magnitudes``) brackets the k-th
    largest in a window of a few percent of the elements; one pass (``window_count``) counts the
    elements above the window and collects those inside it, and the cut is selected among these. A
    model whose cut falls outside its window (the sample misled: ~never at 8 sigma) or whose window
    would be wide (many equal magnitudes) gets the two-pass ``radix_cuts``. A tensor no larger than
    the sample is selected exactly from all its magnitudes."""
    n = job.size
    if job.stored is None or n == 0:
        return radix_cuts(job, densities)
    cuts: list[Cut | None] = [Cut(math.inf, 0) if d <= 0 else None for d in densities]
    base = _frozen(job.stored(0, 0, n))
    models = tuple(_frozen(job.stored(i + 1, 0, n)) for i in range(job.count))
    ks = [max(1, int(d * n)) for d in densities]
    lo, hi, active, caps, fallback = _windows(base, models, densities, ks, cuts)
    if active.any():
        counts, fill = np.zeros((job.count, 3), np.int64), np.zeros(job.count, np.int64)
        cand = np.empty((job.count, int(caps.max())), np.uint32)
        for s, e in job.spans():
            window_count(*_chunk(job, s, e), active, lo, hi, counts, cand, fill)
        for i in np.flatnonzero(active):
            cuts[i] = _settle(ks[i], counts[i], int(fill[i]), int(caps[i]), lo[i], hi[i], cand[i])
            if cuts[i] is None:
                fallback.append(int(i))
    if fallback:
        redo = radix_cuts(job, [densities[i] if i in fallback else 1.0 for i in range(job.count)])
        for i in fallback:
            cuts[i] = redo[i]
    return cuts


def _windows(base: np.ndarray, models: tuple[np.ndarray, ...], densities: list[float], ks: list[int],
             cuts: list[Cut | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Per model with 0 < density < 1, from a sample of its magnitudes: the window's bounds, whether
    the window pass counts it (``active``) and its room for candidates; ``cuts[i]`` set outright for a
    tensor no larger than the sample; the models for the radix select (a wide window)."""
    n, count = base.size, len(models)
    whole = n <= SAMPLE_MIN
    size = min(n, max(SAMPLE_MIN, min(SAMPLE_MAX, n // 16)))
    runs, run = (1, n) if whole else (max(2, size // SAMPLE_RUN), min(SAMPLE_RUN, n))
    starts = np.array([r * (n - run) // max(runs - 1, 1) for r in range(runs)], np.int64)
    lo, hi = np.zeros(count, np.uint32), np.zeros(count, np.uint32)
    active, caps = np.zeros(count, np.bool_), np.zeros(count, np.int64)
    fallback = []
    for i, density in enumerate(densities):
        if not 0 < density < 1:
            continue
        sample = np.empty(runs * run, np.uint32)
        sample_magnitudes(base, models[i], starts, run, sample)
        if whole:
            cuts[i] = _cut_from(sample, ks[i])
            continue
        lo[i], hi[i], inside = _window(sample, ks[i] / n)
        if inside > WINDOW_MAX:
            fallback.append(i)
        else:
            active[i], caps[i] = True, int(n * min(1.0, 1.5 * inside + 0.002)) + BLOCK
    return lo, hi, active, caps, fallback


def _window(sample: np.ndarray, q: float) -> tuple[np.uint32, np.uint32, float]:
    """``(lo, hi, inside)``: bounds (float32 bits) that bracket the top-``q`` quantile of the tensor
    the ``sample`` of its magnitudes comes from, and the fraction of the sample strictly between them
    (the elements equal to a bound are only counted)."""
    size = sample.size
    spread = WINDOW_SIGMAS * math.sqrt(size * q * (1 - q)) + 2
    top_hi, top_lo = int(q * size - spread), int(math.ceil(q * size + spread))  # ranks from the top
    order = np.sort(sample)  # numpy's SIMD sort: faster than its partition on many equal values
    hi = order[size - 1 - top_hi] if top_hi >= 0 else np.uint32(0xFFFFFFFF)
    lo = order[size - 1 - top_lo] if top_lo < size else np.uint32(0)
    inside = int(np.searchsorted(order, hi, side="left")) - int(np.searchsorted(order, lo, side="right"))
    return np.uint32(lo), np.uint32(hi), max(inside, 0) / size


def _settle(k: int, counts: np.ndarray, inside: int, cap: int, lo: np.uint32, hi: np.uint32,
            cand: np.ndarray) -> Cut | None:
    """The cut at the k-th largest from a window's counts, from the top: ``counts`` = (above hi, equal
    to hi, equal to lo), ``inside`` strictly between (collected in ``cand`` up to ``cap``); None when
    the k-th largest lies outside the window."""
    above, at_hi, at_lo = (int(c) for c in counts)
    if hi == lo:
        at_hi = 0  # counted as at_lo
    bits = [None, hi, None, lo]  # the value at each stretch, from the top
    for stretch, size in enumerate((above, at_hi, inside, at_lo)):
        if k <= size:
            if stretch == 0 or (stretch == 2 and inside > cap):
                return None
            if stretch == 2:
                return _cut_from(cand[:inside], k, above + at_hi)
            return Cut(float(np.array(bits[stretch], np.uint32).view(np.float32)), k)
        k -= size
    return None


def radix_cuts(job: TensorJob, densities: list[float]) -> list[Cut | None]:
    """Every model's TIES cut (``methods.magnitude_cut``'s, the same value and count of equal elements
    kept) by a radix select on the bits of |d| (non-negative float32 bits order like the values): a
    histogram of the high 16 bits, then of the low 16 bits inside the bin holding the k-th largest."""
    n = job.size
    cuts: list[Cut | None] = [None] * job.count
    active = np.zeros(job.count, np.bool_)
    for i, density in enumerate(densities):
        if density < 1:
            if density <= 0 or n == 0:
                cuts[i] = Cut(math.inf, 0)
            else:
                active[i] = True
    if not active.any():
        return cuts
    high = np.zeros((job.count, 1 << 16), np.int64)
    for s, e in job.spans():
        cut_histogram(*_chunk(job, s, e), active, np.full(job.count, -1, np.int64), high)
    ks = [max(1, int(d * n)) for d in densities]
    bins, above = np.zeros(job.count, np.int64), [0] * job.count
    for i in np.flatnonzero(active):
        top = np.cumsum(high[i, ::-1])  # elements in this bin or above, from the top bin down
        j = int(np.searchsorted(top, ks[i]))
        bins[i] = (1 << 16) - 1 - j
        above[i] = int(top[j] - high[i, bins[i]])
    low = np.zeros((job.count, 1 << 16), np.int64)
    for s, e in job.spans():
        cut_histogram(*_chunk(job, s, e), active, bins, low)
    for i in np.flatnonzero(active):
        top = np.cumsum(low[i, ::-1])
        j = int(np.searchsorted(top, ks[i] - above[i]))
        bits = (int(bins[i]) << 16) | ((1 << 16) - 1 - j)
        greater = above[i] + int(top[j] - low[i, (1 << 16) - 1 - j])
        cuts[i] = Cut(float(np.array(bits, np.uint32).view(np.float32)), ks[i] - greater)
    return cuts


def _masks(method: str, job: TensorJob, densities: list[float]) -> tuple[np.ndarray, ...]:
    """Per model: mode, TIES cut value and equal elements to keep, DARE key and threshold."""
    count = job.count
    modes, values = np.zeros(count, np.int64), np.zeros(count, np.float32)
    left, keys, thresh = np.zeros(count, np.int64), np.zeros(count, np.uint64), np.zeros(count, np.uint64)
    if method == "ties":
        for i, cut in enumerate(ties_cuts(job, densities)):
            if cut is not None:
                modes[i], values[i], left[i] = TRIM, np.float32(cut.value), cut.ties
    elif method == "dare_ties":
        for i, density in enumerate(densities):
            if density < 1:
                modes[i], keys[i], thresh[i] = DROP, dare_key(job.seed, job.name, i), dare_threshold(density)
    return modes, values, left, keys, thresh


def _rescales(job: TensorJob, modes: np.ndarray, values: np.ndarray, left: np.ndarray, keys: np.ndarray,
              thresh: np.ndarray) -> np.ndarray:
    """``rescale``: float32 L1 before / after per model, from exact histograms (``methods.l1_scales``)."""
    before, after = np.zeros((job.count, L1_BINS), np.int64), np.zeros((job.count, L1_BINS), np.int64)
    counting = left.copy()
    for s, e in job.spans():
        l1_histograms(*_chunk(job, s, e), modes, values, counting, keys, thresh, s, before, after)
    return np.array(l1_scales(list(before), list(after)), np.float64).astype(np.float32)


def prepared(method: str, job: TensorJob, helper: Executor | None = None) -> Callable[[], Iterator[np.ndarray]]:
    """``methods.prepare``'s fused path: the statistics now, the output pass when called. With a
    ``helper``, TIES's and DARE's per-model statistics are split between it and the caller."""
    if method in GTA_METHODS:
        return _gta_prepared(method, job, helper)
    if method == "model_stock":
        return _stock_prepared(job)
    return _slerp_prepared(method, job)


def gta_statistics(method: str, job: TensorJob, models: Sequence[int]) -> tuple[np.ndarray, ...]:
    """``(modes, values, left, keys, thresh, scales)`` of the ``models`` (the others keep every
    element at scale 1): TIES's cuts, DARE's keys, and the L1 rescales with ``rescale``."""
    densities = [float(p["density"]) if i in models else 1.0 for i, p in enumerate(job.per_model)]
    modes, values, left, keys, thresh = _masks(method, job, densities)
    scales = np.ones(job.count, np.float32)
    if job.shared["rescale"] and modes.any():
        scales = _rescales(job, modes, values, left, keys, thresh)
    return modes, values, left, keys, thresh, scales


def _gta_prepared(method: str, job: TensorJob, helper: Executor | None = None) -> Callable[[], Iterator[np.ndarray]]:
    """task_arithmetic / ties / dare_ties on float32 work: ``methods._gta_numpy``'s bits, fused."""
    if helper is not None and method != "task_arithmetic" and job.count > 1:
        half = job.count // 2  # the first half on the helper, the rest here
        theirs = helper.submit(gta_statistics, method, job, range(half))
        mine = gta_statistics(method, job, range(half, job.count))
        stats = tuple(np.concatenate([a[:half], b[half:]]) for a, b in zip(theirs.result(), mine))
    else:
        stats = gta_statistics(method, job, range(job.count))
    modes, values, left, keys, thresh, scales = stats
    weights = np.array([np.float32(p["weight"]) for p in job.per_model], np.float32)
    divisor = weights[0]
    for w in weights[1:]:
        divisor = divisor + w
    divisor = np.float32(1) if abs(divisor) < 1e-8 else np.float32(divisor)
    lam = float(job.shared["lambda"])

    def emit() -> Iterator[np.ndarray]:
        for s, e, out in _outputs(job):
            base, models = _chunk(job, s, e)
            gta_chunk(base, models, out, modes, values, left, keys, thresh, s, scales, weights,
                      method != "task_arithmetic", bool(job.shared["normalize"]), divisor, np.float32(lam), lam != 1)
            yield out
    return emit


def _outputs(job: TensorJob, step: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(start, stop, out)`` per chunk of ``job.spans(step)``: ``out`` a float32 view of one buffer
    reused from chunk to chunk (the first chunk is the largest)."""
    out = np.empty(0, np.float32)
    for s, e in job.spans(step):
        if out.size < e - s:
            out = np.empty(e - s, np.float32)
        yield s, e, out[: e - s]


def _dots(job: TensorJob, delta: bool, count: int, rows: int, width: int, step: int | None = None) -> np.ndarray:
    """float64 dot products per row of every pair (a <= b) of ``count`` vectors (``dots_chunk``)."""
    pairs = np.array(stock_pairs(count), np.int64).reshape(-1, 2)
    dots = np.zeros((rows, len(pairs)))
    for s, e in job.spans(step):
        part = np.zeros((max(1, (e - s) // width) if rows > 1 else 1, len(pairs)))
        dots_chunk(*_chunk(job, s, e), delta, width if rows > 1 else e - s, pairs, part)
        first = s // width if rows > 1 else 0
        dots[first: first + len(part)] += part
    return dots


def _slerp_prepared(method: str, job: TensorJob) -> Callable[[], Iterator[np.ndarray]]:
    """slerp / task_slerp: the Gram matrix in one fused pass, then the output in another."""
    delta = method == "task_slerp"
    count = job.count if delta else 2
    g = np.zeros((count, count))
    for (a, b), value in zip(stock_pairs(count), _dots(job, delta, count, 1, 1)[0]):
        g[a, b] = g[b, a] = value
    coefficients, offset = slerp_family_coefficients(method, job, g)
    c32 = np.array([np.float32(c) for c in coefficients], np.float32)

    def emit() -> Iterator[np.ndarray]:
        for s, e, out in _outputs(job):
            slerp_chunk(*_chunk(job, s, e), c32, offset, out)
            yield out
    return emit


def _stock_prepared(job: TensorJob) -> Callable[[], Iterator[np.ndarray]]:
    """Model Stock: the task vectors' dot products (per row with ``filter_wise``) in one fused pass,
    then the output in another."""
    if job.size == 0:
        return lambda: iter(())
    rows, width, step = stock_rows(job)
    dots = _dots(job, True, job.count, rows, width, step)
    t = stock_t({p: dots[:, j] for j, p in enumerate(stock_pairs(job.count))}, job.count)

    def emit() -> Iterator[np.ndarray]:
        for s, e, out in _outputs(job, step):
            trow = t[s // width: e // width] if rows > 1 else t[:1]
            stock_chunk(*_chunk(job, s, e), trow, width if rows > 1 else e - s, out)
            yield out
    return emit
