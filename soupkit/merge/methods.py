"""Native task-vector merges: per-tensor numpy kernels with mergekit's semantics, and their parameters.

The numpy code here is the reference; the fused numba kernels of ``soupkit.merge.kernels`` run the
same arithmetic (bit for bit on float32 work) unless ``SOUPKIT_JIT=0``, and are imported only then.

Each method streams one tensor: a first pass over its chunks computes what needs the whole tensor
(TIES's magnitude cut, DARE's L1 rescale, the Gram matrix behind SLERP's angle and Model Stock's
cosine), then the merged float32 tensor is produced chunk by chunk, every step elementwise, and the
engine rounds each chunk once to the output dtype. The semantics are mergekit 0.1.5's (read from its
source and its papers; no code is copied), checked against mergekit's output in
``tests/merge/test_methods.py`` and ``tests/merge/test_mergekit_yaml.py``:

- ``task_arithmetic`` (Ilharco et al. 2023, arXiv 2212.04089): base + lambda * sum_i w_i d_i, with
  d_i = x_i - base, divided by sum_i w_i when ``normalize``.
- ``ties`` (Yadav et al. 2023, arXiv 2306.01708): each d_i keeps its ``density`` fraction of largest
  magnitudes, is scaled by w_i; a sign is elected per element from the sum of the scaled deltas; the
  deltas that agree with it are summed and (``normalize``) divided by the sum of their weights.
- ``dare_ties`` (Yu et al. 2024, arXiv 2311.03099): as ties, but each d_i keeps a random ``density``
  fraction of its elements (seeded), rescaled (``rescale``) so its L1 norm is unchanged.
- ``slerp``: spherical interpolation between the base (t = 0) and the other model (t = 1), each tensor
  flattened; nearly parallel tensors (|cos| > 0.9995) are interpolated linearly.
- ``model_stock`` (Jang et al. 2024, arXiv 2403.19522): with c the mean pairwise cosine of the task
  vectors and N their count, t = N c / (1 + (N - 1) c); result t * mean(x_i) + (1 - t) * base.
- ``task_slerp`` (WARP, Rame et al. 2024, arXiv 2406.16768): SLERP of the task vectors relative to
  the init: init + sin((1-t)O)/sin(O) d_1 + sin(tO)/sin(O) d_2, O the angle between d_1 and d_2. For
  M > 2 task vectors the definition used here is the iterated one: the running merge of the first
  m - 1 with the m-th at t = 1/m, so every policy counts equally.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from soupkit.errors import SoupkitError
from soupkit.merge.weights import layer_index

DOT_THRESHOLD = 0.9995
"""|cos| above which two tensors count as parallel and SLERP falls back to linear interpolation."""


@dataclass(frozen=True)
class Method:
    """What a native task-vector method accepts: its parameters (with defaults; None = required) and
    how many inputs it takes. ``shared`` parameters are method-wide; ``per_model`` ones may also be
    given method-wide, as in mergekit (a per-model value wins)."""

    shared: dict[str, Any]
    per_model: dict[str, Any] = field(default_factory=dict)
    min_models: int = 1
    """Models besides the base."""
    max_models: int | None = None
    base_in_models: bool = False
    """The base counts as one of the inputs (slerp's two, model_stock's three)."""


GTA_SHARED = {"int8_mask": False, "lambda": 1.0}
GTA_METHODS = ("task_arithmetic", "ties", "dare_ties")
"""The task-arithmetic family: task vectors, trimmed or dropped, summed (with TIES's sign election)."""
METHODS: dict[str, Method] = {
    "task_arithmetic": Method({**GTA_SHARED, "normalize": False, "rescale": False},
                              {"weight": None, "density": 1.0}),
    "ties": Method({**GTA_SHARED, "normalize": True, "rescale": False}, {"weight": None, "density": 1.0}),
    "dare_ties": Method({**GTA_SHARED, "normalize": False, "rescale": True}, {"weight": None, "density": 1.0}),
    "slerp": Method({"t": None}, min_models=1, max_models=1, base_in_models=True),
    "model_stock": Method({"filter_wise": False}, min_models=2, base_in_models=True),
    "task_slerp": Method({"t": 0.5}, min_models=2),
}
"""The task-vector methods soupkit runs natively (``merge.backend: mergekit`` runs them through mergekit)."""


# ---------------------------------------------------------------------------------------------
# streaming: a statistics pass where a method needs one (a top-k cut, norms, dot products), then the
# output chunk by chunk; every step after the statistics is elementwise, so chunking changes no bit

CHUNK = 1 << 20
GOLDEN = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1
Read = Callable[[int, int, int], np.ndarray]
"""``read(j, start, stop)``: float32 elements [start, stop) of input j (0 = the base, then the models);
the array may be scratch space reused by the next read of the same input."""


@dataclass
class TensorJob:
    """One tensor's inputs and its parameters, resolved for this tensor."""

    name: str
    shape: tuple[int, ...]
    read: Read
    count: int
    """Models besides the base."""
    per_model: list[dict[str, Any]]
    shared: dict[str, Any]
    seed: int
    work: str | None = None
    """A mergekit YAML's ``dtype`` (F16, BF16): the task-arithmetic family computes in it, as mergekit does."""
    stored: Read | None = None
    """``read`` without the widening, where every input is stored alike as float32 or as bfloat16
    (uint16 bits): the fused kernels widen inside their loop. None: they use ``read``."""

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def spans(self, step: int | None = None) -> Iterator[tuple[int, int]]:
        step = step or CHUNK  # read at call time (the tests shrink it)
        for start in range(0, self.size, step):
            yield start, min(start + step, self.size)


def arrays_job(base: np.ndarray, models: list[np.ndarray], shape: tuple[int, ...] | None = None,
               per_model: list[dict[str, Any]] | None = None, shared: dict[str, Any] | None = None,
               name: str = "w", seed: int = 0, work: str | None = None) -> TensorJob:
    """A job over in-memory float32 arrays (for the library's callers and tests)."""
    inputs = [np.asarray(base, np.float32).reshape(-1)] + [np.asarray(m, np.float32).reshape(-1) for m in models]
    read = lambda j, s, e: inputs[j][s:e]  # noqa: E731
    return TensorJob(name, shape or (inputs[0].size,), read, len(models), per_model or [{}] * len(models),
                     shared or {}, seed, work, read)


def merge_stream(method: str, job: TensorJob) -> Iterator[np.ndarray]:
    """The merged tensor, float32, chunk after chunk (a chunk may be scratch space the next reuses)."""
    return prepare(method, job)()


def prepare(method: str, job: TensorJob, helper: Executor | None = None) -> Callable[[], Iterator[np.ndarray]]:
    """``merge_stream`` in two steps: the tensor's statistics (TIES's cuts, DARE's L1 rescales, the
    dot products of SLERP and Model Stock) computed now, on the fused path, and a function that runs
    the output pass. The engine prepares the next tensors in a second thread while it writes this one;
    ``helper`` (that thread) takes half of TIES's and DARE's per-model statistics while the caller
    computes the rest (the engine's first tensor, which nothing else overlaps). The numpy reference
    (``SOUPKIT_JIT=0``, or a narrower working dtype) does everything when called."""
    if jit_enabled() and (job.work is None or method not in GTA_METHODS):
        from soupkit.merge.kernels import prepared

        return prepared(method, job, helper)
    if method in GTA_METHODS:
        return lambda: _gta_numpy(method, job)
    if method == "model_stock":
        return lambda: _model_stock_numpy(job)
    return lambda: _slerp_numpy(method, job)


def merge_array(method: str, job: TensorJob) -> np.ndarray:
    """The whole merged tensor as one float32 array."""
    return np.concatenate([chunk.copy() for chunk in merge_stream(method, job)] or [np.zeros(0, np.float32)])


# --- rounding to a working dtype ------------------------------------------------------------------


def rounder(work: str | None) -> Callable[[Any], Any]:
    """float32 -> float32 rounding through the working dtype (identity for float32)."""
    if work == "F16":
        return lambda a: np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)
    if work == "BF16":
        return _round_bf16
    return lambda a: a


