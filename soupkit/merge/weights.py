"""Per-tensor merge weights: depth interpolation, name filters and normalisation.

Semantics (README, "Recipe merge: section"):
- a list weight ``[w_0 .. w_{K-1}]`` is piecewise-linear over depth t in [0, 1], point k at k/(K-1);
  layer i of L sits at t = i/(L-1); the input embeddings at t = 0; every other tensor outside the
  layers (final norm, LM head) at t = 1. A tied embedding is one tensor and takes t = 0. (mergekit
  puts the LM head and final norm at t = 0 as well; we do not copy that quirk.)
- a mapping weight picks the first key that is a substring of the tensor name, else ``default``;
- the weights of one tensor are normalised to sum to 1; a sum of 0 is an error naming the tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from soupkit.errors import SoupkitError

LAYER = re.compile(r"\.(\d+)\.")
EMBEDDING_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings")
LAYER_CONFIG_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

Weight = float | list[float] | dict[str, Any]


def layer_index(name: str) -> int | None:
    """Index of the decoder layer a tensor belongs to (first ``.N.`` in its name), else None."""
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def count_layers(config: dict[str, Any], names: Iterable[str]) -> int:
    """Number of decoder layers, from the config and checked against the tensor names."""
    indices = {i for i in map(layer_index, names) if i is not None}
    from_names = max(indices) + 1 if indices else 0
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for key in LAYER_CONFIG_KEYS:
        if isinstance(text.get(key), int):
            if indices and text[key] != from_names:
                raise SoupkitError(
                    f"config says {key}={text[key]} but the tensor names have {from_names} layers"
                )
            return text[key]
    return from_names


def depth(name: str, num_layers: int) -> float:
    """Position t in [0, 1] of a tensor along the model's depth."""
    index = layer_index(name)
    if index is not None:
        return index / (num_layers - 1) if num_layers > 1 else 0.0
    return 0.0 if any(marker in name for marker in EMBEDDING_MARKERS) else 1.0


def interpolate(values: Sequence[float], t: float) -> float:
    """Piecewise-linear value of ``values`` (placed at k/(K-1)) at ``t``."""
    if len(values) == 1:
        return values[0]
    x = t * (len(values) - 1)
    k = min(int(x), len(values) - 2)
    frac = x - k
    return values[k] * (1.0 - frac) + values[k + 1] * frac


def pick(weight: Weight, name: str) -> float | list[float] | None:
    """Resolve a mapping weight by substring; plain weights pass through. None: no match."""
    if not isinstance(weight, dict):
        return weight
    for key, value in weight.items():
        if key != "default" and key in name:
            return value
    return weight.get("default")


def raw_weight(weight: Weight, name: str, t: float) -> float | None:
    value = pick(weight, name)
    if isinstance(value, list):
        return interpolate(value, t)
    return value


def tensor_weights(weights: Sequence[Weight | None], name: str, num_layers: int) -> list[float]:
    """Normalised weights of each model for tensor ``name`` (None weights mean uniform)."""
    if all(w is None for w in weights):
        return [1.0 / len(weights)] * len(weights)
    t = depth(name, num_layers)
    raw = []
    for i, weight in enumerate(weights):
        value = raw_weight(weight, name, t)
        if value is None:
            raise SoupkitError(
                f"merge.models[{i}].weight: no key matches tensor {name!r} and there is no 'default'"
            )
        raw.append(value)
    total = sum(raw)
    if total == 0:
        raise SoupkitError(f"merge weights for tensor {name!r} sum to 0 (raw weights {raw})")
    return [w / total for w in raw]
