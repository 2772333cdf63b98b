"""Recipes: YAML files validated by pydantic models that forbid unknown keys.

A recipe is data, never code: every section maps onto one library call (``merge:`` onto
``soupkit.run_merge``). Misspelt keys are errors with a suggestion, not silently ignored (mergekit's
configs ignore them; see research/merge_anchors.md §1.3).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from soupkit.errors import SoupkitError, did_you_mean

NATIVE_METHODS = ("uniform", "weighted", "layerwise")
Dtype = Literal["float32", "float16", "bfloat16"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    """uniform | weighted | layerwise | any mergekit method (ties, slerp, task_arithmetic, ...)."""
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
    shard_size: str | int = "5GB"
    """Largest output shard, e.g. ``5GB`` or ``500MB``."""

    @model_validator(mode="after")
    def _method_rules(self) -> MergeSpec:
        if not self.models:
            raise ValueError("models: at least one model is needed")
        if self.method in NATIVE_METHODS:
            _check_native(self)
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
    if spec.parameters:
        raise ValueError(f"parameters: method {spec.method!r} takes no parameters")
    scalars = [ing.weight for ing in spec.models]
    if spec.method == "weighted" and all(isinstance(w, float) for w in scalars):
        if sum(scalars) == 0:
            raise ValueError("models: the weights sum to 0; they are normalised by their sum")


def _check_native_weight(method: str, i: int, weight: Any) -> None:
    where = f"models[{i}].weight"
    if method == "uniform" and weight is not None:
        raise ValueError(f"{where}: method 'uniform' takes no weights; use method: weighted")
    if method != "uniform" and weight is None:
        raise ValueError(f"{where}: method {method!r} needs a weight for every model")
    if method == "weighted" and _has_list(weight):
        raise ValueError(f"{where}: a list weight varies over depth; use method: layerwise")


def _has_list(weight: Any) -> bool:
    if isinstance(weight, dict):
        return any(isinstance(v, list) for v in weight.values())
    return isinstance(weight, list)


class Recipe(Strict):
    """A whole recipe file. Sections are optional; each command reads the one it needs."""

    name: str | None = None
    """A short name for the experiment."""
    description: str | None = None
    """Free text."""
    merge: MergeSpec | None = None
    """How to make the soup."""


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(source: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()) -> Recipe:
    """Load and validate a recipe from a YAML path or a dict; ``overrides`` are ``key=value``."""
    label = str(source) if isinstance(source, (str, Path)) else "recipe"
    data = read_yaml(Path(source)) if isinstance(source, (str, Path)) else dict(source)
    for item in overrides:
        apply_override(data, item)
    return validate(Recipe, data, label)


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
    err = exc.errors()[0]
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
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the sub-model found by walking ``loc`` (list indices skipped)."""
    current: Any = model
    for part in loc:
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
