"""The interpolation path and plane: endpoints and vertices against each model's own loss."""

from __future__ import annotations

import pytest

from soupkit.diagnostics import path as P
from soupkit.diagnostics import report
from soupkit.diagnostics.reward import mean_reward, score_last_token
from soupkit.loading import causal_lm, load_tokenizer
from tests.diagnostics.conftest import TEXTS
from tests.diagnostics.oracles import own_loss


def test_grid():
    assert P.grid(9) == [-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert P.grid(5) == [-0.5, 0.0, 0.5, 1.0, 1.5]


def test_barriers_hand_worked():
    # inside [0, 1]: losses 1, 2, 3 on a straight line -> no barrier above the chord, but
    # Frankle's max-minus-mean is 3 - (1 + 3) / 2 = 1; the points outside [0, 1] are ignored
    got = P.barriers([-0.5, 0.0, 0.5, 1.0, 1.5], [9.0, 1.0, 2.0, 3.0, 9.0])
    assert got == {"barrier": 1.0, "barrier_chord": 0.0}
    got = P.barriers([0.0, 0.25, 0.5, 0.75, 1.0], [1.0, 2.0, 4.0, 2.5, 2.0])
    assert got["barrier"] == pytest.approx(4.0 - 1.5)
    assert got["barrier_chord"] == pytest.approx(4.0 - 1.5)


@pytest.fixture(scope="module")
def three(family, texts_file):
    """Path and plane over ft1, ft2, other (default 9 points; plane on 5 points per axis)."""
    import torch

    models = [str(family["ft1"]), str(family["ft2"]), str(family["other"])]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the per-test one_torch_thread fixture
    try:
        line = report(models[:2], prompts=texts_file, path=True)["path"]
        plane = report(models, prompts=texts_file, path=True, points=5)["path"]["plane"]
    finally:
        torch.set_num_threads(threads)
    return models, line, plane


def test_path_endpoints_equal_each_models_own_loss(three):
    models, line, _ = three
    assert line["a"] == models[0] and line["b"] == models[1]
    assert line["alpha"] == P.grid(9) and len(line["loss"]) == 9
    assert line["loss"][2] == pytest.approx(own_loss(models[0], TEXTS), rel=1e-5)
    assert line["loss"][6] == pytest.approx(own_loss(models[1], TEXTS), rel=1e-5)
    assert "reward" not in line and line["barrier_chord"] <= line["barrier"] + 1e-12


def test_path_midpoint_equals_the_uniform_soup(family, soup, texts_file, three):
    """The in-memory midpoint is the fp32 soup that soupkit merge writes."""
    _, line, _ = three
    assert line["loss"][4] == pytest.approx(own_loss(soup, TEXTS), rel=1e-6)


def test_plane_vertices_equal_each_models_own_loss(three):
    models, _, plane = three
    assert plane["models"] == models and plane["u"] == plane["v"] == P.grid(5)
    loss = plane["loss"]  # loss[i][j] at (u[j], v[i]); A=(0,0) B=(1,0) C=(0,1)
    assert len(loss) == 5 and all(len(row) == 5 for row in loss)
    for (i, j), model in zip(((1, 1), (1, 3), (3, 1)), models):
        assert loss[i][j] == pytest.approx(own_loss(model, TEXTS), rel=1e-5)


def test_plane_edge_matches_the_path(three):
    _, line, plane = three
    for j, u in enumerate(plane["u"]):  # v = 0 is the line A -> B
        assert plane["loss"][1][j] == pytest.approx(line["loss"][line["alpha"].index(u)], rel=1e-6)


def test_reward_along_the_path_matches_each_model_at_the_endpoints(family, texts_file):
    from tests.diagnostics.rewards import word_count

    spec = "tests.diagnostics.rewards:word_count"
    tok = load_tokenizer(family["ft1"], "model")
    plain = lambda prompts, completions, chat: word_count(prompts, completions)  # noqa: E731
    own = [mean_reward(plain, tok, TEXTS, TEXTS, False)(causal_lm(family[k], "m")) for k in ("ft1", "ft2")]
    line5 = report([str(family["ft1"]), str(family["ft2"])], prompts=texts_file, path=True,
                   reward=spec, points=5)["path"]
    assert [line5["reward"][1], line5["reward"][3]] == own
    assert all(0 < r <= 32 for r in line5["reward"])  # at most MAX_NEW_TOKENS words


def test_reward_model_scores_the_last_real_token(tmp_path):
    """Batched, right-padded scores equal each text scored alone by transformers."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tests.conftest import tiny_config, tokenizer

    config = tiny_config("llama")
    config.num_labels = 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    tok = tokenizer()
    got = score_last_token(model, tok, TEXTS)
    for text, score in zip(TEXTS, got):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            want = float(model(input_ids=ids).logits[0, 0])
        assert score == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_reward_model_directory(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from soupkit.diagnostics.reward import load_reward
    from tests.conftest import tiny_config, tokenizer

    config = tiny_config("llama")
    config.num_labels = 1
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(tmp_path / "rm")
    tokenizer().save_pretrained(tmp_path / "rm")
    fn = load_reward(str(tmp_path / "rm"))
    got = fn(["the cat", "hello"], [" sat on the mat", " world"], False)
    want = score_last_token(model, tokenizer(), ["the cat sat on the mat", "hello world"])
    assert got == pytest.approx(want, rel=1e-5)
