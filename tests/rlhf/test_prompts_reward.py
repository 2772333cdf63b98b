"""Prompt files, prompt order, reward functions and reward-model scores."""

from __future__ import annotations

import pytest
import torch

from soupkit.errors import SoupkitError
from soupkit.rlhf.prompts import batch_indices, load_prompts
from soupkit.rlhf.reward import (
    function_scores,
    last_token_scores,
    load_reward_fn,
    missing_eos_penalty,
)
from tests.rlhf.conftest import REWARDS


def test_prompt_files(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a b"}\n\n{"prompt": "c", "x": 1}\n')
    (tmp_path / "p.txt").write_text("one\n\n two \n")
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["a b", "c"]
    assert load_prompts(str(tmp_path / "p.txt")) == ["one", "two"]


@pytest.mark.parametrize("name, text, message", [
    ("empty.txt", "\n \n", "empty"),
    ("bad.jsonl", '{"prompt": "a"}\n{oops\n', "bad.jsonl:2: invalid JSON"),
    ("field.jsonl", '{"text": "a"}\n', "field.jsonl:1: no prompt: expected a 'prompt' field .* the row has text"),
])
def test_bad_prompt_files(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(SoupkitError, match=message):
        load_prompts(str(tmp_path / name))


def test_missing_prompt_file(tmp_path):
    with pytest.raises(SoupkitError, match="not found"):
        load_prompts(str(tmp_path / "nope.jsonl"))


def test_batch_indices_visit_every_prompt_once_per_pass():
    seen = [i for step in range(5) for i in batch_indices(10, 4, step, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_indices(10, 4, 2, seed=3) == seen[8:12]  # a pure function of the step
    assert seen[:10] != seen[10:20]  # reshuffled each pass


def test_reward_function_from_file_and_module():
    fn = load_reward_fn(f"{REWARDS}:good_words")
    assert fn(["p", "p"], ["cat dog", "cat tree"]) == [1.0, 0.5]
    assert load_reward_fn("tests.rlhf.rewards:good_words")(["p"], ["sun"]) == [1.0]


@pytest.mark.parametrize("ref, message", [
    ("nope_module_xyz:fn", "cannot import 'nope_module_xyz'"),
    (f"{REWARDS}:missing", "has no function 'missing'"),
    ("/no/such/file.py:fn", "not found"),
    ("justtext", "expected module:function"),
])
def test_unimportable_reward_functions(ref, message):
    with pytest.raises(SoupkitError, match=message):
        load_reward_fn(ref)


def test_function_scores_checks_what_comes_back():
    ok = function_scores(lambda p, c, **kw: [1, 2.5], ["a", "b"], ["x", "y"], [[1], [2]], "cpu")
    assert ok.tolist() == [1.0, 2.5]
    with pytest.raises(SoupkitError, match="returned 1 scores for 2"):
        function_scores(lambda p, c, **kw: [1.0], ["a", "b"], ["x", "y"], [[1], [2]], "cpu")
    with pytest.raises(SoupkitError, match="NaN"):
        function_scores(lambda p, c, **kw: [float("nan")] * 2, ["a", "b"], ["x", "y"], [[1], [2]], "cpu")


def test_missing_eos_penalty():
    out = missing_eos_penalty(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), 2.0)
    assert out.tolist() == [1.0, -1.0]


def test_reward_model_score_at_last_real_token_matches_hf_pooling(reward_model):
    # HF's sequence classifier pools at the last non-pad token; ours reads the same position from
    # the explicit mask, with left or right padding.
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = ids != 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask.long()).logits.squeeze(-1)
        torch.testing.assert_close(last_token_scores(model, ids, mask), expected, atol=1e-5, rtol=1e-5)
        left = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
        torch.testing.assert_close(last_token_scores(model, left, left != 0), expected, atol=1e-5, rtol=1e-5)
