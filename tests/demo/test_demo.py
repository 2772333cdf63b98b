"""The reduced demo end to end: every stage, three methods, one seed, a report that reads."""

from __future__ import annotations

import json

import pytest

from soupkit.demo import world
from soupkit.demo.run import run_demo


def test_gold_reward_hand_worked():
    # on topic +1, two good adjectives +1, 11 words, nothing repeated, no other animal
    assert world.gold_score("describe the fox :", "the fox is kind . the fox is very happy . [EOS]") == 2.0
    # "sad" twice: -0.5 x 2 capped at 2, repeated "sad" -0.4, the dog -0.5, off topic 0
    assert world.gold_score("describe the fox :", "the dog is sad . it is sad .") == pytest.approx(-1.0 - 0.4 - 0.5)
    # 20 words: 6 beyond 14 cost 0.9; padding after EOS is ignored
    long = "the fox is very kind and it sings near the park and it runs near the river and it ."
    assert world.gold_score("tell me about the fox :", long + " [EOS] [PAD] [PAD]") == pytest.approx(1.5 - 0.15 * 6)


def test_preferences_follow_gold_with_noise():
    rows = world.preference_pairs(400, seed=0)
    agree = sum(world.gold_score(r["prompt"], r["chosen"]) > world.gold_score(r["prompt"], r["rejected"]) for r in rows)
    assert 0.7 < agree / len(rows) < 0.97  # mostly right, not always: the proxy must learn from noise


def test_shipped_recipe_is_the_demo_recipe():
    from pathlib import Path

    from soupkit.demo.run import RECIPE

    shipped = Path(__file__).resolve().parents[2] / "recipes" / "salsa-tiny.yaml"
    assert not shipped.is_symlink()  # a copy: symlinks break on checkouts without them
    assert shipped.read_text() == RECIPE.read_text()


def test_small_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    logs: list[str] = []
    results = run_demo(out, small=True, log=logs.append)
    assert set(results["methods"]) == {f"{m}@{c}" for m in ("ppo", "salsa", "salsa-from-soup") for c in (0.05, 0.2)}
    assert results["methods"]["ppo@0.05"]["win_rate"] is None and results["baseline"] == "ppo"
    assert results["methods"]["salsa@0.2"]["win_rate_against"] == "ppo@0.2"
    assert results["frontier"]["swept"] == ["ppo", "salsa", "salsa-from-soup"]
    for entry in results["methods"].values():
        for key in ("reward", "gold", "kl_sft-a", "kl_soup", "length"):
            est, lo, hi = entry[key]
            assert lo <= est <= hi, key
    assert (out / "eval" / "report.md").read_text().count("## Reading") == 1
    assert {p.name for p in (out / "eval").glob("*.png")} >= {"gold.png", "reward.png", "reward_vs_kl.png", "path.png"}
    for run in (f"{m}/kl-{c}" for m in ("ppo", "salsa", "salsa-from-soup") for c in (0.05, 0.2)):
        lines = (out / "align" / run / "seed-0" / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3 and {"kl_sft_a", "kl_soup"} <= set(json.loads(lines[0]))
    first_ppo = json.loads((out / "align" / "ppo" / "kl-0.05" / "seed-0" / "metrics.jsonl").read_text().splitlines()[0])
    assert first_ppo["kl"] == pytest.approx(0.0, abs=1e-6)  # init == ref at step 0
    # run again: everything is complete and skipped
    logs.clear()
    run_demo(out, small=True, log=logs.append)
    assert all("complete, skipped" in line for line in logs if line.startswith("["))
    assert len([line for line in logs if line.startswith("[")]) == 12  # 3 sft, rm, merge, 6 align, eval


def test_cli_demo_run_and_eval(tmp_path):
    """The three pipeline commands through the CLI, on the reduced demo."""
    from typer.testing import CliRunner

    from soupkit.cli import app

    runner = CliRunner()
    out = tmp_path / "d"
    result = runner.invoke(app, ["demo", "--small", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "held-out prompts" in result.output and "report:" in result.output
    again = runner.invoke(app, ["run", str(out / "recipe.yaml")])
    assert again.exit_code == 0, again.output
    assert "0 unit(s) run, 12 skipped" in again.output
    evaluated = runner.invoke(app, ["eval", str(out / "recipe.yaml"), "--force", "--set", "eval.bootstrap=100"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((out / "eval" / "results.json").read_text())["baseline"] == "ppo"
    refused = runner.invoke(app, ["eval", str(out / "recipe.yaml")])
    assert refused.exit_code == 2 and "--force" in refused.output


def test_chat_world_gold_judge_hand_worked():
    from soupkit.demo import chat_world

    conv = [{"role": "user", "content": "What is the capital of Kenya?"}]
    assert chat_world.gold_reward(["What is the capital of Kenya?"], ["Nairobi."]) == [1.0]
    assert chat_world.gold_reward([conv], [[{"role": "assistant", "content": "It is Mombasa."}]]) == [0.0]
    twelve = "The capital of Kenya is Nairobi, a city I would like to visit."  # 13 words: 3 past ten
    assert chat_world.gold_reward([conv], [twelve]) == [pytest.approx(1.0 - 0.03)]


def test_smollm2_demo_recipe_is_valid_and_points_at_the_real_model(tmp_path):
    from soupkit.demo.run import demo_recipe

    recipe = demo_recipe(tmp_path / "d", ["align.steps=2"], model="smollm2", base=tmp_path / "smol")
    assert [s.base for s in recipe.sft] == [str(tmp_path / "smol")] * 2
    assert recipe.align.steps == 2 and recipe.align.output == str(tmp_path / "d" / "align")
    with pytest.raises(Exception, match="--model 'gpt9': expected one of toy, smollm2"):
        run_demo(tmp_path / "x", model="gpt9")
