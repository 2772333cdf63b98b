"""Per-sample measurements of one policy on held-out prompts: reward, gold reward, KL, length.

Completions are drawn and scored by the PPO code itself (the policy's tokenizer set up as in
training, prompts encoded without special tokens and truncated the same way, sampling with the
run's temperature and top-p, responses cut at the first EOS, rewards read as in training), so
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

from soupkit.rlhf.reward import (
    ModelReward,
    RewardFn,
    is_function_ref,
    load_reward_fn,
    sequence_scores,
)
from soupkit.rlhf.rollout import (
    Rollout,
    encode_prompts,
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


def load_scorer(reward: str, tokenizer: Any) -> Scorer:
    """A reward function (``module:function``), or a reward model directory scored as in training."""
    if is_function_ref(reward):
        return load_reward_fn(reward)
    from soupkit.checkpoint import resolve_model_dir
    from soupkit.rlhf.models import reward_model

    return reward_model(resolve_model_dir(reward, "reward model"), tokenizer, "cpu")


def sample(policy: Any, tok: Any, prompts: Sequence[str], how: Sampling) -> list[Rollout]:
    """One completion per prompt, in batches of ``BATCH``, cut at EOS."""
    torch.manual_seed(how.seed)
    parts = []
    for i in range(0, len(prompts), BATCH):
        enc = encode_prompts(tok, list(prompts[i:i + BATCH]), how.max_prompt_tokens)
        query, qmask = enc["input_ids"], enc["attention_mask"].bool()
        raw = generate(policy, query, qmask, max_new_tokens=how.max_new_tokens, temperature=how.temperature,
                       top_p=how.top_p, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        response, mask = truncate_at_stop(raw, tok.eos_token_id, tok.pad_token_id)
        parts.append(Rollout(query, qmask, response, mask))
    return parts


def sequence_kl(policy: Any, ref: Any, parts: list[Rollout], temperature: float) -> np.ndarray:
    """Exact per-token KL(policy || ref) summed over each response. Shape: (n,)."""
    out = []
    with torch.no_grad():
        for part in parts:
            logp = torch.log_softmax(response_logits(policy, part, temperature), dim=-1)
            logq = torch.log_softmax(response_logits(ref, part, temperature), dim=-1)
            per_token = (logp.exp() * (logp - logq)).sum(-1)
            out.append((per_token * part.mask).sum(-1))
    return torch.cat(out).numpy()


def scores(scorer: Scorer, parts: list[Rollout], prompts: Sequence[str], tok: Any) -> np.ndarray:
    """Sequence scores of every completion, as the trainer computes them. Shape: (n,)."""
    out, start = [], 0
    with torch.no_grad():
        for part in parts:
            rows = list(prompts[start:start + part.query.shape[0]])
            out.append(sequence_scores(scorer, part, rows, tok))
            start += len(rows)
    return torch.cat(out).numpy().astype(float)


def measure(policy_dir: Path, prompts: Sequence[str], how: Sampling, reward: Scorer, gold: Scorer | None,
            references: dict[str, Any]) -> dict[str, Any]:
    """Every per-prompt number for one policy: ``reward``, ``gold``, ``kl_<ref>``, ``length``."""
    from soupkit.diagnostics.texts import load_lm
    from soupkit.rlhf.models import load_tokenizer

    tok = load_tokenizer(policy_dir, trust_remote_code=False)
    policy = load_lm(policy_dir, "policy")
    parts = sample(policy, tok, prompts, how)
    rows: dict[str, Any] = {"reward": scores(reward, parts, prompts, tok),
                            "length": torch.cat([p.mask.sum(-1) for p in parts]).numpy().astype(float)}
    if gold is not None:
        rows["gold"] = scores(gold, parts, prompts, tok)
    for name, ref in references.items():
        rows[f"kl_{name}"] = sequence_kl(policy, ref, parts, how.temperature)
    texts = [tok.decode(r[m], skip_special_tokens=True) for p in parts for r, m in zip(p.response, p.mask)]
    rows["examples"] = [{"prompt": p, "completion": c} for p, c in list(zip(prompts, texts))[:3]]
    return rows
