"""The paper's recipes (Llama2-7B, Mistral-7B, Gemma-2B) run their whole data path on a few local
rows shaped exactly like UltraChat 200k and UltraFeedback-binarized, with a tiny base model in place
of the 7B one and every size shrunk: SFT on ``messages`` with ChatML, the reward model on the mixed
UltraFeedback rows, the soup, PPO and SALSA, eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from soupkit.chat import CHATML
from soupkit.pipeline import run_pipeline
from tests.conftest import make_model
from tests.evaluation.judge_server import JudgeServer, completion

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"salsa-llama2-7b.yaml": "meta-llama/Llama-2-7b-hf", "salsa-mistral-7b.yaml": "mistralai/Mistral-7B-v0.1",
         "salsa-gemma-2b.yaml": "google/gemma-2b"}


def conv(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


ULTRACHAT = [{"prompt": "the cat", "prompt_id": "a1", "messages": conv("the cat", "sat on the mat")},
             {"prompt": "a dog", "prompt_id": "b2", "messages": conv("a dog", "ran in the sun") + conv("then", "it is good")}]
ULTRAFEEDBACK = [{"prompt": "the cat", "prompt_id": "a1", "chosen": conv("the cat", "sat on the mat"),
                  "rejected": conv("the cat", "bad bad"), "messages": conv("the cat", "sat on the mat"),
                  "score_chosen": 8.0, "score_rejected": 3.0}] * 4


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


MT_BENCH = [{"prompt": ["the cat", "then"], "prompt_id": 7, "category": "writing", "reference": []}]  # the Hub copy's rows
ARENA_HARD = [{"question_id": "q1", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": "a dog"}]}]


def _judge_reply(body: dict, number: int) -> tuple[int, str, float]:
    system = body["messages"][0]["content"]
    return 200, completion("[[A>B]]" if system.startswith("You compare") else "[[6]]"), 0.0


def _shrunk(name: str, tmp: Path, base: Path, judge_url: str = "http://127.0.0.1:9/v1") -> dict:
    text = (ROOT / "recipes" / name).read_text().replace("runs/", f"{tmp}/runs/").replace(PAPER[name], str(base))
    text = text.replace("HuggingFaceH4/ultrachat_200k", _jsonl(tmp / "ultrachat.jsonl", ULTRACHAT))
    text = text.replace("HuggingFaceH4/ultrafeedback_binarized", _jsonl(tmp / "uf.jsonl", ULTRAFEEDBACK))
    recipe = yaml.safe_load(text)
    for section in recipe["sft"] + [recipe["reward_model"]]:
        section.update(batch_size=2, max_length=64)
    recipe["align"].update(steps=1, batch_size=2, minibatches=1, grad_accum=1, seeds=[0], kl_coefs=[0.05],
                           max_new_tokens=4, save_every=0, forward_batch_size=2)
    recipe["eval"].update(bootstrap=100)
    recipe["eval"]["path"]["points"] = 2
    recipe["eval"]["judge"].update(endpoint=judge_url, max_answer_tokens=4, max_tokens=8)
    recipe["eval"]["sets"]["mt-bench"]["source"] = _jsonl(tmp / "mt_bench.jsonl", MT_BENCH)
    recipe["eval"]["sets"]["arena-hard"]["source"] = _jsonl(tmp / "arena_hard.jsonl", ARENA_HARD)
    return recipe


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_data_path(tmp_path, name):
    original = yaml.safe_load((ROOT / "recipes" / name).read_text())
    assert [s["split"] for s in original["sft"]] == ["train_sft", "train_sft"]
    assert all(s["chat_template"] == "chatml" for s in original["sft"])
    assert (original["reward_model"]["split"], original["align"]["prompt_split"], original["eval"]["prompt_split"]) \
        == ("train_prefs", "train_prefs", "test_prefs")
    judge, sets = original["eval"]["judge"], original["eval"]["sets"]
    assert judge["endpoint"].startswith("http://") and judge["protocols"] == ["single", "pairwise"]
    assert (sets["mt-bench"]["source"], sets["mt-bench"]["protocols"]) == ("HuggingFaceH4/mt_bench_prompts", ["single"])
    assert sets["arena-hard"]["protocols"] == ["pairwise"]
    base = make_model(tmp_path / "base", seed=3)
    with JudgeServer(_judge_reply) as server:
        recipe = _shrunk(name, tmp_path, base, server.url)
        report = run_pipeline(recipe, log=lambda _: None)
    assert all(status == ["ran"] * len(status) for status in report.values())
    runs = tmp_path / "runs" / name.removeprefix("salsa-").removesuffix(".yaml")
    for out in ("sft-a", "sft-b", "reward-model", "soup", "align/ppo/seed-0/final", "align/salsa/seed-0/final"):
        assert (runs / out / "chat_template.jinja").read_text() == CHATML, out
    tokenizer = json.loads((runs / "soup" / "tokenizer_config.json").read_text())
    assert tokenizer["eos_token"] == "<|im_end|>"
    results = json.loads((runs / "eval" / "results.json").read_text())
    assert set(results["methods"]) == {"ppo@0.05", "salsa@0.05"}
    assert "path" in results  # eval.path read its prompts from the preference rows too
    judged = results["judge"]["sets"]
    assert set(judged["mt-bench"]) >= {"single"} and "pairwise" not in judged["mt-bench"]
    assert judged["mt-bench"]["single"]["salsa@0.05"]["turns"] == [[6.0, 6.0, 6.0], [6.0, 6.0, 6.0]]
    assert judged["arena-hard"]["pairwise"]["salsa@0.05"]["win_rate"] == [0.5, 0.5, 0.5] and "single" not in judged["arena-hard"]
