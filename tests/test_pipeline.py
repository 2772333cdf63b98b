"""The pipeline: stages skipped when complete, redone when interrupted, refused when stale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from soupkit.errors import SoupkitError
from soupkit.pipeline import MARKER, expand_align, run_pipeline
from soupkit.recipe import load_recipe
from tests.conftest import load_state


def merge_recipe(tmp_path: Path, pair, weight_b: float = 1.0) -> Path:
    recipe = {"merge": {"method": "weighted", "output": str(tmp_path / "soup"),
                        "models": [{"model": str(pair[0]), "weight": 1.0}, {"model": str(pair[1]), "weight": weight_b}]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_complete_stage_is_skipped(tmp_path, llama_pair):
    recipe = merge_recipe(tmp_path, llama_pair)
    assert run_pipeline(recipe, log=lambda _: None) == {s: [] for s in ("sft", "reward_model", "align", "eval")} | {"merge": ["ran"]}
    stamp = (tmp_path / "soup" / "model.safetensors").stat().st_mtime_ns
    assert run_pipeline(recipe, log=lambda _: None)["merge"] == ["skipped"]
    assert (tmp_path / "soup" / "model.safetensors").stat().st_mtime_ns == stamp


def test_interrupted_stage_is_redone(tmp_path, llama_pair):
    recipe = merge_recipe(tmp_path, llama_pair)
    run_pipeline(recipe, log=lambda _: None)
    (tmp_path / "soup" / MARKER).unlink()  # as if killed after the rename, before the marker
    (tmp_path / "soup" / "model.safetensors").write_bytes(b"half a file")
    assert run_pipeline(recipe, log=lambda _: None)["merge"] == ["ran"]
    want = load_state(llama_pair[0])
    got = load_state(tmp_path / "soup")
    b = load_state(llama_pair[1])
    name = "model.norm.weight"
    assert got[name].equal(want[name] * 0.5 + b[name] * 0.5)


def test_changed_settings_need_force(tmp_path, llama_pair):
    run_pipeline(merge_recipe(tmp_path, llama_pair), log=lambda _: None)
    changed = merge_recipe(tmp_path, llama_pair, weight_b=3.0)
    with pytest.raises(SoupkitError, match=r"\[merge\] soup: .* different settings \(the recipe changed them\); pass --force soup \(or --force merge\)"):
        run_pipeline(changed, log=lambda _: None)
    assert run_pipeline(changed, force=["merge"], log=lambda _: None)["merge"] == ["ran"]
    marker = json.loads((tmp_path / "soup" / MARKER).read_text())
    assert marker["stage"] == "merge"


def test_only_and_unknown_stage(tmp_path, llama_pair):
    recipe = merge_recipe(tmp_path, llama_pair)
    assert run_pipeline(recipe, only=["align"], log=lambda _: None) == {"align": []}
    assert not (tmp_path / "soup").exists()
    with pytest.raises(SoupkitError, match="--only 'merj': unknown stage"):
        run_pipeline(recipe, only=["merj"], log=lambda _: None)


def test_align_grid_expands_runs_seeds_and_coefs(tmp_path):
    recipe = load_recipe({"align": {"ref": "soup", "reward": "rm", "prompts": "p.txt", "output": str(tmp_path / "al"),
                                    "runs": {"ppo": {"ref": "sft-a"}, "salsa": {}}, "seeds": [0, 1],
                                    "kl_coefs": [0.05, 0.2]}})
    grid = expand_align(recipe.align)
    assert len(grid) == 2 * 2 * 2
    name, seed, coef, spec, path = grid[0]
    assert (name, seed, coef, spec.ref, spec.kl_coef, spec.seed) == ("ppo", 0, 0.05, ["sft-a"], 0.05, 0)
    assert path == tmp_path / "al" / "ppo" / "kl-0.05" / "seed-0"
    assert grid[-1][3].ref == ["soup"] and grid[-1][4] == tmp_path / "al" / "salsa" / "kl-0.2" / "seed-1"


def test_align_run_with_a_misspelt_override_is_named(tmp_path):
    recipe = load_recipe({"align": {"ref": "soup", "reward": "rm", "prompts": "p.txt",
                                    "runs": {"ppo": {"reff": "sft-a"}}}})
    with pytest.raises(SoupkitError, match=r"align\.runs\.ppo: reff: unknown key \(did you mean 'ref'\?\)"):
        expand_align(recipe.align)


def test_two_stages_writing_one_directory_is_refused(tmp_path, llama_pair):
    recipe = {"merge": {"models": [str(p) for p in llama_pair], "output": str(tmp_path / "x")},
              "reward_model": {"base": str(llama_pair[0]), "data": "d.jsonl", "output": str(tmp_path / "x")}}
    with pytest.raises(SoupkitError, match="write to the same directory"):
        run_pipeline(load_recipe(recipe), log=lambda _: None)


def test_a_changed_sft_makes_the_soup_that_reads_it_stale(tmp_path, llama_pair):
    """The soup reads the SFT run's output, so a changed SFT setting reaches it; a soup that does
    not read it stays complete."""
    from soupkit.pipeline import build_graph, mark_complete, state, units

    sft = {"name": "x", "base": str(llama_pair[0]), "data": "d.jsonl", "output": str(tmp_path / "sft")}
    merges = [{"name": "reads-sft", "models": [str(tmp_path / "sft"), str(llama_pair[1])], "output": str(tmp_path / "s1")},
              {"name": "does-not", "models": [str(p) for p in llama_pair], "output": str(tmp_path / "s2")}]
    first = build_graph(units(load_recipe({"sft": [sft], "merge": merges}), print))
    changed = build_graph(units(load_recipe({"sft": [{**sft, "epochs": 2.0}], "merge": merges}), print))
    for unit in first.units:  # pretend every unit ran with the first settings
        unit.output.mkdir()
        mark_complete(unit, first)
    assert [state(u, first)[0] for u in first.units] == ["done", "done", "done"]
    assert [state(u, changed) for u in changed.units] == [
        ("changed", "the recipe changed them"), ("stale", "input x changed"), ("done", "complete")]


def test_corrupt_marker_means_redo(tmp_path, llama_pair):
    recipe = merge_recipe(tmp_path, llama_pair)
    run_pipeline(recipe, log=lambda _: None)
    (tmp_path / "soup" / MARKER).write_text("{not json")
    assert run_pipeline(recipe, log=lambda _: None)["merge"] == ["ran"]


def test_a_run_may_set_its_own_kl_coef_and_seed(tmp_path):
    recipe = load_recipe({"align": {"ref": "soup", "reward": "rm", "prompts": "p.txt", "output": str(tmp_path),
                                    "seeds": [0, 1], "runs": {"ppo": {"kl_coef": 0.3, "seed": 9}, "salsa": {}}}})
    grid = [(name, seed, coef, spec.seed, spec.kl_coef) for name, seed, coef, spec, _ in expand_align(recipe.align)]
    assert grid == [("ppo", 9, 0.3, 9, 0.3), ("salsa", 0, 0.05, 0, 0.05), ("salsa", 1, 0.05, 1, 0.05)]
    bad = load_recipe({"align": {"ref": "soup", "reward": "rm", "prompts": "p.txt",
                                 "runs": {"ppo": {"output": "x"}}}})
    with pytest.raises(SoupkitError, match=r"align\.runs\.ppo\.output"):
        expand_align(bad.align)


def test_interrupted_align_run_without_checkpoint_starts_again(tmp_path, llama_pair):
    """A run killed before its first checkpoint leaves metrics but no marker: it is trained again
    from step 1 (align clears its own files), not appended to."""
    from tests.rlhf.conftest import REWARDS, WORDS

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(" ".join(WORDS[i:i + 3]) for i in range(0, 24)) + "\n")
    align = {"ref": str(llama_pair[0]), "reward": f"{REWARDS}:good_words", "prompts": str(prompts),
             "output": str(tmp_path / "align"), "steps": 2, "batch_size": 4, "max_new_tokens": 3,
             "save_every": 0}
    run = tmp_path / "align" / "align" / "seed-0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 7, "reward": 0.0}) + "\n")
    report = run_pipeline({"align": align}, only=["align"])
    assert report["align"] == ["ran"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / MARKER).is_file()


def test_lora_recipe_sft_adapters_to_adapter_soup_to_align(tmp_path, llama_pair):
    """issue #19, end to end: two LoRA SFT runs, their exact adapter soup, PPO with a LoRA policy
    that starts from the soup adapter. Its reference is base + a frozen copy of that adapter (not
    the adapter-disabled base), so the step-0 KL is exactly 0."""
    from tests.rlhf.conftest import good_words_ref

    rows = [{"prompt": "the cat", "completion": " sat on the mat"}, {"prompt": "a dog", "completion": " ran"}] * 8
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.txt").write_text("the cat\na dog\nthe bird\na fish\n")
    sft = {"base": str(llama_pair[0]), "data": str(tmp_path / "d.jsonl"), "lora_rank": 4, "lora_alpha": 8,
           "learning_rate": 1e-2, "batch_size": 8, "max_length": 32, "save_steps": 0}
    recipe = load_recipe({
        "sft": [{**sft, "name": n, "seed": s, "output": str(tmp_path / n)} for n, s in (("sft-a", 1), ("sft-b", 2))],
        "merge": {"models": [str(tmp_path / "sft-a"), str(tmp_path / "sft-b")], "output_format": "adapter",
                  "output": str(tmp_path / "soup")},
        "align": {"reward": good_words_ref(), "prompts": str(tmp_path / "p.txt"), "output": str(tmp_path / "ppo"),
                  "lora_rank": 4, "steps": 1, "batch_size": 4, "max_new_tokens": 4, "ppo_epochs": 1,
                  "save_every": 0, "temperature": 1.0},
    })
    run_pipeline(recipe, log=lambda _: None)
    assert json.loads((tmp_path / "soup" / "adapter_config.json").read_text())["r"] == 8
    run = tmp_path / "ppo" / "align" / "seed-0"
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kl"] == 0.0
    assert (run / "final" / "model.safetensors").is_file()
