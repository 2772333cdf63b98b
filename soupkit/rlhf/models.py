"""Finding, checking and loading the models of a PPO run.

``preflight`` reads only configs, prompt files and the reward function, so bad input fails in
well under a second, before any weights load. ``load_models`` then builds the policy (trainable),
the critic (trainable, a separate value model), and the frozen reference(s), reward model and
watch models, all in eval mode so dropout is off ([N] detail 3).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soupkit.checkpoint import read_config, resolve_model_dir
from soupkit.errors import SoupkitError
from soupkit.recipe import AlignSpec
from soupkit.rlhf.prompts import load_prompts
from soupkit.rlhf.reward import ModelReward, RewardFn, is_function_ref, load_reward_fn


@dataclass
class Sources:
    """Every input of a run, resolved and checked."""

    refs: list[Path]
    init: Path
    prompts: list[str]
    reward_dir: Path | None = None
    reward_fn: RewardFn | None = None
    watch: dict[str, Path] = field(default_factory=dict)


def preflight(spec: AlignSpec) -> Sources:
    """Resolve and check all inputs (paths, vocabularies, prompts, reward) before heavy work."""
    refs = [resolve_model_dir(ref, "reference") for ref in spec.ref]
    init = resolve_model_dir(spec.init, "init (policy start)") if spec.init else refs[0]
    watch = {name: resolve_model_dir(path, f"watch model {name!r}") for name, path in spec.watch.items()}
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
        sources.reward_dir = resolve_model_dir(spec.reward, "reward model")
        read_config(sources.reward_dir)
    return sources


def _vocab_size(path: Path, label: str) -> int:
    config = read_config(path)
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
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
    """Load every model onto ``device``; from ``resume_dir`` (a checkpoint) for policy and critic."""
    tokenizer = load_tokenizer(sources.init, spec.trust_remote_code)
    check_prompts(tokenizer, sources.prompts)
    for path in sources.refs + list(sources.watch.values()):
        check_same_vocab(tokenizer, path, spec.trust_remote_code)
    policy_dir = resume_dir / "policy" if resume_dir else sources.init
    policy = _causal_lm(policy_dir, spec, device)
    reward = _reward(spec, sources, tokenizer, device)
    critic = _critic(spec, sources, reward, resume_dir, device)
    # A reference that is the policy's own start is copied, not read from disk twice.
    refs = [freeze(copy.deepcopy(policy) if p == policy_dir else _causal_lm(p, spec, device)) for p in sources.refs]
    if len(refs) > 1 and spec.ref_mode == "soup":
        refs = [soup_in_memory(refs)]
    watch = {name: freeze(_causal_lm(p, spec, device)) for name, p in sources.watch.items()}
    return Models(policy.eval(), critic.eval(), refs, tokenizer, reward, watch)


def load_tokenizer(path: Path, trust_remote_code: bool) -> Any:
    """The policy's tokenizer, left-padding prompts; pad = EOS only if it has no pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a missing or broken tokenizer is the user's input
        raise SoupkitError(f"policy init {path}: cannot load its tokenizer ({type(exc).__name__})") from None
    if tokenizer.eos_token_id is None:
        raise SoupkitError(f"policy init {path}: the tokenizer has no EOS token to end responses")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe here: every mask is explicit, never ids != pad
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    return tokenizer


def check_same_vocab(tokenizer: Any, path: Path, trust_remote_code: bool) -> None:
    """Refuse a model whose tokenizer maps tokens to other ids than the policy's."""
    if not _has_tokenizer(path) or _same_tokenizer_file(tokenizer, path):
        return
    other = load_tokenizer(path, trust_remote_code)
    if other.get_vocab() != tokenizer.get_vocab():
        raise SoupkitError(f"{path}: its tokenizer differs from the policy's; the KL needs one vocabulary")


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def _same_tokenizer_file(tokenizer: Any, path: Path) -> bool:
    """Byte-identical ``tokenizer.json`` files: the same vocabulary without loading a second one."""
    mine, theirs = Path(tokenizer.name_or_path) / "tokenizer.json", path / "tokenizer.json"
    return mine.is_file() and theirs.is_file() and mine.read_bytes() == theirs.read_bytes()


def check_prompts(tokenizer: Any, prompts: list[str]) -> None:
    """Every prompt must give at least one token, or its row would have nothing to attend to."""
    for number, ids in enumerate(tokenizer(prompts, add_special_tokens=False)["input_ids"], start=1):
        if not ids:
            raise SoupkitError(f"prompt {number} ({prompts[number - 1]!r}) tokenises to no tokens")


def freeze(model: Any) -> Any:
    """Eval mode and no gradients: frozen models are read, never written."""
    model.eval()
    model.requires_grad_(False)
    return model


def _causal_lm(path: Path, spec: AlignSpec, device: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=spec.trust_remote_code).to(device)


def _seq_cls(path: Path, spec: AlignSpec, device: Any) -> Any:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a causal LM loaded this way "misses" its score head, by design
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, trust_remote_code=spec.trust_remote_code).to(device)
    finally:
        logging.set_verbosity(verbosity)


def _reward(spec: AlignSpec, sources: Sources, tokenizer: Any, device: Any) -> ModelReward | RewardFn:
    if sources.reward_fn is not None:
        return sources.reward_fn
    model = freeze(_seq_cls(sources.reward_dir, spec, device))
    if not _has_tokenizer(sources.reward_dir) or _same_tokenizer_file(tokenizer, sources.reward_dir):
        return ModelReward(model, None)
    own = load_tokenizer(sources.reward_dir, spec.trust_remote_code)
    if own.get_vocab() == tokenizer.get_vocab():
        own = None  # same ids: score the policy's tokens directly
    if own is not None:
        own.padding_side = "right"
    return ModelReward(model, own)


def _critic(spec: AlignSpec, sources: Sources, reward: Any, resume_dir: Path | None, device: Any) -> ValueModel:
    """Value model from the checkpoint, else the reward model ([N+], rlhf_anchors.md §4 #6) when it
    reads the policy's tokens, else the policy's backbone with a zero scalar head ([N])."""
    if resume_dir is not None:
        return ValueModel(_seq_cls(resume_dir / "critic", spec, device))
    if isinstance(reward, ModelReward) and reward.tokenizer is None:
        return ValueModel(_seq_cls(sources.reward_dir, spec, device))
    seq_cls = _seq_cls(sources.init, spec, device)
    with torch.no_grad():
        for param in seq_cls.score.parameters():
            param.zero_()
    return ValueModel(seq_cls)


@torch.no_grad()
def soup_in_memory(models: list[Any]) -> Any:
    """Uniform weight average of same-shaped models, written into the first (Wortsman et al. 2022,
    arXiv 2203.05482); the others are dropped."""
    states = [m.state_dict() for m in models]
    for name, tensor in states[0].items():
        if tensor.is_floating_point():
            tensor.copy_(torch.stack([s[name].float() for s in states]).mean(dim=0))
    return models[0]
