"""Memory modes: LoRA policy (reference = adapter disabled), bf16, offloading, gradient checkpointing,
and the process-count-independent sampler they all share."""

from __future__ import annotations

import shutil

import pytest
import torch

from soupkit.rlhf import train
from soupkit.rlhf.models import AdapterDisabled, Sources, checkpoint_layers, load_models, visiting
from soupkit.rlhf.rollout import (
    Samples,
    response_logits,
    sample_by_uniform,
    sampling_uniforms,
    token_logprobs,
)
from tests.conftest import load_state
from tests.rlhf.rewards import good_words
from tests.rlhf.test_trainer import metrics, spec_for


def test_sample_by_uniform_picks_the_cdf_interval():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3, 0.0]])).repeat(5, 1)  # token 3 has probability 0
    u = torch.tensor([0.1, 0.2, 0.69, 0.71, 0.9999999])
    assert sample_by_uniform(logits, u, 1.0, 1.0).tolist() == [0, 1, 1, 2, 2]
    # top_p 0.5 keeps token 1 alone: every uniform lands on it.
    assert sample_by_uniform(logits, u, 1.0, 0.5).tolist() == [1] * 5


def test_sampling_noise_depends_on_the_global_row_not_the_split():
    whole = sampling_uniforms(3, 7, [0, 1, 2, 3], 5)
    assert torch.equal(sampling_uniforms(3, 7, [1, 3], 5), whole[[1, 3]])
    assert not torch.equal(sampling_uniforms(3, 8, [0], 5), whole[:1])  # a new step, new noise


def _logprobs(model, sft_a) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft_a)
    ids = torch.tensor([tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]])
    roll = Samples(ids[:, :2], torch.ones_like(ids[:, :2], dtype=torch.bool), ids[:, 2:],
                   torch.ones_like(ids[:, 2:], dtype=torch.bool))
    return token_logprobs(response_logits(model, roll, 1.0), roll.response)


def test_lora_reference_is_the_base_with_the_adapter_off(sft_a, prompts_txt):
    from transformers import AutoModelForCausalLM

    spec = spec_for(sft_a, prompts_txt, None, "lora_rank=4")
    models = load_models(spec, Sources(refs=[sft_a], init=sft_a, prompts=["the cat"], reward_fn=good_words), "cpu")
    ref = models.refs[0]
    assert isinstance(ref, AdapterDisabled) and ref.model is models.policy  # no second copy
    trainable = {n for n, p in models.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # move the adapter off zero: the policy changes, the reference must not
        for name, param in models.policy.named_parameters():
            if "lora_B" in name:
                param.normal_()
    base = AutoModelForCausalLM.from_pretrained(sft_a).eval()
    with torch.no_grad():
        torch.testing.assert_close(_logprobs(ref, sft_a), _logprobs(base, sft_a), atol=1e-6, rtol=0)
        assert (_logprobs(models.policy, sft_a) - _logprobs(base, sft_a)).abs().max() > 1e-3


def test_lora_run_kl_zero_at_start_only_adapters_change_and_resume(tmp_path, sft_a, prompts_txt):
    spec = spec_for(sft_a, prompts_txt, None, "lora_rank=4", "lora_alpha=8", steps=3, save_every=1,
                    learning_rate=1e-2, keep_checkpoints=0)
    out = tmp_path / "run"
    final = load_state(train(spec, out=out))
    assert metrics(out)[0]["kl"] == 0.0 and metrics(out)[2]["kl"] != 0.0
    assert (out / "checkpoints" / "step-1" / "policy" / "adapter_config.json").is_file()  # adapter only
    init = load_state(sft_a)
    changed = {n for n in init if not torch.equal(init[n], final[n])}
    # LoRA on every linear layer: attention and MLP projections move; embeddings, norms, lm_head do not.
    assert changed and all(n.endswith("proj.weight") for n in changed)
    # Resume from step-1 rebuilds the adapter on the init and reaches the same weights.
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "final")
    shutil.rmtree(again / "checkpoints" / "step-2")
    resumed = load_state(train(spec, out=again, resume=True))
    for name, tensor in final.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=1e-5)


def test_lora_salsa_reference_is_a_separate_frozen_model_in_bf16(tmp_path, soup, sft_a, prompts_txt):
    spec = spec_for(soup, prompts_txt, None, "lora_rank=4", "bf16=true", "kl_estimator=k3", init=str(sft_a), steps=1)
    models = load_models(spec, Sources(refs=[soup], init=sft_a, prompts=["the cat"], reward_fn=good_words), "cpu")
    ref = models.refs[0]
    assert isinstance(ref, torch.nn.Module) and not any(p.requires_grad for p in ref.parameters())
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in models.policy.parameters() if p.requires_grad} == {torch.float32}
    train(spec, out=tmp_path / "run")
    assert metrics(tmp_path / "run")[0]["kl"] > 1e-3


def test_bf16_full_policy_stays_fp32_and_runs(tmp_path, sft_a, reward_model, prompts_txt):
    spec = spec_for(sft_a, prompts_txt, reward_model, "bf16=true", steps=2)
    models = load_models(spec, Sources(refs=[sft_a], init=sft_a, prompts=["the cat"], reward_dir=reward_model), "cpu")
    assert {p.dtype for p in models.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in models.reward.model.parameters()} == {torch.bfloat16}
    train(spec, out=tmp_path / "run")
    rows = metrics(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor([r["reward"], r["kl"], r["value_loss"]])).all() for r in rows)
    assert abs(rows[0]["kl"]) < 0.05  # a bf16 copy of the start: small rounding KL, not exactly 0


class _Recorder(torch.nn.Linear):
    """A module that records ``.to`` calls instead of moving (there is no second device here)."""

    def __init__(self):
        super().__init__(2, 2)
        self.moves: list[str] = []

    def to(self, device):  # noqa: D102
        self.moves.append(str(device))
        return self


def test_visiting_moves_an_offloaded_model_there_and_back():
    model = _Recorder()
    with visiting(model, "cuda:0"):
        assert model.moves == ["cuda:0"]
    assert model.moves == ["cuda:0", "cpu"]
    with visiting(model, "cpu"):  # already home: a no-op (all a CPU-only machine ever sees)
        pass
    assert model.moves == ["cuda:0", "cpu"]


def test_offload_and_checkpointing_do_not_change_the_run(tmp_path, sft_a, reward_model, prompts_txt):
    plain, modes = tmp_path / "plain", tmp_path / "modes"
    train(spec_for(sft_a, prompts_txt, reward_model, steps=2), out=plain)
    train(spec_for(sft_a, prompts_txt, reward_model, "offload_frozen=true", "gradient_checkpointing=true",
                   steps=2), out=modes)
    for got, want in zip(metrics(modes), metrics(plain)):
        for key in ("reward", "kl", "policy_loss", "value_loss"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key


def _saved_bytes_and_grads(model, ids):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.square().mean().backward()
    return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_gradients_fewer_saved_activations(sft_a):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(4, 60, (2, 24))
    plain = AutoModelForCausalLM.from_pretrained(sft_a).eval()
    ckpt = AutoModelForCausalLM.from_pretrained(sft_a).eval()
    checkpoint_layers(ckpt)
    assert not any(m.training for m in ckpt.modules() if type(m).__name__.endswith(("Attention", "MLP")))
    plain_bytes, plain_grads = _saved_bytes_and_grads(plain, ids)
    ckpt_bytes, ckpt_grads = _saved_bytes_and_grads(ckpt, ids)
    assert ckpt_bytes < 0.7 * plain_bytes
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5)
