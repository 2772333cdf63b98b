"""Recipes: YAML files validated by pydantic models that forbid unknown keys.

A recipe is data, never code: every section maps onto one library call (``merge:`` onto
``soupkit.run_merge``). Misspelt keys are errors with a suggestion, not silently ignored (mergekit
0.1.5's configs use pydantic's extra="ignore" and drop them).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from soupkit.chat import check_setting
from soupkit.errors import SoupkitError, did_you_mean

NATIVE_METHODS = ("uniform", "weighted", "layerwise", "greedy")
"""Soups: weighted averages whose weights are normalised to sum to 1 (soupkit's own semantics); greedy is
the uniform soup of the ingredients a held-out score keeps (``soupkit.merge.greedy``)."""
TASK_METHODS = ("task_arithmetic", "ties", "dare_ties", "slerp", "model_stock", "task_slerp")
"""Task-vector methods soupkit runs natively with mergekit's semantics (``soupkit.merge.methods``)."""
ChatTemplate = Annotated[str, AfterValidator(check_setting)]
"""auto | always | never | chatml | PATH.jinja (``soupkit.chat``)."""
Dtype = Literal["float32", "float16", "bfloat16"]
MAY_CHANGE_ON_RESUME = {"may_change_on_resume": True}
"""Schema mark of the align settings a resumed run may change (``resume_settings``)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)  # docstrings: --help


def _check_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _check_depth_list(value: Any, where: str) -> list[float]:
    if not value:
        raise ValueError(f"{where} is an empty list")
    return [_check_number(v, f"{where}[{i}]") for i, v in enumerate(value)]


def check_weight(value: Any) -> float | list[float] | dict[str, float | list[float]]:
    """A weight is a number, a list over depth, or ``{substring: number|list, default: ...}``."""
    if isinstance(value, list):
        return _check_depth_list(value, "weight")
    if isinstance(value, Mapping):
        if not value:
            raise ValueError("weight mapping is empty")
        out: dict[str, float | list[float]] = {}
        for key, v in value.items():
            where = f"weight[{key!r}]"
            out[str(key)] = _check_depth_list(v, where) if isinstance(v, list) else _check_number(v, where)
        return out
    return _check_number(value, "weight")


class Ingredient(Strict):
    """One model in a merge."""

    model: str
    """Checkpoint directory or Hugging Face Hub id."""
    weight: float | list[float] | dict[str, float | list[float]] | None = None
    """Number, list over layer depth, or mapping from tensor-name substrings (with ``default``)."""
    parameters: dict[str, Any] = {}
    """Extra per-model parameters for mergekit methods (``density``, ``epsilon``, ...)."""

    @model_validator(mode="before")
    @classmethod
    def _plain_string(cls, data: Any) -> Any:
        return {"model": data} if isinstance(data, str) else data

    @field_validator("weight", mode="before")
    @classmethod
    def _weight(cls, value: Any) -> Any:
        return None if value is None else check_weight(value)


class MergeSpec(Strict):
    """The ``merge:`` section of a recipe."""

    method: str = "uniform"
    """uniform | weighted | layerwise | task_arithmetic | ties | dare_ties | slerp | model_stock | task_slerp
    (native) | any other mergekit method (della, nuslerp, ...), run through mergekit."""
    models: list[Ingredient]
    """Ingredients: paths or Hub ids, or ``{model, weight, parameters}``."""
    base: str | None = None
    """Base model: needed by task-vector methods; also the source of config and tokenizer."""
    dtype: Dtype | None = None
    """Output dtype; default: each tensor keeps the first ingredient's dtype."""
    output: str | None = None
    """Output directory (``--out`` overrides it)."""
    parameters: dict[str, Any] = {}
    """Method-wide parameters for mergekit methods (``t`` for slerp, ``normalize``, ...)."""
    backend: Literal["auto", "mergekit"] = "auto"
    """``auto``: soupkit's engine for the methods it implements, mergekit for the rest; ``mergekit``: mergekit for
    every method but the soups (uniform, weighted, layerwise), e.g. to compare the two."""
    tokenizer_source: str | None = None
    """The ingredient whose tokenizer files the output gets (default: the base, else the first model)."""
    mergekit_config: dict[str, Any] | None = None
    """The mergekit YAML this section was read from (``soupkit merge mk.yaml``): mergekit runs it as
    written when soupkit's engine does not (``soupkit.merge.mergekit_yaml``)."""
    seed: int = 0
    """Seed of dare_ties' random masks (mergekit's ``--random-seed`` when mergekit runs the merge)."""
    shard_size: str | int = "5GB"
    """Largest output shard, e.g. ``5GB`` or ``500MB``."""
    chat_template: ChatTemplate | None = None
    """The soup's chat template: default the ingredients' own (which must agree); chatml or PATH.jinja set one."""
    output_format: Literal["model", "adapter"] = "model"
    """``model``: a full checkpoint; ``adapter``: when every ingredient is a LoRA adapter on one base, the exact
    low-rank soup as one PEFT adapter (their concatenation; ``soupkit.adapters``)."""

    @field_validator("chat_template")
    @classmethod
    def _chat(cls, value: str | None) -> str | None:
        if value in ("auto", "always", "never"):
            raise ValueError("a merge takes chatml or a .jinja file; leave it out to keep the ingredients' template")
        return value

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: str | int) -> str | int:
        from soupkit.shards import parse_size

        if parse_size(value) <= 0:
            raise ValueError("must be positive, e.g. 5GB")
        return value

    @model_validator(mode="after")
    def _method_rules(self) -> MergeSpec:
        if not self.models:
            raise ValueError("models: at least one model is needed")
        if self.tokenizer_source is not None and self.tokenizer_source not in [m.model for m in self.models]:
            raise ValueError(f"tokenizer_source: {self.tokenizer_source!r} is not one of the models")
        if self.method in NATIVE_METHODS:
            _check_native(self)
        elif self.output_format == "adapter":
            raise ValueError(f"output_format: adapter is a weighted sum of adapters; method {self.method!r} is not")
        return self


