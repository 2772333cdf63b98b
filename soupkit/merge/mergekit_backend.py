"""Every merge method soupkit does not implement itself runs through mergekit (LGPL; used, not copied).

The recipe is translated into a mergekit configuration and run with mergekit's own ``run_merge``.
Validation stays soupkit's: unknown parameters, missing required ones and input-count rules are
checked against mergekit's method registry *before* mergekit runs, because mergekit silently drops
misspelt parameters (``densty: 0.5`` runs TIES with density 1.0: mergekit 0.1.5's configs ignore unknown keys).

Semantics differ from soupkit's native methods in one place: mergekit puts the LM head and final
norm at t = 0 of a list ("gradient") parameter, soupkit's ``layerwise`` at t = 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from soupkit import adapters
from soupkit.errors import SoupkitError, did_you_mean
from soupkit.merge.preflight import MergePlan
from soupkit.recipe import NATIVE_METHODS, TASK_METHODS, MergeSpec


def _registry() -> dict[str, Any]:
    from mergekit.merge_methods import registry

    return {m.spec.name: m.spec for m in registry.registered_methods()}


def method_names() -> list[str]:
    """Every method soupkit accepts: its soups, its native task-vector methods, then the rest of mergekit's registry."""
    return list(NATIVE_METHODS) + list(TASK_METHODS) + sorted(set(_registry()) - set(TASK_METHODS))


def validate(spec: MergeSpec) -> None:
    """Check method name, parameters and input counts against mergekit's declarations."""
    registry = _registry()
    if spec.method not in registry:
        raise SoupkitError(
            f"merge.method: unknown method {spec.method!r}{did_you_mean(spec.method, method_names())}; "
            f"available: {', '.join(method_names())}"
        )
    method = registry[spec.method]
    _check_shared(spec, method)
    _check_per_model(spec, method)
    if not (spec.mergekit_config or {}).get("slices") and not (spec.mergekit_config or {}).get("modules"):
        _check_inputs(spec, method)  # slices and modules: mergekit checks each slice's inputs itself


def _param_names(method: Any, scopes: set[str]) -> list[str]:
    return [p.name for p in method.parameters if p.scope.value in scopes]


def _check_shared(spec: MergeSpec, method: Any) -> None:
    known = _param_names(method, {"shared", "input", "non_base"})
    for key in spec.parameters:
        if key not in known:
            raise SoupkitError(
                f"merge.parameters.{key}: unknown parameter for {spec.method}{did_you_mean(key, known)}; "
                f"{spec.method} takes: {', '.join(known) or 'none'}"
            )
    for p in method.parameters:
        if p.scope.value == "shared" and p.required and p.name not in spec.parameters:
            raise SoupkitError(f"merge.parameters.{p.name}: required by method {spec.method}")


def _check_per_model(spec: MergeSpec, method: Any) -> None:
    per_model = _param_names(method, {"input", "non_base"})
    for i, ing in enumerate(spec.models):
        if ing.weight is not None and "weight" not in per_model:
            raise SoupkitError(f"merge.models[{i}].weight: method {spec.method} takes no weights")
        for key in ing.parameters:
            if key == "weight" or key not in per_model:
                hint = " (give it as 'weight:' next to 'model:')" if key == "weight" else did_you_mean(key, per_model)
                raise SoupkitError(
                    f"merge.models[{i}].parameters.{key}: unknown per-model parameter for "
                    f"{spec.method}{hint}; per-model parameters: {', '.join(per_model) or 'none'}"
                )
        _check_required(spec, method, i)


def _check_required(spec: MergeSpec, method: Any, i: int) -> None:
    ing = spec.models[i]
    is_base = spec.base is not None and ing.model == spec.base
    for p in method.parameters:
        if not p.required or p.scope.value == "shared" or (is_base and p.scope.value == "non_base"):
            continue
        given = ing.weight if p.name == "weight" else ing.parameters.get(p.name)
        if given is None and p.name not in spec.parameters:
            key = "weight" if p.name == "weight" else f"parameters.{p.name}"
            raise SoupkitError(f"merge.models[{i}].{key}: required by method {spec.method}")


