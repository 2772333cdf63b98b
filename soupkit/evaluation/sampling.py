"""Sampling and scoring a model's completions: the one protocol of eval, of the reward along
inspect's interpolation path (and so of both columns of eval's report.md), and of training.

Per-sample measurements of one policy on held-out prompts: reward, gold reward, KL, length.
Completions are drawn and scored by the PPO code itself (the policy's tokenizer set up as in
training, prompts rendered with the same chat template, encoded without special tokens and truncated
the same way, sampling with the run's temperature and top-p, responses cut at the first end-of-turn
token, rewards read as in training), so
evaluation sees what training optimised. The KL to a reference is the exact per-token KL over the
vocabulary, both distributions temperature-scaled, summed over the response tokens: a sample
estimate of the sequence-level KL(policy || reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soupkit.chat import Chat, policy_chat, render
from soupkit.formats import Prompt, shown
from soupkit.rlhf.reward import (
    ModelReward,
    RewardFn,
    completion_ids,
    is_function_ref,
    load_reward_fn,
    reward_model_dir,
    sequence_scores,
)
from soupkit.rlhf.rollout import (
    Samples,
    encode_prompts,
    ended,
    generate,
    response_logits,
    truncate_at_stop,
)

BATCH = 32
Scorer = ModelReward | RewardFn


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    max_prompt_tokens: int = 256
    chat_template: str = "auto"
    """How prompts are rendered (``soupkit.chat``), as in training."""


def default_sampling(seed: int = 0, chat_template: str = "auto") -> Sampling:
    """The sampling settings of an ``align`` run left at its defaults (``AlignSpec``)."""
    from soupkit.recipe import AlignSpec

    default = {name: field.default for name, field in AlignSpec.model_fields.items()}
    return Sampling(default["max_new_tokens"], default["temperature"], default["top_p"], seed,
                    default["max_prompt_tokens"], chat_template)


def load_scorer(reward: str, tokenizer: Any) -> Scorer:
    """A reward function (``module:function``), or a reward model directory scored as in training."""
    if is_function_ref(reward):
        return load_reward_fn(reward)
    from soupkit.rlhf.models import reward_model

    return reward_model(reward_model_dir(reward), tokenizer, "cpu")


def sample(policy: Any, tok: Any, texts: Sequence[str], how: Sampling, stops: list[int]) -> list[Samples]:
    """One completion per rendered prompt, in batches of ``BATCH``, cut at the end of turn."""
    torch.manual_seed(how.seed)
    parts = []
    for i in range(0, len(texts), BATCH):
        enc = encode_prompts(tok, list(texts[i:i + BATCH]), how.max_prompt_tokens)
        query, qmask = enc["input_ids"].to(policy.device), enc["attention_mask"].bool().to(policy.device)
        raw = generate(policy, query, qmask, max_new_tokens=how.max_new_tokens, temperature=how.temperature,
                       top_p=how.top_p, stop_ids=stops, pad_id=tok.pad_token_id)
        response, mask = truncate_at_stop(raw, stops, tok.pad_token_id)
        parts.append(Samples(query, qmask, response, mask))
    return parts


def sequence_kl(policy: Any, ref: Any, parts: list[Samples], temperature: float) -> np.ndarray:
    """Exact per-token KL(policy || ref) summed over each response. Shape: (n,)."""
    out = []
    with torch.no_grad():
        for part in parts:
            logp = torch.log_softmax(response_logits(policy, part, temperature), dim=-1)
            logq = torch.log_softmax(response_logits(ref, part, temperature), dim=-1)
            per_token = (logp.exp() * (logp - logq)).sum(-1)
            out.append((per_token * part.mask).sum(-1))
    return torch.cat(out).numpy()


def scores(scorer: Scorer, parts: list[Samples], prompts: Sequence[Prompt], chat: Chat) -> np.ndarray:
    """Sequence scores of every completion, as the trainer computes them. Shape: (n,)."""
    out, start = [], 0
    with torch.no_grad():
        for part in parts:
            rows = list(prompts[start:start + part.query.shape[0]])
            out.append(sequence_scores(scorer, part, rows, chat.tokenizer, chat.stops, chat.template is not None))
            start += len(rows)
    return torch.cat(out).numpy().astype(float)


def mean_score(policy: Any, prompts: Sequence[Prompt], chat: Chat, how: Sampling, scorer: Scorer) -> float:
    """Mean reward of one completion per prompt, sampled and scored as in training and eval (the
    same noise for every model: the seed is set before sampling)."""
    texts = render(chat.tokenizer, prompts, chat.template, "prompts")
    parts = sample(policy, chat.tokenizer, texts, how, chat.stops)
    return float(scores(scorer, parts, prompts, chat).mean())


def completions(parts: list[Samples], chat: Chat) -> list[str]:
    """Every completion as text: no special tokens, no end-of-turn token."""
    return [text for p in parts for text in chat.tokenizer.batch_decode(completion_ids(p, chat.stops),
                                                                        skip_special_tokens=True)]


def measure(policy_dir: Path, prompts: Sequence[Prompt], how: Sampling, reward: Scorer, gold: Scorer | None,
            references: dict[str, Any]) -> dict[str, Any]:
    """Every per-prompt number for one policy: ``reward``, ``gold``, ``kl_<ref>``, ``length``,
    ``ended`` (1 when the response ended its turn), ``nonempty`` (1 when the completion has text),
    and the first few ``examples``."""
    from soupkit.loading import causal_lm

    chat = policy_chat(policy_dir, how.chat_template, f"policy {policy_dir}")
    policy = causal_lm(policy_dir, "policy")
    parts = sample(policy, chat.tokenizer, render(chat.tokenizer, prompts, chat.template, "eval prompts"), how,
                   chat.stops)
    rows: dict[str, Any] = {"reward": scores(reward, parts, prompts, chat),
                            "length": torch.cat([p.mask.sum(-1) for p in parts]).numpy().astype(float),
                            "ended": torch.cat([ended(p.response, p.mask, chat.stops) for p in parts]).numpy().astype(float)}
    if gold is not None:
        rows["gold"] = scores(gold, parts, prompts, chat)
    for name, ref in references.items():
        rows[f"kl_{name}"] = sequence_kl(policy, ref, parts, how.temperature)
    texts = completions(parts, chat)
    rows["nonempty"] = np.array([float(bool(t.strip())) for t in texts])
    rows["examples"] = [{"prompt": shown(p), "completion": c} for p, c in list(zip(prompts, texts))[:3]]
    return rows
