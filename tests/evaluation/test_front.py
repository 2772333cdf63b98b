"""``eval.fronts`` (WARP's LITI, rewarded soups): the grid's ends are the two models themselves,
bit for bit, and so are their measurements; a midpoint is the merge engine's soup; the Pareto
flags and the comparison with another model follow hand-worked cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soupkit.chat import policy_chat, render
from soupkit.errors import SoupkitError
from soupkit.evaluation import front as F
from soupkit.evaluation.sampling import Sampling, load_scorer
from soupkit.loading import causal_lm
from soupkit.recipe import EvalSpec, FrontSpec, validate
from tests.conftest import load_state
from tests.rlhf.conftest import good_words_ref

HOW = Sampling(max_new_tokens=5, temperature=1.0, top_p=1.0, seed=3)
PROMPTS = ["the cat sat on", "a dog ran", "hello world", "the big red bird flew over the", "one two"]


def _measure(path: Path, scorers, refs):
    chat = policy_chat(path, "auto", "policy")
    texts = render(chat.tokenizer, PROMPTS, chat.template, "prompts")
    return F.summarise(F.measure_model(causal_lm(path, "m"), chat, texts, PROMPTS, HOW, scorers, refs), 200)


def test_eta_0_and_1_are_the_endpoints_and_the_middle_is_the_soup(tmp_path, llama_pair):
    from soupkit import run_merge

    a, b = llama_pair
    tok = policy_chat(a, "auto", "policy").tokenizer
    scorers = {"reward": load_scorer(good_words_ref(), tok)}
    refs = {"init": causal_lm(a, "init")}
    spec = FrontSpec(name="liti", a=str(a), b=str(b), axis="eta", values=[0.0, 0.5, 1.0])
    got = F.measure_front(spec, ["kl_init", "reward"], PROMPTS, HOW, scorers, refs, 200)
    soup = run_merge({"merge": {"method": "uniform", "models": [str(a), str(b)]}}, out=tmp_path / "soup")
    for point, model in zip(got["points"], [a, soup, b]):
        want = _measure(model, scorers, refs)
        assert {k: point[k] for k in want} == want, point["value"]
    assert got["points"][0]["kl_init"][0] == 0.0  # eta 0 is the init itself
    assert got["points"][2]["kl_init"][0] > 0.0


def test_the_in_memory_model_at_0_and_1_is_each_model_bit_for_bit(llama_pair):
    from soupkit.diagnostics.path import mix_into, snapshot

    a, b = llama_pair
    model = causal_lm(a, "a")
    ends = [snapshot(model), snapshot(causal_lm(b, "b"))]
    for weights, path in (([0.0, 1.0], b), ([1.0, 0.0], a)):
        mix_into(model, ends, weights)
        state = {k: v for k, v in model.state_dict().items()}
        for name, tensor in load_state(path).items():
            assert torch.equal(state[name], tensor), name


def _pt(value, x, y):
    return {"value": value, "kind": [x, x - 0.1, x + 0.1], "focus": [y, y - 0.1, y + 0.1]}


def test_pareto_flags_follow_a_hand_worked_case():
    points = [_pt(0, 0.0, 1.0), _pt(0.5, 0.5, 0.5), _pt(0.75, 0.4, 0.4), _pt(1, 1.0, 0.0)]
    assert F.pareto(points, "kind", "focus") == [True, True, False, True]  # (0.4, 0.4) is beaten by (0.5, 0.5)
    kl = [{"value": 0, "kl_init": [0.0] * 3, "gold": [1.0] * 3}, {"value": 1, "kl_init": [2.0] * 3, "gold": [0.5] * 3}]
    assert F.pareto(kl, "kl_init", "gold") == [True, False]  # more KL and less gold: dominated


def test_compare_with_another_model_at_its_x():
    front = {"axes": ["kl_init", "gold"], "points": [
        {"value": 0.0, "kl_init": [0.0, 0.0, 0.0], "gold": [1.0, 0.9, 1.1]},
        {"value": 1.0, "kl_init": [2.0, 1.8, 2.2], "gold": [3.0, 2.9, 3.1]},
        {"value": 0.5, "kl_init": [1.0, 0.9, 1.1], "gold": [0.5, 0.4, 0.6]}]}  # dominated: not on the front
    # at kl 1 the front (the first two points) is 2.0 in [1.9, 2.1] (interpolated bounds)
    assert F.at_x(front["points"], "kl_init", "gold", 1.0) == [2.0, 1.9, 2.1]
    assert F.compare(front, {"kl_init": [1.0, 0.9, 1.1], "gold": [1.5, 1.4, 1.8]}) == "beats"
    assert F.compare(front, {"kl_init": [1.0, 0.9, 1.1], "gold": [2.5, 2.2, 2.8]}) == "loses to"
    assert F.compare(front, {"kl_init": [1.0, 0.9, 1.1], "gold": [2.0, 1.95, 2.3]}) == "not separated from"
    # past the front's larger-KL end: its end point (kl 2, gold 3) does better with less KL
    assert F.at_x(front["points"], "kl_init", "gold", 3.0) == [3.0, 2.9, 3.1]
    assert F.compare(front, {"kl_init": [3.0, 2.9, 3.1], "gold": [2.0, 1.9, 2.1]}) == "beats"
    assert F.compare(front, {"kl_init": [-0.5, -0.6, -0.4], "gold": [2.0, 1.9, 2.1]}) == "outside"
    scores = {"axes": ["kind", "focus"], "points": [_pt(0, 0.2, 1.0), _pt(1, 1.0, 0.2)]}
    assert F.at_x(scores["points"], "kind", "focus", 0.1) == [1.0, 0.9, 1.1]  # less kind than the front's least-kind end: that end's focus
    assert F.at_x(scores["points"], "kind", "focus", 1.2) is None


def test_front_settings_are_checked():
    with pytest.raises(SoupkitError, match="axes: give two different metrics"):
        validate(FrontSpec, {"name": "f", "a": "x", "b": "y", "axes": ["gold"]}, "eval.fronts")
    with pytest.raises(SoupkitError, match="two fronts have the same name"):
        validate(EvalSpec, {"prompts": "p", "output": "o", "fronts": [{"name": "f", "a": "x", "b": "y"}] * 2}, "eval")


def test_an_unmeasured_axis_is_refused_before_any_model_loads():
    from soupkit.pipeline import _front_axes

    spec = validate(EvalSpec, {"prompts": "p", "output": "o", "gold_reward": "m:f",
                               "fronts": [{"name": "f", "a": "x", "b": "y", "axes": ["kind", "gold"]}]}, "eval")
    with pytest.raises(SoupkitError, match="eval.fronts.f.axes: 'kind' is not measured; known: reward, gold"):
        _front_axes(spec)


def test_a_missing_front_model_is_refused_before_any_model_loads(tmp_path, llama_pair):
    from soupkit.pipeline import _front_axes

    spec = validate(EvalSpec, {"prompts": "p", "output": "o", "references": {"init": str(llama_pair[0])},
                               "fronts": [{"name": "liti", "a": str(llama_pair[0]), "b": str(tmp_path / "nope")}]},
                    "eval")
    with pytest.raises(SoupkitError, match=f"eval.fronts.liti.b: {tmp_path / 'nope'} not found"):
        _front_axes(spec)
    ok = spec.model_copy(update={"fronts": [spec.fronts[0].model_copy(update={"b": str(llama_pair[1])})]})
    assert _front_axes(ok) == [["kl_init", "reward"]]  # the default axes: KL to the first reference, the score


def test_soupkit_eval_prints_each_front_and_its_verdicts():
    from soupkit.display import front_summary

    front = {"name": "liti", "axis": "eta", "axes": ["kl_init", "gold"],
             "points": [{"value": 0.0, "pareto": True}, {"value": 0.5, "pareto": True}, {"value": 1.0, "pareto": False}],
             "others": {"ppo": {"front": "loses to"}, "ppo-1": {"front": "outside"}}}
    assert front_summary([front]) == ["front liti (kl_init vs gold): Pareto at eta = 0, 0.5",
                                      "  the front loses to ppo", "  the front cannot be compared with ppo-1"]