def _check_inputs(spec: MergeSpec, method: Any) -> None:
    contract = method.contract
    inputs = list(dict.fromkeys([ing.model for ing in spec.models] + ([spec.base] if spec.base else [])))
    policy = contract.base.value
    if policy == "required" and spec.base is None:
        raise SoupkitError(f"merge.base: method {spec.method} needs a base model")
    if policy == "forbidden" and spec.base is not None:
        raise SoupkitError(f"merge.base: method {spec.method} does not take a base model")
    has_base = spec.base is not None and policy != "ignored"
    _check_count(spec.method, "models (counting the base)", len(inputs), contract.min_inputs, contract.max_inputs)
    if contract.min_non_base is not None or contract.max_non_base is not None:
        _check_count(spec.method, "models besides the base", len(inputs) - int(has_base),
                     contract.min_non_base or 0, contract.max_non_base)


def _check_count(method: str, what: str, count: int, low: int, high: int | None) -> None:
    if count < low or (high is not None and count > high):
        want = f"exactly {low}" if low == high else (f"{low} to {high}" if high else f"at least {low}")
        raise SoupkitError(f"merge.models: method {method} needs {want} {what}; got {count}")


def _mergekit_setting(weight: Any) -> Any:
    """soupkit setting -> mergekit parameter: a mapping becomes a conditional (filter) list."""
    if not isinstance(weight, dict):
        return weight
    rows: list[dict[str, Any]] = [{"filter": k, "value": v} for k, v in weight.items() if k != "default"]
    if "default" in weight:
        rows.append({"value": weight["default"]})
    return rows


def mergekit_config(plan: MergePlan, out_dtype: str) -> dict[str, Any]:
    """The mergekit YAML configuration for ``plan`` (paths resolved to local directories)."""
    spec = plan.spec
    models = []
    for ing, ckpt in zip(spec.models, plan.models):
        params = {k: _mergekit_setting(v) for k, v in ing.parameters.items()}
        if ing.weight is not None:
            params["weight"] = _mergekit_setting(ing.weight)
        models.append({"model": adapters.mergekit_name(ckpt), **({"parameters": params} if params else {})})
    config: dict[str, Any] = {"merge_method": spec.method, "models": models, "dtype": "float32",
                              "out_dtype": out_dtype}
    if plan.base is not None:
        config["base_model"] = adapters.mergekit_name(plan.base)
    if spec.parameters:
        config["parameters"] = {k: _mergekit_setting(v) for k, v in spec.parameters.items()}
    return config


def owns_tokenizer(spec: MergeSpec) -> bool:
    """mergekit builds the tokenizer itself: a mergekit YAML's ``tokenizer:`` or ``tokenizer_source: union``."""
    config = spec.mergekit_config or {}
    return spec.backend == "mergekit" and bool(config.get("tokenizer") or config.get("tokenizer_source") == "union")


def run(plan: MergePlan, out_dir: Path, out_dtype: str) -> None:
    """Run mergekit into ``out_dir`` (which the caller renames into place on success)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_run_merge

    from soupkit.shards import parse_size

    config = MergeConfiguration.model_validate(plan.spec.mergekit_config or mergekit_config(plan, out_dtype))
    with adapters.mergekit_lora_cache(plan, out_dir) as cache:  # adapters: mergekit merges them there first
        options = MergeOptions(copy_tokenizer=owns_tokenizer(plan.spec), write_model_card=False, quiet=True, lazy_unpickle=True,
                               out_shard_size=parse_size(plan.spec.shard_size), lora_merge_cache=cache,
                               random_seed=plan.spec.seed)
        logging.getLogger("mergekit").setLevel(logging.WARNING)
        mergekit_run_merge(config, str(out_dir), options=options)
