"""Statistics for comparing aligned policies: bootstrap intervals, win rates, KL-matched frontiers.

The SALSA paper reports single runs without intervals and compares methods at each method's own
best KL coefficient (both criticised in its ICLR 2025 reviews, openreview.net/forum?id=AN6PIiObp0). These functions give the missing
pieces: percentile-bootstrap 95% intervals (Efron & Tibshirani 1993), resampling seeds and then
prompts when several seeds exist (a two-level bootstrap, so seed-to-seed variance is counted), win
rates with ties as half a win, and reward compared at matched KL along each method's frontier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Interval = tuple[float, float, float]  # (estimate, low, high)


def _resample(groups: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Two-level resample: seeds with replacement, then rows within each chosen seed."""
    picks = rng.integers(0, len(groups), size=len(groups))
    return [groups[i][rng.integers(0, len(groups[i]), size=len(groups[i]))] for i in picks]


def bootstrap(groups: Sequence[Sequence[float]] | Sequence[np.ndarray], statistic: Callable[[np.ndarray], float],
              n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """``statistic`` of the pooled rows with a percentile-bootstrap interval.

    ``groups`` holds one array per seed (rows = prompts; a row may be a vector, e.g. a pair of
    rewards). With one group this is the ordinary bootstrap over rows.
    """
    arrays = [np.asarray(g, dtype=float) for g in groups]
    if not arrays or any(len(a) == 0 for a in arrays):
        raise ValueError("bootstrap needs at least one non-empty group")
    rng = np.random.default_rng(seed)
    estimate = statistic(np.concatenate(arrays))
    draws = np.array([statistic(np.concatenate(_resample(arrays, rng))) for _ in range(n_boot)])
    tail = (1.0 - level) / 2.0
    return float(estimate), float(np.quantile(draws, tail)), float(np.quantile(draws, 1.0 - tail))


def mean_ci(groups: Sequence[Sequence[float]], **kw) -> Interval:
    """Mean with a 95% bootstrap interval."""
    return bootstrap(groups, np.mean, **kw)


def win_rate(pairs: np.ndarray) -> float:
    """Share of rows where column 0 beats column 1; ties count half. Shape: (n, 2)."""
    a, b = pairs[:, 0], pairs[:, 1]
    return float(np.mean((a > b) + 0.5 * (a == b)))


def win_rate_ci(groups: Sequence[np.ndarray], **kw) -> Interval:
    """Win rate of method over baseline, paired by prompt, with a 95% bootstrap interval.

    ``groups``: one (n, 2) array per seed, columns (method, baseline) scored on the same prompts.
    """
    return bootstrap(groups, win_rate, **kw)


def frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(kl, reward) points sorted by KL, duplicates in KL averaged."""
    by_kl: dict[float, list[float]] = {}
    for kl, reward in points:
        by_kl.setdefault(float(kl), []).append(float(reward))
    return [(kl, float(np.mean(r))) for kl, r in sorted(by_kl.items())]


def reward_at(curve: Sequence[tuple[float, float]], kl: float) -> float | None:
    """Linear interpolation of a frontier at ``kl``; None outside its KL range (no extrapolation)."""
    kls = [p[0] for p in curve]
    if not curve or kl < kls[0] or kl > kls[-1]:
        return None
    return float(np.interp(kl, kls, [p[1] for p in curve]))


def matched_kl(curves: dict[str, Sequence[tuple[float, float]]], points: int = 5) -> dict[str, object]:
    """Each method's reward at common KL values inside the KL range every method covers.

    Returns ``{"kl": [...], "reward": {method: [...]}}``; empty lists when the ranges do not overlap
    (then no matched comparison is possible, and saying so is the honest result).
    """
    fronts = {name: frontier(c) for name, c in curves.items()}
    low = max(f[0][0] for f in fronts.values())
    high = min(f[-1][0] for f in fronts.values())
    if low > high:
        return {"kl": [], "reward": {name: [] for name in fronts}}
    grid = [float(x) for x in np.linspace(low, high, points)] if high > low else [low]
    return {"kl": grid, "reward": {name: [reward_at(f, x) for x in grid] for name, f in fronts.items()}}
