"""Clipped PPO losses on hand-worked numbers, with gradients checked by autograd."""

from __future__ import annotations

import math

import pytest
import torch

from soupkit.rlhf.losses import policy_loss, value_loss


def test_policy_loss_hand_worked():
    # clip 0.2. Token 0: r = 1.5, A = 1 -> max(-1.5, -1.2) = -1.2 (clipped wins, no gradient).
    # Token 1: r = 0.5, A = 1 -> max(-0.5, -0.8) = -0.5.  Token 2: r = 1.1, A = -1 -> 1.1 (inside).
    # Token 3 is padding with wild numbers. Loss = (-1.2 - 0.5 + 1.1) / 3 = -0.2, clipfrac 1/3.
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), 50.0]], requires_grad=True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, 1e6]])
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(1 / 3)
    # approx_kl = mean of (r - 1) - log r over the valid tokens
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert stats["approx_kl"] == pytest.approx(expected_kl, rel=1e-5)
    loss.backward()
    # d/dlogp of -A r is -A r: token 1 -> -0.5/3, token 2 -> +1.1/3; token 0 clipped, token 3 masked.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.5 / 3, 1.1 / 3, 0.0]]))


def test_policy_loss_is_minus_advantage_at_ratio_one():
    adv = torch.tensor([[0.3, -1.2, 2.0]])
    mask = torch.ones_like(adv, dtype=torch.bool)
    loss, stats = policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0


def test_value_loss_hand_worked():
    # clip 0.2, old values 1. Token 0: V = 1.5, R = 2: unclipped 0.25, clipped V 1.2 -> 0.64 (wins).
    # Token 1: V = 0.9, R = 0: 0.81 both ways. Loss = 0.5 * (0.64 + 0.81) / 2 = 0.3625.
    values = torch.tensor([[1.5, 0.9, 7.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, -7.0]])
    mask = torch.tensor([[True, True, False]])
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.3625)
    assert stats["value_clipfrac"] == pytest.approx(0.5)
    loss.backward()
    # token 0: clipped branch is constant in V -> 0; token 1: 0.5 * 2 * 0.9 / 2 = 0.45
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.45, 0.0]]))
