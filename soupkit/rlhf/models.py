"""Finding, checking and loading the models of a PPO run.

``preflight`` reads only configs, prompt files and the reward function, so bad input fails in
well under a second, before any weights load. ``load_models`` then builds the policy (trainable),
the critic (trainable, a separate value model), and the frozen reference(s), reward model and
watch models, all in eval mode so dropout is off (Huang et al. 2023, https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo).

Memory modes (``AlignSpec``): a LoRA policy whose reference, when it is the policy's start, is the
same weights with the adapter disabled; frozen models in bf16 and/or parked on the CPU between
their forward passes; gradient checkpointing of the trained models.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soupkit import adapters
from soupkit.chat import own_template, policy_chat, render
from soupkit.errors import SoupkitError
from soupkit.formats import Prompt
from soupkit.loading import (
    causal_lm,
    freeze,
    generation_tokenizer,
    has_tokenizer,
    same_tokenizer_file,
    seq_cls,
    use_attention,
    vocab_difference,
    vocab_size,
)
from soupkit.modeldir import read_config
from soupkit.recipe import AlignSpec
from soupkit.rlhf.config import attention_for
from soupkit.rlhf.prompts import load_prompts
from soupkit.rlhf.reward import (
    ModelReward,
    RewardFn,
    is_function_ref,
    load_reward_fn,
    reward_model_dir,
)
from soupkit.rlhf.sharding import full_weights, zero3_loading


@dataclass
class Sources:
    """Every input of a run, resolved and checked."""

    refs: list[Path]
    init: Path
    prompts: list[Prompt]
    reward_dir: Path | None = None
    reward_fn: RewardFn | None = None
    watch: dict[str, Path] = field(default_factory=dict)


def preflight(spec: AlignSpec) -> Sources:
    """Resolve and check all inputs (paths, vocabularies, prompts, reward) before heavy work."""
    refs = [adapters.resolve_dir(ref, "reference") for ref in spec.ref]
    init = adapters.resolve_dir(spec.init, "init (policy start)") if spec.init else refs[0]
    watch = {name: adapters.resolve_dir(path, f"watch model {name!r}") for name, path in spec.watch.items()}
    policy_vocab = _vocab_size(init, "policy init")
    for label, path in [("reference", r) for r in refs] + [(f"watch model {n!r}", p) for n, p in watch.items()]:
        if _vocab_size(path, label) != policy_vocab:
            raise SoupkitError(
                f"{label} {path} has vocab_size {_vocab_size(path, label)} but the policy ({init}) "
                f"has {policy_vocab}; the KL needs one vocabulary"
            )
    sources = Sources(refs=refs, init=init, prompts=load_prompts(spec.prompts, spec.prompt_field, spec.prompt_split), watch=watch)
    if is_function_ref(spec.reward):
        sources.reward_fn = load_reward_fn(spec.reward)
    else:
        sources.reward_dir = reward_model_dir(spec.reward)
    return sources


def _vocab_size(path: Path, label: str) -> int:
    size = vocab_size(read_config(adapters.base_dir(path)))
    if not isinstance(size, int):
        raise SoupkitError(f"{label} {path}: config.json has no vocab_size")
    return size


@dataclass
class Models:
    """The models of a run; only ``policy`` and ``critic`` are trained."""

    policy: Any
    critic: Any
    refs: list[Any]
    tokenizer: Any
    reward: ModelReward | RewardFn
    watch: dict[str, Any]
    prompt_texts: list[str] = field(default_factory=list)
    """Each prompt as the policy reads it: rendered with the chat template, or plain text."""
    template: str | None = None
    """The chat template in use (None: plain-text prompts)."""
    stops: list[int] = field(default_factory=list)
    """Tokens that end a response: the tokenizer's EOS and the generation config's ``eos_token_id``."""
    attention: str = "sdpa"
    """The attention kernel every model runs (``config.attention_for``)."""


class ValueModel(torch.nn.Module):
    """A per-token critic: a sequence-classification model's backbone and scalar head.

    Wrapping it as one module lets accelerate/DDP see the critic's forward pass.
    """

    def __init__(self, seq_cls: Any):
        super().__init__()
        self.seq_cls = seq_cls

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """Shapes: (b, s) x3 -> (b, s)."""
        hidden = self.seq_cls.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids).last_hidden_state
        return self.seq_cls.score(hidden).squeeze(-1).float()


def load_models(spec: AlignSpec, sources: Sources, device: Any, resume_dir: Path | None = None) -> Models:
    """Load every model; from ``resume_dir`` (a checkpoint) for policy and critic. Trained models
    go to ``device``; frozen ones too, or to the CPU with ``offload_frozen``."""
    chat = policy_chat(adapters.tokenizer_dir(sources.init), spec.chat_template, f"policy init {sources.init}",
                       spec.trust_remote_code)
    tokenizer = chat.tokenizer
    texts = render(tokenizer, sources.prompts, chat.template, f"prompts {spec.prompts}")
    longest = min(check_prompts(tokenizer, texts), spec.max_prompt_tokens) + spec.max_new_tokens
    for path in sources.refs + list(sources.watch.values()):
        check_same_vocab(tokenizer, path, spec.trust_remote_code)
    if spec.offload_frozen and zero3_loading():
        raise SoupkitError("--offload-frozen under DeepSpeed ZeRO-3: the frozen models are already sharded over "
                           "the processes (and gathered one at a time); drop the flag")
    home = torch.device("cpu") if spec.offload_frozen else device
    policy = _policy(spec, sources, device, resume_dir).eval()
    reward = _reward(spec, sources, tokenizer, home)
    critic = _critic(spec, sources, reward, resume_dir, device).eval()
    refs = [_reference(p, spec, sources, policy, resume_dir, home) for p in sources.refs]
    if len(refs) > 1 and spec.ref_mode == "soup":
        if zero3_loading():
            raise SoupkitError("several --ref averaged in memory (ref_mode soup) under DeepSpeed ZeRO-3 is not "
                               "supported: merge them first with `soupkit merge` and pass the soup as --ref")
        refs = [soup_in_memory(refs)]
    watch = {name: _reference(p, spec, sources, policy, resume_dir, home) for name, p in sources.watch.items()}
    attention = attention_for(spec, torch.device(device).type, policy.config, longest)
    for model in (policy, critic.seq_cls, *refs, *watch.values(), getattr(reward, "model", None)):
        use_attention(model, attention, strict=spec.attention != "auto")
    if spec.gradient_checkpointing:
        checkpoint_layers(policy)
        checkpoint_layers(critic.seq_cls)
    return Models(policy, critic, refs, tokenizer, reward, watch, texts, chat.template, chat.stops, attention)


def frozen_dtype(spec: AlignSpec) -> torch.dtype:
    """bf16 with ``bf16: true`` (``auto`` is decided before models load, ``config.with_precision``)."""
    return torch.bfloat16 if spec.bf16 is True else torch.float32


def _policy(spec: AlignSpec, sources: Sources, device: Any, resume_dir: Path | None) -> Any:
    """The full model (fp32: the optimiser's master weights), or a LoRA adapter on a frozen base."""
    if not spec.lora_rank:
        return _causal_lm(resume_dir / "policy" if resume_dir else sources.init, spec, device, what="policy")
    base = _causal_lm(adapters.base_dir(sources.init), spec, device, frozen_dtype(spec))
    start = resume_dir / "policy" if resume_dir else adapters.adapter_dir(sources.init)
    return with_lora(base, spec, start)


def with_lora(base: Any, spec: AlignSpec, adapter_dir: Path | None = None) -> Any:
    """``base`` frozen with a trainable LoRA adapter (Hu et al. 2021, arXiv 2106.09685); B starts
    at 0, so the policy starts exactly at the base, unless ``adapter_dir`` gives the adapter to
    start from (a checkpoint, or an ``--init`` adapter with its own rank). Dropout 0: every model
    runs in eval mode."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    config = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                        target_modules=spec.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(base, config)


class AdapterDisabled:
    """A LoRA policy read with its adapter switched off: the base weights, with no second copy
    (TRL <= 1.12's PPOTrainer reference under PEFT). Called like a model."""

    training = False

    def __init__(self, peft_model: Any):
        self.model = peft_model

    def __call__(self, **kwargs: Any) -> Any:
        with self.model.disable_adapter():
            return self.model(**kwargs)


def _reference(path: Path, spec: AlignSpec, sources: Sources, policy: Any, resume_dir: Path | None,
               home: Any) -> Any:
    """A frozen causal LM for ``path`` (a reference or a watch model), sharing weights when it can.

    The policy's own start is the LoRA base with the adapter off, or a copy of the (not yet
    trained) full policy. In the SALSA setting (init != ref) it is a separate frozen model: one
    more copy of the weights, in bf16 with ``bf16``, on the CPU between passes with ``offload_frozen``.
    """
    shared_base = len(sources.refs) == 1 or spec.ref_mode == "mean_kl"  # a soup is built in place
    if spec.lora_rank and shared_base and adapters.same_dir(path, adapters.base_dir(sources.init)):
        return AdapterDisabled(policy)  # the policy's base itself: right only for the base (issue #19)
    if spec.lora_rank and shared_base and adapters.is_adapter_on(path, adapters.base_dir(sources.init)):
        return adapters.AdapterReference(policy, path)  # base + a frozen second adapter: one copy of the base
    if path == sources.init and not spec.lora_rank and resume_dir is None and not zero3_loading():
        return freeze(copy.deepcopy(policy).to(home, frozen_dtype(spec)))
    return freeze(_causal_lm(path, spec, home, frozen_dtype(spec)))


@contextmanager
def visiting(model: Any, device: Any) -> Iterator[Any]:
    """``model`` on ``device`` for one phase, then back where it lives (an offloaded frozen model);
    a frozen model that ZeRO-3 loaded sharded is gathered whole for the phase.

    A no-op when it already lives there, and always on a CPU-only machine.
    """
    param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    home = param.device if param is not None else None
    moves = home is not None and home != torch.device(device)
    if moves:
        model.to(device)
    try:
        with full_weights(model):
            yield model
    finally:
        if moves:
            model.to(home)


def checkpoint_layers(model: Any) -> None:
    """Gradient checkpointing (Chen et al. 2016, arXiv 1604.06174) with dropout still off.

    transformers only checkpoints layers in training mode, so the decoder layers alone are flagged
    as training (not recursively: their attention and MLP children stay in eval mode, no dropout).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 5.19 (the vLLM environment, ``soupkit[vllm]``) has the older name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


class PolicyAndValue(torch.nn.Module):
    """Policy and critic as one module, so DDP / FSDP / DeepSpeed wrap and sync both in one
    forward (accelerate's DeepSpeed path takes one model per ``prepare``; TRL's
    ``PolicyAndValueWrapper`` does the same)."""

    def __init__(self, policy: Any, critic: ValueModel):
        super().__init__()
        self.policy, self.critic = policy, critic
        # accelerate's FSDP auto-wrap shards the layer classes a model lists here
        self._no_split_modules = sorted({*(getattr(policy, "_no_split_modules", None) or []),
                                         *(getattr(critic.seq_cls, "_no_split_modules", None) or [])})

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int):
        """Shapes: (b, s) x3 -> logits (b, logits_to_keep, v), values (b, s)."""
        return (self.logits(input_ids, attention_mask, position_ids, logits_to_keep),
                self.critic(input_ids, attention_mask, position_ids))

    def logits(self, input_ids, attention_mask, position_ids, logits_to_keep: int):
        """The policy's part of ``forward`` alone (the critic's is ``self.critic``)."""
        return self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           logits_to_keep=logits_to_keep).logits


def check_same_vocab(tokenizer: Any, path: Path, trust_remote_code: bool) -> None:
    """Refuse a model whose tokenizer maps tokens to other ids than the policy's."""
    if not has_tokenizer(path) or same_tokenizer_file(tokenizer, path):
        return
    other = generation_tokenizer(path, "model", trust_remote_code)
    difference = vocab_difference(other.get_vocab(), tokenizer.get_vocab())
    if difference:
        raise SoupkitError(f"{path}: its tokenizer differs from the policy's ({difference}); "
                           "the KL needs one vocabulary")


def check_prompts(tokenizer: Any, prompts: list[str]) -> int:
    """Every prompt must give at least one token, or its row would have nothing to attend to.
    Returns the longest prompt's token count."""
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    for number, ids in enumerate(encoded, start=1):
        if not ids:
            raise SoupkitError(f"prompt {number} ({prompts[number - 1]!r}) tokenises to no tokens")
    return max(len(ids) for ids in encoded)


def _causal_lm(path: Path, spec: AlignSpec, device: Any, dtype: torch.dtype = torch.float32,
               what: str = "model") -> Any:
    return causal_lm(path, what, dtype, device, spec.trust_remote_code)


def _reward(spec: AlignSpec, sources: Sources, tokenizer: Any, device: Any) -> ModelReward | RewardFn:
    if sources.reward_fn is not None:
        return sources.reward_fn
    return reward_model(sources.reward_dir, tokenizer, device, frozen_dtype(spec), spec.trust_remote_code)


def reward_model(path: Path, tokenizer: Any, device: Any, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False) -> ModelReward:
    """A frozen sequence-classification reward model, with its own tokenizer only when its ids
    differ from ``tokenizer``'s (then text is re-tokenised; else the policy's ids are scored)."""
    model = freeze(seq_cls(path, "reward model", dtype, device, trust_remote_code))
    if not has_tokenizer(path):
        return ModelReward(model, None)
    own = generation_tokenizer(path, "reward model", trust_remote_code)
    own.padding_side = "right"
    chat = own if own_template(own) is not None else None
    same = same_tokenizer_file(tokenizer, path) or vocab_difference(own.get_vocab(), tokenizer.get_vocab()) is None
    return ModelReward(model, None if same else own, chat)  # same ids: score the policy's tokens directly


def _critic(spec: AlignSpec, sources: Sources, reward: Any, resume_dir: Path | None, device: Any) -> ValueModel:
    """Value model from the checkpoint, else the reward model (Huang et al. 2024, arXiv 2403.17031) when it
    reads the policy's tokens, else the policy's backbone with a zero scalar head (Huang et al. 2023)."""
    if resume_dir is not None:
        return ValueModel(seq_cls(resume_dir / "critic", "critic", None, device, spec.trust_remote_code))
    if isinstance(reward, ModelReward) and reward.tokenizer is None:
        return ValueModel(seq_cls(sources.reward_dir, "reward model", None, device, spec.trust_remote_code))
    model = seq_cls(adapters.base_dir(sources.init), "policy init", None, device, spec.trust_remote_code)
    with torch.no_grad(), full_weights(model.score, modify=True):
        for param in model.score.parameters():
            param.zero_()
    return ValueModel(model)


@torch.no_grad()
def soup_in_memory(models: list[Any]) -> Any:
    """Uniform weight average of same-shaped models, written into the first (Wortsman et al. 2022,
    arXiv 2203.05482); the others are dropped. The arithmetic is ``soupkit merge``'s (float32 sum of
    weight * tensor left to right, rounded once), so the soup equals a merged one bit for bit."""
    from soupkit.merge.engine import Buffers, average_tensors
    from soupkit.merge.weights import tensor_weights

    states = [m.state_dict() for m in models]
    weights, buf, done = tensor_weights([None] * len(models), "", 0), Buffers(), set()
    for name, tensor in states[0].items():
        if tensor.is_floating_point() and tensor.data_ptr() not in done:  # a tied tensor is averaged once
            done.add(tensor.data_ptr())
            tensor.copy_(average_tensors([s[name] for s in states], weights, buf))
    return models[0]
