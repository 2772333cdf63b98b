"""Exact token-level divergences between two models' next-token distributions.

Pure functions over log-probabilities (``b`` batch, ``t`` predicted positions, ``v`` vocabulary).
These are exact sums over the vocabulary, for ``inspect``; the sampled per-token KL estimators
used during PPO live in ``soupkit.rlhf``.
Masks are True = valid.
"""

from __future__ import annotations

import math
from typing import Any

Tensor = Any  # torch.Tensor; torch is imported by the caller, not at module import


def token_kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_v p (log p - log q) per position, in nats.

    logp, logq: (b, t, v) log-probabilities -> (b, t). Terms with p = 0 contribute 0.
    """
    import torch

    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1)


def token_js(logp: Tensor, logq: Tensor) -> Tensor:
    """Jensen-Shannon divergence 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, in nats.

    (b, t, v), (b, t, v) -> (b, t); bounded by log 2 (Lin 1991, IEEE Trans. Inf. Theory 37(1)).
    """
    import torch

    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * token_kl(logp, logm) + 0.5 * token_kl(logq, logm)


def top1_agree(logp: Tensor, logq: Tensor) -> Tensor:
    """Whether both models' most likely next tokens agree. (b, t, v) x 2 -> (b, t) bool."""
    return logp.argmax(-1) == logq.argmax(-1)


def token_nll(logp: Tensor, targets: Tensor) -> Tensor:
    """Negative log-likelihood of the observed next tokens. (b, t, v), (b, t) long -> (b, t)."""
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def masked_sum(values: Tensor, mask: Tensor) -> float:
    """Sum of ``values`` (b, t) over positions where ``mask`` (b, t) is True."""
    return float(values.masked_select(mask).double().sum())
