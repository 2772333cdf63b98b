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