def _round_bf16(a: Any) -> Any:
    """Round float32 to the nearest bfloat16 (ties to even), kept as float32; NaN stays NaN."""
    a = np.asarray(a, dtype=np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(a), a, rounded).astype(np.float32)


def _sum(items: Sequence[Any]) -> Any:
    """Left-to-right float32 sum."""
    acc = items[0].copy() if isinstance(items[0], np.ndarray) else items[0]
    for item in items[1:]:
        acc = acc + item
    return acc


# --- task_arithmetic, ties, dare_ties -------------------------------------------------------------


@dataclass
class Cut:
    """Where TIES trims one task vector: keep |d| > value, and the first ``ties`` elements equal to it
    (mergekit's pick among equal magnitudes is argsort's, unspecified; soupkit keeps the earliest)."""

    value: float
    ties: int


def magnitude_cut(job: TensorJob, i: int, density: float, scratch: np.ndarray) -> Cut | None:
    """The cut keeping the ``max(1, int(density * n))`` largest |d_i| (None: keep all)."""
    n = job.size
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return Cut(math.inf, 0)
    r = rounder(job.work)
    mags = scratch[:n]
    for s, e in job.spans():
        base = r(job.read(0, s, e))
        np.abs(r(r(job.read(i + 1, s, e)) - base), out=mags[s:e])
    k = max(1, int(density * n))
    mags.partition(n - k)  # in place: mags[n - k] is the k-th largest, everything after it is >= it
    value = float(mags[n - k])
    return Cut(value, k - int(np.count_nonzero(mags[n - k + 1:] > value)))


