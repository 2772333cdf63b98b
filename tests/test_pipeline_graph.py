"""The pipeline as a graph of units by the data they read: a change reruns exactly what lies
downstream of it (issue #17). Merges are real; where a test is about the graph and not about
training, the SFT, reward-model, align and eval work is replaced by a stand-in that writes a
file and records its call, so the oracle is the list of units that ran."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from soupkit.errors import SoupkitError
from soupkit.pipeline import MARKER, fingerprint, plan, run_pipeline
from soupkit.recipe import load_recipe, to_plain
from tests.conftest import load_state

QUIET = {"log": lambda _: None}


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """Stand-ins for the training stages and eval: each writes its output and records its name."""
    import soupkit.pipeline
    import soupkit.rlhf
    import soupkit.train

    made: list[str] = []

    def fake(name_of):
        def run(spec, *, out=None, force=False, **_):
            target = Path(out or spec.output)
            made.append(name_of(spec, target))
            (target / "final").mkdir(parents=True, exist_ok=True)
            (target / "final" / "config.json").write_text(json.dumps({"made": len(made)}))
            return target
        return run

    monkeypatch.setattr(soupkit.train, "train_sft", fake(lambda s, t: s.name))
    monkeypatch.setattr(soupkit.train, "train_reward_model", fake(lambda s, t: "reward_model"))
    monkeypatch.setattr(soupkit.rlhf, "train", fake(lambda s, t: t.parent.name))

    def fake_eval(recipe, *, force=False):
        made.append("eval")
        Path(recipe.eval.output).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(soupkit.pipeline, "run_eval", fake_eval)
    return made


def graph_recipe(tmp_path: Path, pair, weight_b: float = 1.0) -> dict:
    """Two SFT-like inputs (the test pair), a reward model on a data file, two named soups, PPO
    against model A, SALSA against each soup, and eval; models named by the recipe's names."""
    prefs = tmp_path / "prefs.jsonl"
    if not prefs.exists():
        prefs.write_text('{"chosen": "a", "rejected": "b"}\n')
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    return {
        "reward_model": {"name": "rm", "base": str(pair[0]), "data": str(prefs), "output": str(tmp_path / "rm")},
        "merge": [{"name": "soup-x", "method": "weighted", "output": str(tmp_path / "soup-x"),
                   "models": [{"model": str(pair[0]), "weight": 1.0}, {"model": str(pair[1]), "weight": weight_b}]},
                  {"name": "soup-y", "models": [str(p) for p in pair], "output": str(tmp_path / "soup-y")}],
        "align": {"ref": str(pair[0]), "reward": "rm", "prompts": str(tmp_path / "prompts.txt"),
                  "output": str(tmp_path / "align"),
                  "runs": {"ppo": {}, "salsa-x": {"ref": "soup-x"}, "salsa-y": {"ref": "soup-y"}}},
        "eval": {"prompts": str(tmp_path / "prompts.txt"), "output": str(tmp_path / "eval"), "baseline": "ppo"},
    }


def test_a_changed_data_file_reruns_the_reward_model_its_readers_and_eval_not_the_merge(tmp_path, llama_pair, calls):
    recipe = graph_recipe(tmp_path, llama_pair)
    run_pipeline(load_recipe(recipe), **QUIET)
    assert calls == ["reward_model", "ppo", "salsa-x", "salsa-y", "eval"]
    soups = {n: (tmp_path / n / "model.safetensors").stat().st_mtime_ns for n in ("soup-x", "soup-y")}
    calls.clear()
    assert run_pipeline(load_recipe(recipe), **QUIET)["merge"] == ["skipped", "skipped"] and calls == []

    (tmp_path / "prefs.jsonl").write_text('{"chosen": "b", "rejected": "a"}\n')  # same path, same size
    report = run_pipeline(load_recipe(recipe), **QUIET)
    assert calls == ["reward_model", "ppo", "salsa-x", "salsa-y", "eval"]
    assert report["merge"] == ["skipped", "skipped"] and report["reward_model"] == ["ran"]
    assert {n: (tmp_path / n / "model.safetensors").stat().st_mtime_ns for n in soups} == soups


