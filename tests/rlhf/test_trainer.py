"""The PPO loop end to end on tiny models: KL, frozen reference, learning, errors, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soupkit.errors import SoupkitError
from soupkit.rlhf import build_spec, train
from tests.conftest import load_state
from tests.rlhf.conftest import REWARDS, good_words_ref

TINY = {"temperature": 1.0, "max_new_tokens": 4, "ppo_epochs": 2, "save_every": 0, "steps": 2, "batch_size": 8}


def spec_for(ref, prompts, reward=None, *sets, **flags):
    flags = {"ref": [str(r) for r in (ref if isinstance(ref, list) else [ref])], "prompts": str(prompts),
             "reward": str(reward or good_words_ref()), **TINY, **flags}
    return build_spec(None, flags, sets)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kl_at_step_zero_is_zero_when_init_is_the_ref(tmp_path, soup, prompts_txt):
    out = tmp_path / "run"
    train(spec_for(soup, prompts_txt, steps=1), out=out)
    assert metrics(out)[0]["kl"] == 0.0


def test_salsa_setup_kl_positive_ref_unchanged_policy_changed(tmp_path, soup, sft_a, prompts_txt):
    # SALSA: the policy starts from one SFT model, the soup is the reference. One flag apart.
    out = tmp_path / "run"
    ref_before = load_state(soup)
    # k3 is non-negative per token, so "> 0" holds for any sample (k1 may dip below 0 on 8 prompts).
    spec = spec_for(soup, prompts_txt, None, "kl_estimator=k3", init=str(sft_a), watch={"sft": str(sft_a)})
    final = train(spec, out=out)
    rows = metrics(out)
    assert rows[0]["kl"] > 1e-3
    assert rows[0]["kl_sft"] == 0.0  # the policy is sft-a before its first update
    assert [r["step"] for r in rows] == [1, 2]
    required = {"step", "reward", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "clipfrac",
                "approx_kl", "explained_variance", "response_length", "tokens_per_s", "kl_sft"}
    assert required <= set(rows[0])
    for name, tensor in load_state(soup).items():
        assert torch.equal(tensor, ref_before[name]), name
    start, trained = load_state(sft_a), load_state(final)
    assert any(not torch.equal(start[n], trained[n]) for n in start)
    assert {"config.json", "model.safetensors", "tokenizer.json", "soupkit_recipe.yaml", "README.md"} <= {
        p.name for p in final.iterdir()}
    assert not list(out.glob(".final*"))  # no temporary siblings left behind


def test_rule_based_reward_rises(tmp_path, sft_a, prompts_txt):
    # Share of "good" words starts near 6/64 (random tiny model) and should climb fast.
    out = tmp_path / "run"
    spec = spec_for(sft_a, prompts_txt, None, "max_new_tokens=6", "ppo_epochs=4", "lr_schedule=constant",
                    steps=30, batch_size=16, learning_rate=1e-2, kl_coef=0.01, seed=1)
    train(spec, out=out)
    rewards = [r["reward"] for r in metrics(out)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.3 and last > first + 0.4, (first, last)


def test_reward_model_and_critic_from_it(tmp_path, sft_a, reward_model, prompts_txt):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    train(spec_for(sft_a, prompts_txt, reward_model, "missing_eos_penalty=1.0", "kl_estimator=k3",
                   "kl_target=1.0", "whiten_rewards=true", save_every=1), out=out)
    rows = metrics(out)
    assert all(torch.isfinite(torch.tensor(r["value_loss"])) for r in rows)
    assert rows[1]["kl_coef"] != rows[0]["kl_coef"]  # adaptive controller moved
    # The critic was initialised from the reward model (Huang et al. 2024): step-1's critic is one update away.
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model).state_dict()
    critic = load_state(out / "checkpoints" / "step-1" / "critic")
    assert rm.keys() == critic.keys()
    for name, tensor in rm.items():  # lr 3e-6 for one step: still the reward model's weights
        torch.testing.assert_close(critic[name], tensor, atol=1e-4, rtol=0)


def test_reward_model_with_its_own_tokenizer_scores_the_text(tmp_path, sft_a, reward_model_own_tokenizer,
                                                             prompts_txt):
    from soupkit.rlhf.models import Sources, load_models
    from soupkit.rlhf.reward import ModelReward

    spec = spec_for(sft_a, prompts_txt, reward_model_own_tokenizer, save_every=1)
    sources = Sources(refs=[sft_a], init=sft_a, prompts=["the cat"], reward_dir=reward_model_own_tokenizer)
    models = load_models(spec, sources, "cpu")
    assert isinstance(models.reward, ModelReward) and models.reward.tokenizer is not None
    # Dropout off everywhere (Huang et al. 2023): every model stays in eval mode, trained ones included.
    assert not any(m.training for m in (models.policy, models.critic, models.reward.model, *models.refs))
    # The critic cannot read the reward model's ids, so it starts from the policy with a zero head.
    assert all(p.abs().sum() == 0 for p in models.critic.seq_cls.score.parameters())
    train(spec, out=tmp_path / "run")
    # An oracle for the first step's mean score: the reward model on re-tokenised text.
    assert torch.isfinite(torch.tensor(metrics(tmp_path / "run")[0]["reward"]))


def test_two_refs_soup_in_memory_and_mean_kl(tmp_path, sft_a, sft_b, soup, prompts_txt):
    one = tmp_path / "one"
    train(spec_for([sft_a, sft_b], prompts_txt, init=str(soup), steps=1), out=one)
    assert metrics(one)[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # soup of a and b == the soup dir
    two = tmp_path / "two"
    train(spec_for([sft_a, sft_a], prompts_txt, None, "ref_mode=mean_kl", steps=1), out=two)
    assert metrics(two)[0]["kl"] == 0.0


@pytest.mark.parametrize("change, message", [
    ({"ref": ["/no/such/ref"]}, "reference '/no/such/ref' not found"),
    ({"init": "/no/such/init"}, "init (policy start) '/no/such/init' not found"),
    ({"reward": "/no/such/rm"}, "reward model '/no/such/rm' not found"),
    ({"prompts": "/no/such/prompts.txt"}, "not found"),
    ({"reward": f"{REWARDS}:nope"}, "has no function 'nope'"),
    ({"reward": "no_such_module_q:fn"}, "cannot import"),
])
def test_bad_input_fails_before_training(tmp_path, sft_a, prompts_txt, change, message):
    spec = spec_for(sft_a, prompts_txt).model_copy(update=change)
    with pytest.raises(SoupkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(spec, out=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_vocab_mismatch_and_empty_prompts(tmp_path, sft_a, other_vocab, prompts_txt):
    with pytest.raises(SoupkitError, match="vocab_size 80 but the policy"):
        train(spec_for(other_vocab, prompts_txt, init=str(sft_a)), out=tmp_path / "a")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SoupkitError, match="empty"):
        train(spec_for(sft_a, tmp_path / "empty.jsonl"), out=tmp_path / "b")
    (tmp_path / "blank.jsonl").write_text('{"prompt": "the cat"}\n{"prompt": "   "}\n')
    with pytest.raises(SoupkitError, match="blank.jsonl:2: field 'prompt': expected a non-empty string"):
        train(spec_for(sft_a, tmp_path / "blank.jsonl"), out=tmp_path / "c")


def test_existing_output_needs_force_which_drops_old_checkpoints(tmp_path, sft_a, prompts_txt):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-7").mkdir(parents=True)
    (out / "checkpoints" / "step-7" / "trainer_state.pt").write_text("stale")
    (out / "notes.txt").write_text("keep")
    with pytest.raises(SoupkitError, match="--force"):
        train(spec_for(sft_a, prompts_txt), out=out)
    train(spec_for(sft_a, prompts_txt, steps=1), out=out, force=True)
    assert not (out / "checkpoints" / "step-7").exists() and (out / "notes.txt").read_text() == "keep"
    assert [r["step"] for r in metrics(out)] == [1]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, sft_a, prompts_txt):
    out = tmp_path / "run"
    spec = spec_for(sft_a, prompts_txt, f"{REWARDS}:huge_from_third_call", steps=4, save_every=1)
    with pytest.raises(SoupkitError, match=r"step 3: the PPO loss is .*(nan|inf).*step-2"):
        train(spec, out=out)
    assert (out / "checkpoints" / "step-2" / "trainer_state.pt").is_file()
    assert not (out / "final").exists()
    assert all(torch.isfinite(t).all() for t in load_state(out / "checkpoints" / "step-2" / "policy").values())


def _adam_steps(out: Path, step: int) -> int:
    state = torch.load(out / "checkpoints" / f"step-{step}" / "trainer_state.pt", weights_only=True)
    return int(next(iter(state["optimizer"]["state"].values()))["step"])  # keyed by parameter name


def test_epochs_minibatches_accumulation_and_early_stop_count_optimiser_steps(tmp_path, sft_a, reward_model,
                                                                               prompts_txt):
    # 3 epochs x 2 minibatches = 6 optimiser steps per PPO step, whatever grad_accum is.
    full = tmp_path / "full"
    train(spec_for(sft_a, prompts_txt, None, "grad_accum=2", ppo_epochs=3, minibatches=2, save_every=1), out=full)
    assert _adam_steps(full, 1) == 6
    # With a tiny target_kl the first epoch's approx KL (> 0 after its first update) stops the rest;
    # the reward model gives every response a different score, so the first update is not zero.
    early = tmp_path / "early"
    train(spec_for(sft_a, prompts_txt, reward_model, "target_kl=1e-8", ppo_epochs=3, minibatches=2, save_every=1,
                learning_rate=1e-3), out=early)
    assert _adam_steps(early, 1) == 2
