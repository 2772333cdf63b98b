"""Evaluation measurements against torch.nn.functional and against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from soupkit.chat import Chat
from soupkit.evaluation.sampling import Sampling, load_scorer, sample, scores, sequence_kl
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
    parts = sample(policy, tok, PROMPTS, Sampling(max_new_tokens=6, temperature=0.8, top_p=1.0, seed=0), [tok.eos_token_id])
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
    parts = sample(policy, tok, PROMPTS, Sampling(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=1), [tok.eos_token_id])
    for row, mask in zip(parts[0].response, parts[0].mask):
        kept = row[mask].tolist()
        assert tok.eos_token_id not in kept[:-1]
        assert all(t == tok.pad_token_id for t in row[~mask].tolist())
    # prompts are encoded as in training: no special tokens added, left padding
    assert tok.bos_token_id not in parts[0].query.tolist()[0]
    assert parts[0].query_mask[:, -1].all()


def test_reward_model_scores_ids_and_text_alike(tmp_path, lm_pair):
    """A reward model with the policy's vocabulary scores the rollout's ids; one with another
    vocabulary scores re-tokenised text; on rows without EOS the two agree."""
    from transformers import AutoModelForSequenceClassification

    from tests.conftest import tiny_config, tokenizer

    policy, _, tok = lm_pair
    config = tiny_config("llama")
    config.num_labels = 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)  # one model, two tokenizers
    for name, extra in (("rm", None), ("rm-other", "zzz")):
        model.save_pretrained(tmp_path / name)
        other = tokenizer()
        if extra:
            other.add_tokens([extra])  # a different vocabulary forces the text path
        other.save_pretrained(tmp_path / name)
    parts = sample(policy, tok, PROMPTS, Sampling(max_new_tokens=5, temperature=1.0, top_p=1.0, seed=2), [tok.eos_token_id])
    same, other = load_scorer(str(tmp_path / "rm"), tok), load_scorer(str(tmp_path / "rm-other"), tok)
    assert same.tokenizer is None and other.tokenizer is not None
    by_ids, by_text = scores(same, parts, PROMPTS, Chat(tok, None, [tok.eos_token_id])), scores(other, parts, PROMPTS, Chat(tok, None, [tok.eos_token_id]))
    no_eos = (parts[0].response == tok.eos_token_id).sum(1) == 0
    assert no_eos.any()
    np.testing.assert_allclose(by_ids[no_eos.numpy()], by_text[no_eos.numpy()], rtol=1e-4, atol=1e-5)


def test_reward_function_gets_completions_and_ids(lm_pair):
    policy, _, tok = lm_pair
    parts = sample(policy, tok, ["describe the fox :"], Sampling(max_new_tokens=4, temperature=1.0, top_p=1.0, seed=3), [tok.eos_token_id])
    gold = scores(load_scorer("soupkit.demo.world:gold_reward", tok), parts, ["describe the fox :"], Chat(tok, None, [3]))
    text = tok.decode(parts[0].response[0][parts[0].mask[0]], skip_special_tokens=True)
    from soupkit.demo.world import gold_score

    assert gold.tolist() == [gold_score("describe the fox :", text)]
