"""Native task-vector merges: per-tensor numpy kernels with mergekit's semantics, and their parameters.

Each kernel takes whole tensors as flat float32 arrays (a global step such as TIES's top-k, a norm or
an angle needs the whole tensor) and returns the merged float32 tensor; the engine rounds it once to
the output dtype. The semantics are mergekit 0.1.5's (read from its source and its papers; no code
is copied), checked against mergekit's output in ``tests/merge/test_methods.py``:

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
  M > 2 task vectors it is applied iteratively as the paper does: the running merge of the first
  m - 1 with the m-th at t = 1/m, so every policy counts equally.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
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
# kernels: flat float32 arrays in, a float32 array out


def top_magnitude_mask(delta: np.ndarray, density: float) -> np.ndarray | None:
    """Boolean mask of the ``max(1, int(density * n))`` largest |delta| (None: keep all). Among equal
    magnitudes at the cut the earliest elements are kept (mergekit's order there is unspecified)."""
    n = delta.size
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    k = max(1, int(density * n))
    mag = np.abs(delta)
    cut = np.partition(mag, n - k)[n - k]
    keep = mag > cut
    missing = k - int(np.count_nonzero(keep))
    if missing > 0:
        keep[np.flatnonzero(mag == cut)[:missing]] = True
    return keep


def random_mask(n: int, density: float, rng: np.random.Generator) -> np.ndarray | None:
    """Bernoulli(density) keep-mask (None: keep all)."""
    if density >= 1:
        return None
    return rng.random(n) < density


def apply_mask(delta: np.ndarray, mask: np.ndarray | None, rescale: bool) -> np.ndarray:
    """``delta * mask``, rescaled to the L1 norm of ``delta`` when asked (unless either norm is ~0)."""
    if mask is None:
        return delta
    masked = delta * mask
    if rescale:
        before = float(np.abs(delta, dtype=np.float64).sum())
        after = float(np.abs(masked, dtype=np.float64).sum())
        if before >= 1e-7 and after >= 1e-7:
            masked *= np.float32(before / after)
    return masked


def generalized_task_arithmetic(base: np.ndarray, deltas: list[np.ndarray], weights: Sequence[float], *,
                                consensus: bool, normalize: bool, lam: float, work: str | None = None) -> np.ndarray:
    """base + lambda * (sum of weighted, optionally sign-agreeing deltas) [/ their weight sum].

    ``deltas`` are already sparsified; they are scaled in place. ``work`` (F16 or BF16): round every
    step to that dtype as mergekit's arithmetic in a configuration's ``dtype`` does (sums accumulate
    in float32 and round once, as torch's do)."""
    r = rounder(work)
    w = [r(np.float32(x)) for x in weights]
    for d, wi in zip(deltas, w):
        np.multiply(d, wi, out=d)
        d[:] = r(d)
    if consensus:
        total = r(_sum(deltas))
        majority = np.where(total >= 0, np.float32(1), np.float32(-1))
        masks = [np.sign(d) == majority for d in deltas]
        mixed = r(_sum([d * m for d, m in zip(deltas, masks)]))
        divisor = r(_sum([wi * m.astype(np.float32) for wi, m in zip(w, masks)]))
        divisor[divisor == 0] = 1
    else:
        mixed = r(_sum(deltas))
        divisor = r(_sum(w))
        divisor = np.float32(1) if abs(divisor) < 1e-8 else divisor
    if normalize:
        mixed = r(np.divide(mixed, divisor, dtype=np.float32))
    if lam != 1:
        mixed = r(mixed * np.float32(lam))
    return r(base + mixed)


def rounder(work: str | None) -> Any:
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


def slerp(t: float, a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1) of two flat float32 arrays: the
    coefficients come from the angle between them (float64), and multiply the raw arrays."""
    ca, cb = slerp_coefficients(t, a, b, eps)
    return np.float32(ca) * a + np.float32(cb) * b


def slerp_coefficients(t: float, a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> tuple[float, float]:
    """(sin((1-t)O)/sin O, sin(tO)/sin O), or the linear (1-t, t) when |cos O| > 0.9995."""
    na = float(np.linalg.norm(a.astype(np.float64)))
    nb = float(np.linalg.norm(b.astype(np.float64)))
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = min(1.0, max(-1.0, float(np.dot(a.astype(np.float64), b.astype(np.float64))) / (na * nb)))
    t32 = float(np.float32(t))
    if abs(dot) > DOT_THRESHOLD or a.size == 0:
        return float(np.float32(1) - np.float32(t32)), t32
    theta = math.acos(dot)
    return math.sin((1 - t32) * theta) / math.sin(theta), math.sin(t32 * theta) / math.sin(theta)


def task_slerp(init: np.ndarray, deltas: list[np.ndarray], t: float) -> np.ndarray:
    """WARP's SLERP of task vectors: two at ``t``; more iteratively, the m-th at t = 1/m."""
    if len(deltas) == 2:
        return init + slerp(t, deltas[0], deltas[1])
    running = deltas[0]
    for m, delta in enumerate(deltas[1:], start=2):
        running = slerp(1.0 / m, running, delta)
    return init + running


def model_stock(base: np.ndarray, models: list[np.ndarray], shape: tuple[int, ...], filter_wise: bool) -> np.ndarray:
    """Model Stock: interpolate from the base to the models' mean by t = N c / (1 + (N - 1) c)."""
    rows = shape[0] if filter_wise and len(shape) > 1 else 1
    w0 = base.reshape(rows, -1)
    ws = [x.reshape(rows, -1) for x in models]
    offsets = [(x - w0).astype(np.float64) for x in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
            cosines.append(np.clip((a * b).sum(axis=-1) / np.maximum(norms, 1e-6), -1, 1))
    cos = np.mean(cosines, axis=0)[:, None]
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = np.abs(denominator) < 1e-6
    t = np.where(singular, 0.0, count * cos / np.where(singular, 1.0, denominator)).astype(np.float32)
    average = _sum(ws) / np.float32(count)
    return (t * average + (np.float32(1) - t) * w0).reshape(-1)


# ---------------------------------------------------------------------------------------------
# one tensor: inputs and resolved parameters -> merged float32 array


@dataclass
class TensorJob:
    """One tensor's inputs (float32) and its parameters, resolved for this tensor."""

    name: str
    shape: tuple[int, ...]
    base: np.ndarray | None
    models: list[np.ndarray]
    """The inputs besides the base, in recipe order."""
    per_model: list[dict[str, Any]]
    shared: dict[str, Any]
    seed: int
    work: str | None = None
    """A mergekit YAML's ``dtype`` (F16, BF16): the task-arithmetic family computes in it, as mergekit does."""


def merge_job(method: str, job: TensorJob) -> np.ndarray:
    """The merged float32 tensor of ``job`` under ``method``."""
    if method in ("task_arithmetic", "ties", "dare_ties"):
        return _gta(method, job)
    if method == "slerp":
        return slerp(job.shared["t"], job.base, job.models[0])
    if method == "model_stock":
        return model_stock(job.base, job.models, job.shape, bool(job.shared["filter_wise"]))
    if method == "task_slerp":
        return task_slerp(job.base, [x - job.base for x in job.models], job.shared["t"])
    raise AssertionError(method)


def _gta(method: str, job: TensorJob) -> np.ndarray:
    rescale = bool(job.shared["rescale"])
    r = rounder(job.work)
    base = r(job.base)
    deltas = []
    for i, (x, params) in enumerate(zip(job.models, job.per_model)):
        delta = r(r(x) - base)
        density = float(params["density"])
        if method == "ties":
            mask = top_magnitude_mask(delta, density)
        elif method == "dare_ties":
            mask = random_mask(delta.size, density, dare_rng(job.seed, job.name, i))
        else:
            mask = None
        deltas.append(r(apply_mask(delta, mask, rescale)))
    return generalized_task_arithmetic(base, deltas, [p["weight"] for p in job.per_model],
                                       consensus=method != "task_arithmetic", normalize=bool(job.shared["normalize"]),
                                       lam=float(job.shared["lambda"]), work=job.work)


def dare_rng(seed: int, name: str, index: int) -> np.random.Generator:
    """DARE's random masks, keyed by (seed, tensor name, model index): the same whatever the order
    in which tensors are merged."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), index])


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
