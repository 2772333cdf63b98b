"""Loss (and reward) along the line through two models and over the plane through three.

The interpolated models exist only in memory: one working model's parameters are overwritten
with ``sum_k w_k * theta_k`` for each point, so no checkpoint is written. The sum is the merge
engine's (``soupkit.merge.engine``: float32, left to right ``w_0 * theta_0 + w_1 * theta_1 + ...``),
which makes every vertex exact (``0 * x + y == y``: the path's endpoints are the models themselves,
bit for bit) and the midpoint the uniform soup ``soupkit merge`` writes, bit for bit.

Loss barrier, as defined by Frankle et al. 2020 ("Linear Mode Connectivity and the Lottery
Ticket Hypothesis", arXiv 1912.05671, section 2): the largest loss on the segment minus the mean
of the endpoint losses. ``barrier_chord`` is the variant of Entezari et al. 2022 (arXiv
2110.06296, Def. 1) measured against the straight chord between the endpoint losses; it is never
smaller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from soupkit.diagnostics import kl as K
from soupkit.diagnostics.texts import batches, next_token_logprobs

Progress = Callable[[str, int, int], None]
LOW, HIGH = -0.5, 1.5  # past both ends, to see whether the basin extends beyond the models


def grid(points: int) -> list[float]:
    """``points`` evenly spaced values in [-0.5, 1.5] (9 points: steps of 0.25, incl. 0 and 1)."""
    step = (HIGH - LOW) / (points - 1)
    return [round(LOW + i * step, 12) for i in range(points)]


def snapshot(model: Any) -> dict[str, Any]:
    """float32 copies of a model's parameters (tied weights appear once)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def mix_into(model: Any, sources: Sequence[dict[str, Any]], weights: Sequence[float]) -> None:
    """Set every parameter of ``model`` to ``sum_k weights[k] * sources[k][name]`` in place."""
    import torch

    from soupkit.merge.engine import Buffers, average_tensors

    buf = Buffers()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(average_tensors([src[name] for src in sources], list(weights), buf))


def mean_loss(model: Any, ids: list[list[int]], pad: int) -> float:
    """Mean next-token NLL per predicted token over the texts, in nats."""
    total, count = 0.0, 0
    for input_ids, mask in batches(ids, pad):
        lp, targets, valid = next_token_logprobs(model, input_ids, mask)
        total += K.masked_sum(K.token_nll(lp, targets), valid)
        count += int(valid.sum())
    return total / count


def barriers(alphas: Sequence[float], losses: Sequence[float]) -> dict[str, float]:
    """Frankle et al. 2020 barrier and the chord barrier over the alphas in [0, 1]."""
    inside = [(a, v) for a, v in zip(alphas, losses) if 0.0 <= a <= 1.0]
    la, lb = losses[list(alphas).index(0.0)], losses[list(alphas).index(1.0)]
    return {
        "barrier": max(v for _, v in inside) - (la + lb) / 2,
        "barrier_chord": max(v - ((1 - a) * la + a * lb) for a, v in inside),
    }


def evaluate(model: Any, sources: Sequence[dict[str, Any]], weights: Sequence[float], ids: list[list[int]],
             pad: int, reward: Callable[[Any], float] | None) -> tuple[float, float | None]:
    """Loss (and mean reward) of the model at one point of the line or plane."""
    mix_into(model, sources, weights)
    return mean_loss(model, ids, pad), reward(model) if reward is not None else None


def line(model: Any, sources: Sequence[dict[str, Any]], ids: list[list[int]], pad: int, points: int,
         reward: Callable[[Any], float] | None = None, progress: Progress | None = None) -> dict:
    """theta(alpha) = (1 - alpha) A + alpha B for alpha on ``grid(points)``."""
    alphas = grid(points)
    out: dict[str, Any] = {"alpha": alphas, "loss": [], "reward": []}
    for i, a in enumerate(alphas):
        loss, rew = evaluate(model, sources, (1.0 - a, a), ids, pad, reward)
        out["loss"].append(loss)
        out["reward"].append(rew)
        if progress is not None:
            progress("path", i + 1, len(alphas))
    if 0.0 in alphas and 1.0 in alphas:
        out.update(barriers(alphas, out["loss"]))
    if reward is None:
        del out["reward"]
    return out


def plane(model: Any, sources: Sequence[dict[str, Any]], ids: list[list[int]], pad: int, points: int,
          reward: Callable[[Any], float] | None = None, progress: Progress | None = None) -> dict:
    """theta(u, v) = (1 - u - v) A + u B + v C on a grid; ``loss[i][j]`` is at (u[j], v[i]).

    The triangle ABC is u, v >= 0, u + v <= 1; the grid spans [-0.5, 1.5]^2, so most of it lies
    outside (the landscape around the soup, as in SALSA's reward-landscape figure).
    """
    coords = grid(points)
    out: dict[str, Any] = {"u": coords, "v": coords, "loss": [], "reward": []}
    for i, v in enumerate(coords):
        row = [evaluate(model, sources, (1.0 - u - v, u, v), ids, pad, reward) for u in coords]
        out["loss"].append([r[0] for r in row])
        out["reward"].append([r[1] for r in row])
        if progress is not None:
            progress("plane", i + 1, len(coords))
    if reward is None:
        del out["reward"]
    return out
