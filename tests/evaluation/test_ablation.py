"""Eval across align runs against different soups: the ablation table over a soup sweep, and a
reading that calls equal KLs equal (issue #17)."""

from __future__ import annotations

import json

import pytest

from soupkit.evaluation.report import ablations
from soupkit.evaluation.writing import ablation_lines, reading


def entry(method, coef, gold, win, points, kl=(0.5, 0.4, 0.6)):
    return {"method": method, "kl_coef": coef, "seeds": [0, 1], "reward": [0.1, 0.0, 0.2], "gold": gold,
            "kl_sft-a": list(kl), "win_rate": win, "win_rate_against": "ppo@0.05", "points": points}


SUMMARY = {
    "ppo@0.05": entry("ppo", 0.05, [0.3, 0.2, 0.4], None, [["soup", "alpha", 0.0]]),
    "salsa-a1@0.05": entry("salsa-a1", 0.05, [0.2, 0.1, 0.3], [0.43, 0.35, 0.5], [["soup", "alpha", 1.0]]),
    "salsa-a0.5@0.05": entry("salsa-a0.5", 0.05, [0.5, 0.4, 0.6], [0.6, 0.52, 0.68], [["soup", "alpha", 0.5]]),
    "other@0.05": entry("other", 0.05, [0.1, 0.0, 0.2], [0.5, 0.4, 0.6], []),
}


def test_ablation_rows_follow_the_swept_value_with_their_intervals():
    tables = ablations({**SUMMARY, "n3@0.05": entry("n3", 0.05, [0.1, 0.0, 0.2], [0.5, 0.4, 0.6], [["soup", "n", 3.0]])},
                       "gold")
    assert [(r["method"], r["value"]) for r in tables["soup-n"]["rows"]] == [("n3", 3.0)]  # one sweep name, two axes
    table = tables["soup-alpha"]
    assert (table["sweep"], table["axis"], table["score"]) == ("soup", "alpha", "gold")
    assert [(r["value"], r["method"], r["gold"], r["win_rate"]) for r in table["rows"]] == [
        (0.0, "ppo", [0.3, 0.2, 0.4], None),
        (0.5, "salsa-a0.5", [0.5, 0.4, 0.6], [0.6, 0.52, 0.68]),
        (1.0, "salsa-a1", [0.2, 0.1, 0.3], [0.43, 0.35, 0.5]),
    ]
    lines = ablation_lines({"ablation": {"soup-alpha": table}, "baseline": "ppo"})
    assert "| 0.5 | salsa-a0.5 | 0.05 | 2 | 0.500 [0.400, 0.600] | 0.600 [0.520, 0.680] |" in lines
    assert "| 0 | ppo | 0.05 | 2 | 0.300 [0.200, 0.400] | – |" in lines


@pytest.mark.parametrize("kl, word", [((0.5004, 0.4, 0.6), "the same"), ((0.5006, 0.4, 0.6), "further away"),
                                      ((0.4996, 0.4, 0.6), "the same"), ((0.4994, 0.4, 0.6), "closer"), ((0.4, 0.3, 0.5), "closer")])
def test_kls_equal_to_the_printed_precision_read_as_the_same(kl, word):
    methods = {"ppo@0.05": entry("ppo", 0.05, [0.3, 0.2, 0.4], None, [], kl=(0.5, 0.4, 0.6)),
               "salsa@0.05": entry("salsa", 0.05, [0.3, 0.2, 0.4], [0.5, 0.4, 0.6], [], kl=kl)}
    text = "\n".join(reading({"primary": "gold", "baseline": "ppo", "methods": methods, "frontier": None}))
    assert f"sits at KL {kl[0]:.3f} vs 0.500 for ppo@0.05 ({word})." in text


def test_eval_tabulates_runs_against_the_soups_of_a_sweep(tmp_path, llama_pair):
    """End to end on tiny models: an alpha sweep, PPO against the first model (alpha 0) and one
    run per soup; the ablation rows are the summary's own numbers, ordered by alpha."""
    from soupkit.pipeline import run_pipeline
    from soupkit.recipe import load_recipe
    from tests.rlhf.conftest import REWARDS, WORDS

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(" ".join(WORDS[i:i + 3]) for i in range(0, 16)) + "\n")
    a, b = (str(p) for p in llama_pair)
    recipe = load_recipe({
        "merge": [{"name": "soup", "models": [a, b], "alphas": [0.5, 1.0], "output": str(tmp_path / "soup")}],
        "align": {"ref": a, "reward": f"{REWARDS}:good_words", "prompts": str(prompts), "output": str(tmp_path / "al"),
                  "steps": 1, "batch_size": 2, "max_new_tokens": 3, "save_every": 0,
                  "runs": {"ppo": {}, "s-half": {"ref": "soup-a0.5"}, "s-one": {"ref": "soup-a1"}}},
        "eval": {"prompts": str(prompts), "output": str(tmp_path / "eval"), "baseline": "ppo", "bootstrap": 100,
                 "gold_reward": f"{REWARDS}:good_words", "references": {"a": a}}})
    run_pipeline(recipe, log=lambda _: None)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = results["ablation"]["soup-alpha"]["rows"]
    assert [(r["value"], r["method"]) for r in rows] == [(0.0, "ppo"), (0.5, "s-half"), (1.0, "s-one")]
    for row in rows:
        assert row["gold"] == results["methods"][row["entry"]]["gold"]
        assert row["win_rate"] == results["methods"][row["entry"]]["win_rate"]
    assert (tmp_path / "eval" / "ablation-soup-alpha.png").is_file()
    assert "## Ablation over alpha: the soups of `soup`" in (tmp_path / "eval" / "report.md").read_text()