def dare_key(seed: int, name: str, index: int) -> int:
    """The 64-bit key of DARE's mask of model ``index``'s task vector in tensor ``name``."""
    key = _mix64((seed + GOLDEN) & MASK64)
    key = _mix64((key ^ zlib.crc32(name.encode())) & MASK64)
    return _mix64((key + index * GOLDEN) & MASK64)


def _mix64(z: int) -> int:
    """splitmix64's finaliser on a Python int (the kernels' ``_mix``)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def dare_threshold(density: float) -> int:
    """Element kept when the top 53 bits of its hash are below this: probability ``density`` exactly."""
    return 0 if density <= 0 else min(1 << 53, int(density * (1 << 53)))


def dare_mask(seed: int, name: str, index: int, start: int, stop: int, density: float) -> np.ndarray:
    """DARE's Bernoulli(density) keep-mask of elements [start, stop) of model ``index``'s task vector:
    element k is kept when splitmix64(key + (k + 1) * golden) >> 11 < density * 2^53, the key hashed
    from (seed, crc32 of the tensor name, model): counter-based, so the same whatever the chunking and
    the order in which tensors are merged."""
    z = np.arange(start + 1, stop + 1, dtype=np.uint64) * np.uint64(GOLDEN) + np.uint64(dare_key(seed, name, index))
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)) < np.uint64(dare_threshold(density))


def jit_enabled() -> bool:
    """The fused numba kernels run unless ``SOUPKIT_JIT=0``."""
    return os.environ.get("SOUPKIT_JIT", "1") != "0"


def _gta_numpy(method: str, job: TensorJob) -> Iterator[np.ndarray]:
    """The numpy reference of task_arithmetic / ties / dare_ties (one numpy pass per operation)."""
    r = rounder(job.work)
    densities = [float(p["density"]) for p in job.per_model]
    cuts: list[Cut | None] = [None] * job.count
    if method == "ties":
        scratch = np.empty(job.size, np.float32)
        cuts = [magnitude_cut(job, i, d, scratch) for i, d in enumerate(densities)]
    scales = _l1_scales(method, job, cuts, densities) if job.shared["rescale"] else [1.0] * job.count
    weights = [r(np.float32(p["weight"])) for p in job.per_model]
    left = [cut.ties if cut else 0 for cut in cuts]
    for s, e in job.spans():
        base = r(job.read(0, s, e))
        deltas = []
        for i in range(job.count):
            delta = r(r(job.read(i + 1, s, e)) - base)
            mask = _keep(method, job, i, s, e, delta, cuts[i], left, densities[i])
            if mask is not None:
                np.multiply(delta, mask, out=delta)
                if scales[i] != 1.0:
                    delta *= np.float32(scales[i])
            deltas.append(r(delta))
        combine = _combine if job.work else _combine32
        yield combine(base, deltas, weights, method != "task_arithmetic", job, r)


def _keep(method: str, job: TensorJob, i: int, s: int, e: int, delta: np.ndarray, cut: Cut | None,
          left: list[int], density: float) -> np.ndarray | None:
    """This chunk's keep-mask of model i's task vector (None: keep all)."""
    if method == "dare_ties" and density < 1:
        return dare_mask(job.seed, job.name, i, s, e, density)
    if cut is None:
        return None
    mags = np.abs(delta)
    keep = mags > cut.value
    if left[i] > 0:
        equal = np.flatnonzero(mags == cut.value)[: left[i]]
        keep[equal] = True
        left[i] -= equal.size
    return keep


def _l1_scales(method: str, job: TensorJob, cuts: list[Cut | None], densities: list[float]) -> list[float]:
    """``rescale``: each trimmed task vector is scaled back to its L1 norm (unless either norm is ~0)."""
    r = rounder(job.work)
    before = [np.zeros(L1_BINS, np.int64) for _ in range(job.count)]
    after = [np.zeros(L1_BINS, np.int64) for _ in range(job.count)]
    left = [cut.ties if cut else 0 for cut in cuts]
    for s, e in job.spans():
        base = r(job.read(0, s, e))
        for i in range(job.count):
            delta = r(r(job.read(i + 1, s, e)) - base)
            mask = _keep(method, job, i, s, e, delta, cuts[i], left, densities[i])
            magnitude = np.abs(delta)
            before[i] += l1_histogram(magnitude)
            after[i] += l1_histogram(magnitude if mask is None else magnitude[mask])
    return l1_scales(before, after)


L1_BINS = 512
"""An exact L1 norm's histogram: bin e (1 <= e < 511) holds integers weighing 2^(e - 150) each (a
float32's significand sits in bin max(exponent, 1)); bin 511 counts infinities and NaNs."""