def _check_native(spec: MergeSpec) -> None:
    if len(spec.models) < 2:
        raise ValueError("models: a soup needs at least two models")
    for i, ing in enumerate(spec.models):
        if ing.parameters:
            raise ValueError(
                f"models[{i}].parameters: method {spec.method!r} takes no per-model parameters"
            )
        _check_native_weight(spec.method, i, ing.weight)
    if spec.parameters and spec.method != "greedy":
        raise ValueError(f"parameters: method {spec.method!r} takes no parameters")
    scalars = [ing.weight for ing in spec.models]
    if spec.method == "weighted" and all(isinstance(w, float) for w in scalars):
        if sum(scalars) == 0:
            raise ValueError("models: the weights sum to 0; they are normalised by their sum")


def _check_native_weight(method: str, i: int, weight: Any) -> None:
    where = f"models[{i}].weight"
    if method in ("uniform", "greedy") and weight is not None:
        raise ValueError(f"{where}: method {method!r} takes no weights (it makes uniform soups); use method: weighted")
    if method not in ("uniform", "greedy") and weight is None:
        raise ValueError(f"{where}: method {method!r} needs a weight for every model")
    if method == "weighted" and _has_list(weight):
        raise ValueError(f"{where}: a list weight varies over depth; use method: layerwise")


def _has_list(weight: Any) -> bool:
    if isinstance(weight, dict):
        return any(isinstance(v, list) for v in weight.values())
    return isinstance(weight, list)


class SoupSpec(MergeSpec):
    """One named soup of a ``merge:`` list, or a sweep that expands to several named soups."""

    name: str
    """Name of the soup, for ``align`` refs and ``soupkit run --only/--force``; a sweep's soups are
    ``NAME-a<alpha>`` or ``NAME-n<n>``, written to ``OUTPUT-a<alpha>`` or ``OUTPUT-n<n>``."""
    alphas: list[float] = []
    """Sweep: for each alpha in [0, 1], the two models at weights (1 - alpha, alpha), so alpha 0 is the
    first model and alpha 1 the second (the SALSA paper's soup-weight ablation)."""
    first_n: list[int] = []
    """Sweep: for each n, the uniform soup of the first n models (the paper's soup-n ablation)."""

    @model_validator(mode="after")
    def _method_rules(self) -> SoupSpec:  # replaces MergeSpec's: a sweep's own rules come first
        if self.alphas and self.first_n:
            raise ValueError("give alphas or first_n, not both")
        if not (self.alphas or self.first_n):
            return MergeSpec._method_rules(self)
        if self.method != "uniform" or any(ing.weight is not None or ing.parameters for ing in self.models):
            raise ValueError("a sweep sets the method and weights itself: give models as plain paths or names")
        if not self.output:
            raise ValueError("output: a sweep needs an output prefix")
        if self.alphas and (len(self.models) != 2 or not all(0 <= a <= 1 for a in self.alphas)):
            raise ValueError("alphas: a sweep over alpha in [0, 1] between exactly two models")
        if self.first_n and not all(2 <= n <= len(self.models) for n in self.first_n):
            raise ValueError(f"first_n: each n must be between 2 and the {len(self.models)} models given")
        return self


@dataclass(frozen=True)
class Soup:
    """A named soup of a recipe, with the sweep point it stands for (``("alpha", 0.25)``), if any."""

    name: str
    spec: MergeSpec
    sweep: str | None = None
    axis: str | None = None
    value: float | None = None


def expand_soups(merge: MergeSpec | list[SoupSpec] | None) -> list[Soup]:
    """Every soup ``merge:`` describes: one (named ``soup``), a list of named ones, sweeps expanded."""
    if merge is None:
        return []
    if not isinstance(merge, list):
        return [Soup("soup", merge)]
    return [soup for entry in merge for soup in _sweep(entry)]


