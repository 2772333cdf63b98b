"""From flags and recipes to one validated ``AlignSpec``, and the settings derived from it.

Precedence, lowest first: the recipe's ``align:`` section, command-line flags, ``--set`` overrides.
An override key that does not name a recipe section is read inside ``align:``
(``--set kl_coef=0.02`` is ``--set align.kl_coef=0.02``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError
from soupkit.recipe import AlignSpec, Recipe, apply_override, read_yaml, validate


def build_spec(recipe: Path | None, flags: Mapping[str, Any], overrides: Iterable[str] = ()) -> AlignSpec:
    """The ``AlignSpec`` for a recipe file (or none) plus flags (None = not given) and overrides."""
    data = read_yaml(recipe) if recipe is not None else {}
    section = data.setdefault("align", {}) if isinstance(data.get("align", {}), dict) else None
    if section is None:
        raise SoupkitError(f"{recipe}: align: must be a mapping of settings")
    section.update({k: v for k, v in flags.items() if v not in (None, [], {})})
    for item in overrides:
        apply_override(data, _in_align(item))
    loaded = validate(Recipe, data, str(recipe) if recipe else "align")
    return loaded.align


def _in_align(item: str) -> str:
    key = item.partition("=")[0].strip()
    return item if key.split(".")[0] in Recipe.model_fields else f"align.{item}"


def parse_watch(items: Iterable[str]) -> dict[str, str]:
    """``NAME=PATH`` strings -> ``{NAME: PATH}``; a bad or repeated name is an error."""
    watch: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.isidentifier() or not path:
            raise SoupkitError(f"--watch {item!r}: expected NAME=PATH with NAME a plain identifier")
        if name in watch:
            raise SoupkitError(f"--watch {name}: given twice")
        watch[name] = path
    return watch


def lr_factor(spec: AlignSpec, step: int) -> float:
    """Multiplier of the learning rate after ``step`` PPO steps: warm-up, then the schedule.

    Huang et al. 2023 (https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo) and 2024 (arXiv 2403.17031) anneal the learning rate linearly to 0 over training.
    """
    if step < spec.warmup_steps:
        return (step + 1) / (spec.warmup_steps + 1)
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    if spec.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    if spec.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def micro_batch_size(spec: AlignSpec) -> int:
    """Sequences per forward/backward pass: batch / minibatches / grad_accum."""
    return spec.batch_size // (spec.minibatches * spec.grad_accum)


def with_precision(spec: AlignSpec) -> AlignSpec:
    """``spec`` with ``bf16: auto`` decided for this machine (``native_bf16``), so the run's
    provenance, metrics and resume checks record what it did."""
    if spec.bf16 != "auto":
        return spec
    import torch

    return spec.model_copy(update={"bf16": native_bf16("cuda" if torch.cuda.is_available() else "cpu")})


EAGER_ATTENTION_BYTES = 1 << 30
"""``attention: auto`` picks eager attention on a CPU while what it keeps stays under this."""


def attention_for(spec: AlignSpec, device_type: str, config: Any, longest: int) -> str:
    """The attention kernel for ``attention: auto``: ``eager`` on a CPU when the attention
    probabilities it keeps for the backward pass (micro-batch x heads x ``longest``^2 x layers, at
    most 8 bytes each: fp32 softmax and its bf16 copy) fit in ``EAGER_ATTENTION_BYTES``, and when
    the widest no-grad forward's scores (forward batch x heads x ``longest``^2, 12 bytes) fit too;
    ``sdpa`` otherwise and on accelerators. On the SmolLM2 PPO job (benchmarks/README.md) eager
    took 20% less CPU time for the policy + critic forward and backward, and 12% less for a forward."""
    if spec.attention != "auto":
        return spec.attention
    text = getattr(config, "text_config", None) or config
    heads, layers = getattr(text, "num_attention_heads", None), getattr(text, "num_hidden_layers", None)
    if device_type != "cpu" or not isinstance(heads, int) or not isinstance(layers, int):
        return "sdpa"
    square = heads * longest * longest
    kept = micro_batch_size(spec) * square * layers * 8
    scores = min(spec.batch_size, spec.forward_batch_size) * square * 12
    return "eager" if max(kept, scores) <= EAGER_ATTENTION_BYTES else "sdpa"


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bfloat16 matrix products natively: a CUDA GPU that supports
    bf16 (Ampere and later), or a CPU whose flags list AVX512-BF16, AMX-BF16 or (Arm) BF16 with
    oneDNN built into torch. Elsewhere bf16 is emulated and slower than fp32.
    ``SOUPKIT_NATIVE_BF16=0`` (or ``1``) overrides the check, e.g. where a container hides the CPU's flags."""
    import os

    import torch

    if os.environ.get("SOUPKIT_NATIVE_BF16") in ("0", "1"):
        return os.environ["SOUPKIT_NATIVE_BF16"] == "1"

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (``flags`` on x86, ``Features`` on Arm); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()
