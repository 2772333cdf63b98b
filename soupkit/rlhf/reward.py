"""Sequence scores: a reward model read at the last real token, or a Python function.

A reward function has the signature TRL uses for its reward functions:
``fn(prompts, completions, **kw) -> list[float]``, with TRL's convention for the values: a string
prompt comes with a string completion, a conversational prompt (a list of messages) with a list
holding one assistant message. soupkit passes ``completion_ids`` (lists of token ids) as a keyword.
Completions are decoded without special tokens and without the token that ended the turn.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from soupkit.chat import render_conversation
from soupkit.errors import SoupkitError
from soupkit.formats import Conversation, Prompt, as_conversation
from soupkit.rlhf.advantage import last_index
from soupkit.rlhf.rollout import Samples, position_ids


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], **kw: Any) -> list[float]: ...


def is_function_ref(reward: str) -> bool:
    """``module:function`` or ``file.py:function`` (not an existing directory)."""
    return ":" in reward and not Path(reward).expanduser().is_dir()


def load_reward_fn(reward: str) -> RewardFn:
    """Import ``module:function`` or ``path/to/file.py:function``; clear errors if it fails."""
    target, _, name = reward.rpartition(":")
    if not target or not name:
        raise SoupkitError(f"reward {reward!r}: expected module:function or file.py:function")
    module = _import_file(target, reward) if target.endswith(".py") else _import_module(target, reward)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SoupkitError(f"reward {reward!r}: {target} has no function {name!r}")
    return fn


def _import_file(target: str, reward: str) -> Any:
    path = Path(target).expanduser()
    if not path.is_file():
        raise SoupkitError(f"reward {reward!r}: file {path} not found")
    spec = importlib.util.spec_from_file_location(f"soupkit_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file failed to import
        raise SoupkitError(f"reward {reward!r}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    return module


def _import_module(target: str, reward: str) -> Any:
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # console scripts do not put the working directory on sys.path
    try:
        return importlib.import_module(target)
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import
        raise SoupkitError(f"reward {reward!r}: cannot import {target!r}: {type(exc).__name__}: {exc}") from None


GET_A_REWARD_MODEL = ("a reward model must be a sequence classifier (one label) whose score head was saved: "
                      "train one with the reward_model: stage of `soupkit run`, or pass a reward function "
                      "as module:function")


def reward_model_dir(ref: str) -> Path:
    """The directory of reward model ``ref``, checked from its files alone (config and safetensors
    headers, no weights loaded) to hold a saved one-output ``score`` head. transformers would give a
    causal LM a randomly initialised head without an error, and PPO would optimise noise."""
    from soupkit.modeldir import resolve_model_dir

    path = resolve_model_dir(ref, "reward model")
    problem = _head_problem(path)
    if problem:
        raise SoupkitError(f"reward model {ref}: {problem}; {GET_A_REWARD_MODEL}")
    return path


def _head_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable reward model, or None. The head is ``score`` as in transformers'
    ``*ForSequenceClassification`` decoders (Llama, Mistral, Qwen, Gemma), which soupkit reads."""
    from soupkit.modeldir import has_pickle_weights, read_config, tensor_headers

    archs = read_config(path).get("architectures") or []
    tensors = tensor_headers(path)
    heads = [t for name, t in tensors.items() if name.split(".")[-2:] == ["score", "weight"]]
    if heads:
        return None if heads[0].shape[0] == 1 else f"its score head has {heads[0].shape[0]} outputs, not 1"
    classifier = any(str(a).endswith("ForSequenceClassification") for a in archs)
    if not tensors and not has_pickle_weights(path):
        return "no weights (*.safetensors or pytorch_model*.bin) in the directory"
    if not tensors and classifier:
        return None  # pickle weights cannot be read without loading them; the config is the evidence
    kind = ", ".join(map(str, archs)) or "no architectures in config.json"
    return f"no trained score head ({kind}; no score.weight in its weights)"


@dataclass
class ModelReward:
    """A sequence-classification reward model, with its tokenizer when it differs from the policy's."""

    model: Any
    tokenizer: Any | None
    """None when the reward model reads the policy's token ids directly."""
    chat_tokenizer: Any | None = None
    """The reward model's own tokenizer when it has a chat template: with chat prompts, the whole
    conversation is rendered with it, as TRL's RewardTrainer tokenised conversational pairs."""


@torch.no_grad()
def last_token_scores(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at the last real token of each row (Huang et al. 2023, https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo). (b, s), (b, s) -> (b,)."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask.long(),
                              position_ids=position_ids(mask)).last_hidden_state
    rows = torch.arange(ids.shape[0], device=ids.device)
    return model.score(hidden[rows, last_index(mask)]).squeeze(-1).float()