def _sweep(entry: SoupSpec) -> list[Soup]:
    data = to_plain(entry)
    for key in ("name", "alphas", "first_n"):
        data.pop(key, None)
    if not (entry.alphas or entry.first_n):
        return [Soup(entry.name, validate(MergeSpec, data, f"merge.{entry.name}"))]
    models = [ing.model for ing in entry.models]
    out = []
    for axis, value in [("alpha", a) for a in entry.alphas] + [("n", n) for n in entry.first_n]:
        tag = f"a{value:g}" if axis == "alpha" else f"n{value}"
        point = ({"method": "weighted", "models": [{"model": models[0], "weight": 1.0 - value},
                                                   {"model": models[1], "weight": float(value)}]}
                 if axis == "alpha" else {"method": "uniform", "models": models[:value]})
        spec = validate(MergeSpec, {**data, **point, "output": f"{entry.output}-{tag}"}, f"merge.{entry.name}-{tag}")
        out.append(Soup(f"{entry.name}-{tag}", spec, entry.name, axis, float(value)))
    return out


def _merge_kind(value: Any) -> str:
    return "soups" if isinstance(value, list) else "one soup"


MergeSection = Annotated[Annotated[MergeSpec, Tag("one soup")] | Annotated[list[SoupSpec], Tag("soups")],
                         Discriminator(_merge_kind)]
"""``merge:`` is one soup (a mapping) or a list of named soups and sweeps."""
UNION_TAGS = {"one soup": MergeSpec, "soups": SoupSpec}
"""Tags in a validation error's location, and the model each stands for."""


