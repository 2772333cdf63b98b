"""A mergekit YAML configuration read as a soupkit ``merge:`` section (``soupkit merge mk.yaml``).

The keys keep mergekit's meaning (https://github.com/arcee-ai/mergekit, ``docs`` and ``config.py``):
``merge_method``, ``models[].model``/``parameters``, ``base_model``, ``parameters``, ``dtype`` (mergekit's
working dtype, and the output's unless ``out_dtype`` says otherwise), ``tokenizer_source``,
``slices``. Parameter values may be scalars, lists over depth ("gradients") or filter lists
(``[{filter: mlp, value: 0.5}, {value: 0}]``), which become soupkit's ``{mlp: 0.5, default: 0}``.

soupkit's engine runs what it implements: ``linear`` with scalar or filtered weights (as ``weighted``)
and the task-vector methods of ``soupkit.merge.methods``; one slice taking every layer of every
source is the same as ``models:``. Everything else (other methods, partial or several slices,
``modules``, ``tokenizer_source: union``, ``tokenizer:``, a named chat template) runs through mergekit
with the configuration as written (``merge.mergekit_config``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError, did_you_mean

KEYS = ("merge_method", "models", "slices", "modules", "base_model", "parameters", "dtype", "out_dtype",
        "tokenizer_source", "tokenizer", "chat_template")
"""mergekit 0.1.5's ``MergeConfiguration`` fields."""
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def is_mergekit_config(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def to_recipe(data: dict[str, Any], label: str) -> dict[str, Any]:
    """The recipe ``{"merge": {...}}`` a mergekit configuration stands for."""
    from soupkit.recipe import TASK_METHODS

    for key in data:
        if key not in KEYS:
            raise SoupkitError(f"{label}: {key}: not a mergekit configuration key{did_you_mean(key, list(KEYS))} "
                               "(mergekit would silently ignore it)")
    sources, shared, whole = _sources(data, label)
    method = data["merge_method"]
    models = [_ingredient(src, i, label) for i, src in enumerate(sources)]
    spec: dict[str, Any] = {"method": method, "models": models, "mergekit_config": data}
    if data.get("base_model") is not None:
        spec["base"] = str(data["base_model"])
    if shared:
        spec["parameters"] = {k: to_setting(v, f"{label}: parameters.{k}") for k, v in shared.items()}
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        if str(dtype) not in DTYPES:
            raise SoupkitError(f"{label}: out_dtype/dtype {dtype!r}: soupkit writes float32, float16 or bfloat16")
        spec["dtype"] = DTYPES[str(dtype)]
    tokenizer = data.get("tokenizer_source")
    if tokenizer not in (None, "base", "union"):
        spec["tokenizer_source"] = str(tokenizer)
    native = whole and not _needs_mergekit(data)
    if method == "linear" and native and _plain_linear(spec):
        spec["method"] = "weighted"
    elif method not in TASK_METHODS or not native:
        spec["backend"] = "mergekit"
    return {"merge": spec}


def _needs_mergekit(data: dict[str, Any]) -> bool:
    """Features only mergekit implements: module configs, tokenizer unions or surgery, named templates."""
    template = data.get("chat_template")
    return (data.get("modules") is not None or data.get("tokenizer") is not None
            or data.get("tokenizer_source") == "union" or template not in (None, "chatml"))


def _plain_linear(spec: dict[str, Any]) -> bool:
    """mergekit's linear with normalize on and no weight varying over depth is soupkit's weighted soup
    (both divide by the weights' sum per tensor; mergekit puts embeddings, head and final norm at
    t = 0 of a list, soupkit the head and final norm at t = 1, so lists stay with mergekit)."""
    params = spec.get("parameters", {})
    if params.get("normalize", True) is not True or set(params) - {"normalize", "weight"}:
        return False
    for ing in spec["models"]:
        if set(ing.get("parameters", {})) or _has_list(ing.get("weight", params.get("weight"))):
            return False
        ing.setdefault("weight", params.get("weight"))
    spec.pop("parameters", None)
    return all(ing["weight"] is not None for ing in spec["models"])


def _has_list(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_list(v) for v in value.values())
    return isinstance(value, list)


def _sources(data: dict[str, Any], label: str) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
    """(inputs, method-wide parameters, whether they cover every layer of every model as ``models:`` does)."""
    shared = dict(data.get("parameters") or {})
    if data.get("models"):
        return [_entry(m, label) for m in data["models"]], shared, True
    slices = data.get("slices") or []
    if not slices:
        return [], shared, False  # modules: mergekit reads them
    sources = [_entry(s, label) for s in slices[0].get("sources", [])]
    whole = len(slices) == 1 and not slices[0].get("base_model") and all(
        _whole_range(src.get("layer_range"), src["model"]) for src in slices[0].get("sources", []))
    if whole:
        shared.update(slices[0].get("parameters") or {})
    else:  # a frankenmerge: the inputs of every slice, once each, for soupkit's checks and card
        seen = {src["model"] for src in sources}
        for piece in slices[1:]:
            for src in piece.get("sources", []):
                if src["model"] not in seen:
                    seen.add(src["model"])
                    sources.append(_entry(src, label))
    return sources, shared, whole


def _entry(item: Any, label: str) -> dict[str, Any]:
    if isinstance(item, str):
        return {"model": item}
    if not isinstance(item, dict) or "model" not in item:
        raise SoupkitError(f"{label}: each model or slice source needs a 'model:' key; got {item!r}")
    return item


def _whole_range(layer_range: Any, model: str) -> bool:
    """``layer_range`` is ``[0, L]`` with L the model's layer count (read from a local config.json)."""
    if not isinstance(layer_range, list) or len(layer_range) != 2 or layer_range[0] != 0:
        return False
    config = Path(model) / "config.json"
    if not config.is_file():
        return False
    text = json.loads(config.read_text())
    text = text.get("text_config", text) if isinstance(text.get("text_config"), dict) else text
    layers = next((text[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(text.get(k), int)), None)
    return layers == layer_range[1]


def _ingredient(src: dict[str, Any], i: int, label: str) -> dict[str, Any]:
    params = dict(src.get("parameters") or {})
    out: dict[str, Any] = {"model": str(src["model"])}
    if "weight" in params:
        out["weight"] = to_setting(params.pop("weight"), f"{label}: models[{i}].parameters.weight")
    if params:
        out["parameters"] = {k: to_setting(v, f"{label}: models[{i}].parameters.{k}") for k, v in params.items()}
    return out


def to_setting(value: Any, where: str) -> Any:
    """A mergekit parameter value in soupkit's form: a filter list becomes ``{filter: value, default: v}``
    (first match wins in both; entries after an unfiltered one can never match, as in mergekit)."""
    if isinstance(value, dict) and "value" in value:
        value = [value]
    if not (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
        return value
    out: dict[str, Any] = {}
    for entry in value:
        if "value" not in entry:
            raise SoupkitError(f"{where}: a filter entry needs a 'value:'; got {entry!r}")
        key = entry.get("filter")
        if key in (None, "*"):
            out["default"] = entry["value"]
            break
        out.setdefault(str(key), entry["value"])
    return out
