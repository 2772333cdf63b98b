"""The interpolation path and plane: endpoints and vertices against each model's own loss."""

from __future__ import annotations

import pytest

from soupkit.diagnostics import path as P
from soupkit.diagnostics import report
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
    """The in-memory midpoint is the fp32 soup that soupkit merge writes, bit for bit."""
    import torch

    from soupkit.loading import causal_lm
    from tests.conftest import load_state

    _, line, _ = three
    assert line["loss"][4] == pytest.approx(own_loss(soup, TEXTS), rel=1e-6)
    work = causal_lm(family["ft1"], "m")
    P.mix_into(work, [P.snapshot(causal_lm(family[k], "m")) for k in ("ft1", "ft2")], (0.5, 0.5))
    merged = load_state(soup)
    assert all(torch.equal(p, merged[name]) for name, p in work.named_parameters())


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


def _eval_mean_reward(model_dir, reward: str, how) -> float:
    """eval's mean reward of one model (``soupkit eval``'s ``reward`` column before the bootstrap)."""
    from soupkit.evaluation.sampling import load_scorer, measure
    from soupkit.loading import generation_tokenizer

    scorer = load_scorer(reward, generation_tokenizer(model_dir, "policy"))
    return float(measure(model_dir, TEXTS, how, scorer, None, {})["reward"].mean())


@pytest.mark.parametrize("reward", ["function", "model"])
def test_path_reward_at_the_endpoints_is_evals_reward_of_each_model(family, texts_file, reward_dir, reward):
    """One protocol: the reward inspect reports at alpha = 0 and 1 is the mean reward eval measures
    for those models with the same sampling settings (an align run's defaults here)."""
    from soupkit.evaluation.sampling import default_sampling

    spec = "tests.diagnostics.rewards:word_count" if reward == "function" else str(reward_dir)
    line5 = report([str(family["ft1"]), str(family["ft2"])], prompts=texts_file, path=True,
                   reward=spec, points=5)["path"]
    how = default_sampling()
    assert [line5["reward"][1], line5["reward"][3]] == [_eval_mean_reward(family[k], spec, how) for k in ("ft1", "ft2")]
    assert len(set(line5["reward"])) > 1  # the points differ: the reward is measured, not a constant
    if reward == "function":
        assert all(0 < r <= how.max_new_tokens for r in line5["reward"])  # words <= tokens


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A one-label sequence classifier with the models' tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tests.conftest import tiny_config, tokenizer

    config = tiny_config("llama")
    config.num_labels = 1
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("rm") / "rm"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path
