"""Evaluation statistics against hand-computed values and textbook formulas."""

from __future__ import annotations

import numpy as np
import pytest

from soupkit.evaluation.stats import (
    bootstrap,
    frontier,
    matched_kl,
    mean_ci,
    reward_at,
    win_rate,
    win_rate_ci,
)


def test_win_rate_ties_count_half():
    pairs = np.array([[1, 0], [0, 1], [1, 1], [2, 1]], dtype=float)
    assert win_rate(pairs) == (1 + 0 + 0.5 + 1) / 4


def test_win_rate_ci_brackets_estimate():
    rng = np.random.default_rng(0)
    method = rng.normal(0.2, 1, 400)
    baseline = rng.normal(0.0, 1, 400)
    est, lo, hi = win_rate_ci([np.stack([method, baseline], 1)])
    assert lo < est < hi
    assert est == win_rate(np.stack([method, baseline], 1))


def test_constant_data_gives_a_point_interval():
    assert mean_ci([[2.0] * 10]) == (2.0, 2.0, 2.0)


def test_bootstrap_mean_matches_normal_theory():
    # For n = 2000 draws of N(0, 1), the 95% interval of the mean is about mean +- 1.96 / sqrt(n).
    x = np.random.default_rng(1).normal(0, 1, 2000)
    est, lo, hi = mean_ci([x], n_boot=4000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert est == pytest.approx(x.mean())
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)


def test_seed_resampling_widens_the_interval():
    # Three seeds with different means: resampling seeds must count that spread.
    rng = np.random.default_rng(2)
    groups = [rng.normal(m, 0.1, 200) for m in (0.0, 1.0, 2.0)]
    _, lo2, hi2 = mean_ci(groups)
    _, lo1, hi1 = mean_ci([np.concatenate(groups)])
    assert (hi2 - lo2) > 5 * (hi1 - lo1)


def test_bootstrap_rejects_empty():
    with pytest.raises(ValueError):
        bootstrap([[]], np.mean)


def test_frontier_and_interpolation():
    curve = frontier([(2.0, 1.0), (0.0, 0.0), (2.0, 3.0), (4.0, 4.0)])
    assert curve == [(0.0, 0.0), (2.0, 2.0), (4.0, 4.0)]
    assert reward_at(curve, 1.0) == 1.0
    assert reward_at(curve, 3.0) == 3.0
    assert reward_at(curve, 5.0) is None and reward_at(curve, -1.0) is None


def test_matched_kl_on_the_overlap():
    result = matched_kl({"a": [(0, 0), (2, 2)], "b": [(1, 0), (3, 4)]}, points=3)
    assert result["kl"] == [1.0, 1.5, 2.0]
    assert result["reward"]["a"] == [1.0, 1.5, 2.0]
    assert result["reward"]["b"] == [0.0, 1.0, 2.0]


def test_matched_kl_without_overlap_is_empty():
    result = matched_kl({"a": [(0, 0), (1, 1)], "b": [(2, 0), (3, 1)]})
    assert result == {"kl": [], "reward": {"a": [], "b": []}}