def model_scores(reward: ModelReward, rollout: Samples, texts: Callable[[], list[str]]) -> torch.Tensor:
    """Scores of the rollout's prompt + response; re-tokenised when the tokenizers differ. (b,)."""
    if reward.tokenizer is None:
        return last_token_scores(reward.model, rollout.sequences, rollout.attention_mask)
    device = rollout.query.device
    enc = reward.tokenizer(texts(), return_tensors="pt", padding=True, truncation=True).to(device)
    return last_token_scores(reward.model, enc["input_ids"], enc["attention_mask"].bool())


def conversation_scores(reward: ModelReward, prompts: list[Prompt], completions: list[str], device: Any) -> torch.Tensor:
    """Scores of each prompt + completion as one conversation, rendered with the reward model's
    chat template (the completion is the assistant's turn). (b,)."""
    tok = reward.chat_tokenizer
    rows = [render_conversation(tok, as_conversation(p) + [{"role": "assistant", "content": c}], tok.chat_template)
            for p, c in zip(prompts, completions)]
    ids, mask = right_padded(rows, tok.pad_token_id if tok.pad_token_id is not None else 0)
    return last_token_scores(reward.model, ids.to(device), mask.to(device))


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask (True on real tokens). Shapes: -> (b, s), (b, s)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), True
    return ids, mask


def completion_ids(roll: Samples, stops: list[int]) -> list[list[int]]:
    """Each response's token ids without the token that ended the turn."""
    out = []
    for row, mask in zip(roll.response, roll.mask):
        ids = row[mask].tolist()
        out.append(ids[:-1] if ids and ids[-1] in stops else ids)
    return out


def sequence_scores(reward: ModelReward | RewardFn, roll: Samples, prompts: list[Prompt], tok: Any,
                    stops: list[int], chat: bool = False) -> torch.Tensor:
    """Scores (b,) of a rollout. A reward model reads its token ids, or the decoded text when its
    tokenizer differs, or (``chat`` prompts and a reward model with a chat template) the whole
    conversation; a reward function gets the prompts and decoded completions in TRL's convention."""
    if isinstance(reward, ModelReward) and not (chat and reward.chat_tokenizer is not None):
        texts = lambda: [tok.decode(roll.sequences[i][roll.attention_mask[i]], skip_special_tokens=True)  # noqa: E731
                         for i in range(len(prompts))]
        return model_scores(reward, roll, texts)  # the rollout's own ids: nothing to decode
    ids = completion_ids(roll, stops)
    completions = tok.batch_decode(ids, skip_special_tokens=True)
    if isinstance(reward, ModelReward):
        return conversation_scores(reward, prompts, completions, roll.query.device)
    return function_scores(reward, prompts, completions, ids, roll.query.device)


def trl_completions(prompts: list[Prompt], completions: list[str]) -> list[str | Conversation]:
    """TRL's convention: a conversational prompt's completion is a list with one assistant message."""
    return [[{"role": "assistant", "content": c}] if isinstance(p, list) else c for p, c in zip(prompts, completions)]


def function_scores(fn: RewardFn, prompts: list[Prompt], completions: list[str],
                    completion_ids: list[list[int]], device: Any) -> torch.Tensor:
    """Call a reward function (prompts and completions in TRL's convention) and check it returned
    one finite float per completion. (b,)."""
    values = call_reward_fn(fn, prompts, trl_completions(prompts, completions), completion_ids=completion_ids)
    return torch.tensor(values, dtype=torch.float32, device=device)


def call_reward_fn(fn: RewardFn, prompts: list[Any], completions: list[Any], **kw: Any) -> list[float]:
    """``fn(prompts, completions, **kw)`` as one finite float per completion. What the user's code
    raises becomes a ``SoupkitError`` naming the function, chained to it (``--debug`` prints it)."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    try:
        out = fn(prompts, completions, **kw)
    except Exception as exc:  # noqa: BLE001 - the user's code failed; say so in one line
        raise SoupkitError(f"reward function {name} raised {_described(exc)} "
                           "(`soupkit --debug ...` or SOUPKIT_DEBUG=1 prints its traceback)") from exc
    try:
        values = [float(v) for v in out]
    except Exception:  # noqa: BLE001 - not a sequence of numbers
        raise SoupkitError(f"reward function {name} returned {type(out).__name__}; expected a list of floats") from None
    if len(values) != len(completions):
        raise SoupkitError(f"reward function {name} returned {len(values)} scores for {len(completions)} completions")
    if not all(math.isfinite(v) for v in values):
        raise SoupkitError(f"reward function {name} returned a NaN or infinite score")
    return values


def _described(exc: Exception) -> str:
    """``Type: message (at file.py:line)`` on one line; the place is the innermost frame."""
    import traceback

    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}{': ' + text if text else ''}{where}"


def missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract ``penalty`` from rows that did not end with EOS (TRL's ``missing_eos_penalty``,
    the "EOS trick" of Huang et al. 2023). Shapes: (b,), (b,) -> (b,)."""
    return scores - penalty * (~ended).float()