def l1_histogram(magnitude: np.ndarray) -> np.ndarray:
    """The exact sum of ``magnitude`` (float32, >= 0) as an ``L1_BINS`` histogram (int64)."""
    bits = np.ascontiguousarray(magnitude, dtype=np.float32).view(np.uint32)
    exponent = bits >> 23
    finite = exponent < 255
    significand = (bits & 0x7FFFFF) | np.where(exponent > 0, np.uint32(0x800000), np.uint32(0))
    # float64 weights are exact: at most CHUNK * 2^24 = 2^44 < 2^53 per bin and chunk
    out = np.bincount(np.maximum(exponent, 1)[finite], weights=significand[finite], minlength=L1_BINS)
    out = out.astype(np.int64)
    out[L1_BINS - 1] = np.count_nonzero(~finite)
    return out


def l1_norm(histogram: np.ndarray) -> float:
    """The exact sum behind an ``l1_histogram``, rounded once to float64 (NaN if any |d| is inf/NaN)."""
    if histogram[L1_BINS - 1]:
        return math.nan
    total = sum(int(h) << e for e, h in enumerate(histogram[:L1_BINS - 1].tolist()) if h)
    return total / (1 << 150)


def l1_scales(before: list[np.ndarray], after: list[np.ndarray]) -> list[float]:
    """Per model: L1 before / L1 after the trim (1 when either is below 1e-7, as mergekit)."""
    out = []
    for b_hist, a_hist in zip(before, after):
        b, a = l1_norm(b_hist), l1_norm(a_hist)
        out.append(b / a if b >= 1e-7 and a >= 1e-7 else 1.0)
    return out


def _combine(base: np.ndarray, deltas: list[np.ndarray], weights: list[Any], consensus: bool, job: TensorJob,
             r: Callable[[Any], Any]) -> np.ndarray:
    """base + lambda * (sum of weighted, optionally sign-agreeing deltas) [/ their weight sum], with every
    step rounded to the working dtype (sums accumulate in float32 and round once, as torch's do)."""
    for d, w in zip(deltas, weights):
        np.multiply(d, w, out=d)
        d[:] = r(d)
    if consensus:
        total = r(_sum(deltas))
        majority = np.where(total >= 0, np.float32(1), np.float32(-1))
        agree = [np.sign(d) == majority for d in deltas]
        mixed = r(_sum([d * m for d, m in zip(deltas, agree)]))
        divisor = r(_sum([w * m.astype(np.float32) for w, m in zip(weights, agree)]))
        divisor[divisor == 0] = 1
    else:
        mixed = r(_sum(deltas))
        divisor = r(_sum(weights))
        divisor = np.float32(1) if abs(divisor) < 1e-8 else divisor
    if job.shared["normalize"]:
        mixed = r(np.divide(mixed, divisor, dtype=np.float32))
    if float(job.shared["lambda"]) != 1:
        mixed = r(mixed * np.float32(job.shared["lambda"]))
    return r(base + mixed)


