"""LoRA adapters as the reference and the start of a PPO run (issue #19).

With ``lora_rank`` the reference adapter sits beside the policy's on one copy of the base; the
oracle is the same run against the full (merged) model, and PEFT's own ``merge_and_unload``.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from soupkit import run_merge
from soupkit.adapters import AdapterReference
from soupkit.errors import SoupkitError
from soupkit.rlhf import train
from soupkit.rlhf.checkpoints import plain_policy
from soupkit.rlhf.models import AdapterDisabled, Sources, load_models
from tests.conftest import load_state
from tests.lora import make_adapter, merged
from tests.rlhf.rewards import good_words
from tests.rlhf.test_memory_modes import _logprobs
from tests.rlhf.test_trainer import metrics, spec_for


@pytest.fixture(scope="module")
def adapter_soups(tmp_path_factory, sft_a) -> dict:
    """Two random rank-4 adapters on ``sft_a``, their exact adapter soup and their full soup."""
    root = tmp_path_factory.mktemp("rl-lora")
    a, b = (make_adapter(root / n, sft_a, seed=s, rank=4, alpha=4) for n, s in (("a", 1), ("b", 2)))
    models = [str(a), str(b)]
    low = run_merge({"merge": {"models": models, "output_format": "adapter", "output": str(root / "low")}})
    full = run_merge({"merge": {"models": models, "output": str(root / "full")}})
    return {"a": a, "b": b, "low": low, "full": full}


def _load(spec, refs, init):
    return load_models(spec, Sources(refs=refs, init=init, prompts=["the cat"], reward_fn=good_words), "cpu")


def test_reference_adapter_shares_the_policys_base(sft_a, prompts_txt, adapter_soups):
    from transformers import AutoModelForCausalLM

    low = adapter_soups["low"]
    models = _load(spec_for(low, prompts_txt, None, "lora_rank=4", init=str(sft_a)), [low], sft_a)
    ref = models.refs[0]
    assert isinstance(ref, AdapterReference) and ref.model is models.policy  # no second copy of the base
    trainable = {n for n, p in models.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    full = AutoModelForCausalLM.from_pretrained(adapter_soups["full"]).eval()
    base = AutoModelForCausalLM.from_pretrained(sft_a).eval()
    with torch.no_grad():
        torch.testing.assert_close(_logprobs(ref, sft_a), _logprobs(full, sft_a), atol=1e-5, rtol=0)
        torch.testing.assert_close(_logprobs(models.policy, sft_a), _logprobs(base, sft_a), atol=1e-6, rtol=0)
    assert {n for n, p in models.policy.named_parameters() if p.requires_grad} == trainable  # switching kept them
    exported = plain_policy(models.policy).state_dict()  # the final policy: the reference is not merged in
    for name, value in load_state(sft_a).items():
        torch.testing.assert_close(exported[name], value, atol=0, rtol=0)


def test_policy_starting_from_an_adapter_keeps_it_as_its_reference(sft_a, prompts_txt, adapter_soups):
    """TRL's "adapter disabled" reference is the base; when the policy starts from a trained
    adapter and the reference is that start, the reference must be base + that adapter."""
    a = adapter_soups["a"]
    models = _load(spec_for(a, prompts_txt, None, "lora_rank=4"), [a], a)
    ref, want = models.refs[0], merged(sft_a, a).eval()
    assert isinstance(ref, AdapterReference)
    with torch.no_grad():
        torch.testing.assert_close(_logprobs(models.policy, sft_a), _logprobs(want, sft_a), atol=1e-5, rtol=0)
        torch.testing.assert_close(_logprobs(ref, sft_a), _logprobs(want, sft_a), atol=1e-5, rtol=0)
    base_ref = _load(spec_for(sft_a, prompts_txt, None, "lora_rank=4", init=str(a)), [sft_a], a).refs[0]
    assert isinstance(base_ref, AdapterDisabled)  # the base itself as reference: adapter off is exact


@pytest.mark.parametrize("lora", ["lora_rank=4", "lora_rank=0"])
def test_step0_kl_against_the_adapter_soup_is_the_kl_against_the_full_soup(tmp_path, sft_a, prompts_txt,
                                                                           adapter_soups, lora):
    kls = {}
    for name in ("low", "full"):
        out = tmp_path / name
        train(spec_for(adapter_soups[name], prompts_txt, None, lora, init=str(sft_a), steps=1), out=out)
        kls[name] = metrics(out)[0]["kl"]
    assert abs(kls["full"]) > 1e-2  # the soup is not the policy's start: a real KL
    assert abs(kls["low"] - kls["full"]) < 1e-5, kls


def test_bad_adapter_reference_fails_before_loading(tmp_path, sft_a, prompts_txt, adapter_soups):
    from soupkit.rlhf.models import preflight

    stale = shutil.copytree(adapter_soups["a"], tmp_path / "stale")
    text = (stale / "adapter_config.json").read_text().replace(str(sft_a), "/nowhere/base")
    (stale / "adapter_config.json").write_text(text)
    with pytest.raises(SoupkitError, match=r"reference .*stale: its base '/nowhere/base' .* is not found"):
        preflight(spec_for(stale, prompts_txt, None, "lora_rank=4", init=str(sft_a)))


def test_resume_with_a_reference_adapter_reaches_the_same_policy(tmp_path, sft_a, prompts_txt, adapter_soups):
    """A checkpoint holds the trained adapter; the reference adapter is loaded again from its own
    directory on resume, and the resumed run ends where the uninterrupted one did."""
    spec = spec_for(adapter_soups["low"], prompts_txt, None, "lora_rank=4", init=str(sft_a), steps=2,
                    save_every=1, keep_checkpoints=0, learning_rate=1e-2)
    out = tmp_path / "run"
    final = load_state(train(spec, out=out))
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "final")
    assert sorted(p.name for p in (again / "checkpoints").iterdir()) == ["step-1"]
    resumed = load_state(train(spec, out=again, resume=True))
    for name, tensor in final.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=1e-5)
    assert metrics(again)[1]["kl"] == pytest.approx(metrics(out)[1]["kl"], abs=1e-6)
