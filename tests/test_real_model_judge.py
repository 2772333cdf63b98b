"""Judged evaluation with SmolLM2-135M-Instruct as a local in-process judge (and as the policy), on
MT-Bench-format and Arena-Hard-format questions: the mechanics, not the quality of a 135M judge
(issue #15). Cheap: short answers, short verdicts, a handful of questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.realmodel
MT = [{"question_id": 81, "category": "writing", "turns": ["Write one sentence about Paris.", "Now make it shorter."]},
      {"question_id": 82, "category": "math", "turns": ["What is 2 + 3?"], "reference": ["5"]}]
ARENA = [{"question_id": "a1", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": "Name a prime number."}]},
         {"question_id": "a2", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": "Say hello in French."}]}]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from soupkit.realmodel import smollm2

    return smollm2()


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_judge_replies_as_transformers_generates(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soupkit.evaluation.judge import LocalJudge

    chat = [{"role": "system", "content": "You grade answers."}, {"role": "user", "content": "Grade: 2 + 2 = 4"}]
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert LocalJudge(str(smollm2), max_tokens=12, device="cpu").complete([chat]) == [expected]


def test_smollm2_judges_mt_bench_and_arena_hard_sets(smollm2, tmp_path):
    from soupkit.evaluation.judge import JudgmentCache, LocalJudge
    from soupkit.evaluation.judge_report import judge_lines
    from soupkit.evaluation.judging import JudgeJob, run_judge
    from soupkit.evaluation.questions import load_questions
    from soupkit.evaluation.report import RunResult
    from soupkit.evaluation.sampling import Sampling
    from soupkit.evaluation.verdicts import load_templates

    runs = [RunResult("ppo", 0, 0.05, smollm2, Sampling(12, 0.7, 1.0, 1234)),
            RunResult("salsa", 0, 0.05, smollm2, Sampling(12, 1.0, 1.0, 1234))]
    sets = {"mt-bench": load_questions(_jsonl(tmp_path / "mt.jsonl", MT)),
            "arena-hard": load_questions(_jsonl(tmp_path / "ah.jsonl", ARENA))}

    def job() -> JudgeJob:
        judge = LocalJudge(str(smollm2), max_tokens=16, device="cpu", batch_size=12)
        return JudgeJob(judge, load_templates(None), JudgmentCache(tmp_path / "cache.jsonl"), sets,
                        ("single", "pairwise"), 12)

    first = run_judge(job(), runs, "ppo", n_boot=100)
    turns = {"mt-bench": 3, "arena-hard": 2}
    for name, result in first["sets"].items():
        for key in ("ppo@0.05", "salsa@0.05"):
            single = result["single"][key]
            assert single["judgments"] == turns[name] and 0 <= single["unparsed"] <= turns[name]
            assert single["score"] is None or 1.0 <= single["score"][1] <= single["score"][0] <= single["score"][2] <= 10.0
        pair = result["pairwise"]["salsa@0.05"]
        assert pair["judgments"] == 2 * turns[name] and sum(pair["verdicts"].values()) + pair["unparsed"] == 2 * turns[name]
        assert pair["consistency"] is None or 0.0 <= pair["consistency"] <= 1.0
        assert all(e["answer"].strip() for e in result["examples"])  # the policy answered
    assert first["judged"] + first["cached"] == 2 * (3 + 2) + 2 * (3 + 2) and first["judged"] > 0
    second = run_judge(job(), runs, "ppo", n_boot=100)  # a rerun: the same answers, every verdict from the cache
    assert second["judged"] == 0 and second["sets"] == first["sets"]
    text = "\n".join(judge_lines(second))
    assert "### mt-bench: 2 question(s), up to 2 turn(s)" in text and "| salsa@0.05 | ppo@0.05 |" in text
