"""Weight-space distances between checkpoints, streamed one chunk of one tensor at a time.

Each chunk of each model is widened to float64 in a reused buffer, and every pair adds its dot
products to float64 accumulators grouped three ways: the whole model, each decoder layer, and each
module kind. Inputs are ``mmap``'d (page cache, not process memory), so two 7B checkpoints need
a few chunk buffers, not their state dicts. numpy only: no torch import on this path.

Task-vector statistics (``--base``): tau = model - base. Cosine of task vectors as in task
arithmetic (Ilharco et al. 2023, arXiv 2212.04089); the sign-conflict rate as in TIES-merging
(Yadav et al. 2023, arXiv 2306.01708): among coordinates both models changed, the fraction changed
in opposite directions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import combinations

import numpy as np

from soupkit.errors import SoupkitError
from soupkit.merge.engine import widen
from soupkit.merge.weights import EMBEDDING_MARKERS, layer_index
from soupkit.modeldir import Checkpoint

# 2 MiB of float64 per buffer: the handful of passes over one chunk stay in cache.
CHUNK = 1 << 18
Progress = Callable[[str, int, int], None]
# Accumulator slots: ||a||^2, ||b||^2, <a,b>, ||a-b||^2, ||ta||^2, ||tb||^2, <ta,tb>, both, opposite.
AA, BB, AB, DD, TA, TB, TAB, BOTH, OPP = range(9)
MODULE_KINDS = ("embeddings", "attention", "mlp", "norms", "other")


def module_kind(name: str) -> str:
    """Module kind of a tensor from its name (Llama/Mistral/Qwen/Gemma and GPT-2 naming)."""
    low = name.lower()
    if "norm" in low or ".ln_" in low or low.startswith("ln_"):
        return "norms"  # before attention: q_norm/k_norm live inside self_attn
    if any(m in low for m in EMBEDDING_MARKERS) or "lm_head" in low:
        return "embeddings"  # the LM head is the output embedding (tied to the input in some models)
    if "attn" in low or "attention" in low:
        return "attention"
    if "mlp" in low or "feed_forward" in low or "ffn" in low:
        return "mlp"
    return "other"


def float_names(ckpts: Sequence[Checkpoint], names: Sequence[str]) -> list[str]:
    """The floating-point tensors to compare (integer buffers are skipped; fp8 is refused)."""
    for ckpt in ckpts:
        for name in names:
            if ckpt.tensors[name].dtype.startswith("F8"):
                raise SoupkitError(f"tensor {name!r} in {ckpt.ref} is fp8; dequantise before inspecting")
    return [n for n in names if all(c.tensors[n].is_float for c in ckpts)]


class Scratch:
    """Reusable float32/float64 buffers for ``k`` models' chunks."""

    def __init__(self, k: int, size: int = CHUNK):
        self.f32 = np.empty(size, dtype=np.float32)
        self.x = [np.empty(size, dtype=np.float64) for _ in range(k)]
        self.t = [np.empty(size, dtype=np.float64) for _ in range(k)]
        self.d = np.empty(size, dtype=np.float64)
        self.neg = np.empty(size, dtype=bool)


def load_chunk(ckpt: Checkpoint, name: str, start: int, stop: int, scratch: Scratch, out: np.ndarray) -> np.ndarray:
    """float64 copy of elements ``[start, stop)`` of one tensor (exact for bf16/fp16/fp32)."""
    n = stop - start
    src = ckpt.array(name)[start:stop]
    info = ckpt.tensors[name]
    if info.dtype == "F64":
        np.copyto(out[:n], src)
    else:
        np.copyto(out[:n], widen(src, info.dtype, scratch.f32[:n]))
    return out[:n]


def dot(x: np.ndarray, y: np.ndarray) -> float:
    """float64 dot product without BLAS: a threaded BLAS ``ddot`` on a busy machine spins its
    threads and ran 100x slower here (OpenBLAS, 2 cores); einsum's own loop does not thread."""
    return float(np.einsum("i,i->", x, y))


def pair_chunk(x: np.ndarray, y: np.ndarray, tx: np.ndarray | None, ty: np.ndarray | None,
               sq: tuple[float, float], tsq: tuple[float, float], s: Scratch) -> np.ndarray:
    """The nine accumulator increments of one pair over one chunk (float64; counts as floats)."""
    n = x.size
    d = np.subtract(x, y, out=s.d[:n])
    row = np.zeros(9)
    row[[AA, BB]] = sq
    row[AB], row[DD] = dot(x, y), dot(d, d)  # ||a-b||^2 from a-b itself: no cancellation
    if tx is not None and ty is not None:
        prod = np.multiply(tx, ty, out=s.d[:n])
        row[[TA, TB]] = tsq
        row[TAB] = float(prod.sum())
        row[BOTH] = np.count_nonzero(prod)  # both changed <=> the product of the changes is non-zero
        row[OPP] = np.count_nonzero(np.less(prod, 0.0, out=s.neg[:n]))
    return row


