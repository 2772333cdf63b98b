"""Every shipped recipe validates, opens with a comment, and names what it runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from soupkit.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("**/*.yaml"))


def test_recipes_are_found():
    assert len(RECIPES) > 0


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_validates_and_documents_itself(path):
    recipe = load_recipe(path)
    head = path.read_text().splitlines()[:6]
    assert head[0].startswith("# "), "a recipe opens with a comment saying what it does"
    assert any("soupkit " in line for line in head), "the header says how to run it"
    assert recipe.merge is not None or any(
        getattr(recipe, section, None) is not None for section in ("align", "sft", "reward_model")
    )


def test_mergekit_recipe_parameters_are_valid():
    from soupkit.merge import mergekit_backend

    recipe = load_recipe(ROOT / "recipes" / "ties.yaml")
    mergekit_backend.validate(recipe.merge)
