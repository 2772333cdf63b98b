"""GAE, whitening and reward placement against hand-worked numbers and formulas."""

from __future__ import annotations

import pytest
import torch

from soupkit.rlhf.advantage import explained_variance, gae, last_index, per_token_rewards, whiten


def test_gae_hand_worked():
    # gamma 0.9, lambda 0.8, so gamma * lambda = 0.72.
    # Row 0, all valid: next values [1.0, 0.5, 0];
    #   deltas: 1 + 0.9*1.0 - 0.5 = 1.4, 0 + 0.9*0.5 - 1.0 = -0.55, 2 + 0 - 0.5 = 1.5
    #   A2 = 1.5, A1 = -0.55 + 0.72*1.5 = 0.53, A0 = 1.4 + 0.72*0.53 = 1.7816
    # Row 1, last token padding (its 99s must be ignored): values [1, 2, (0)], rewards [0, 1, (0)]
    #   deltas: 0 + 0.9*2 - 1 = 0.8, 1 + 0 - 2 = -1;  A1 = -1, A0 = 0.8 + 0.72*(-1) = 0.08
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 0.5], [1.0, 2.0, 99.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, gae_lambda=0.8)
    torch.testing.assert_close(adv, torch.tensor([[1.7816, 0.53, 1.5], [0.08, -1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.2816, 1.53, 2.0], [1.08, 1.0, 0.0]]))


def test_gae_at_gamma_lambda_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 7), torch.randn(4, 7)
    lengths = torch.tensor([7, 5, 1, 3])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    adv, ret = gae(rewards, values, mask, gamma=1.0, gae_lambda=1.0)
    for i, n in enumerate(lengths.tolist()):
        to_go = torch.flip(torch.cumsum(torch.flip(rewards[i, :n], [0]), 0), [0])
        torch.testing.assert_close(adv[i, :n], to_go - values[i, :n])
        torch.testing.assert_close(ret[i, :n], to_go)
        assert adv[i, n:].abs().sum() == 0


def test_whiten_matches_mean_and_population_std_over_valid_entries():
    torch.manual_seed(1)
    x = torch.randn(3, 5) * 4 + 2
    mask = torch.rand(3, 5) > 0.3
    out = whiten(x, mask)
    valid = x[mask]
    torch.testing.assert_close(out[mask], (valid - valid.mean()) / valid.std(correction=0), atol=1e-5, rtol=1e-5)
    assert out[~mask].abs().sum() == 0
    kept = whiten(x, mask, shift_mean=False)[mask]
    torch.testing.assert_close(kept.mean(), valid.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept.std(correction=0), torch.tensor(1.0), atol=1e-4, rtol=1e-4)


def test_score_lands_on_last_valid_token_and_kl_on_every_valid_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    rewards = per_token_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1 + 1.0, 0.0], [-0.2, -0.25, -0.3 + 2.0]])
    torch.testing.assert_close(rewards, expected)
    assert last_index(mask).tolist() == [1, 2]


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones_like(returns, dtype=torch.bool)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(returns), returns, mask) == pytest.approx(0.0)