def tensor_sums(ckpts: Sequence[Checkpoint], base: Checkpoint | None, name: str, s: Scratch) -> np.ndarray:
    """(pairs, 9) float64 sums over one tensor, streamed in chunks of ``CHUNK`` elements."""
    pairs = list(combinations(range(len(ckpts)), 2))
    total = np.zeros((len(pairs), 9))
    n = ckpts[0].tensors[name].numel
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        xs = [load_chunk(c, name, start, stop, s, s.x[i]) for i, c in enumerate(ckpts)]
        ts = task_chunks(xs, base, name, start, stop, s)
        sq = [dot(x, x) for x in xs]
        tsq = [dot(t, t) for t in ts] if ts else [0.0] * len(xs)
        for p, (i, j) in enumerate(pairs):
            ti, tj = (ts[i], ts[j]) if ts else (None, None)
            total[p] += pair_chunk(xs[i], xs[j], ti, tj, (sq[i], sq[j]), (tsq[i], tsq[j]), s)
    return total


def task_chunks(xs: list[np.ndarray], base: Checkpoint | None, name: str, start: int, stop: int,
                s: Scratch) -> list[np.ndarray]:
    """Task-vector chunks ``x - base`` for every model, or [] without a base."""
    if base is None:
        return []
    b = load_chunk(base, name, start, stop, s, s.d)
    return [np.subtract(x, b, out=s.t[i][: x.size]) for i, x in enumerate(xs)]


def stream_sums(ckpts: Sequence[Checkpoint], base: Checkpoint | None, names: Sequence[str],
                progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Accumulators keyed ``"all"``, ``"layer:<i>"`` and ``"module:<kind>"``, each (pairs, 9)."""
    scratch = Scratch(len(ckpts), min(CHUNK, max((ckpts[0].tensors[n].numel for n in names), default=1)))
    sums: dict[str, np.ndarray] = {}
    total = sum(ckpts[0].tensors[n].nbytes for n in names)
    done = 0
    for name in names:
        part = tensor_sums(ckpts, base, name, scratch)
        layer = layer_index(name)
        keys = ["all", f"module:{module_kind(name)}"] + ([f"layer:{layer}"] if layer is not None else [])
        for key in keys:
            sums[key] = sums[key] + part if key in sums else part.copy()
        done += ckpts[0].tensors[name].nbytes
        if progress is not None:
            progress("weights", done, total)
    return sums


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def metrics(row: np.ndarray, with_base: bool) -> dict[str, float | None]:
    """Distances from one accumulator row; None where undefined (a zero norm, nothing changed)."""
    out: dict[str, float | None] = {
        "l2": math.sqrt(row[DD]),  # math.sqrt returns a plain float: JSON-ready
        "relative_l2": _ratio(math.sqrt(row[DD]), math.sqrt(row[AA])),
        "cosine": _ratio(row[AB], math.sqrt(row[AA] * row[BB])),
    }
    if with_base:
        out["task_norm_a"], out["task_norm_b"] = math.sqrt(row[TA]), math.sqrt(row[TB])
        out["task_cosine"] = _ratio(row[TAB], math.sqrt(row[TA] * row[TB]))
        out["sign_conflict"] = _ratio(row[OPP], row[BOTH])
    return out


def pair_stats(sums: dict[str, np.ndarray], p: int, with_base: bool) -> dict:
    """Global, per-layer and per-module metrics of pair ``p``."""
    layers = sorted(int(k.split(":")[1]) for k in sums if k.startswith("layer:"))
    modules = [k for k in MODULE_KINDS if f"module:{k}" in sums]
    stats = metrics(sums["all"][p], with_base)
    stats["layers"] = [{"layer": i, **metrics(sums[f"layer:{i}"][p], with_base)} for i in layers]
    stats["modules"] = [{"module": k, **metrics(sums[f"module:{k}"][p], with_base)} for k in modules]
    return stats


def weight_stats(ckpts: Sequence[Checkpoint], base: Checkpoint | None, names: Sequence[str],
                 progress: Progress | None = None) -> list[dict]:
    """One stats dict per pair ``(i, j)``, ``i < j``, in ``itertools.combinations`` order."""
    sums = stream_sums(ckpts, base, float_names(list(ckpts) + ([base] if base else []), names), progress)
    if "all" not in sums:
        raise SoupkitError(f"{ckpts[0].ref}: no floating-point tensors to compare")
    n_pairs = len(ckpts) * (len(ckpts) - 1) // 2
    return [pair_stats(sums, p, base is not None) for p in range(n_pairs)]
