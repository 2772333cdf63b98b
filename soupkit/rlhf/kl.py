"""Per-token KL estimators and KL-coefficient controllers.

Estimators follow J. Schulman, "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html).
With tokens sampled from the policy and ``log r = ref_logprob - logprob``:

- k1 = -log r: unbiased, can be negative per token;
- k2 = (log r)^2 / 2: biased, low variance, its gradient is the KL's gradient;
- k3 = (r - 1) - log r: unbiased and never negative.

Sampled estimates for training live here; ``soupkit.diagnostics`` computes exact KLs over the vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(x) - log pi_ref(x). Shapes: (b, t), (b, t) -> (b, t)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi(x) - log pi_ref(x))^2 / 2. Shapes: (b, t), (b, t) -> (b, t)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref(x) / pi(x); >= 0. Shapes: (b, t), (b, t) -> (b, t)."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1, "k2": kl_k2, "k3": kl_k3,
}


class FixedKL:
    """A constant KL coefficient (beta), as in Huang et al. 2024 (arXiv 2403.17031) and TRL's PPO (0.05)."""

    def __init__(self, value: float):
        self.value = value

    def update(self, kl: float, n_steps: int) -> None:
        """A fixed coefficient ignores the observed KL."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKL:
    """Ziegler et al. 2019 (arXiv 1909.08593, section 2.2): steer the KL toward ``target``.

    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_steps / horizon)``,
    where ``n_steps`` is the number of samples (episodes) the KL was measured on.
    """

    def __init__(self, value: float, target: float, horizon: float):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        """Move ``value`` up when ``kl`` is above target, down when below."""
        if not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]
