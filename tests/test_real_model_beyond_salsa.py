"""WARP's moving reference and ``eval.fronts`` on the real chat model, SmolLM2-135M-Instruct (tied
embeddings, ChatML prompts, ``<|im_end|>`` as end of turn): the EMA the trainer keeps equals its
closed form, and a front's ends are measured exactly as the two models themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soupkit.demo import chat_world

pytestmark = pytest.mark.realmodel
MU = 0.5
GOLD = "soupkit.demo.chat_world:gold_reward"


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    from soupkit.realmodel import smollm2
    from soupkit.rlhf import build_spec, train

    base = smollm2()
    root = tmp_path_factory.mktemp("smollm2-warp")
    data = chat_world.write_data(root / "data", sft_n=8, pref_n=8)
    spec = build_spec(None, {"ref": [str(base)], "prompts": str(data["prompts"]), "reward": GOLD, "steps": 3,
                             "batch_size": 4, "max_new_tokens": 16, "ppo_epochs": 1, "learning_rate": 1e-5,
                             "save_every": 1, "keep_checkpoints": 0, "ref_ema": MU, "bf16": False})
    train(spec, out=root / "run")
    return base, root / "run", data["heldout"]


def test_ema_reference_is_the_closed_form_with_tied_embeddings(ema_run):
    from soupkit.rlhf.checkpoints import load_trainer_state
    from tests.conftest import load_state

    base, run, _ = ema_run
    start = load_state(base)
    p1, p2 = (load_state(run / "checkpoints" / f"step-{k}" / "policy") for k in (1, 2))
    saved = load_trainer_state(run / "checkpoints" / "step-2")["ema_ref"]
    assert "lm_head.weight" not in saved  # tied to the embeddings: one parameter, updated once
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        want = (1 - MU) ** 2 * start[name].double() + MU * (1 - MU) * p1[name].double() + MU * p2[name].double()
        torch.testing.assert_close(saved[name].double(), want, atol=1e-6, rtol=1e-6)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl_init"] == rows[0]["kl"] == 0.0 and rows[-1]["kl_init"] != rows[-1]["kl"]


def test_front_ends_are_the_two_models(ema_run):
    from soupkit.chat import policy_chat, render
    from soupkit.evaluation import front as F
    from soupkit.evaluation.sampling import Sampling, load_scorer
    from soupkit.loading import causal_lm
    from soupkit.recipe import FrontSpec
    from soupkit.rlhf.prompts import load_prompts

    base, run, heldout = ema_run
    prompts = load_prompts(str(heldout), "prompt", "test")[:8]
    how = Sampling(max_new_tokens=16, temperature=0.7, top_p=1.0, seed=0)
    chat = policy_chat(base, "auto", "policy")
    scorers, refs = {"gold": load_scorer(GOLD, chat.tokenizer)}, {"init": causal_lm(base, "init")}
    spec = FrontSpec(name="liti", a=str(base), b=str(run / "final"), axis="eta", values=[0.0, 1.0])
    got = F.measure_front(spec, ["kl_init", "gold"], prompts, how, scorers, refs, 100)
    texts = render(chat.tokenizer, prompts, chat.template, "p")
    for point, path in zip(got["points"], [base, run / "final"]):
        rows = F.measure_model(causal_lm(path, "m"), chat, texts, prompts, how, scorers, refs)
        assert {k: point[k] for k in ("gold", "kl_init")} == F.summarise(rows, 100), path
    assert got["points"][0]["kl_init"][0] == 0.0 and got["points"][1]["kl_init"][0] > 0.0
