"""Sampling responses with a KV cache, and teacher-forced log-probs, entropies and values.

Layout of a batch: ``query`` (b, p) left-padded prompts, ``response`` (b, t) right-padded tokens.
``query_mask`` / ``response_mask`` are True on real tokens; a response ends at its first EOS
(kept, and valid) and everything after it is padding (the "EOS trick" of Huang et al. 2023, https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo).
Forward passes use explicit ``position_ids = cumsum(mask) - 1`` so left padding does not shift
positions (Huang et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import torch

from soupkit.rlhf.rng import keyed_generator

R = TypeVar("R", bound="Samples")


@dataclass(frozen=True)
class Samples:
    """Prompts and the responses sampled for them: the token layout every forward pass reads."""

    query: torch.Tensor
    """(b, p) prompt ids, left-padded."""
    query_mask: torch.Tensor
    """(b, p) bool, True on real prompt tokens."""
    response: torch.Tensor
    """(b, t) response ids; after a row's first end-of-turn token, padding."""
    mask: torch.Tensor
    """(b, t) bool, True on valid response tokens (up to and including the end of turn)."""

    @property
    def sequences(self) -> torch.Tensor:
        """Prompt and response side by side. Shape: (b, p + t)."""
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """True on the real tokens of ``sequences``. Shape: (b, p + t)."""
        return torch.cat([self.query_mask, self.mask], dim=1)

    def select(self: R, rows: torch.Tensor) -> R:
        """The same record for the rows ``rows`` of every tensor (a minibatch)."""
        return replace(self, **{f.name: _rows(getattr(self, f.name), rows) for f in fields(self)})


@dataclass(frozen=True)
class Rollout(Samples):
    """One PPO batch as sampled and scored: every tensor the advantages and metrics are computed
    from, filled at once (after torchtune's ``Trajectory`` and OpenRLHF's ``Experience``)."""

    logprobs: torch.Tensor
    """(b, t) the policy's log-probs of the response tokens at sampling time (temperature-scaled)."""
    entropy: torch.Tensor
    """(b, t) entropy of the policy's temperature-scaled next-token distribution."""
    ref_logprobs: torch.Tensor
    """(b, r, t) each of the r references' log-probs of the response tokens."""
    values: torch.Tensor
    """(b, t) the critic's value at each position that predicts a response token."""
    scores: torch.Tensor
    """(b,) the sequence reward, with the missing-EOS penalty applied when configured."""
    watch_logprobs: dict[str, torch.Tensor]
    """name -> (b, t) log-probs of each watch model, for the ``kl_<name>`` metrics."""
    engine_logprobs: torch.Tensor | None = None
    """(b, t) the rollout engine's own log-probs of the sampled tokens (0 on padding), when it
    reports them (``vllm``); None when the policy sampled them itself (``hf``)."""


@dataclass(frozen=True)
class Trajectory(Samples):
    """What one PPO optimisation pass reads per micro-batch: the samples, the log-probs and values
    they were drawn and judged with, and their GAE targets."""

    logprobs: torch.Tensor
    """(b, t) the policy's log-probs at sampling time (the denominator of the PPO ratio)."""
    values: torch.Tensor
    """(b, t) the critic's values at sampling time (the centre of value clipping)."""
    advantages: torch.Tensor
    """(b, t) GAE advantages, whitened over the global batch when configured."""
    returns: torch.Tensor
    """(b, t) advantages + values: the critic's regression target."""


def samples_of(record: Samples) -> dict[str, torch.Tensor]:
    """The ``Samples`` fields of a record, to build a richer record on the same tokens."""
    return {f.name: getattr(record, f.name) for f in fields(Samples)}


def _rows(value: Any, rows: torch.Tensor) -> Any:
    if isinstance(value, dict):
        return {k: v[rows] for k, v in value.items()}
    return None if value is None else value[rows]


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int):
    """Left-padded prompt ids of rendered prompt texts (``soupkit.chat.render``), no special
    tokens added (the text, with its chat template if any, is the whole query),
    long prompts keeping their last ``max_prompt_tokens`` tokens (the tokenizer truncates left)."""
    return tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True,
                     max_length=max_prompt_tokens, add_special_tokens=False)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1``, clamped at 0 for leading pads. Shapes: (b, s) -> (b, s)."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside the nucleus to -inf (Holtzman et al. 2019, arXiv 1904.09751).

    Keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (at least
    one token). Shapes: (b, v) -> (b, v).
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already enough
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from ``softmax(logits / temperature)`` within the nucleus. (b, v) -> (b,)."""
    probs = torch.softmax(top_p_filter(logits.float() / temperature, top_p), dim=-1)
    return torch.multinomial(probs, 1).squeeze(-1)


def sample_by_uniform(logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The token whose CDF interval holds ``uniform``: inverse-CDF sampling from the same
    distribution as ``sample_next``, but driven by given noise. Shapes: (b, v), (b,) -> (b,).

    Zero-probability tokens have empty intervals, so they are never drawn; scaling ``uniform`` by
    the last CDF value keeps a rounding shortfall of the total below 1 from picking past the end.
    """
    probs = torch.softmax(top_p_filter(logits.float() / temperature, top_p), dim=-1)
    cdf = probs.cumsum(dim=-1)
    token = torch.searchsorted(cdf, (uniform.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1), right=True)
    return token.squeeze(-1).clamp(max=probs.shape[-1] - 1)


