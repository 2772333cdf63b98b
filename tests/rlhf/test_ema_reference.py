"""WARP's moving reference (``align.ref_ema``, arXiv 2406.16768): the EMA formula by hand, the EMA
the trainer keeps against its closed form over 3 optimiser steps, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soupkit.errors import SoupkitError
from soupkit.rlhf import build_spec, ema, train
from soupkit.rlhf.checkpoints import load_trainer_state
from tests.conftest import load_state
from tests.rlhf.conftest import good_words_ref

MU = 0.25
TINY = {"temperature": 1.0, "max_new_tokens": 4, "ppo_epochs": 1, "minibatches": 1, "batch_size": 8,
        "learning_rate": 1e-2, "seed": 3, "keep_checkpoints": 0,
        "lr_schedule": "constant"}  # constant: a run cut short and resumed longer follows the same updates


def spec_for(ref: Path, prompts: Path, **flags):
    return build_spec(None, {"ref": [str(ref)], "prompts": str(prompts), "reward": good_words_ref(), **TINY, **flags})


def test_update_matches_the_formula_worked_by_hand():
    ref, policy = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        ref.weight.fill_(1.0)
    expected = [1.5, 2.75, 5.375]  # mu 0.5: r <- r/2 + p/2 with p = 2, 4, 8, starting at r = 1
    for p, want in zip([2.0, 4.0, 8.0], expected):
        with torch.no_grad():
            policy.weight.fill_(p)
        ema.update(ref, policy, 0.5)
        assert ref.weight.item() == want


def test_trainer_ema_is_the_closed_form_over_three_optimiser_steps(tmp_path, sft_a, prompts_txt):
    # One optimiser step per PPO step; a checkpoint after each (but the last) holds the policy and the EMA.
    out = tmp_path / "run"
    train(spec_for(sft_a, prompts_txt, steps=4, save_every=1, ref_ema=MU), out=out)
    policies = [load_state(out / "checkpoints" / f"step-{k}" / "policy") for k in (1, 2, 3)]
    saved = [load_trainer_state(out / "checkpoints" / f"step-{k}")["ema_ref"] for k in (1, 2, 3)]
    start = load_state(sft_a)
    for name, r0 in start.items():
        r0 = r0.double()
        p1, p2, p3 = (p[name].double() for p in policies)
        # r3 = (1-mu)^3 r0 + mu (1-mu)^2 p1 + mu (1-mu) p2 + mu p3
        closed = (1 - MU) ** 3 * r0 + MU * (1 - MU) ** 2 * p1 + MU * (1 - MU) * p2 + MU * p3
        torch.testing.assert_close(saved[2][name].double(), closed, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(saved[0][name].double(), (1 - MU) * r0 + MU * p1, atol=1e-6, rtol=1e-6)
    assert not torch.equal(policies[2]["lm_head.weight"], start["lm_head.weight"])  # the policy did move
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("kl_init" in r for r in rows)
    assert rows[0]["kl"] == rows[0]["kl_init"] == 0.0  # both start at the init
    assert rows[2]["kl"] != rows[2]["kl_init"]  # the reference moved


def test_resume_continues_the_moving_reference(tmp_path, sft_a, prompts_txt):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(spec_for(sft_a, prompts_txt, steps=5, save_every=2, ref_ema=MU), out=whole)
    train(spec_for(sft_a, prompts_txt, steps=3, save_every=2, ref_ema=MU), out=cut)  # checkpoint at step 2
    train(spec_for(sft_a, prompts_txt, steps=5, save_every=2, ref_ema=MU), out=cut, resume=True)
    a = load_trainer_state(whole / "checkpoints" / "step-4")["ema_ref"]
    b = load_trainer_state(cut / "checkpoints" / "step-4")["ema_ref"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5)


def test_resume_without_a_saved_ema_is_refused(tmp_path, sft_a, prompts_txt):
    out = tmp_path / "run"
    train(spec_for(sft_a, prompts_txt, steps=2, save_every=1), out=out)
    with pytest.raises(SoupkitError, match="ref_ema"):
        train(spec_for(sft_a, prompts_txt, steps=3, save_every=1, ref_ema=MU), out=out, resume=True)


def test_lora_policy_is_refused(tmp_path, sft_a, prompts_txt):
    with pytest.raises(SoupkitError, match="ref_ema.*lora_rank"):
        train(spec_for(sft_a, prompts_txt, steps=1, ref_ema=MU, lora_rank=2), out=tmp_path / "run")
