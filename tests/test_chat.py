"""Chat templates: settings, rendering, end-of-turn tokens, and template-aware scoring, checked
against hand-written strings and transformers' own forward passes."""

from __future__ import annotations

import json

import pytest
import torch

from soupkit.chat import CHATML, render, stop_ids, template_text, use_template
from soupkit.errors import SoupkitError
from tests.conftest import make_model, tiny_config, tokenizer

USER = {"role": "user", "content": "the cat"}


def chatml_tokenizer():
    from transformers import AutoModelForCausalLM

    tok = tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    use_template(tok, "chatml", "test", model)
    return tok, model


def test_settings_select_a_template(tmp_path):
    assert template_text("auto", None, "w") is None
    assert template_text("auto", "T", "w") == "T"
    assert template_text("never", "T", "w") is None
    assert template_text("always", "T", "w") == "T"
    assert template_text("chatml", "T", "w") == CHATML
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert template_text(str(tmp_path / "t.jinja"), "T", "w") == "{{ messages[0]['content'] }}"
    with pytest.raises(SoupkitError, match="^w: chat_template always, but the tokenizer has no chat template"):
        template_text("always", None, "w")
    with pytest.raises(SoupkitError, match="^w: chat_template file .*nope.jinja not found"):
        template_text(str(tmp_path / "nope.jinja"), None, "w")


def test_chatml_on_a_base_vocabulary_adds_its_markers_and_ends_turns_with_im_end():
    tok, model = chatml_tokenizer()
    assert len(tok) == len(tokenizer()) + 2
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok.eos_token == "<|im_end|>" and model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(SoupkitError, match="chatml needs the tokens <\\|im_start\\|>, <\\|im_end\\|>"):
        use_template(tokenizer(), "chatml", "policy init x")  # no model to grow: align cannot add them


def test_string_and_conversational_prompts_render_to_the_same_ids():
    tok, _ = chatml_tokenizer()
    text, conv = render(tok, ["the cat", [USER]], CHATML, "prompts")
    assert text == conv == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == start and ids.count(end) == 1  # the markers are single tokens


def test_plain_prompts_without_template_and_conversations_refused():
    tok = tokenizer()
    assert render(tok, ["the cat"], None, "prompts p.jsonl") == ["the cat"]
    with pytest.raises(SoupkitError, match="^prompts p.jsonl: prompt 2 is a conversation but no chat template"):
        render(tok, ["the cat", [USER]], None, "prompts p.jsonl")


def test_stop_ids_are_eos_and_every_generation_config_eos(tmp_path):
    path = make_model(tmp_path / "m")
    tok = tokenizer()
    assert stop_ids(tok, path) == [3]  # generation_config.json: eos_token_id 3, the tokenizer's EOS
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7, 9]}))
    assert stop_ids(tok, path) == [3, 7, 9]


def test_reward_model_scores_the_conversation_rendered_with_its_template():
    """The score equals transformers' sequence-classification logit of the templated conversation
    (TRL's RewardTrainer input); a reward function gets TRL's conversational convention."""
    from transformers import AutoModelForSequenceClassification

    from soupkit.rlhf.reward import ModelReward, conversation_scores, function_scores

    tok, lm = chatml_tokenizer()
    config = tiny_config("llama")
    config.num_labels, config.vocab_size = 1, len(tok)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(config).eval()
    prompts, completions = ["the cat", [USER, {"role": "assistant", "content": "a"}, USER]], ["sat on the mat", "yes"]
    got = conversation_scores(ModelReward(rm, None, tok), prompts, completions, "cpu")
    for prompt, completion, score in zip(prompts, completions, got):
        conv = ([USER] if isinstance(prompt, str) else prompt) + [{"role": "assistant", "content": completion}]
        ids = torch.tensor([tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]])
        with torch.no_grad():
            assert float(score) == pytest.approx(float(rm(input_ids=ids).logits[0, 0]), rel=1e-5, abs=1e-6)
    seen = {}

    def fn(prompts, completions, **kw):
        seen.update(prompts=prompts, completions=completions)
        return [0.0] * len(prompts)

    function_scores(fn, ["the cat", [USER]], ["x", "y"], [[4], [5]], "cpu")
    assert seen["completions"] == ["x", [{"role": "assistant", "content": "y"}]]