def _combine32(base: np.ndarray, deltas: list[np.ndarray], weights: list[Any], consensus: bool, job: TensorJob,
               r: Callable[[Any], Any]) -> np.ndarray:
    """``_combine`` in float32, in place: the same operations in the same order, so the same bits."""
    for d, w in zip(deltas, weights):
        d *= w
    mixed = _sum(deltas)
    if consensus:
        positive = mixed >= 0  # the elected sign, from the sum of the weighted deltas
        negative = ~positive
        divisor = np.zeros_like(mixed)
        for i, (d, w) in enumerate(zip(deltas, weights)):
            agree = (d > 0) & positive  # sign(d) == the elected sign (np.where on booleans is slow)
            agree |= (d < 0) & negative
            np.multiply(d, agree, out=d)
            divisor += agree.astype(np.float32) * w  # (a masked ufunc with where= is ~30x slower)
            if i == 0:
                mixed[:] = d
            else:
                mixed += d
        np.copyto(divisor, np.float32(1), where=divisor == 0)
    else:
        divisor = _sum(weights)
        divisor = np.float32(1) if abs(divisor) < 1e-8 else divisor
    if job.shared["normalize"]:
        np.divide(mixed, divisor, out=mixed)
    if float(job.shared["lambda"]) != 1:
        mixed *= np.float32(job.shared["lambda"])
    mixed += base
    return mixed


# --- slerp, task_slerp ------------------------------------------------------------------------------


def gram(job: TensorJob, vectors: Callable[[int, int], list[np.ndarray]], count: int) -> np.ndarray:
    """float64 matrix of dot products of the ``count`` vectors ``vectors(start, stop)`` yields per chunk."""
    g = np.zeros((count, count))
    for s, e in job.spans():
        chunk = [v.astype(np.float64) for v in vectors(s, e)]
        for a in range(count):
            for b in range(a, count):
                g[a, b] += float(np.dot(chunk[a], chunk[b]))
    return np.triu(g) + np.triu(g, 1).T


def slerp_coefficients(t: float, g: np.ndarray, eps: float = 1e-8) -> tuple[float, float]:
    """For two vectors with Gram matrix ``g``: (sin((1-t)O)/sin O, sin(tO)/sin O), or the linear
    (1 - t, t) when they are nearly parallel (|cos O| > 0.9995) or either is ~0 (as mergekit)."""
    na, nb = math.sqrt(max(g[0, 0], 0.0)), math.sqrt(max(g[1, 1], 0.0))
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = min(1.0, max(-1.0, g[0, 1] / (na * nb)))
    t32 = float(np.float32(t))
    if abs(dot) > DOT_THRESHOLD:
        return float(np.float32(1) - np.float32(t32)), t32
    theta = math.acos(dot)
    return math.sin((1 - t32) * theta) / math.sin(theta), math.sin(t32 * theta) / math.sin(theta)


def task_slerp_coefficients(g: np.ndarray, t: float) -> list[float]:
    """Coefficients c of WARP's merged task vector sum_i c_i d_i, from the task vectors' Gram matrix:
    two at ``t``; more iteratively, the m-th joining the running merge r at t = 1/m (r . d_m and |r|^2
    follow from the Gram matrix, so r is never materialised)."""
    if len(g) == 2:
        return list(slerp_coefficients(t, g))
    c = np.zeros(len(g))
    c[0] = 1.0
    for m in range(1, len(g)):
        pair = np.array([[c @ g @ c, c @ g[:, m]], [c @ g[:, m], g[m, m]]])
        ca, cb = slerp_coefficients(1.0 / (m + 1), pair)
        c *= ca
        c[m] += cb
    return c.tolist()


def slerp_family_coefficients(method: str, job: TensorJob, g: np.ndarray) -> tuple[list[float], bool]:
    """The float64 coefficients of the vectors (slerp: base and model; task_slerp: the task vectors)
    from their Gram matrix, and whether the base is added (task_slerp)."""
    if method == "slerp":
        return list(slerp_coefficients(job.shared["t"], g)), False
    return task_slerp_coefficients(g, job.shared["t"]), True