class AlignSpec(Strict):
    """The ``align:`` section of a recipe: PPO against a frozen reference (``soupkit.rlhf.train``).

    Defaults follow Huang et al. 2023 (https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo), Huang et al. 2024 (arXiv 2403.17031) and TRL 1.12's PPOConfig.
    """

    ref: list[str]
    """Frozen KL reference: checkpoint dir, Hub id or LoRA adapter dir (a soup, an SFT model); repeat for several; default: merge.output."""
    ref_mode: Literal["soup", "mean_kl"] = "soup"
    """With several refs: ``soup`` averages their weights in memory; ``mean_kl`` averages their KLs."""
    init: str | None = None
    """Checkpoint the policy starts from; default: the (first) reference."""
    reward: str
    """Reward: a sequence-classification model dir, or ``module:function`` / ``file.py:function``."""
    prompts: str
    """Prompts: ``.jsonl`` (a ``prompt`` field), ``.txt`` (one per line) or a dataset dir/Hub id."""
    prompt_field: str = "prompt"
    """Field holding the prompt text in a ``.jsonl`` file or dataset."""
    prompt_split: str = "train"
    """Split to read when ``prompts`` is a Hub dataset."""
    chat_template: ChatTemplate = "auto"
    """auto | always | never | chatml | PATH.jinja: how prompts are rendered (see ``soupkit.chat``)."""
    output: str | None = Field(None, json_schema_extra=MAY_CHANGE_ON_RESUME)
    """Output directory (``--out`` overrides it)."""
    watch: dict[str, str] = {}
    """Extra models to log ``kl_<name>`` against each step, e.g. ``{sft: runs/sft-a}``."""
    steps: int = Field(100, ge=1, json_schema_extra=MAY_CHANGE_ON_RESUME)
    """PPO steps (one rollout batch each)."""
    batch_size: int = Field(16, ge=1, json_schema_extra=MAY_CHANGE_ON_RESUME)
    """Prompts per PPO step (per process); on ``--resume`` the global batch (x processes) is checked instead."""
    max_prompt_tokens: int = Field(256, ge=1)
    """Longer prompts keep their last tokens."""
    max_new_tokens: int = Field(53, ge=1)
    """Largest response length (Huang et al. 2024's TL;DR setting)."""
    temperature: float = Field(0.7, gt=0)
    """Sampling temperature; log-probs use logits divided by it too (Huang et al. 2023)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold (1 = off)."""
    learning_rate: float = Field(3e-6, gt=0)
    """Policy learning rate (3e-6: Huang et al. 2024, TRL #5174)."""
    value_learning_rate: float | None = Field(None, gt=0)
    """Critic learning rate; default: learning_rate."""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay over the steps, to 0 for linear and cosine."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warm-up before the schedule."""
    adam_eps: float = Field(1e-5, gt=0)
    """Adam epsilon (Huang et al. 2023: 1e-5)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    kl_coef: float = Field(0.05, ge=0)
    """KL penalty coefficient beta (initial value when adaptive)."""
    ref_ema: float | None = Field(None, gt=0, le=1)
    """WARP's moving anchor (arXiv 2406.16768): after every optimiser step ref <- (1 - mu) ref + mu policy, with
    mu this value; the KL to the policy's start is logged as ``kl_init``. null = a frozen reference."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (joschu.net/blog/kl-approx.html)."""
    kl_target: float | None = Field(None, gt=0)
    """Set to make beta adaptive (Ziegler et al. 2019), steering the sequence KL to this value."""
    kl_horizon: float = Field(10000, gt=0)
    """Adaptive controller horizon, in samples."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount factor."""
    gae_lambda: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance per batch (mean kept)."""
    whiten_advantages: bool = True
    """Normalise advantages per batch."""
    clip_eps: float = Field(0.2, gt=0)
    """Policy ratio clip range."""
    value_clip_eps: float = Field(0.2, gt=0)
    """Value clip range."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss."""
    ppo_epochs: int = Field(4, ge=1)
    """Optimisation passes over each rollout batch."""
    minibatches: int = Field(1, ge=1)
    """Minibatches per epoch (one optimiser step each)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated into each minibatch step."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient-norm clip (per model); null = off."""
    target_kl: float | None = Field(None, gt=0)
    """Stop a step's epochs early once approx_kl exceeds this."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses that did not end with EOS."""
    forward_batch_size: int = Field(64, ge=1, json_schema_extra=MAY_CHANGE_ON_RESUME)
    """Sequences per no-grad forward pass (reference, reward, watch models)."""
    seed: int = 0
    """Random seed; sampling noise is keyed by (seed, step, global row), the same for any process count."""
    save_every: int = Field(50, ge=0, json_schema_extra=MAY_CHANGE_ON_RESUME)
    """Write a resumable checkpoint every N steps (0 = never)."""
    keep_checkpoints: int = Field(2, ge=0, json_schema_extra=MAY_CHANGE_ON_RESUME)
    """Checkpoints kept on disk (0 = all)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint dirs (off: it runs arbitrary code)."""
    lora_rank: int = Field(0, ge=0)
    """LoRA rank of the policy (peft; 0 = full fine-tuning); a ref that is the policy's base is read with the
    adapter off, a ref that is an adapter on that base as a second, frozen adapter (issue #19)."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA scale numerator: the adapter's update is scaled by lora_alpha / lora_rank."""
    lora_target_modules: list[str] | str = "all-linear"
    """Modules that get LoRA adapters: a list of names, or peft's ``all-linear``."""
    bf16: bool | Literal["auto"] = "auto"
    """Frozen weights (refs, reward, watch, a LoRA base) in bfloat16, forwards under bf16 autocast; trained weights
    and Adam states stay fp32. ``auto``: on where the hardware computes bf16 natively (a CUDA GPU with bf16, a CPU
    with AVX512-BF16 or AMX), off elsewhere; ``false`` keeps every forward pass in fp32."""
    attention: Literal["auto", "sdpa", "eager"] = Field("auto", json_schema_extra=MAY_CHANGE_ON_RESUME)
    """Attention kernel of every model: ``sdpa`` (torch's fused kernels) or ``eager`` (plain matrix products).
    ``auto``: eager on a CPU when the attention probabilities it keeps for the backward pass fit in 1 GiB
    (micro-batch x heads x longest sequence^2 x layers x 8 bytes), where it is measured faster; sdpa elsewhere."""
    offload_frozen: bool = Field(False, json_schema_extra=MAY_CHANGE_ON_RESUME)
    """Keep ref, reward and watch models on the CPU, moved to the accelerator only for their forward passes."""
    gradient_checkpointing: bool = Field(False, json_schema_extra=MAY_CHANGE_ON_RESUME)
    """Recompute policy and critic activations in the backward pass: less memory, one more forward."""
    rollout_engine: Literal["hf", "vllm"] = "hf"
    """What samples the responses: hf (the policy's own forward passes) or vllm (a vLLM engine in the same process,
    the policy's weights pushed into it before each rollout; needs the vllm extra, see the README's Rollout engines)."""
    rollout_is_cap: float | None = Field(None, gt=0)
    """vllm engine: truncated importance sampling for the engine/trainer log-prob gap (Yao et al. 2025), advantages
    times min(pi_trainer / pi_engine, cap); null = off (2 is the paper's usual cap)."""
    vllm_memory_fraction: float = Field(0.3, gt=0, lt=1, json_schema_extra=MAY_CHANGE_ON_RESUME)
    """vllm engine: vLLM's gpu_memory_utilization, the share of GPU memory it may take for weights and KV cache; on
    a CPU, the share of RAM reserved for its KV cache."""
    vllm_enforce_eager: bool = Field(False, json_schema_extra=MAY_CHANGE_ON_RESUME)
    """vllm engine: no torch.compile / CUDA graphs (faster start, slower sampling)."""
    vllm_sleep: bool = Field(True, json_schema_extra=MAY_CHANGE_ON_RESUME)
    """vllm engine on a CUDA device: free its weights and KV cache while the trainer optimises (no effect on a CPU)."""
    @field_validator("ref", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _batch_split(self) -> AlignSpec:
        if not self.ref:
            raise ValueError("ref: at least one reference model is needed")
        if self.batch_size % (self.minibatches * self.grad_accum):
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by minibatches x grad_accum "
                f"({self.minibatches} x {self.grad_accum})"
            )
        if self.rollout_is_cap is not None and self.rollout_engine == "hf":
            raise ValueError("rollout_is_cap corrects an inference engine's log-prob gap: it needs rollout_engine vllm "
                             "(the hf engine samples with the trained model itself)")
        return self


