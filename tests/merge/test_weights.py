"""Weight resolution: depth interpolation, filters, normalisation (hand-worked cases)."""

from __future__ import annotations

import pytest

from soupkit.errors import SoupkitError
from soupkit.merge.weights import count_layers, depth, interpolate, layer_index, tensor_weights


@pytest.mark.parametrize(("values", "t", "expected"), [
    ([0.2], 0.7, 0.2),
    ([0.0, 1.0], 0.0, 0.0),
    ([0.0, 1.0], 1.0, 1.0),
    ([0.0, 1.0], 0.25, 0.25),
    ([1.0, 0.0, 1.0], 0.5, 0.0),
    ([1.0, 0.0, 1.0], 0.25, 0.5),   # halfway between points 0 (t=0) and 1 (t=0.5)
    ([1.0, 0.0, 1.0], 0.75, 0.5),
    ([0.0, 3.0, 6.0, 9.0], 2 / 3, 6.0),
])
def test_interpolate(values, t, expected):
    assert interpolate(values, t) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("name", "expected"), [
    ("model.layers.0.self_attn.q_proj.weight", 0.0),
    ("model.layers.1.mlp.up_proj.weight", 1 / 3),
    ("model.layers.3.input_layernorm.weight", 1.0),
    ("model.embed_tokens.weight", 0.0),        # input embeddings: t = 0
    ("transformer.wte.weight", 0.0),           # GPT-2 token embeddings (tied with the head): t = 0
    ("transformer.wpe.weight", 0.0),
    ("model.norm.weight", 1.0),                # final norm: t = 1
    ("lm_head.weight", 1.0),                   # LM head: t = 1
])
def test_depth_of_tensor_names(name, expected):
    assert depth(name, num_layers=4) == pytest.approx(expected)


def test_layer_index_and_count():
    names = [f"transformer.h.{i}.attn.c_attn.weight" for i in range(3)] + ["transformer.ln_f.weight"]
    assert [layer_index(n) for n in names] == [0, 1, 2, None]
    assert count_layers({"n_layer": 3}, names) == 3
    assert count_layers({}, names) == 3
    with pytest.raises(SoupkitError, match="num_hidden_layers=5"):
        count_layers({"num_hidden_layers": 5}, names)


def test_scalars_are_normalised():
    assert tensor_weights([1.0, 3.0], "x", 2) == [0.25, 0.75]
    assert tensor_weights([None, None, None], "x", 2) == [1 / 3] * 3
    assert tensor_weights([2.0, -1.0], "x", 2) == [2.0, -1.0]  # extrapolation is allowed


def test_list_weights_follow_depth():
    # A: [1, 0], B: [0, 1] over 4 layers -> layer 1 sits at t = 1/3.
    w = tensor_weights([[1.0, 0.0], [0.0, 1.0]], "model.layers.1.mlp.down_proj.weight", 4)
    assert w == pytest.approx([2 / 3, 1 / 3])
    assert tensor_weights([[1.0, 0.0], [0.0, 1.0]], "lm_head.weight", 4) == [0.0, 1.0]
    assert tensor_weights([[1.0, 0.0], [0.0, 1.0]], "model.embed_tokens.weight", 4) == [1.0, 0.0]


def test_mapping_first_match_then_default():
    a = {"self_attn": 0.9, "mlp": 0.1, "default": 0.5}
    b = {"self_attn": 0.1, "mlp": 0.9, "default": 0.5}
    assert tensor_weights([a, b], "model.layers.0.self_attn.k_proj.weight", 2) == pytest.approx([0.9, 0.1])
    assert tensor_weights([a, b], "model.layers.0.mlp.gate_proj.weight", 2) == pytest.approx([0.1, 0.9])
    assert tensor_weights([a, b], "model.norm.weight", 2) == pytest.approx([0.5, 0.5])


def test_mapping_values_may_be_lists():
    a = {"mlp": [1.0, 0.0], "default": 0.5}
    b = {"mlp": [0.0, 1.0], "default": 0.5}
    assert tensor_weights([a, b], "model.layers.3.mlp.up_proj.weight", 4) == pytest.approx([0.0, 1.0])


def test_zero_sum_names_the_tensor():
    with pytest.raises(SoupkitError, match="'model.layers.0.mlp.up_proj.weight' sum to 0"):
        tensor_weights([{"mlp": 1.0, "default": 1.0}, {"mlp": -1.0, "default": 1.0}],
                       "model.layers.0.mlp.up_proj.weight", 2)


def test_unmatched_mapping_without_default():
    with pytest.raises(SoupkitError, match=r"models\[0\].weight: no key matches tensor 'lm_head.weight'"):
        tensor_weights([{"mlp": 1.0}, 1.0], "lm_head.weight", 2)
