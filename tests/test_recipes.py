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


def test_public_api_resolves_to_the_library_functions():
    import soupkit
    from soupkit.diagnostics.report import report
    from soupkit.merge import run_merge
    from soupkit.pipeline import run_eval, run_pipeline
    from soupkit.rlhf.trainer import train

    assert (soupkit.run_merge, soupkit.inspect, soupkit.align) == (run_merge, report, train)
    assert (soupkit.run_pipeline, soupkit.run_eval) == (run_pipeline, run_eval)
    assert sorted(soupkit.__all__) == soupkit.__all__ and all(hasattr(soupkit, n) for n in soupkit.__all__)