def resume_settings(spec: AlignSpec) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues: every ``AlignSpec`` field
    whose schema does not mark it ``MAY_CHANGE_ON_RESUME`` (steps may grow, checkpoints and memory
    savers may change)."""
    fields = AlignSpec.model_fields
    return {k: v for k, v in spec.model_dump(mode="json").items()
            if k in fields and not (fields[k].json_schema_extra or {}).get("may_change_on_resume")}


class AlignSection(AlignSpec):
    """The ``align:`` section of a recipe: one run's settings (``AlignSpec``) and the sweep over
    them that ``soupkit run`` expands (``soupkit align`` trains one run and reads no sweep key)."""

    runs: dict[str, dict[str, Any]] = {}
    """Named variants, each overriding align keys (``{ppo: {ref: sft-a}}``); a model may be named
    by the name of an SFT run, soup or reward model of the recipe."""
    seeds: list[int] = []
    """Repeat every run once per seed (default: ``[seed]``)."""
    kl_coefs: list[float] = []
    """Repeat every run once per KL coefficient (default: ``[kl_coef]``)."""


SWEEP_KEYS = tuple(k for k in AlignSection.model_fields if k not in AlignSpec.model_fields)
"""The ``align:`` keys that describe the sweep, not one run."""


class TrainSpec(Strict):
    """Settings shared by the training stages (TRL trainers)."""

    base: str
    """Model to start from: checkpoint dir or Hub id."""
    data: str
    """Training data: ``.jsonl``/``.json`` file, saved dataset dir, or Hub dataset id."""
    split: str = "train"
    """Split to read from a Hub dataset."""
    output: str
    """Output directory."""
    seed: int = 0
    """Seed for initialisation and data order."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the data."""
    learning_rate: float = Field(2e-5, gt=0)
    """Peak learning rate (cosine decay)."""
    batch_size: int = Field(8, ge=1)
    """Examples per device per optimiser step."""
    max_length: int = Field(1024, ge=8)
    """Longer examples are truncated (SFT) or dropped (reward model, as TRL does)."""
    chat_template: ChatTemplate = "auto"
    """auto | always | never | chatml | PATH.jinja; saved with the output's tokenizer (``soupkit.chat``)."""
    save_steps: int = Field(200, ge=0)
    """Checkpoint every N optimiser steps (0 = never), so ``soupkit run`` continues an interrupted run."""


class SFTSpec(TrainSpec):
    """One SFT ingredient run (``sft:`` is a list of these)."""

    name: str
    """Name of the run, e.g. ``sft-a``."""
    lora_rank: int = Field(0, ge=0)
    """Train a LoRA adapter of this rank instead of every weight (peft; 0 = full fine-tuning): the output is an
    adapter directory, which merge, align and inspect take as they take a model (issue #19)."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA scale numerator: the adapter's update is scaled by lora_alpha / lora_rank."""
    lora_target_modules: list[str] | str = "all-linear"
    """Modules that get LoRA adapters: a list of names, or peft's ``all-linear``."""