def sampling_uniforms(seed: int, step: int, positions: list[int], n: int) -> torch.Tensor:
    """One U(0, 1) per (row, new token) from a generator keyed by (seed, step, global row), so a
    row's response does not depend on which process samples it or how many there are. (b, n)."""
    rows = [torch.rand(n, generator=keyed_generator(seed, step, p)) for p in positions]
    return torch.stack(rows) if rows else torch.zeros(0, n)


@torch.no_grad()
def generate(
    model, query: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int,
    temperature: float, top_p: float, stop_ids: list[int], pad_id: int, uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample up to ``max_new_tokens`` per row with a KV cache; a row ends at its first token of
    ``stop_ids`` (any end-of-turn token) and gets ``pad_id`` after it.

    ``uniforms`` (b, max_new_tokens), when given, drives the sampling (``sample_by_uniform``);
    otherwise the global torch RNG does. Stops early once every row has produced EOS.
    Shapes: (b, p), (b, p) -> (b, t <= max_new_tokens).
    """
    mask = query_mask.long()
    positions = position_ids(mask)
    out = model(input_ids=query, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    next_position = positions[:, -1:] + 1
    done = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
    stops = torch.tensor(stop_ids, device=query.device)
    tokens = []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1]
        token = (sample_next(logits, temperature, top_p) if uniforms is None
                 else sample_by_uniform(logits, uniforms[:, len(tokens)], temperature, top_p))
        token = token.masked_fill(done, pad_id)
        tokens.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()) or len(tokens) == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position,
                    use_cache=True, **kv_cache(out))
        next_position = next_position + 1
    return torch.stack(tokens, dim=1)


def kv_cache(out: Any) -> dict[str, Any]:
    """The model output's KV cache as the next call's keyword: ``cache`` in transformers 5.24,
    ``past_key_values`` in the 5.19 that vLLM 0.32 needs (``soupkit[vllm]``)."""
    return {"cache": out.cache} if hasattr(out, "cache") else {"past_key_values": out.past_key_values}


def is_stop(response: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """True where a token ends the turn. Shapes: (b, t) -> (b, t)."""
    return torch.isin(response, torch.tensor(stop_ids, device=response.device))


def ended(response: torch.Tensor, mask: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """True for rows whose response ended with a stop token (not cut by the length limit). (b, t) -> (b,)."""
    return (is_stop(response, stop_ids) & mask).any(dim=1)


def truncate_at_stop(response: torch.Tensor, stop_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row up to and including its first token of ``stop_ids``; pad the rest.

    Returns ``(response, mask)`` with mask True on kept tokens. Shapes: (b, t) -> (b, t), (b, t).
    """
    is_stop = torch.isin(response, torch.tensor(stop_ids, device=response.device))
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()  # stops strictly before t
    mask = stops_before == 0
    return response.masked_fill(~mask, pad_id), mask


def response_logits(model, rollout: Samples, temperature: float) -> torch.Tensor:
    """Temperature-scaled logits that predicted each response token. Shape: (b, t, v), fp32.

    Dividing by the sampling temperature makes these the distribution the tokens were drawn
    from (Huang et al. 2023: without it the KL rises faster than it should).
    """
    mask = rollout.attention_mask
    t = rollout.response.shape[1]
    out = model(input_ids=rollout.sequences, attention_mask=mask.long(),
                position_ids=position_ids(mask), logits_to_keep=t + 1)
    return scaled_logits(out.logits[:, :-1], temperature)


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` in fp32 as the only fp32 copy: bf16 logits are cast once and fp32
    ones divided in place (autograd allows it: the LM head's backward does not read its output).
    Shapes: (b, t, v) -> (b, t, v)."""
    return logits.float().div_(temperature)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token]``, without a log-softmax copy of the logits. Shapes: (b, t, v), (b, t) -> (b, t)."""
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


ENTROPY_POSITIONS = 8
"""Positions per slice in ``entropy``: its temporaries are this many positions of the logits, not all."""


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position, ``H = logsumexp(x) - sum(softmax(x) x)``,
    computed a few positions at a time so no full-size temporary is made. (b, t, v) -> (b, t)."""
    parts = []
    for part in logits.split(ENTROPY_POSITIONS, dim=1):
        lse = torch.logsumexp(part, dim=-1, keepdim=True)
        probs = (part - lse).exp_()
        parts.append(lse.squeeze(-1) - (probs.mul_(part)).sum(dim=-1))
    return torch.cat(parts, dim=1) if parts else logits.new_zeros(logits.shape[:2])


def in_chunks(fn, rollout: Samples, size: int) -> torch.Tensor:
    """``fn`` applied to row chunks of at most ``size`` and concatenated (no-grad passes)."""
    b = rollout.query.shape[0]
    parts = [fn(rollout.select(torch.arange(i, min(i + size, b)))) for i in range(0, b, size)]
    return torch.cat(parts, dim=0)
