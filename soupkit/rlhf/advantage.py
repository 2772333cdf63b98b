"""Per-token rewards, GAE and whitening: pure functions over (b, t) tensors.

Masks are True = valid token everywhere. Responses are right-padded: the valid tokens of row i are
``0 .. n_i - 1`` (the last one is EOS when the policy stopped by itself).
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over valid entries. Shapes: (b, t), (b, t) -> ()."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance of ``x`` over valid entries. Shapes: (b, t), (b, t) -> ()."""
    centred = (x - masked_mean(x, mask)) * mask
    return (centred**2).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale valid entries to unit variance (and zero mean when ``shift_mean``); invalid ones -> 0.

    ``shift_mean=False`` is how Huang et al. 2023 (https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo) and 2024 (arXiv 2403.17031) whiten rewards: only the scale changes, so a reward's sign
    (and the KL penalty's direction) is kept. Shapes: (b, t), (b, t) -> (b, t).
    """
    return whiten_with(x, mask, masked_mean(x, mask), masked_var(x, mask), shift_mean, eps)


def whiten_with(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``whiten`` with the statistics given: under data parallelism they are those of the global
    batch, so every process scales its rows alike. Shapes: (b, t), (b, t), (), () -> (b, t)."""
    scaled = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        scaled = scaled + mean
    return scaled * mask


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid entry of each row (0 for an empty row). Shapes: (b, t) -> (b,)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask).amax(dim=1)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """``r_t = -kl_coef * KL_t`` on every valid token, plus the sequence score on the last one.

    The score sits on the last real (EOS) token as in Huang et al. 2024's reference code (github.com/vwxyzjn/summarize_from_feedback_details), not one token
    later as in TRL's PPO (issue #3750). Shapes: (b,), (b, t), (b, t) -> (b, t).
    """
    rewards = -kl_coef * kl * mask
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_index(mask)] += scores
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438, eq. 16).

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lambda A_{t+1}``; the value
    after the last valid token is 0 (the episode ends there). Returns ``(advantages, returns)``
    with ``returns = advantages + values``, both zero on invalid tokens.
    Shapes: (b, t), (b, t), (b, t) -> (b, t), (b, t).
    """
    values = values * mask
    rewards = rewards * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for t in reversed(range(deltas.shape[1])):
        running = deltas[:, t] + gamma * gae_lambda * running * mask[:, t]
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var[returns - values] / Var[returns]`` over valid tokens (nan when returns are constant)."""
    var_returns = masked_var(returns, mask)
    if var_returns == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_returns)
