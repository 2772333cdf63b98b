"""Fused numba kernels for task_arithmetic, ties and dare_ties on float32 work.

One pass per chunk does every elementwise step of a method (the task vectors, TIES's trim or DARE's
drop, the scales and weights, the sign election, the sums, the division, lambda, the base), in the
same float32 operations and order as the numpy reference in ``soupkit.merge.methods`` (``_keep`` and
``_combine32``), so the bits are the same; ``tests/merge/test_kernels.py`` checks it. The statistics
passes are fused too: TIES's cut is a two-pass radix select on the bits of |d| (a histogram of the
high 16 bits, then of the low 16 bits inside the chosen bin) instead of a partition of a full copy,
and the L1 norms behind DARE's rescale are exact exponent/mantissa histograms.

This module imports numba (~0.35 s), so ``soupkit.merge.methods`` imports it only when a task-vector
method runs; ``SOUPKIT_JIT=0`` keeps the numpy reference. Kernels compile on first use (cached on
disk by numba, ``cache=True``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from numba import njit

from soupkit.merge.methods import Cut, TensorJob, dare_key, dare_threshold, l1_scales

BLOCK = 4096
"""Elements per inner block of the statistics kernels (their scratch stays in the L1 cache)."""

G = np.uint64(0x9E3779B97F4A7C15)
M1 = np.uint64(0xBF58476D1CE4E5B9)
M2 = np.uint64(0x94D049BB133111EB)
S30, S27, S31, S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)

KEEP_ALL, TRIM, DROP = 0, 1, 2
"""Per-model modes: keep every element, TIES's magnitude trim, DARE's random drop."""


@njit(cache=True, nogil=True)
def _mix(z):
    """splitmix64's finaliser (uint64 -> uint64)."""
    z = (z ^ (z >> S30)) * M1
    z = (z ^ (z >> S27)) * M2
    return z ^ (z >> S31)


@njit(cache=True, nogil=True)
def _keep(mode, d, value, left, key, thresh, index):
    """Whether element ``index`` of a task vector (value ``d``) is kept; ``left[0]`` counts down the
    elements equal to the cut still to keep."""
    if mode == TRIM:
        m = abs(d)
        if m > value:
            return True
        if m == value and left[0] > 0:
            left[0] -= 1
            return True
        return False
    if mode == DROP:
        return (_mix(key + np.uint64(index + 1) * G) >> S11) < thresh
    return True


@njit(cache=True, nogil=True)
def gta_chunk(base, models, out, modes, values, left, keys, thresh, start, scales, weights, consensus,
              normalize, divisor_all, lam, use_lam):
    """One output chunk of task_arithmetic / ties / dare_ties into ``out`` (float32)."""
    count = len(models)
    d = np.empty(count, np.float32)
    one, zero = np.float32(1), np.float32(0)
    for k in range(base.size):
        b = base[k]
        for i in range(count):
            x = models[i][k] - b
            if modes[i] != KEEP_ALL:
                keep = _keep(modes[i], x, values[i], left[i:i + 1], keys[i], thresh[i], start + k)
                x = x * (one if keep else zero)
                if scales[i] != one:
                    x = x * scales[i]
            d[i] = x * weights[i]
        mixed = _elect(d, weights) if consensus else _total(d)
        divisor = _agreeing_weight(d, weights) if consensus else divisor_all
        if normalize:
            mixed = mixed / divisor
        if use_lam:
            mixed = mixed * lam
        out[k] = mixed + b


@njit(cache=True, nogil=True)
def _total(d):
    """Left-to-right float32 sum."""
    mixed = d[0]
    for i in range(1, d.size):
        mixed = mixed + d[i]
    return mixed


@njit(cache=True, nogil=True)
def _agrees(di, positive):
    return (di > 0 and positive) or (di < 0 and not positive)


@njit(cache=True, nogil=True)
def _elect(d, weights):
    """The sum of the weighted deltas whose sign is the one elected by their total."""
    positive = _total(d) >= np.float32(0)
    mixed = d[0] * (np.float32(1) if _agrees(d[0], positive) else np.float32(0))
    for i in range(1, d.size):
        mixed = mixed + d[i] * (np.float32(1) if _agrees(d[i], positive) else np.float32(0))
    return mixed


@njit(cache=True, nogil=True)
def _agreeing_weight(d, weights):
    """The sum of the weights of the agreeing deltas (1 when none agrees)."""
    positive = _total(d) >= np.float32(0)
    divisor = np.float32(0)
    for i in range(d.size):
        divisor = divisor + (np.float32(1) if _agrees(d[i], positive) else np.float32(0)) * weights[i]
    return np.float32(1) if divisor == np.float32(0) else divisor