def test_same_size_same_mtime_edit_is_seen_and_a_touch_is_not(tmp_path, llama_pair, calls):
    """Size and mtime are recorded, but the content hash decides: a file rewritten with the same
    size and its old mtime restored is still a change; a touch that changes nothing is not."""
    recipe = graph_recipe(tmp_path, llama_pair)
    run_pipeline(load_recipe(recipe), only=["rm"], **QUIET)
    prefs = tmp_path / "prefs.jsonl"
    stat = prefs.stat()
    os.utime(prefs, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, not changed
    calls.clear()
    assert run_pipeline(load_recipe(recipe), only=["rm"], **QUIET) == {"reward_model": ["skipped"]}
    marker = json.loads((tmp_path / "rm" / MARKER).read_text())
    assert marker["files"][str(prefs)]["size"] == stat.st_size
    stat = prefs.stat()
    prefs.write_text('{"chosen": "x", "rejected": "y"}\n')
    os.utime(prefs, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prefs.stat().st_size == stat.st_size and prefs.stat().st_mtime_ns == stat.st_mtime_ns
    [step] = plan(load_recipe(recipe), only=["rm"], **QUIET)
    assert (step.action, step.why) == ("run", f"data file {prefs} changed")


def test_a_changed_soup_weight_reruns_that_soup_and_its_align_runs_only(tmp_path, llama_pair):
    """Real merges and real PPO runs: the PPO baseline and the other soup's run keep their files."""
    from tests.rlhf.conftest import REWARDS

    def recipe(weight_b: float) -> dict:
        data = graph_recipe(tmp_path, llama_pair, weight_b)
        del data["reward_model"], data["eval"]
        data["align"].update(reward=f"{REWARDS}:good_words", steps=1, batch_size=2, max_new_tokens=3, save_every=0)
        return data

    run_pipeline(load_recipe(recipe(1.0)), **QUIET)
    files = {name: tmp_path / name / "model.safetensors" for name in ("soup-x", "soup-y")}
    files |= {run: tmp_path / "align" / run / "seed-0" / "final" / "model.safetensors" for run in ("ppo", "salsa-x", "salsa-y")}
    before = {name: f.stat().st_mtime_ns for name, f in files.items()}

    with pytest.raises(SoupkitError, match=r"\[merge\] soup-x: .*pass --force soup-x \(or --force merge\)"):
        run_pipeline(load_recipe(recipe(3.0)), **QUIET)
    report = run_pipeline(load_recipe(recipe(3.0)), force=["soup-x"], **QUIET)
    assert report == {"sft": [], "reward_model": [], "merge": ["ran", "skipped"], "align": ["skipped", "ran", "skipped"],
                      "eval": []}
    after = {name: f.stat().st_mtime_ns for name, f in files.items()}
    assert {n for n in files if after[n] != before[n]} == {"soup-x", "salsa-x"}
    a, b, soup = load_state(llama_pair[0]), load_state(llama_pair[1]), load_state(tmp_path / "soup-x")
    name = "model.norm.weight"
    assert soup[name].equal(a[name] * 0.25 + b[name] * 0.75)  # weights 1 and 3, normalised


def test_an_input_made_again_reruns_its_readers(tmp_path, llama_pair, calls):
    """--force NAME with unchanged settings makes a new output; what read the old one is redone."""
    recipe = graph_recipe(tmp_path, llama_pair)
    run_pipeline(load_recipe(recipe), **QUIET)
    calls.clear()
    run_pipeline(load_recipe(recipe), force=["soup-y"], **QUIET)
    assert calls == ["salsa-y", "eval"]
    calls.clear()
    run_pipeline(load_recipe(recipe), only=["soup-y"], force=["soup-y"], **QUIET)  # readers left out ...
    assert calls == []
    steps = {s.unit.name: (s.action, s.why) for s in plan(load_recipe(recipe), **QUIET) if s.action != "skip"}
    assert steps == {"salsa-y/seed-0/kl-0.05": ("run", "input soup-y was made again"),  # ... are redone next time
                     "eval": ("run", "input salsa-y/seed-0/kl-0.05 runs again")}


def test_dry_run_prints_what_would_run_and_why(tmp_path, llama_pair, calls):
    from typer.testing import CliRunner

    from soupkit.cli import app

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(graph_recipe(tmp_path, llama_pair)))
    run_pipeline(path, only=["rm", "soup-x", "soup-y", "ppo"], **QUIET)
    (tmp_path / "soup-y" / MARKER).unlink()  # as if interrupted
    path.write_text(yaml.safe_dump(graph_recipe(tmp_path, llama_pair, weight_b=2.0)))
    calls.clear()
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--force", "salsa-x"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "skip   [reward_model] rm: complete",
        "refuse [merge] soup-x: the recipe changed them",
        "run    [merge] soup-y: unfinished",
        "skip   [align] ppo/seed-0/kl-0.05: complete",
        "run    [align] salsa-x/seed-0/kl-0.05: forced; not made yet",
        "run    [align] salsa-y/seed-0/kl-0.05: not made yet",
        "run    [eval] eval: not made yet",
    ]
    assert calls == [] and not (tmp_path / "align" / "salsa-x").exists()  # nothing ran, nothing written


