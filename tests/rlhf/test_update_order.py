"""Policy and critic updated one after the other (``one_model_at_a_time``): the same numbers as one
joint backward pass, with only one model's gradients alive at a time."""

from __future__ import annotations

import pytest
import torch

from soupkit.rlhf import train, trainer
from tests.conftest import load_state
from tests.rlhf.test_trainer import spec_for


def _run(tmp_path, name, sft_a, reward_model, prompts_txt, monkeypatch, split: bool, *sets, **flags):
    seen: list[tuple[bool, bool]] = []
    step = trainer._optimizer_step

    def recording(run, *models):
        has_grad = lambda m: any(p.grad is not None for p in m.parameters())  # noqa: E731
        seen.append((has_grad(run.models.policy), has_grad(run.models.critic)))
        step(run, *models)

    monkeypatch.setattr(trainer, "_optimizer_step", recording)
    if not split:
        monkeypatch.setattr(trainer, "one_model_at_a_time", lambda run: False)
    out = tmp_path / name
    spec = spec_for(sft_a, prompts_txt, reward_model, *sets, steps=3, save_every=2, learning_rate=1e-3, **flags)
    train(spec, out=out)
    monkeypatch.undo()
    checkpoint = out / "checkpoints" / "step-2"  # (the last step writes final/, without the critic)
    assert checkpoint.is_dir()
    return seen, load_state(checkpoint / "policy"), load_state(checkpoint / "critic")


def test_one_model_at_a_time_gives_the_joint_update_bit_for_bit(tmp_path, sft_a, reward_model, prompts_txt,
                                                                monkeypatch):
    seen, policy, critic = _run(tmp_path, "split", sft_a, reward_model, prompts_txt, monkeypatch, True)
    seen_joint, policy_joint, critic_joint = _run(tmp_path, "joint", sft_a, reward_model, prompts_txt,
                                                  monkeypatch, False)
    # 3 PPO steps x 2 epochs x 1 minibatch: the joint path steps both models at once, 6 times; the
    # split one steps the policy alone, then the critic alone (its gradients appear after the
    # policy's are freed), 12 times
    assert seen_joint == [(True, True)] * 6
    assert seen == [(True, False), (False, True)] * 6
    assert policy and critic and policy.keys() == policy_joint.keys() and critic.keys() == critic_joint.keys()
    for name in policy:
        assert torch.equal(policy[name], policy_joint[name]), name
    for name in critic:
        assert torch.equal(critic[name], critic_joint[name]), name
    start = load_state(sft_a)
    moved = sum(not torch.equal(policy[name], start[name]) for name in policy if name in start)
    assert moved > 0  # the comparison is between trained weights, not two copies of the start


@pytest.mark.parametrize("setting", ["grad_accum=2"])
def test_accumulation_keeps_the_joint_update(tmp_path, sft_a, reward_model, prompts_txt, monkeypatch, setting):
    seen, _, _ = _run(tmp_path, "accum", sft_a, reward_model, prompts_txt, monkeypatch, True, setting,
                      minibatches=1)
    assert seen == [(True, True)] * 6
