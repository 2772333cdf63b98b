"""Sequence scores: a reward model read at the last real token, or a Python function.

A reward function has the signature TRL uses for its reward functions:
``fn(prompts: list[str], completions: list[str], **kw) -> list[float]``; soupkit passes
``completion_ids`` (lists of token ids) as a keyword.
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

from soupkit.errors import SoupkitError
from soupkit.rlhf.advantage import last_index
from soupkit.rlhf.rollout import Rollout, position_ids


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


@dataclass
class ModelReward:
    """A sequence-classification reward model, with its tokenizer when it differs from the policy's."""

    model: Any
    tokenizer: Any | None
    """None when the reward model reads the policy's token ids directly."""


@torch.no_grad()
def last_token_scores(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at the last real token of each row ([N] detail 1). (b, s), (b, s) -> (b,)."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask.long(),
                              position_ids=position_ids(mask)).last_hidden_state
    rows = torch.arange(ids.shape[0], device=ids.device)
    return model.score(hidden[rows, last_index(mask)]).squeeze(-1).float()


def model_scores(reward: ModelReward, rollout: Rollout, texts: Callable[[], list[str]]) -> torch.Tensor:
    """Scores of the rollout's prompt + response; re-tokenised when the tokenizers differ. (b,)."""
    if reward.tokenizer is None:
        return last_token_scores(reward.model, rollout.sequences, rollout.attention_mask)
    device = rollout.query.device
    enc = reward.tokenizer(texts(), return_tensors="pt", padding=True, truncation=True).to(device)
    return last_token_scores(reward.model, enc["input_ids"], enc["attention_mask"].bool())


def sequence_scores(reward: ModelReward | RewardFn, roll: Rollout, prompts: list[str], tok: Any) -> torch.Tensor:
    """Scores (b,) of a rollout: a reward model on its token ids (or on the decoded prompt +
    response when its tokenizer differs), or a reward function on the decoded responses."""
    ids = [row[m].tolist() for row, m in zip(roll.response, roll.mask)]
    if isinstance(reward, ModelReward):
        texts = lambda: [tok.decode(roll.sequences[i][roll.attention_mask[i]], skip_special_tokens=True)  # noqa: E731
                         for i in range(len(prompts))]
        return model_scores(reward, roll, texts)
    completions = tok.batch_decode(ids, skip_special_tokens=True)
    return function_scores(reward, prompts, completions, ids, roll.query.device)


def function_scores(fn: RewardFn, prompts: list[str], completions: list[str],
                    completion_ids: list[list[int]], device: Any) -> torch.Tensor:
    """Call a reward function and check it returned one finite float per completion. (b,)."""
    out = fn(prompts, completions, completion_ids=completion_ids)
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise SoupkitError(f"reward function returned {type(out).__name__}; expected a list of floats") from None
    if len(values) != len(completions):
        raise SoupkitError(f"reward function returned {len(values)} scores for {len(completions)} completions")
    if not all(math.isfinite(v) for v in values):
        raise SoupkitError("reward function returned a NaN or infinite score")
    return torch.tensor(values, dtype=torch.float32, device=device)


def missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract ``penalty`` from rows that did not end with EOS (TRL's ``missing_eos_penalty``,
    the [N] "EOS trick"). Shapes: (b,), (b,) -> (b,)."""
    return scores - penalty * (~ended).float()
