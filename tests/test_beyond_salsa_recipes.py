"""The shipped WARP recipe is two rounds in one graph: each SLERP reads its round's align runs
(paths inside their outputs), LITI reads the SLERP, the next round starts from LITI; the eval
reads the fronts' models. The WARM and rewarded-soups recipes name what their evals compare."""

from __future__ import annotations

import random
from pathlib import Path

from soupkit.pipeline import build_graph, units
from soupkit.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _graph(name: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing made yet: the graph is built from the recipe alone
    return build_graph(units(load_recipe(RECIPES / name), lambda _: None))


def test_warp_rounds_are_ordered_by_the_data_they_read(tmp_path, monkeypatch):
    graph = _graph("warp-tiny.yaml", tmp_path, monkeypatch)
    inputs = graph.inputs
    assert sorted(inputs["slerp-1"]) == ["round1-a/seed-1/kl-0.05", "round1-b/seed-2/kl-0.05", "sft-a"]
    assert sorted(inputs["init-2"]) == ["sft-a", "slerp-1"]
    assert "init-2" in inputs["round2-a/seed-1/kl-0.05"] and "init-2" in inputs["round2-b/seed-2/kl-0.05"]
    assert sorted(inputs["slerp-2"]) == ["init-2", "round2-a/seed-1/kl-0.05", "round2-b/seed-2/kl-0.05"]
    assert {"slerp-2", "ppo/seed-0/kl-0.05", "ppo/seed-0/kl-0.2", "ppo/seed-0/kl-1"} <= set(inputs["eval"])
    order = [u.name for u in graph.units]
    assert order.index("slerp-1") < order.index("init-2") < order.index("round2-a/seed-1/kl-0.05") < order.index("slerp-2")
    specs = {u.name: u.settings for u in graph.units}
    assert specs["round1-a/seed-1/kl-0.05"]["ref_ema"] == 0.01 and "ref_ema" not in specs["ppo/seed-0/kl-0.05"]
    assert specs["slerp-1"]["method"] == "task_slerp"


def test_warm_and_rewarded_soups_recipes_compare_with_their_baselines(tmp_path, monkeypatch):
    warm = _graph("warm-tiny.yaml", tmp_path, monkeypatch)
    assert sorted(warm.inputs["rm"]) == ["rm-seed0", "rm-seed1", "rm-seed2"]
    assert "rm" in warm.inputs["warm/seed-0/kl-0.05"] and "rm-seed0" in warm.inputs["single/seed-0/kl-0.05"]
    soups = load_recipe(RECIPES / "rewarded-soups-tiny.yaml")
    front = soups.eval.fronts[0]
    assert front.axes == ["kind", "focus"] and front.values[0] == 0.0 and front.values[-1] == 1.0
    rs = _graph("rewarded-soups-tiny.yaml", tmp_path, monkeypatch)
    assert {"kind/seed-0/kl-0.05", "focus/seed-0/kl-0.05", "sum/seed-0/kl-0.05"} <= set(rs.inputs["eval"])


def test_the_two_rewards_sum_to_the_gold_judge():
    from soupkit.demo import world

    rows = [(p, world.response(random.Random(i), p, p_good=0.5, p_off=0.3))
            for i, p in enumerate(world.prompts(200, seed=9))]
    rows += [("describe the fox :", "the fox is happy happy kind . the cat is sad ."), ("tell me about the owl :", "")]
    for p, c in rows:
        assert abs(world.kind_score(p, c) + world.focus_score(p, c) - world.gold_score(p, c)) < 1e-12
    assert world.kind_score("describe the fox :", "the fox is happy happy kind . the cat is sad .") == 0.5  # 2 good - 1 bad
