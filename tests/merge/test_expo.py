"""ExPO (arXiv 2404.16792) as a weighted soup with weights past 1: the formula, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soupkit import run_merge
from soupkit.recipe import load_recipe
from tests.conftest import load_state

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("alpha", [0.5, 0.3, 2.0])
def test_expo_is_the_extrapolation_formula(tmp_path, llama_pair, alpha):
    """theta = (1 + alpha) aligned - alpha sft. The weights sum to 1, so normalising leaves them be, and
    the engine computes fp32(-alpha) * sft + fp32(1 + alpha) * aligned in float32: the oracle below."""
    sft, aligned = llama_pair
    spec = {"method": "weighted", "output": str(tmp_path / "expo"),
            "models": [{"model": str(sft), "weight": -alpha}, {"model": str(aligned), "weight": 1 + alpha}]}
    got = load_state(run_merge({"merge": spec}))
    s, a = load_state(sft), load_state(aligned)
    for name, value in got.items():
        want = s[name].float() * torch.tensor(-alpha, dtype=torch.float32) + a[name].float() * torch.tensor(
            1 + alpha, dtype=torch.float32)
        assert torch.equal(value, want), name
    # it extrapolates: the step from sft to the result is (1 + alpha) times the step from sft to aligned
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[name] - s[name], (1 + alpha) * (a[name] - s[name]), rtol=1e-5, atol=1e-6)


def test_expo_through_task_arithmetic_agrees(tmp_path, llama_pair):
    """The same extrapolation as task arithmetic over the SFT model: sft + (1 + alpha)(aligned - sft)."""
    sft, aligned = llama_pair
    weighted = load_state(run_merge({"merge": {"method": "weighted", "output": str(tmp_path / "w"), "models": [
        {"model": str(sft), "weight": -0.5}, {"model": str(aligned), "weight": 1.5}]}}))
    task = load_state(run_merge({"merge": {"method": "task_arithmetic", "base": str(sft), "output": str(tmp_path / "t"),
                                           "models": [{"model": str(aligned), "weight": 1.0}],
                                           "parameters": {"lambda": 1.5}}}))
    for name in weighted:
        torch.testing.assert_close(weighted[name], task[name], rtol=0, atol=4e-7 * float(weighted[name].abs().max()) + 1e-7)


def test_shipped_expo_recipe():
    spec = load_recipe(ROOT / "recipes" / "expo.yaml").merge
    weights = [ing.weight for ing in spec.models]
    assert spec.method == "weighted" and sum(weights) == 1 and min(weights) < 0 < 1 < max(weights)
