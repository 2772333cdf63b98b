"""``merge:`` as a list of named soups and sweeps, models named by the recipe's names, and the
align section split into one run's settings and the sweep (issues #17 and #11)."""

from __future__ import annotations

import pytest

from soupkit.errors import SoupkitError
from soupkit.recipe import AlignSection, AlignSpec, load_recipe, resume_settings

SFT = [{"name": f"sft-{c}", "base": "init", "data": "d.jsonl", "output": f"out/sft-{c}"} for c in "abc"]


def test_sweeps_expand_to_named_soups_with_the_paper_weights():
    recipe = load_recipe({"sft": SFT, "merge": [
        {"name": "soup", "models": ["sft-a", "sft-b"], "alphas": [0.25, 1.0], "output": "out/soup"},
        {"name": "soup", "models": ["sft-a", "sft-b", "sft-c"], "first_n": [2, 3], "output": "out/soup", "dtype": "float32"},
        {"name": "mine", "method": "weighted", "models": [{"model": "sft-c", "weight": 2}, {"model": "out/x", "weight": 1}], "output": "out/m"}]})
    got = [(s.name, s.spec.method, [(i.model, i.weight) for i in s.spec.models], s.spec.output, s.axis, s.value)
           for s in recipe.soups()]
    assert got == [
        ("soup-a0.25", "weighted", [("out/sft-a", 0.75), ("out/sft-b", 0.25)], "out/soup-a0.25", "alpha", 0.25),
        ("soup-a1", "weighted", [("out/sft-a", 0.0), ("out/sft-b", 1.0)], "out/soup-a1", "alpha", 1.0),
        ("soup-n2", "uniform", [("out/sft-a", None), ("out/sft-b", None)], "out/soup-n2", "n", 2.0),
        ("soup-n3", "uniform", [("out/sft-a", None), ("out/sft-b", None), ("out/sft-c", None)], "out/soup-n3", "n", 3.0),
        ("mine", "weighted", [("out/sft-c", 2.0), ("out/x", 1.0)], "out/m", None, None),
    ]
    assert recipe.soups()[2].spec.dtype == "float32"  # the sweep's other settings reach every soup


def test_one_merge_mapping_is_one_soup_named_soup():
    recipe = load_recipe({"merge": {"models": ["a", "b"], "output": "s"}, "align": {"reward": "m:f", "prompts": "p"}})
    assert [s.name for s in recipe.soups()] == ["soup"] and recipe.align.ref == ["s"]


def test_align_runs_eval_and_sft_name_models_by_recipe_names():
    recipe = load_recipe({
        "sft": SFT[:2] + [{"name": "sft-c", "base": "sft-a", "data": "d.jsonl", "output": "out/c"}],
        "reward_model": {"base": "sft-a", "data": "p.jsonl", "output": "out/rm"},
        "merge": [{"name": "soup", "models": ["sft-a", "sft-b"], "alphas": [0.5], "output": "out/soup"}],
        "align": {"ref": "sft-a", "reward": "reward_model", "prompts": "p.txt", "watch": {"s": "soup-a0.5"},
                  "runs": {"ppo": {}, "salsa": {"ref": "soup-a0.5", "init": "sft-b"}}},
        "eval": {"prompts": "h", "output": "e", "reward": "reward_model", "references": {"a": "sft-a"},
                 "path": {"a": "sft-a", "b": "sft-b"}}})
    assert recipe.sft[2].base == "out/sft-a" and recipe.reward_model.base == "out/sft-a"
    assert (recipe.align.ref, recipe.align.reward, recipe.align.watch) == (["out/sft-a"], "out/rm", {"s": "out/soup-a0.5"})
    assert recipe.align.runs["salsa"] == {"ref": "out/soup-a0.5", "init": "out/sft-b"}
    assert (recipe.eval.reward, recipe.eval.references, recipe.eval.path.a) == ("out/rm", {"a": "out/sft-a"}, "out/sft-a")
    assert recipe.align.prompts == "p.txt"  # data paths are not model names


@pytest.mark.parametrize("merge, message", [
    ([{"name": "s", "models": ["a", "b"], "alphas": [0.5], "first_n": [2], "output": "o"}],
     r"merge\[0\]: give alphas or first_n, not both"),
    ([{"name": "s", "models": ["a", "b", "c"], "alphas": [0.5], "output": "o"}], r"merge\[0\]: alphas: .*exactly two models"),
    ([{"name": "s", "models": ["a", "b"], "alphas": [1.5], "output": "o"}], r"alpha in \[0, 1\]"),
    ([{"name": "s", "models": ["a", "b"], "first_n": [3], "output": "o"}], r"first_n: each n must be between 2 and the 2"),
    ([{"name": "s", "models": ["a", {"model": "b", "weight": 2}], "alphas": [0.5], "output": "o"}], "sets the method and weights"),
    ([{"name": "s", "models": ["a", "b"], "alphas": [0.5]}], "output: a sweep needs an output prefix"),
    ([{"name": "s", "models": ["a", "b"], "output": "o"}, {"name": "s", "models": ["a", "b"], "output": "p"}],
     "the name 's' is given to two"),
    ([{"name": "s", "modles": ["a", "b"], "output": "o"}], r"merge\[0\]\.modles: unknown key \(did you mean 'models'\?\)"),
    ([{"models": ["a", "b"], "output": "o"}], r"merge\[0\]\.name: Field required"),
])
def test_bad_soup_lists_are_one_line(merge, message):
    with pytest.raises(SoupkitError, match=message):
        load_recipe({"merge": merge})


def test_soupkit_merge_of_a_recipe_with_several_soups_points_to_run(tmp_path):
    from soupkit.merge import load_merge_spec

    recipe = {"merge": [{"name": "s", "models": ["a", "b"], "alphas": [0.25, 0.5], "output": "o"}]}
    with pytest.raises(SoupkitError, match=r"merge: holds 2 soups \(s-a0.25, s-a0.5\); .*soupkit run .*--only NAME"):
        load_merge_spec(recipe)
    one = load_merge_spec({"merge": [{"name": "s", "models": ["a", "b"], "alphas": [0.25], "output": "o"}]})
    assert [i.weight for i in one.models] == [0.75, 0.25] and one.output == "o-a0.25"


def test_align_sweep_keys_live_in_the_section_not_in_one_run():
    assert set(AlignSection.model_fields) - set(AlignSpec.model_fields) == {"runs", "seeds", "kl_coefs"}
    with pytest.raises(Exception, match="seeds"):
        AlignSpec(ref=["r"], reward="m:f", prompts="p", seeds=[0, 1])


def test_the_schema_says_which_settings_may_change_on_resume():
    """Oracle: the list the trainer kept by hand before the schema said it."""
    spec = AlignSpec(ref=["r"], reward="m:f", prompts="p")
    free = {"steps", "save_every", "keep_checkpoints", "output", "forward_batch_size", "batch_size",
            "offload_frozen", "gradient_checkpointing", "attention",  # attention: a kernel, not the maths
            "vllm_memory_fraction", "vllm_enforce_eager", "vllm_sleep"}  # the vllm engine's memory knobs (issue #13)
    assert set(resume_settings(spec)) == set(AlignSpec.model_fields) - free