class RewardModelSpec(TrainSpec):
    """The ``reward_model:`` section: a Bradley-Terry reward model on preference pairs."""

    name: str = "reward_model"
    """Name of the reward model, for ``align.reward`` and ``soupkit run --only/--force``."""

    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate (cosine decay)."""
    seeds: list[int] = []
    """WARM (Ramé et al. 2024, arXiv 2401.12187): one reward model per seed (``NAME-seed<s>``, written to
    ``OUTPUT-seed<s>``), and at ``output`` their uniform weight average, score head included (``soupkit merge``)."""

    @field_validator("seeds")
    @classmethod
    def _warm(cls, value: list[int]) -> list[int]:
        if value and (len(value) < 2 or len(set(value)) < len(value)):
            raise ValueError("a WARM average needs at least two different seeds")
        return value

    def members(self) -> list[RewardModelSpec]:
        """The reward models trained: itself, or one per seed of a WARM average."""
        if not self.seeds:
            return [self]
        return [self.model_copy(update={"seed": s, "seeds": [], "name": f"{self.name}-seed{s}",
                                        "output": f"{self.output}-seed{s}"}) for s in self.seeds]

    def average(self) -> MergeSpec | None:
        """The WARM soup of the members (None without ``seeds``)."""
        if not self.seeds:
            return None
        return MergeSpec(method="uniform", models=[Ingredient(model=m.output) for m in self.members()],
                         output=self.output)


class PathSpec(Strict):
    """Reward and loss along the straight line between two models (``eval.path``)."""

    a: str
    """Model at alpha = 0."""
    b: str
    """Model at alpha = 1."""
    points: int = Field(9, ge=2)
    """Points over alpha in [-0.5, 1.5]."""


class FrontSpec(Strict):
    """One ``eval.fronts`` entry: models on the line from ``a`` to ``b``, measured over a grid.

    LITI (WARP, arXiv 2406.16768): ``a`` the init, ``b`` the merged policy, ``axis: eta``, axes
    ``[kl_init, gold]``. Rewarded soups (arXiv 2306.04488): ``a`` and ``b`` trained on two rewards,
    axes the two rewards."""

    name: str
    """Name of the front in the report and its plot ``front-NAME.png``."""
    a: str
    """Model at 0: a checkpoint dir (a soup, an align run's ``final``)."""
    b: str
    """Model at 1."""
    axis: str = "lambda"
    """The grid's variable as the report names it (``eta`` for LITI)."""
    values: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    """Grid: the model at v is ``(1 - v) * a + v * b`` (0 is a, 1 is b, bit for bit)."""
    rewards: dict[str, str] = {}
    """More scores at every point: ``{name: module:function or reward model dir}``."""
    axes: list[str] = []
    """The two metrics of the front, e.g. ``[kind, focus]`` or ``[kl_init, gold]`` (KL: lower is better);
    default: ``[kl_<first eval reference>, gold]`` (``reward`` without a gold judge)."""
    others: dict[str, str] = {}
    """Models measured the same way and compared with the front at their x, e.g. a baseline's policy."""

    @field_validator("values")
    @classmethod
    def _grid(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("at least one value is needed")
        return [_check_number(v, "values") for v in value]

    @field_validator("axes")
    @classmethod
    def _two(cls, value: list[str]) -> list[str]:
        if value and (len(value) != 2 or value[0] == value[1]):
            raise ValueError("axes: give two different metrics, e.g. [kl_init, gold]")
        return value


class QuestionSet(Strict):
    """One ``eval.sets`` entry given in full (a plain string is its ``source``)."""

    source: str
    """``.jsonl`` / ``.txt`` file, saved dataset or Hub dataset."""
    split: str | None = None
    """Split of a dataset (default: ``eval.prompt_split``)."""
    field: str | None = None
    """Field holding a plain prompt (default: ``eval.prompt_field``); MT-Bench and Arena-Hard rows need none."""
    protocols: list[Literal["single", "pairwise"]] | None = Field(None, min_length=1)
    """Protocols for this set (default: ``eval.judge.protocols``), e.g. ``[single]`` for MT-Bench."""


class JudgeSpec(Strict):
    """``eval.judge``: an LLM judge grading the policies' answers (MT-Bench / Arena-Hard style).

    A local HF chat model directory run in-process (``model`` alone, or the whole value a path), or
    an OpenAI-compatible chat-completions server (``endpoint`` + ``model``, e.g. vLLM or llama.cpp)."""

    model: str
    """Local judge: an HF chat model directory. Endpoint judge: the model name the server serves."""
    endpoint: str | None = None
    """Base URL of an OpenAI-compatible server, e.g. ``http://127.0.0.1:8000/v1``."""
    api_key_env: str | None = None
    """Name of the environment variable holding the endpoint's API key (the key is never written)."""
    protocols: list[Literal["single", "pairwise"]] = Field(["single", "pairwise"], min_length=1)
    """``single``: each answer graded 1-10, per turn; ``pairwise``: each run against ``eval.baseline``
    in both orders, five-point verdicts, ties as half a win."""
    template: str | None = None
    """YAML file of judge prompts replacing soupkit's own (see README, "Judge templates")."""
    max_answer_tokens: int | None = Field(None, ge=1)
    """Length of the policies' answers (default: ``eval.max_new_tokens``, else the run's)."""
    answer_device: str = "auto"
    """Where the policies answer the questions: ``auto`` (CUDA when available), ``cpu``, ``cuda:1``, ..."""
    max_question_tokens: int = Field(1024, ge=1)
    """Longest question, with the dialogue so far, fed to a policy (longer keeps its last tokens)."""
    max_tokens: int = Field(512, ge=1)
    """Length of the judge's reply."""
    temperature: float = Field(0.0, ge=0)
    """Judge sampling temperature (0: greedy)."""
    device: str = "auto"
    """Local judge: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ..."""
    dtype: Dtype | None = None
    """Local judge: weights dtype (default: bfloat16 on a GPU, float32 on a CPU)."""
    batch_size: int = Field(8, ge=1)
    """Local judge: prompts per generate call. Endpoint judge: requests in flight at once."""
    timeout: float = Field(120.0, gt=0)
    """Endpoint judge: seconds to wait for one reply."""
    retries: int = Field(4, ge=0)
    """Endpoint judge: retries of a failed request (connection error, timeout, HTTP 408/429/5xx)."""
    backoff: float = Field(2.0, ge=0)
    """Endpoint judge: first wait in seconds before a retry, doubled at each further retry."""
    cache: str | None = None
    """JSONL file of judgments kept across runs (default: ``<eval.output>-judge-cache.jsonl``)."""

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, data: Any) -> Any:
        return {"model": data} if isinstance(data, str) else data

    @field_validator("endpoint")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _key_needs_endpoint(self) -> JudgeSpec:
        if self.api_key_env and not self.endpoint:
            raise ValueError("api_key_env is for an endpoint judge; set endpoint too")
        return self


class EvalSpec(Strict):
    """The ``eval:`` section: every align run measured on held-out prompts."""

    prompts: str
    """Held-out prompts (``.jsonl``/``.txt``/dataset), never seen in training."""
    prompt_field: str = "prompt"
    """Field holding the prompt text."""
    prompt_split: str = "test"
    """Split to read when ``prompts`` is a Hub dataset."""
    chat_template: ChatTemplate | None = None
    """How prompts are rendered (default: each align run's ``chat_template``)."""
    output: str
    """Directory for results.json, report.md and plots."""
    baseline: str | None = None
    """Align run that win rates are measured against (default: the first run)."""
    reward: str | None = None
    """Reward model or function (default: ``align.reward``)."""
    gold_reward: str | None = None
    """Optional ``module:function`` judge that training never saw (the demo's hidden gold reward)."""
    references: dict[str, str] = {}
    """Models to report KL(policy || model) against, e.g. ``{sft-a: runs/sft-a, soup: runs/soup}``;
    the first is the x-axis of the reward-KL frontier."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Response length (default: ``align.max_new_tokens``)."""
    temperature: float | None = Field(None, gt=0)
    """Sampling temperature (default: ``align.temperature``)."""
    seed: int = 1234
    """Sampling seed (the same for every policy)."""
    bootstrap: int = Field(2000, ge=100)
    """Bootstrap resamples for the intervals."""
    path: PathSpec | None = None
    """Also measure reward along the line between two models (e.g. SFT-A -> SFT-B)."""
    fronts: list[FrontSpec] = []
    """Fronts over a grid between two models: WARP's LITI, rewarded soups (``soupkit.evaluation.front``)."""

    @field_validator("fronts")
    @classmethod
    def _names(cls, value: list[FrontSpec]) -> list[FrontSpec]:
        names = [f.name for f in value]
        if len(set(names)) < len(names):
            raise ValueError("two fronts have the same name")
        return value
    judge: JudgeSpec | None = None
    """An LLM judge grading every run's answers on ``sets`` (default: the ``prompts``)."""
    sets: dict[str, str | QuestionSet] = {}
    """Question sets the judge grades, ``{name: source}``: MT-Bench or Arena-Hard questions (files or
    datasets), or any prompt file or dataset ``prompts`` takes; ``{name: {source, split, field}}`` to
    choose a dataset's split."""

    @model_validator(mode="after")
    def _sets_need_judge(self) -> EvalSpec:
        if self.sets and self.judge is None:
            raise ValueError("sets are graded by a judge; add eval.judge (or remove sets)")
        return self


class Recipe(Strict):
    """A whole recipe file. Sections are optional; each command reads the one it needs."""

    name: str | None = None
    """A short name for the experiment."""
    description: str | None = None
    """Free text."""
    sft: list[SFTSpec] | None = None
    """SFT ingredient runs, e.g. two seeds of one recipe."""
    reward_model: RewardModelSpec | None = None
    """The proxy reward model."""
    merge: MergeSection | None = None
    """How to make the soup: one ``merge:`` mapping, or a list of named soups and sweeps."""
    align: AlignSection | None = None
    """PPO against a frozen reference; ``align.ref`` defaults to ``merge.output``."""
    eval: EvalSpec | None = None
    """Held-out evaluation of the align runs."""

    @model_validator(mode="before")
    @classmethod
    def _ref_from_merge(cls, data: Any) -> Any:
        # The one cross-section rule: "merge then align" needs no repeated path.
        align, merge = (data.get("align"), data.get("merge")) if isinstance(data, dict) else (0, 0)
        if isinstance(align, dict) and not align.get("ref") and isinstance(merge, dict) and merge.get("output"):
            return {**data, "align": {**align, "ref": merge["output"]}}
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        names = ([s.name for s in self.sft or []] + [s.name for s in self.soups()] + [r.name for r in self.reward_models()])
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"the name {twice[0]!r} is given to two SFT runs, soups or reward models; names must differ")
        return self

    def soups(self) -> list[Soup]:
        """Every soup of ``merge:``, sweeps expanded."""
        return expand_soups(self.merge)

    def reward_models(self) -> list[RewardModelSpec]:
        """The reward model, and the members of a WARM average."""
        rm = self.reward_model
        return [] if rm is None else [rm] + (rm.members() if rm.seeds else [])

    def outputs_by_name(self) -> dict[str, str]:
        """``{name: output}`` of the recipe's SFT runs, soups and reward models."""
        named = {s.name: s.output for s in self.sft or []} | {s.name: s.spec.output or "" for s in self.soups()}
        return named | {r.name: r.output for r in self.reward_models()}


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(source: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()) -> Recipe:
    """Load and validate a recipe from a YAML path or a dict; ``overrides`` are ``key=value``."""
    label = str(source) if isinstance(source, (str, Path)) else "recipe"
    data = read_yaml(Path(source)) if isinstance(source, (str, Path)) else copy.deepcopy(dict(source))
    from soupkit.merge import mergekit_yaml

    if mergekit_yaml.is_mergekit_config(data):  # a mergekit YAML, read as is
        data = mergekit_yaml.to_recipe(data, label)
    for item in overrides:
        apply_override(data, item)
    return resolve_names(validate(Recipe, data, label), label)


