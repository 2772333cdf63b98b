"""PPO's clipped losses (Schulman et al. 2017, arXiv 1707.06347), as pure functions.

Each returns ``(loss, stats)``: the loss is a token-level mean over valid tokens (mask True); the
stats are detached 0-d tensors (no device-to-host copy per micro-batch).
"""

from __future__ import annotations

import torch

from soupkit.rlhf.advantage import masked_mean


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
    mask: torch.Tensor, clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate ``max(-A r, -A clip(r, 1-eps, 1+eps))`` with ``r = pi / pi_old`` (eq. 7).

    Stats: ``clipfrac`` (share of tokens where the clipped term wins) and ``approx_kl``, the k3
    estimate of KL(pi_old || pi) as in cleanrl's ppo.py. Shapes: (b, t) x4 -> ().
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
    mask: torch.Tensor, clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)``.

    The value clip is from OpenAI baselines' ppo2, kept by Huang et al. 2023 (https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo) and 2024 (arXiv 2403.17031). Stats: ``value_clipfrac``.
    Shapes: (b, t) x4 -> ().
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats
