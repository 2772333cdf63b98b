"""``soupkit eval`` with an LLM judge, end to end on tiny models, the judge a scripted local
OpenAI-compatible server: grades and win rates against hand-worked values, unparsed verdicts
counted, position bias showing as zero swap consistency, retries, the cache (a rerun makes no
calls; a new question makes only its own), and the API key in no file written (issue #15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from soupkit.evaluation.writing import format_ci
from tests.evaluation.judge_server import JudgeServer, completion

KEY = "sk-test-judge-key-0451"
MT = [{"question_id": 1, "category": "writing", "turns": ["the cat sat", "then the dog ran"]},
      {"question_id": 2, "category": "math", "turns": ["a dog ran"]},
      {"question_id": 3, "category": "math", "turns": ["bird flew mystery"]}]
ARENA = [{"question_id": "x1", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": "red fish swam"}]}]
GRADES = {"the cat sat": 8, "a dog ran": 9, "red fish swam": 5, "sun moon rain": 2}


def scripted(body: dict, number: int) -> tuple[int, str, float]:
    """A judge that grades by question (turn 2 always 4), always prefers answer A (pure position
    bias), cannot decide on the 'mystery' question, and is busy at the first request."""
    if number == 1:
        return 503, "busy", 0.0
    system, user = (m["content"] for m in body["messages"])
    if "mystery" in user:
        return 200, completion("I cannot decide."), 0.0
    if system.startswith("You compare"):
        return 200, completion("A reads better.\n[[A>>B]]"), 0.0
    if "[User's latest message]" in user:
        return 200, completion("Grade: [[4]]"), 0.0
    question = user.split("[User's message]\n", 1)[1].split("\n", 1)[0]
    return 200, completion(f"Grade: [[{GRADES[question]}]]"), 0.0


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def recipe(tmp_path, llama_pair, monkeypatch):
    from tests.rlhf.conftest import REWARDS, WORDS

    monkeypatch.setenv("JUDGE_KEY", KEY)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(" ".join(WORDS[i:i + 3]) for i in range(0, 8)) + "\n")
    plain = tmp_path / "plain.jinja"  # the tiny tokenizer has no chat template: turns as plain text
    plain.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    a, b = (str(p) for p in llama_pair)
    return {
        "align": {"ref": a, "reward": f"{REWARDS}:good_words", "prompts": str(prompts), "output": str(tmp_path / "al"),
                  "steps": 1, "batch_size": 2, "max_new_tokens": 3, "save_every": 0, "seeds": [0, 1],
                  "runs": {"ppo": {}, "salsa": {"ref": b}}},
        "eval": {"prompts": str(prompts), "output": str(tmp_path / "eval"), "baseline": "ppo", "bootstrap": 100,
                 "chat_template": str(plain),
                 "sets": {"mt-bench": _jsonl(tmp_path / "mt.jsonl", MT), "arena-hard": _jsonl(tmp_path / "ah.jsonl", ARENA)},
                 "judge": {"endpoint": "URL", "model": "judge", "api_key_env": "JUDGE_KEY", "backoff": 0,
                           "max_answer_tokens": 4}}}


def _run(recipe: dict, tmp_path: Path, url: str, force: bool = False) -> dict:
    from soupkit.pipeline import run_eval, run_pipeline

    recipe["eval"]["judge"]["endpoint"] = url
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    if force:
        run_eval(tmp_path / "recipe.yaml", force=True)
    else:
        run_pipeline(tmp_path / "recipe.yaml", log=lambda _: None)
    return json.loads((tmp_path / "eval" / "results.json").read_text())["judge"]


def _eval_step(tmp_path: Path):
    from soupkit.pipeline import plan

    return next(s for s in plan(tmp_path / "recipe.yaml", log=lambda _: None) if s.unit.stage == "eval")


def test_judged_eval_end_to_end(recipe, tmp_path):
    with JudgeServer(scripted) as server:
        judge = _run(recipe, tmp_path, server.url)
        # every distinct chat asked once (runs that give the same answer share a judgment), one retried
        distinct = {json.dumps(r["messages"]) for r in server.requests}
        assert len(distinct) == server.calls - 1 == judge["judged"] and judge["cached"] > 0
        mt = judge["sets"]["mt-bench"]
        assert (mt["questions"], mt["turns"], mt["categories"]) == (3, 2, ["math", "writing"])
        for key in ("ppo@0.05", "salsa@0.05"):
            single = mt["single"][key]
            # question 1: (8 + 4) / 2, question 2: 9, question 3 unparsed
            assert single["score"][0] == 7.5 and 6.0 <= single["score"][1] < 7.5 < single["score"][2] <= 9.0
            assert [t[0] for t in single["turns"]] == [8.5, 4.0] and single["turns"][1] == [4.0, 4.0, 4.0]
            assert single["categories"] == {"math": [9.0, 9.0, 9.0], "writing": [6.0, 6.0, 6.0]}
            assert (single["judgments"], single["unparsed"], single["seeds"]) == (8, 2, [0, 1])
            assert judge["sets"]["arena-hard"]["single"][key]["score"] == [5.0, 5.0, 5.0]
        assert set(mt["pairwise"]) == {"salsa@0.05"}
        pair = mt["pairwise"]["salsa@0.05"]
        assert pair["against"] == "ppo@0.05" and pair["win_rate"] == [0.5, 0.5, 0.5]  # pure position bias
        assert pair["consistency"] == 0.0 and pair["both_orders_parsed"] == 6
        assert pair["verdicts"] == {"A>>B": 6, "A>B": 0, "A=B": 0, "B>A": 0, "B>>A": 6}
        assert (pair["judgments"], pair["unparsed"]) == (16, 4)
        report = (tmp_path / "eval" / "report.md").read_text()
        assert "## Judged by an LLM" in report and "### mt-bench: 3 question(s), up to 2 turn(s)" in report
        assert "| salsa@0.05 | ppo@0.05 | 0.500 [0.500, 0.500] | 6 | 0 | 0 | 0 | 6 | 4 of 16 | 0.0% of 6 |" in report
        assert "agree on only 0% of pairs: the judge's verdicts follow the answers' positions" in report
        ppo = mt["single"]["ppo@0.05"]
        assert (f"| ppo@0.05 | 2 | {format_ci(ppo['score'])} | {format_ci(ppo['turns'][0])} | 4.000 [4.000, 4.000] | "
                "2 of 8 |") in report
        for name in ("judge-mt-bench-single", "judge-mt-bench-pairwise", "judge-arena-hard-single"):
            assert f"![{name}]({name}.png)" in report and (tmp_path / "eval" / f"{name}.png").is_file()

        eval_step = _eval_step(tmp_path)
        assert eval_step.action == "skip"
        arena = Path(recipe["eval"]["sets"]["arena-hard"])
        kept = arena.read_text()
        arena.write_text(kept.replace("red fish", "blue fish"))  # a question set is an input of eval
        eval_step = _eval_step(tmp_path)
        assert eval_step.action == "run" and "ah.jsonl changed" in eval_step.why, eval_step.why
        arena.write_text(kept)

        calls = server.calls
        again = _run(recipe, tmp_path, server.url, force=True)
        assert server.calls == calls and again["judged"] == 0 and again["sets"] == judge["sets"]

        # a new set: its answers are new, the others' are sampled as before (a set is sampled on its own)
        recipe["eval"]["sets"]["extra"] = _jsonl(tmp_path / "extra.jsonl", [{"prompt": "sun moon rain"}])
        third = _run(recipe, tmp_path, server.url, force=True)
        new = server.requests[calls:]
        assert 0 < len(new) == third["judged"] and all("sun moon rain" in r["messages"][1]["content"] for r in new)
        assert third["sets"]["extra"]["single"]["ppo@0.05"]["score"] == [2.0, 2.0, 2.0]
        assert third["sets"]["mt-bench"] == judge["sets"]["mt-bench"]
    assert all(server.headers[i]["Authorization"] == f"Bearer {KEY}" for i in range(server.calls))
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 20 and not [p for p in written if KEY.encode() in p.read_bytes()]


def test_a_dead_judge_fails_in_one_line_and_writes_no_eval(recipe, tmp_path):
    from soupkit.errors import SoupkitError

    recipe["eval"]["judge"]["retries"] = 1
    with JudgeServer(lambda body, n: (502, "bad gateway", 0.0)) as server:
        with pytest.raises(SoupkitError, match=r"failed 2 times, last: HTTP 502"):
            _run(recipe, tmp_path, server.url)
    assert not (tmp_path / "eval").exists() and (tmp_path / "al" / "ppo" / "seed-0" / "final").is_dir()


def test_bad_judge_settings_fail_before_any_model_is_loaded(tmp_path):
    from soupkit.errors import SoupkitError
    from soupkit.recipe import load_recipe

    base = {"prompts": "p.txt", "output": str(tmp_path / "e")}
    with pytest.raises(SoupkitError, match="sets are graded by a judge"):
        load_recipe({"eval": {**base, "sets": {"x": "q.jsonl"}}})
    with pytest.raises(SoupkitError, match="api_key_env is for an endpoint judge"):
        load_recipe({"eval": {**base, "judge": {"model": "m", "api_key_env": "K"}}})
    with pytest.raises(SoupkitError, match="http:// or https://"):
        load_recipe({"eval": {**base, "judge": {"model": "m", "endpoint": "localhost:8000"}}})
    assert load_recipe({"eval": {**base, "judge": "runs/judge"}}).eval.judge.model == "runs/judge"