MODEL_KEYS = {"sft": ("base",), "reward_model": ("base",), "merge": ("models", "base"),
              "align": ("ref", "init", "reward", "watch"), "eval": ("reward", "references", "path", "fronts")}
"""Where a recipe names a model, per section: these values may be a path or the name of an SFT run,
soup or reward model of the recipe (``align.runs`` entries take the align keys)."""


def resolve_names(recipe: Recipe, label: str = "recipe") -> Recipe:
    """``recipe`` with every model named by a run, soup or reward-model name replaced by that
    output path (a name wins over a relative path spelt the same)."""
    names = recipe.outputs_by_name()
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    resolved = {section: _resolve(section, value, names) for section, value in data.items()}
    return recipe if resolved == data else validate(Recipe, resolved, label)


def _resolve(section: str, value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, list):  # the sft list, a merge list
        return [_resolve(section, v, names) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _named(k, v, names) if k in MODEL_KEYS.get(section, ()) else v for k, v in value.items()}
    if section == "align" and isinstance(out.get("runs"), dict):
        out["runs"] = {run: _resolve("align", v, names) for run, v in out["runs"].items()}
    return out


def _named(key: str, value: Any, names: dict[str, str]) -> Any:
    """A model reference, or a list or mapping of them, with names replaced by outputs: every value
    of ``watch``/``references``, ``a``/``b`` of ``path``, ``model`` of a merge ingredient."""
    if isinstance(value, str):
        return names.get(value, value)
    if isinstance(value, list):
        return [_named(key, v, names) for v in value]
    if key == "fronts" and isinstance(value, dict):  # a front's models; its names and rewards stay as they are
        return {**value, **{k: names.get(value[k], value[k]) for k in ("a", "b") if k in value},
                **({"others": {n: names.get(p, p) for n, p in value["others"].items()}} if "others" in value else {})}
    if isinstance(value, dict):
        only = {"path": ("a", "b"), "models": ("model",)}.get(key)
        return {k: _named(key, v, names) if only is None or k in only else v for k, v in value.items()}
    return value


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML mapping; syntax errors name the file and line."""
    if not path.is_file():
        raise SoupkitError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SoupkitError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        raise SoupkitError(f"{path}: a recipe must be a YAML mapping of sections (merge:, ...)")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict in place."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise SoupkitError(f"--set {item!r}: expected key=value, e.g. align.kl_coef=0.05")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SoupkitError(f"--set {item!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def validate(model: type[BaseModel], data: Any, label: str) -> Any:
    """Validate ``data`` against ``model``; errors become one ``SoupkitError`` line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SoupkitError(f"{label}: {format_validation_error(model, exc)}") from None