def _slerp_numpy(method: str, job: TensorJob) -> Iterator[np.ndarray]:
    """slerp: base and model at ``t``; task_slerp: the init plus a SLERP of the task vectors."""
    if method == "slerp":
        g = gram(job, lambda s, e: [job.read(0, s, e), job.read(1, s, e)], 2)
    else:
        g = gram(job, lambda s, e: _deltas(job, s, e), job.count)
    coefficients, offset = slerp_family_coefficients(method, job, g)
    c32 = [np.float32(c) for c in coefficients]
    for s, e in job.spans():
        vectors = _deltas(job, s, e) if offset else [job.read(0, s, e), job.read(1, s, e)]
        out = _sum([c * v for c, v in zip(c32, vectors)])
        yield job.read(0, s, e) + out if offset else out


def _deltas(job: TensorJob, s: int, e: int) -> list[np.ndarray]:
    base = job.read(0, s, e)
    return [job.read(i + 1, s, e) - base for i in range(job.count)]


# --- model_stock -----------------------------------------------------------------------------------


def _model_stock_numpy(job: TensorJob) -> Iterator[np.ndarray]:
    """Model Stock: interpolate from the base to the models' mean by t = N c / (1 + (N - 1) c), c the
    mean pairwise cosine of the task vectors over the tensor (per row with ``filter_wise``)."""
    if job.size == 0:
        return
    rows, width, step = stock_rows(job)
    t = _stock_t(job, rows, width, step)
    count = np.float32(job.count)
    for s, e in job.spans(step):
        base = job.read(0, s, e)
        average = _sum([job.read(i + 1, s, e) for i in range(job.count)]) / count
        tt = np.repeat(t[s // width: e // width], width) if rows > 1 else t[0]
        yield tt * average + (np.float32(1) - tt) * base


def stock_rows(job: TensorJob) -> tuple[int, int, int]:
    """Model Stock's rows (1 unless ``filter_wise``), their width, and the chunk step (whole rows)."""
    rows = job.shape[0] if job.shared["filter_wise"] and len(job.shape) > 1 else 1
    width = job.size // rows
    return rows, width, max(1, CHUNK // width) * width if rows > 1 else CHUNK


def stock_pairs(count: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(count) for b in range(a, count)]


def _stock_t(job: TensorJob, rows: int, width: int, step: int) -> np.ndarray:
    """float32 t per row (one row: the whole tensor)."""
    pairs = stock_pairs(job.count)
    dots = {p: np.zeros(rows) for p in pairs}
    for s, e in job.spans(step):
        deltas = [d.astype(np.float64).reshape(-1, width if rows > 1 else e - s) for d in _deltas(job, s, e)]
        for a, b in pairs:
            dots[a, b][s // width: e // width if rows > 1 else 1] += (deltas[a] * deltas[b]).sum(axis=-1)
    return stock_t(dots, job.count)


def stock_t(dots: dict[tuple[int, int], np.ndarray], count: int) -> np.ndarray:
    """float32 t per row from the float64 dot products of the task vectors (``stock_pairs``)."""
    pairs = stock_pairs(count)
    norms = [np.sqrt(dots[i, i]) for i in range(count)]
    cosines = [np.clip(dots[a, b] / np.maximum(norms[a] * norms[b], 1e-6), -1, 1) for a, b in pairs if a < b]
    cos = np.mean(cosines, axis=0)
    denominator = 1 + (count - 1) * cos
    singular = np.abs(denominator) < 1e-6
    return np.where(singular, 0.0, count * cos / np.where(singular, 1.0, denominator)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# parameters: mergekit's per-tensor semantics


def mergekit_t(name: str, num_layers: int) -> float:
    """mergekit's position of a tensor for list ("gradient") parameters: layer i of L at i/(L-1)
    (1 for a single layer); every tensor outside the layers (embeddings, final norm, LM head) at 0."""
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(setting: Any, name: str, t: float) -> Any:
    """A parameter value for one tensor: a scalar, a list interpolated over depth, or a mapping from
    tensor-name substrings (first match, else ``default``); None when nothing matches."""
    if isinstance(setting, dict):
        for key, value in setting.items():
            if key != "default" and key in name:
                return evaluate(value, name, t)
        return evaluate(setting["default"], name, t) if "default" in setting else None
    if isinstance(setting, list):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            x = t * (len(setting) - 1)
            i0 = int(x)
            i1 = min(len(setting) - 1, i0 + 1)
            return (1 - (x - i0)) * setting[i0] + (x - i0) * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    return setting


def resolve(setting: Any, name: str, t: float, where: str) -> Any:
    value = evaluate(setting, name, t)
    if value is None:
        raise SoupkitError(f"{where}: no key matches tensor {name!r} and there is no 'default'")
    return value


# ---------------------------------------------------------------------------------------------
# validation: before any weight is read, without importing mergekit


@dataclass(frozen=True)
class TaskRoles:
    """Which ingredients are merged onto the base, and every parameter setting (defaults filled in)."""

    indices: list[int]
    """Ingredients besides the base (an ingredient that is the base is the base, as in mergekit)."""
    per_model: list[dict[str, Any]]
    shared: dict[str, Any]


def roles(spec: Any) -> TaskRoles:
    """Check ``spec`` (a MergeSpec of a native task-vector method) and resolve its settings."""
    method = METHODS[spec.method]
    if spec.base is None:
        raise SoupkitError(f"merge.base: method {spec.method} needs a base model")
    indices = [i for i, ing in enumerate(spec.models) if ing.model != spec.base]
    _check_count(spec.method, method, len(indices))
    _check_keys(spec, method)
    shared = {key: spec.parameters.get(key, default) for key, default in method.shared.items()}
    for key, value in shared.items():
        if value is None:
            raise SoupkitError(f"merge.parameters.{key}: required by method {spec.method}")
        _check_value(value, f"merge.parameters.{key}", bool if isinstance(method.shared[key], bool) else float)
    if spec.method == "task_slerp" and len(indices) > 2 and "t" in spec.parameters:
        raise SoupkitError("merge.parameters.t: task_slerp of more than two models weighs them equally "
                           "(the m-th joins at t = 1/m); t applies to exactly two")
    return TaskRoles(indices, [_model_settings(spec, method, i) for i in indices], shared)


def _check_count(name: str, method: Method, count: int) -> None:
    low, high = method.min_models, method.max_models
    if count < low or (high is not None and count > high):
        extra = int(method.base_in_models)  # slerp's 2 and model_stock's 3 inputs count the base, as mergekit says
        want = f"exactly {low + extra}" if low == high else f"at least {low + extra}"
        what = "models (counting the base)" if extra else "models besides the base"
        raise SoupkitError(f"merge.models: method {name} needs {want} {what}; got {count + extra}")


def _check_keys(spec: Any, method: Method) -> None:
    from soupkit.errors import did_you_mean

    known = list(method.shared) + list(method.per_model)
    for key in spec.parameters:
        if key not in known:
            raise SoupkitError(f"merge.parameters.{key}: unknown parameter for {spec.method}"
                               f"{did_you_mean(key, known)}; {spec.method} takes: {', '.join(known)}")
    per_model = [k for k in method.per_model if k != "weight"]
    for i, ing in enumerate(spec.models):
        if ing.weight is not None and "weight" not in method.per_model:
            raise SoupkitError(f"merge.models[{i}].weight: method {spec.method} takes no weights")
        for key in ing.parameters:
            if key not in per_model:
                hint = " (give it as 'weight:' next to 'model:')" if key == "weight" else did_you_mean(key, per_model)
                raise SoupkitError(f"merge.models[{i}].parameters.{key}: unknown per-model parameter for "
                                   f"{spec.method}{hint}; per-model parameters: {', '.join(per_model) or 'none'}")


def _model_settings(spec: Any, method: Method, i: int) -> dict[str, Any]:
    ing = spec.models[i]
    out = {}
    for key, default in method.per_model.items():
        value = ing.weight if key == "weight" else ing.parameters.get(key)
        value = spec.parameters.get(key, default) if value is None else value
        where = f"merge.models[{i}].{'weight' if key == 'weight' else 'parameters.' + key}"
        if value is None:
            raise SoupkitError(f"{where}: required by method {spec.method}")
        _check_value(value, where, float)
        out[key] = value
    return out


def _check_value(value: Any, where: str, kind: type) -> None:
    """A setting is a scalar of ``kind``, a list of them (over depth) or a ``{substring: ...}`` mapping."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_value(item, f"{where}[{key!r}]", kind)
        return
    for item in value if isinstance(value, list) else [value]:
        ok = isinstance(item, bool) if kind is bool else (isinstance(item, (int, float)) and not isinstance(item, bool)
                                                           and math.isfinite(item))
        if not ok:
            raise SoupkitError(f"{where}: expected {'true/false' if kind is bool else 'a finite number'}, got {item!r}")
