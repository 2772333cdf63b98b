"""SFT and reward-model stages over TRL: they learn, they are seeded, they write HF outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soupkit.errors import SoupkitError
from soupkit.recipe import RewardModelSpec, SFTSpec
from soupkit.train import train_reward_model, train_sft
from tests.conftest import load_state, make_model

SFT_ROWS = [{"prompt": "the cat", "completion": " sat on the mat"}, {"prompt": "a dog", "completion": " ran in the sun"}] * 16
PREFS = [{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " bad bad bad"},
         {"prompt": "a dog", "chosen": " ran in the sun", "rejected": " sad sad sad"}] * 16


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _completion_loss(model_dir: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    ids = tok(["the cat sat on the mat"], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("train") / "base", seed=7)


def sft(tmp_path: Path, base: Path, name: str, seed: int, **kw) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = _jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    spec = SFTSpec(name=name, base=str(base), data=str(data), output=str(tmp_path / name), seed=seed,
                   learning_rate=5e-3, batch_size=8, epochs=4, max_length=32, **kw)
    return train_sft(spec)


def test_sft_learns_and_writes_a_loadable_model_with_provenance(tmp_path, base):
    out = sft(tmp_path, base, "a", seed=1)
    assert _completion_loss(out) < _completion_loss(base) - 0.5
    assert {"config.json", "model.safetensors", "tokenizer.json", "soupkit_recipe.yaml", "README.md"} <= \
        {p.name for p in out.iterdir()}
    assert not (out / "training_args.bin").exists()  # no pickles in outputs


def test_sft_seed_decides_the_result(tmp_path, base):
    a = load_state(sft(tmp_path / "1", base, "a", seed=1))
    again = load_state(sft(tmp_path / "2", base, "a", seed=1))
    b = load_state(sft(tmp_path / "3", base, "b", seed=2))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[name], again[name])  # same seed, same data order: the same model
    assert not torch.equal(a[name], b[name])  # another seed shuffles differently


def test_reward_model_prefers_the_chosen_answers(tmp_path, base):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = _jsonl(tmp_path / "prefs.jsonl", PREFS)
    out = train_reward_model(RewardModelSpec(base=str(base), data=str(data), output=str(tmp_path / "rm"),
                                             learning_rate=5e-3, batch_size=8, epochs=2, max_length=32))
    model, tok = AutoModelForSequenceClassification.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)

    def score(text: str) -> float:
        enc = tok([text], return_tensors="pt")
        with torch.no_grad():
            return float(model(**enc).logits[0, 0])

    for row in PREFS[:2]:
        assert score(row["prompt"] + row["chosen"]) > score(row["prompt"] + row["rejected"])


def test_missing_columns_are_named(tmp_path, base):
    data = _jsonl(tmp_path / "bad.jsonl", [{"question": "x", "answer": "y"}])
    spec = SFTSpec(name="a", base=str(base), data=str(data), output=str(tmp_path / "a"))
    with pytest.raises(SoupkitError, match=r"bad.jsonl:1: not an SFT example: expected 'messages', 'prompt' \+ "
                                           r"'completion', or 'text'; the row has answer, question"):
        train_sft(spec)
    assert not (tmp_path / "a").exists()
