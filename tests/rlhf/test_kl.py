"""KL estimators against the exact KL, and the KL controllers."""

from __future__ import annotations

import pytest
import torch

from soupkit.rlhf.kl import AdaptiveKL, FixedKL, kl_k1, kl_k2, kl_k3


def test_k3_is_never_negative_and_k1_k2_formulas():
    torch.manual_seed(0)
    a, b = torch.randn(64, 9) * 3, torch.randn(64, 9) * 3
    assert (kl_k3(a, b) >= 0).all()
    torch.testing.assert_close(kl_k1(a, b), a - b)
    torch.testing.assert_close(kl_k2(a, b), 0.5 * (a - b) ** 2)
    assert kl_k1(a, a).abs().max() == 0 and kl_k3(a, a).abs().max() == 0


def test_k1_and_k3_average_to_the_exact_kl_on_samples():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(6), dim=0)
    logq = torch.log_softmax(torch.randn(6), dim=0)
    exact = float((logp.exp() * (logp - logq)).sum())
    samples = torch.multinomial(logp.exp(), 400_000, replacement=True)
    lp, lq = logp[samples], logq[samples]
    assert float(kl_k1(lp, lq).mean()) == pytest.approx(exact, abs=0.01)
    assert float(kl_k3(lp, lq).mean()) == pytest.approx(exact, abs=0.01)


def test_adaptive_kl_formula_and_direction():
    ctl = AdaptiveKL(0.1, target=6.0, horizon=100)
    ctl.update(12.0, n_steps=10)  # error clipped to +0.2 -> 0.1 * (1 + 0.2 * 0.1)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(3.0, n_steps=10)  # error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.102 * 0.98)
    before = ctl.value
    ctl.update(6.0, n_steps=10)
    assert ctl.value == pytest.approx(before)


def test_adaptive_kl_drives_a_kl_toward_its_target():
    # A toy world where the policy's KL responds to the penalty as KL = 3 / beta.
    ctl = AdaptiveKL(0.1, target=6.0, horizon=20)
    gaps = []
    for _ in range(200):
        kl = 3.0 / ctl.value
        gaps.append(abs(kl - 6.0))
        ctl.update(kl, n_steps=4)
    assert gaps[0] == pytest.approx(24.0)
    assert gaps[-1] < 0.1 and all(b <= a + 1e-9 for a, b in zip(gaps, gaps[1:]))


def test_fixed_kl_and_state_round_trip():
    ctl = FixedKL(0.05)
    ctl.update(100.0, 8)
    assert ctl.value == 0.05
    other = AdaptiveKL(1.0, 6.0, 100)
    other.load_state_dict(AdaptiveKL(0.3, 6.0, 100).state_dict())
    assert other.value == 0.3
