"""Greedy soup: the search rule on a hand-worked case, then on checkpoints against an independent loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soupkit import run_merge
from soupkit.errors import SoupkitError
from soupkit.merge.greedy import greedy
from tests.conftest import load_state, make_model


def test_hand_worked_case():
    """Ingredients are numbers, a soup their mean, the score (mean - 1.5)^2 (lower is better).

    own scores: 0 -> 2.25, 3 -> 2.25, 1 -> 0.25, 5 -> 12.25; order: 1, 0, 3, 5 (the tie 0/3 keeps recipe
    order). Soup {1}: 0.25. Add 0: mean 0.5 -> 1.0, worse, dropped. Add 3: mean 2 -> 0.25, no worse,
    kept. Add 5: mean 3 -> 2.25, worse, dropped. Kept: 1 and 3 (indices 2 and 1)."""
    values = [0.0, 3.0, 1.0, 5.0]

    def score(indices):
        return (sum(values[i] for i in indices) / len(indices) - 1.5) ** 2

    result = greedy(4, score, higher_is_better=False)
    assert result.individual == [2.25, 2.25, 0.25, 12.25]
    assert result.order == [2, 0, 1, 3]
    assert [(t["model"], t["soup_score"], t["kept"]) for t in result.trials] == [(0, 1.0, False), (1, 0.25, True),
                                                                                   (3, 2.25, False)]
    assert result.kept == [2, 1] and result.score == 0.25
    flipped = greedy(4, lambda idx: -score(idx), higher_is_better=True)
    assert flipped.kept == [2, 1] and flipped.order == [2, 0, 1, 3]


def test_first_ingredient_alone_when_everything_hurts():
    result = greedy(3, lambda idx: 1.0 if len(idx) == 1 else 2.0, higher_is_better=False)
    assert result.kept == [0] and not any(t["kept"] for t in result.trials)


def independent_loss(model_dir: Path, texts: list[str]) -> float:
    """Mean next-token cross-entropy over every predicted token of every text, with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            logits = model(ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("greedy")
    return [make_model(root / f"m{i}", seed=70 + i) for i in range(4)]


def test_greedy_soup_on_texts(tmp_path, four):
    """Four random tiny models and a copy of the best one (m2; own losses 4.149 to 4.178 nats). The copy
    ties m2 and ranks next (recipe order); the soup of m2 and its copy is m2 bit for bit, so its loss is
    no worse and the copy is kept. Every other decision must follow the recorded scores."""
    import shutil

    texts = ["the cat sat on the mat", "a dog ran in the sun and then it was a good day",
             "one two three four five", "the bird flew over the tree"]
    (tmp_path / "held.txt").write_text("\n".join(texts) + "\n")
    copy = Path(shutil.copytree(four[2], tmp_path / "m2-copy"))
    refs = [str(p) for p in [*four[:3], copy, four[3]]]
    spec = {"method": "greedy", "models": refs, "output": str(tmp_path / "soup"),
            "parameters": {"texts": str(tmp_path / "held.txt")}}
    out = run_merge({"merge": spec})
    record = json.loads((out / "greedy_soup.json").read_text())
    assert record["order"][:2] == [str(four[2]), str(copy)]
    assert record["trials"][0] == {"model": str(copy), "soup_score": record["individual"][str(four[2])], "kept": True}
    # every ingredient's own score is its loss on the texts, measured independently
    for ref in refs:
        assert record["individual"][ref] == pytest.approx(independent_loss(Path(ref), texts), rel=1e-5)
    assert record["order"] == sorted(refs, key=lambda r: record["individual"][r])
    # each trial follows the rule: kept iff the soup with it scores no worse than the soup before
    best = record["individual"][record["order"][0]]
    for trial in record["trials"]:
        assert trial["kept"] == (trial["soup_score"] <= best)
        best = trial["soup_score"] if trial["kept"] else best
    # the written model is the uniform soup of the kept ingredients (in the order they were added),
    # bit for bit, and its loss is the score recorded for it
    uniform = run_merge({"merge": {"method": "uniform", "models": record["kept"], "output": str(tmp_path / "u")}})
    written, want = load_state(out), load_state(uniform)
    assert all(torch.equal(written[k], want[k]) for k in want)
    assert record["score"] == pytest.approx(independent_loss(out, texts), rel=1e-5)
    card = (out / "README.md").read_text()
    assert "## Greedy soup" in card and f"Kept {len(record['kept'])} of 5" in card


def test_greedy_by_reward_smoke(tmp_path, four):
    """Smoke test (the sampling and scoring are eval's, tested there): reward of samples, higher is better."""
    (tmp_path / "prompts.txt").write_text("the cat\na dog\n")
    (tmp_path / "rw.py").write_text("def score(prompts, completions, **kw):\n"
                                    "    return [float(c.count('the')) for c in completions]\n")
    spec = {"method": "greedy", "models": [str(p) for p in four[:3]], "output": str(tmp_path / "soup"),
            "parameters": {"prompts": str(tmp_path / "prompts.txt"), "reward": f"{tmp_path / 'rw.py'}:score"}}
    record = json.loads((run_merge({"merge": spec}) / "greedy_soup.json").read_text())
    assert record["metric"] == "reward" and record["higher_is_better"] is True
    assert record["order"] == sorted(record["individual"], key=lambda r: -record["individual"][r])


@pytest.mark.parametrize(("parameters", "weights", "message"), [
    ({}, False, "greedy needs texts: FILE"),
    ({"texts": "t.txt", "reward": "m:f"}, False, "not both"),
    ({"text": "t.txt"}, False, r"merge.parameters.text: unknown parameter for greedy \(did you mean 'texts'\?\)"),
    ({"texts": "t.txt"}, True, "takes no weights"),
])
def test_bad_greedy_settings(tmp_path, four, parameters, weights, message):
    models = [{"model": str(p), "weight": 1.0} if weights else str(p) for p in four[:2]]
    with pytest.raises(SoupkitError, match=message):
        run_merge({"merge": {"method": "greedy", "models": models, "parameters": parameters,
                             "output": str(tmp_path / "o")}})
    assert not (tmp_path / "o").exists()


def test_soupkit_run_fingerprints_the_held_out_texts(tmp_path):
    """A greedy soup reads its texts: ``soupkit run`` lists them with the models, so editing them reruns it."""
    from soupkit.pipeline import units
    from soupkit.recipe import load_recipe

    recipe = load_recipe({"merge": {"method": "greedy", "models": ["a", "b"], "output": str(tmp_path / "o"),
                                    "parameters": {"texts": "held.txt"}}})
    (unit,) = units(recipe, lambda *a, **k: None)
    assert unit.reads == ("a", "b", "held.txt")
