"""The rollout-engine interface without vLLM: the truncated-IS formula, the mismatch metric, the
merged weights a LoRA policy pushes, vLLM's outputs as tensors, and the refusals (issue #13).
The engine itself is tested against vLLM in ``test_vllm_engine.py`` (marker ``vllm``)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from soupkit.errors import SoupkitError
from soupkit.rlhf import build_spec, train
from soupkit.rlhf.engines import (
    check_engine,
    is_corrected,
    mismatch_metrics,
    padded,
    policy_weights,
    truncated_is_weights,
)
from soupkit.rlhf.losses import policy_loss
from tests.rlhf.test_trainer import spec_for

TRAINER = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -4.0]])
ENGINE = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -0.2, -9.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_truncated_is_weight_is_min_of_the_ratio_and_the_cap():
    # Yao et al. 2025: w = min(pi_trainer / pi_engine, C), worked by hand per token.
    # exp(0.5) = 1.65 and exp(5) are capped at 1.5; the rest are below the cap.
    expected = torch.tensor([[1.5, math.exp(-1.0), 1.0], [math.exp(-2.0), math.exp(0.1), 1.5]])
    assert torch.allclose(truncated_is_weights(TRAINER, ENGINE, 1.5), expected)


def test_is_corrected_advantages_scale_each_tokens_clipped_loss_by_its_weight():
    torch.manual_seed(0)
    new = TRAINER + 0.3 * torch.randn(2, 3)
    adv = torch.randn(2, 3)
    corrected = is_corrected(adv, TRAINER, ENGINE, 1.5)
    loss, _ = policy_loss(new, TRAINER, corrected, MASK, 0.2)
    # Oracle: the uncorrected per-token surrogate, weighted by w, token-mean over the mask.
    ratio = torch.exp(new - TRAINER)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    w = truncated_is_weights(TRAINER, ENGINE, 1.5)
    assert torch.allclose(loss, (w * per_token)[MASK].mean())
    assert is_corrected(adv, TRAINER, ENGINE, None) is adv  # no cap: unchanged
    assert is_corrected(adv, TRAINER, None, 2.0) is adv  # hf engine: no engine log-probs


def test_mismatch_metrics_over_valid_tokens_only():
    out = mismatch_metrics(TRAINER, ENGINE, MASK, cap=1.5)
    gaps = [0.5, 1.0, 0.0, 2.0, 0.1]  # |engine - trainer| on the 5 valid tokens (5.0 is padding)
    assert out["engine_logprob_diff_mean"].item() == pytest.approx(sum(gaps) / 5)
    assert out["engine_logprob_diff_max"].item() == pytest.approx(2.0)
    weights = [1.5, math.exp(-1.0), 1.0, math.exp(-2.0), math.exp(0.1)]  # exp(0.5) capped
    assert out["rollout_is_weight"].item() == pytest.approx(sum(weights) / 5)
    assert out["rollout_is_truncated"].item() == pytest.approx(1 / 5)  # exp(0.5) > 1.5 only
    assert set(mismatch_metrics(TRAINER, ENGINE, MASK, None)) == {"engine_logprob_diff_mean",
                                                                  "engine_logprob_diff_max"}


def test_vllm_completions_become_right_padded_tensors():
    lp = lambda *pairs: [{t: SimpleNamespace(logprob=v)} for t, v in pairs]  # noqa: E731
    outs = [SimpleNamespace(token_ids=[5, 3], logprobs=lp((5, -0.5), (3, -1.5))),
            SimpleNamespace(token_ids=[7, 8, 9], logprobs=lp((7, -0.1), (8, -0.2), (9, -0.3)))]
    got = padded(outs, pad_id=0, device=torch.device("cpu"))
    assert got.response.tolist() == [[5, 3, 0], [7, 8, 9]]
    assert torch.allclose(got.logprobs, torch.tensor([[-0.5, -1.5, 0.0], [-0.1, -0.2, -0.3]]))


def test_lora_policy_pushes_peft_merged_weights(sft_a):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(sft_a),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    pushed = dict(policy_weights(lora))
    merged = lora.merge_and_unload().state_dict()  # PEFT's own merge: the oracle
    assert set(pushed) == set(merged)
    for name, tensor in merged.items():
        assert torch.allclose(pushed[name], tensor, atol=1e-6), name
    base = AutoModelForCausalLM.from_pretrained(sft_a).state_dict()
    assert not torch.allclose(pushed["model.layers.0.self_attn.q_proj.weight"],
                              base["model.layers.0.self_attn.q_proj.weight"])  # the adapter's delta is in


def test_full_policy_pushes_its_state_dict(sft_a):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_a)
    pushed = dict(policy_weights(model))
    assert pushed.keys() == model.state_dict().keys()
    assert all(pushed[k] is v or torch.equal(pushed[k], v) for k, v in model.state_dict().items())


def test_is_cap_needs_the_vllm_engine(sft_a, prompts_txt):
    with pytest.raises(SoupkitError, match="rollout_is_cap .* needs rollout_engine vllm"):
        spec_for(sft_a, prompts_txt, None, "rollout_is_cap=2")
    assert spec_for(sft_a, prompts_txt).rollout_engine == "hf"  # the default


@pytest.mark.parametrize("env, word", [({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP"),
                                        ({"ACCELERATE_USE_DEEPSPEED": "true",
                                          "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO-3")])
def test_vllm_under_sharded_training_is_refused_in_one_line(monkeypatch, sft_a, prompts_txt, env, word):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = spec_for(sft_a, prompts_txt, None, "rollout_engine=vllm")
    with pytest.raises(SoupkitError, match=f"rollout_engine vllm under {word}.*use DDP") as info:
        check_engine(spec)
    assert "\n" not in str(info.value)


def test_vllm_missing_is_refused_before_any_model_loads(monkeypatch, tmp_path, sft_a, prompts_txt):
    import importlib.util

    import soupkit.rlhf.trainer as trainer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.setattr(trainer, "preflight", lambda *a, **k: pytest.fail("inputs read before the refusal"))
    spec = build_spec(None, {"ref": [str(sft_a)], "prompts": str(prompts_txt), "rollout_engine": "vllm",
                             "reward": "tests/rlhf/rewards.py:good_words"}, ())
    with pytest.raises(SoupkitError, match="rollout_engine vllm needs vLLM: install soupkit's vllm extra"):
        train(spec, out=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