@njit(cache=True, nogil=True)
def high_histogram(base, models, active, hist):
    """Pass 1 of the cut: ``hist[i, bits(|d_i|) >> 16] += 1`` for the models with ``active[i]``."""
    tmp = np.empty(BLOCK, np.float32)
    bits = tmp.view(np.uint32)
    n = base.size
    for i in range(len(models)):
        if not active[i]:
            continue
        x = models[i]
        for s in range(0, n, BLOCK):
            e = min(s + BLOCK, n)
            for k in range(s, e):
                tmp[k - s] = abs(x[k] - base[k])
            for k in range(e - s):
                hist[i, bits[k] >> 16] += 1


@njit(cache=True, nogil=True)
def low_histogram(base, models, active, bins, hist):
    """Pass 2 of the cut: the low 16 bits of |d_i| whose high 16 bits are ``bins[i]``."""
    tmp = np.empty(BLOCK, np.float32)
    bits = tmp.view(np.uint32)
    n = base.size
    for i in range(len(models)):
        if not active[i]:
            continue
        x = models[i]
        target = bins[i]
        for s in range(0, n, BLOCK):
            e = min(s + BLOCK, n)
            for k in range(s, e):
                tmp[k - s] = abs(x[k] - base[k])
            for k in range(e - s):
                if (bits[k] >> 16) == target:
                    hist[i, bits[k] & 0xFFFF] += 1


@njit(cache=True, nogil=True)
def l1_histograms(base, models, modes, values, left, keys, thresh, start, before, after):
    """Exact L1 norms of each task vector before and after its trim/drop, as sums of float32
    significands per exponent (``before[i, e]``, ``after[i, e]``; int64, exact)."""
    tmp = np.empty(BLOCK, np.float32)
    bits = tmp.view(np.uint32)
    kept = np.empty(BLOCK, np.bool_)
    n = base.size
    for i in range(len(models)):
        x = models[i]
        for s in range(0, n, BLOCK):
            e = min(s + BLOCK, n)
            for k in range(s, e):
                dk = x[k] - base[k]
                kept[k - s] = _keep(modes[i], dk, values[i], left[i:i + 1], keys[i], thresh[i], start + k)
                tmp[k - s] = abs(dk)
            for k in range(e - s):
                u = bits[k]
                ex = u >> 23
                sig = np.int64(u & 0x7FFFFF)
                if ex > 0:
                    sig += 0x800000
                before[i, ex] += sig
                if kept[k]:
                    after[i, ex] += sig


# ---------------------------------------------------------------------------------------------
# drivers: the statistics, then the output chunk by chunk


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only view (every input of a kernel call has one numba type, whatever its origin)."""
    v = a.view()
    v.flags.writeable = False
    return v


def _chunk(job: TensorJob, s: int, e: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    return _frozen(job.read(0, s, e)), tuple(_frozen(job.read(i + 1, s, e)) for i in range(job.count))


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
        high_histogram(*_chunk(job, s, e), active, high)
    ks = [max(1, int(d * n)) for d in densities]
    bins, above = np.zeros(job.count, np.uint32), [0] * job.count
    for i in np.flatnonzero(active):
        top = np.cumsum(high[i, ::-1])  # elements in this bin or above, from the top bin down
        j = int(np.searchsorted(top, ks[i]))
        bins[i] = (1 << 16) - 1 - j
        above[i] = int(top[j] - high[i, bins[i]])
    low = np.zeros((job.count, 1 << 16), np.int64)
    for s, e in job.spans():
        low_histogram(*_chunk(job, s, e), active, bins, low)
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
        for i, cut in enumerate(radix_cuts(job, densities)):
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
    before, after = np.zeros((job.count, 256), np.int64), np.zeros((job.count, 256), np.int64)
    counting = left.copy()
    for s, e in job.spans():
        l1_histograms(*_chunk(job, s, e), modes, values, counting, keys, thresh, s, before, after)
    return np.array(l1_scales(list(before), list(after)), np.float64).astype(np.float32)


def gta_fused(method: str, job: TensorJob) -> Iterator[np.ndarray]:
    """task_arithmetic / ties / dare_ties on float32 work: ``methods._gta_numpy``'s bits, fused."""
    modes, values, left, keys, thresh = _masks(method, job, [float(p["density"]) for p in job.per_model])
    scales = np.ones(job.count, np.float32)
    if job.shared["rescale"] and modes.any():
        scales = _rescales(job, modes, values, left, keys, thresh)
    weights = np.array([np.float32(p["weight"]) for p in job.per_model], np.float32)
    divisor = weights[0]
    for w in weights[1:]:
        divisor = divisor + w
    divisor = np.float32(1) if abs(divisor) < 1e-8 else np.float32(divisor)
    lam = float(job.shared["lambda"])
    out = np.empty(0, np.float32)
    for s, e in job.spans():
        if out.size < e - s:
            out = np.empty(e - s, np.float32)  # the first chunk is the largest
        base, models = _chunk(job, s, e)
        gta_chunk(base, models, out[: e - s], modes, values, left, keys, thresh, s, scales, weights,
                  method != "task_arithmetic", bool(job.shared["normalize"]), divisor, np.float32(lam), lam != 1)
        yield out[: e - s]
