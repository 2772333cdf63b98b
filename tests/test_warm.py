"""WARM (arXiv 2401.12187): ``reward_model.seeds`` trains one reward model per seed and writes their
uniform weight average, score head included. The oracle for the average is numpy: the float32
sum ``w * x_0 + w * x_1 + w * x_2`` (w = 1/3 rounded to float32), left to right, tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from soupkit.errors import SoupkitError
from soupkit.pipeline import plan, run_pipeline
from soupkit.recipe import load_recipe
from tests.conftest import load_state, tiny_config, tokenizer

QUIET = {"log": lambda _: None}


@pytest.fixture
def trained(monkeypatch) -> list[tuple[str, int]]:
    """Reward-model training replaced by a tiny random LlamaForSequenceClassification seeded by the
    run's seed; align by a stand-in. Records (name, seed) of each reward model made."""
    from transformers import AutoModelForSequenceClassification

    import soupkit.rlhf
    import soupkit.train

    made: list[tuple[str, int]] = []

    def reward(spec, *, force=False, **_):
        made.append((spec.name, spec.seed))
        torch.manual_seed(spec.seed)
        config = tiny_config("llama")
        config.num_labels = 1
        AutoModelForSequenceClassification.from_config(config).save_pretrained(spec.output)
        tokenizer().save_pretrained(spec.output)
        return Path(spec.output)

    def align(spec, *, out=None, force=False, **_):
        (Path(out) / "final").mkdir(parents=True, exist_ok=True)
        (Path(out) / "reward.txt").write_text(spec.reward)
        return Path(out)

    monkeypatch.setattr(soupkit.train, "train_reward_model", reward)
    monkeypatch.setattr(soupkit.rlhf, "train", align)
    return made


def warm_recipe(tmp_path: Path, llama_pair) -> dict:
    (tmp_path / "prefs.jsonl").write_text('{"chosen": "a", "rejected": "b"}\n')
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    return {"reward_model": {"name": "rm", "base": str(llama_pair[0]), "data": str(tmp_path / "prefs.jsonl"),
                             "output": str(tmp_path / "rm"), "seeds": [1, 2, 3]},
            "align": {"ref": str(llama_pair[0]), "reward": "rm", "prompts": str(tmp_path / "prompts.txt"),
                      "output": str(tmp_path / "align"), "runs": {"warm": {}, "single": {"reward": "rm-seed1"}}}}


def test_warm_reward_model_is_the_float32_average_bit_for_bit(tmp_path, llama_pair, trained):
    run_pipeline(load_recipe(warm_recipe(tmp_path, llama_pair)), **QUIET)
    assert sorted(trained) == [("rm-seed1", 1), ("rm-seed2", 2), ("rm-seed3", 3)]
    members = [load_state(tmp_path / f"rm-seed{s}") for s in (1, 2, 3)]
    warm = load_state(tmp_path / "rm")
    assert "score.weight" in warm and set(warm) == set(members[0])
    w = np.float32(1.0) / np.float32(3.0)
    for name, got in warm.items():
        x = [m[name].numpy() for m in members]
        expected = w * x[0] + w * x[1] + w * x[2]  # float32 throughout
        assert expected.dtype == np.float32
        assert np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32)), name
    assert not torch.equal(members[0]["score.weight"], members[1]["score.weight"])  # the seeds differ
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    # the names resolve: the WARM run scores with the average, the baseline with one member
    assert (tmp_path / "align" / "warm" / "seed-0" / "reward.txt").read_text() == str(tmp_path / "rm")
    assert (tmp_path / "align" / "single" / "seed-0" / "reward.txt").read_text() == str(tmp_path / "rm-seed1")


def test_the_average_reads_its_members_and_align_reads_the_average(tmp_path, llama_pair, trained):
    steps = {s.unit.name: s for s in plan(load_recipe(warm_recipe(tmp_path, llama_pair)), **QUIET)}
    names = list(steps)
    assert names.index("rm") > max(names.index(f"rm-seed{s}") for s in (1, 2, 3))
    assert names.index("warm/seed-0/kl-0.05") > names.index("rm")


@pytest.mark.parametrize("seeds", [[1], [2, 2]])
def test_a_warm_average_needs_two_different_seeds(tmp_path, llama_pair, seeds):
    recipe = warm_recipe(tmp_path, llama_pair)
    recipe["reward_model"]["seeds"] = seeds
    with pytest.raises(SoupkitError, match="reward_model.seeds: a WARM average needs at least two different seeds"):
        load_recipe(recipe)