def format_validation_error(model: type[BaseModel], exc: ValidationError) -> str:
    """The first problem as ``key.path: message``, with a suggestion for misspelt keys."""
    # a misspelt key also leaves the key it meant missing: name the misspelling, it is the cause
    err = next((e for e in exc.errors() if e["type"] == "extra_forbidden"), exc.errors()[0])
    loc = [str(p) for p in err["loc"]]
    path = _dotted(loc)
    if err["type"] == "extra_forbidden":
        known = _fields_at(model, loc[:-1])
        hint = did_you_mean(loc[-1], known)
        return f"{path}: unknown key{hint}; allowed: {', '.join(known)}" if known else f"{path}: unknown key"
    msg = err["msg"].removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{path}: {msg}{tail}" if path else f"{msg}{tail}"


def _dotted(loc: list[str]) -> str:
    out = ""
    for part in (p for p in loc if p not in UNION_TAGS):
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the sub-model found by walking ``loc`` (list indices skipped)."""
    current: Any = model
    for part in loc:
        if part in UNION_TAGS:
            current = UNION_TAGS[part]
            continue
        if part.isdigit():
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _submodel(field.annotation)
    return list(getattr(current, "model_fields", {}))


def _submodel(annotation: Any) -> Any:
    """The BaseModel inside ``X | None`` or ``list[X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def to_plain(model: BaseModel) -> dict[str, Any]:
    """A recipe model as plain YAML-ready data, keys left at their defaults omitted."""
    return model.model_dump(mode="json", exclude_defaults=True)
