"""A minimal reward for ``inspect --path --reward``: sample completions, score them, average.

``RM`` is a directory holding an ``AutoModelForSequenceClassification`` with one label (scored
at the last real token of prompt + completion, not at a pad-id guess: models whose pad and EOS ids
coincide would otherwise be scored on padding), or ``module:function`` with TRL's reward-function
signature ``fn(prompts: list[str], completions: list[str], **kw) -> list[float]``
(https://huggingface.co/docs/trl/main/en/rewards). ``soupkit.rlhf`` has the full reward machinery;
this is deliberately small.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError
from soupkit.formats import Prompt

RewardFn = Callable[[list[Prompt], list[str], bool], list[float]]
"""``(prompts, completions, chat) -> scores``; ``chat``: the prompts were rendered with a chat template."""
MAX_NEW_TOKENS = 32
SEED = 0


def load_reward(spec: str) -> RewardFn:
    """A reward function from a model directory or ``module:function`` / ``file.py:function``
    (the loaders of ``soupkit.rlhf.reward``); fails fast on bad input."""
    from soupkit.rlhf.reward import is_function_ref, load_reward_fn, reward_model_dir

    if Path(spec).is_dir():
        return _model_reward(reward_model_dir(spec))
    if is_function_ref(spec):
        from soupkit.rlhf.reward import call_reward_fn, trl_completions

        fn = load_reward_fn(spec)
        return lambda prompts, completions, chat: call_reward_fn(fn, prompts, trl_completions(prompts, completions))
    raise SoupkitError(f"--reward {spec!r}: neither a reward-model directory nor module:function")


def _model_reward(path: Path) -> RewardFn:
    from soupkit.loading import load_tokenizer, seq_cls

    model, tok = seq_cls(path, "--reward"), load_tokenizer(path, "--reward")
    return lambda prompts, completions, chat: _model_scores(model, tok, prompts, completions, chat)


def _model_scores(model: Any, tok: Any, prompts: list[Prompt], completions: list[str], chat: bool) -> list[float]:
    """A conversation rendered with the reward model's chat template (as TRL trains it) when the
    prompts are chat prompts and it has one; else prompt + completion as plain text."""
    from soupkit.chat import own_template
    from soupkit.rlhf.reward import ModelReward, conversation_scores

    if chat and own_template(tok) is not None:
        return conversation_scores(ModelReward(model, tok, tok), prompts, completions, "cpu").tolist()
    return score_last_token(model, tok, [p + c for p, c in zip(prompts, completions)])


def score_last_token(model: Any, tok: Any, texts: list[str]) -> list[float]:
    """Reward-model scores (b,) read at each text's last real token (right padding, own mask)."""
    from soupkit.rlhf.reward import last_token_scores, right_padded

    ids = [tok(t)["input_ids"] or [tok.eos_token_id or 0] for t in texts]
    input_ids, mask = right_padded(ids, tok.pad_token_id or 0)
    return last_token_scores(model, input_ids, mask).tolist()


def sample(model: Any, tok: Any, texts: list[str], chat: bool, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """One sampled completion per rendered prompt (temperature 1, fixed seed: the same noise at
    each point); generation stops at every ``eos_token_id`` of the model's generation config."""
    import torch

    torch.manual_seed(SEED)
    tok.padding_side = "left"  # generation continues at the right edge of every row
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    decoded = [tok.decode(row[enc.input_ids.shape[1]:], skip_special_tokens=True) for row in out]
    return decoded if chat else [_join(c) for c in decoded]


def _join(completion: str) -> str:
    """Completions start with a space so ``prompt + completion`` reads as text for word-level tokenizers."""
    return completion if not completion or completion[0].isspace() else " " + completion


def mean_reward(fn: RewardFn, tok: Any, prompts: list[Prompt], texts: list[str], chat: bool) -> Callable[[Any], float]:
    """``model -> mean reward of its sampled completions`` over ``prompts`` (fed as ``texts``,
    rendered with the chat template when ``chat``)."""

    def score(model: Any) -> float:
        completions = sample(model, tok, texts, chat)
        values = fn(prompts, completions, chat)
        if len(values) != len(prompts):
            raise SoupkitError(f"--reward returned {len(values)} scores for {len(prompts)} prompts")
        return float(sum(values) / len(values))

    return score
