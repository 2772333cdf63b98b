"""Per-sample measurements of one policy on held-out prompts: reward, gold reward, KL, length.

Completions are sampled with the align run's temperature and truncated at the first EOS (the PPO
rollout code, so evaluation sees exactly what training optimised). The KL to a reference is the
exact per-token KL over the vocabulary, both distributions temperature-scaled, summed over the
response tokens: a sample estimate of the sequence-level KL(policy || reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soupkit.rlhf.reward import is_function_ref, last_token_scores, load_reward_fn
from soupkit.rlhf.rollout import Rollout, generate, response_logits, truncate_at_stop

BATCH = 32


@dataclass
class Sampling:
    """How completions are drawn."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int


def _load_lm(path: Path | str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def sample(policy: Any, tok: Any, prompts: Sequence[str], how: Sampling) -> tuple[list[Rollout], list[str]]:
    """Completions of ``prompts`` (one each), as a rollout and as text (EOS and padding removed)."""
    torch.manual_seed(how.seed)
    parts, texts = [], []
    for i in range(0, len(prompts), BATCH):
        enc = tok(list(prompts[i:i + BATCH]), return_tensors="pt", padding=True)
        query, qmask = enc["input_ids"], enc["attention_mask"].bool()
        raw = generate(policy, query, qmask, max_new_tokens=how.max_new_tokens, temperature=how.temperature,
                       top_p=how.top_p, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        response, mask = truncate_at_stop(raw, tok.eos_token_id, tok.pad_token_id)
        parts.append(Rollout(query, qmask, response, mask))
        texts += tok.batch_decode(response, skip_special_tokens=True)
    return parts, texts


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


def reward_scores(reward: str, prompts: Sequence[str], completions: Sequence[str], tok: Any,
                  parts: list[Rollout]) -> np.ndarray:
    """Scores from a ``module:function``, or from a reward model directory: on the rollout's own
    token ids (EOS included) when it shares the policy's vocabulary, else on re-tokenised text."""
    if is_function_ref(reward):
        return np.asarray(load_reward_fn(reward)(list(prompts), list(completions)), dtype=float)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(reward).eval()
    rtok = AutoTokenizer.from_pretrained(reward)
    if rtok.get_vocab() == tok.get_vocab():
        return torch.cat([last_token_scores(model, p.sequences, p.attention_mask) for p in parts]).numpy()
    texts = [p + " " + c for p, c in zip(prompts, completions)]
    scores = []
    for i in range(0, len(texts), BATCH):
        enc = rtok(texts[i:i + BATCH], return_tensors="pt", padding=True)
        scores.append(last_token_scores(model, enc["input_ids"], enc["attention_mask"].bool()))
    return torch.cat(scores).numpy()


def measure(policy_dir: Path, prompts: Sequence[str], how: Sampling, reward: str,
            gold: str | None, references: dict[str, Any]) -> dict[str, Any]:
    """Every per-prompt number for one policy: ``reward``, ``gold``, ``kl_<ref>``, ``length``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = _load_lm(policy_dir)
    parts, completions = sample(policy, tok, prompts, how)
    rows: dict[str, Any] = {"reward": reward_scores(reward, prompts, completions, tok, parts),
                            "length": torch.cat([p.mask.sum(-1) for p in parts]).numpy().astype(float)}
    if gold:
        rows["gold"] = reward_scores(gold, prompts, completions, tok, parts)
    for name, ref in references.items():
        rows[f"kl_{name}"] = sequence_kl(policy, ref, parts, how.temperature)
    rows["examples"] = [{"prompt": p, "completion": c} for p, c in list(zip(prompts, completions))[:3]]
    return rows
