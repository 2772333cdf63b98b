"""Evaluation measurements against torch.nn.functional and against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from soupkit.evaluation.sampling import Sampling, reward_scores, sample, sequence_kl
from tests.conftest import make_model


@pytest.fixture(scope="module")
def lm_pair(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("eval")
    a, b = make_model(root / "a", seed=5), make_model(root / "b", seed=6)
    return (AutoModelForCausalLM.from_pretrained(a).eval(), AutoModelForCausalLM.from_pretrained(b).eval(),
            AutoTokenizer.from_pretrained(a))


PROMPTS = ["the cat sat on", "a dog ran", "hello world", "the big red bird flew over the"]


def test_sequence_kl_matches_kl_div(lm_pair):
    policy, ref, tok = lm_pair
    parts, _ = sample(policy, tok, PROMPTS, Sampling(max_new_tokens=6, temperature=0.8, top_p=1.0, seed=0))
    got = sequence_kl(policy, ref, parts, temperature=0.8)
    part = parts[0]
    want = []
    with torch.no_grad():
        for i in range(len(PROMPTS)):
            ids = part.sequences[i][part.attention_mask[i]]
            n = int(part.mask[i].sum())
            lp = torch.log_softmax(policy(ids[None]).logits[0, -n - 1:-1] / 0.8, -1)
            lq = torch.log_softmax(ref(ids[None]).logits[0, -n - 1:-1] / 0.8, -1)
            # F.kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q)
            want.append(F.kl_div(lq, lp, log_target=True, reduction="sum").item())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.all(got > 0)
    assert np.allclose(sequence_kl(policy, policy, parts, temperature=0.8), 0.0, atol=1e-6)


def test_responses_stop_at_eos(lm_pair):
    policy, _, tok = lm_pair
    parts, texts = sample(policy, tok, PROMPTS, Sampling(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=1))
    for row, mask in zip(parts[0].response, parts[0].mask):
        kept = row[mask].tolist()
        assert tok.eos_token_id not in kept[:-1]
        assert all(t == tok.pad_token_id for t in row[~mask].tolist())
    assert all("[EOS]" not in t and "[PAD]" not in t for t in texts)


def test_reward_model_scores_ids_and_text_alike(tmp_path, lm_pair):
    """Scoring the rollout's ids and re-tokenising the decoded text agree for a shared tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.conftest import tiny_config, tokenizer

    policy, _, tok = lm_pair
    config = tiny_config("llama")
    config.num_labels = 1
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tokenizer().save_pretrained(tmp_path / "rm")
    parts, texts = sample(policy, tok, PROMPTS, Sampling(max_new_tokens=5, temperature=1.0, top_p=1.0, seed=2))
    by_ids = reward_scores(str(tmp_path / "rm"), PROMPTS, texts, tok, parts)
    other_tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    other_tok.add_tokens(["zzz"])  # a different vocabulary forces the text path
    by_text = reward_scores(str(tmp_path / "rm"), PROMPTS, texts, other_tok, parts)
    ended = parts[0].mask.sum(1) < parts[0].response.shape[1]  # rows without EOS compare directly
    np.testing.assert_allclose(by_ids[~ended.numpy()], by_text[~ended.numpy()], rtol=1e-4, atol=1e-5)


def test_reward_function_scores(lm_pair):
    _, _, tok = lm_pair
    got = reward_scores("soupkit.demo.world:gold_reward", ["describe the fox :"], ["the fox is kind ."], tok, [])
    assert got.tolist() == [1.5]