def test_only_and_force_take_unit_names_and_run_families(tmp_path, llama_pair, calls):
    recipe = load_recipe(graph_recipe(tmp_path, llama_pair))
    assert run_pipeline(recipe, only=["rm", "ppo"], **QUIET) == {"reward_model": ["ran"], "align": ["ran"]}
    assert calls == ["reward_model", "ppo"]
    with pytest.raises(SoupkitError, match=r"--force 'soup-xx': unknown stage or unit \(did you mean 'soup-x'\?\)"):
        run_pipeline(recipe, force=["soup-xx"], **QUIET)
    with pytest.raises(SoupkitError, match=r"\[align\] salsa-x/seed-0/kl-0.05: its input soup-x is not up to date "
                                           r"\(not made yet\); add it to --only"):
        run_pipeline(recipe, only=["salsa-x"], **QUIET)


def test_a_marker_from_before_the_graph_is_still_complete(tmp_path, llama_pair):
    """soupkit wrote ``fingerprint(settings + fingerprints of every earlier stage)``; an output so
    marked is not redone (oracle: that formula, written out here)."""
    recipe = {"merge": {"models": [str(p) for p in llama_pair], "output": str(tmp_path / "soup")}}
    run_pipeline(load_recipe(recipe), **QUIET)
    old = fingerprint({**to_plain(load_recipe(recipe).merge), "upstream": []})
    (tmp_path / "soup" / MARKER).write_text(json.dumps({"stage": "merge", "name": "soup", "fingerprint": old}))
    assert run_pipeline(load_recipe(recipe), **QUIET)["merge"] == ["skipped"]
    (tmp_path / "soup" / MARKER).write_text(json.dumps({"stage": "merge", "name": "soup", "fingerprint": "0" * 16}))
    with pytest.raises(SoupkitError, match="by an earlier soupkit"):
        run_pipeline(load_recipe(recipe), **QUIET)


def test_an_unreadable_data_file_is_one_line(tmp_path, llama_pair, monkeypatch):
    import soupkit.pipeline

    recipe = load_recipe(graph_recipe(tmp_path, llama_pair))
    real = Path.open

    def denied(self, *args, **kwargs):
        if self.name == "prefs.jsonl":
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(SoupkitError, match=r"^data file .*prefs\.jsonl: cannot be read \(Permission denied\)$"):
        soupkit.pipeline.plan(recipe, **QUIET)
    assert not (tmp_path / "rm").exists()
