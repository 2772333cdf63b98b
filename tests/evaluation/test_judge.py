"""Judge verdicts, templates, question sets, the endpoint client (against a scripted local server)
and the judgment cache (issue #15)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from soupkit.errors import SoupkitError
from soupkit.evaluation import verdicts
from soupkit.evaluation.judge import EndpointJudge, JudgmentCache
from soupkit.evaluation.judging import summarise_pairs, summarise_single
from soupkit.evaluation.questions import Question, load_questions, question_of
from tests.evaluation.judge_server import JudgeServer, completion

SINGLE = verdicts.SOUPKIT["single"]["pattern"]
PAIR = verdicts.SOUPKIT["pairwise"]["pattern"]


@pytest.mark.parametrize("text, grade", [("Fine.\nGrade: [[7]]", 7.0), ("[[ 8.5 ]]", 8.5), ("[[7]] again [[7]]", 7.0),
                                         ("[[3]] no, [[7]]", None), ("[[11]]", None), ("[[0]]", None),
                                         ("Grade: 7", None), ("", None)])
def test_grades_parse_only_when_one_in_range_grade_is_given(text, grade):
    assert verdicts.parse_grade(text, SINGLE) == grade


@pytest.mark.parametrize("text, verdict", [("[[A>>B]]", "A>>B"), ("so [[B > A]]", "B>A"), ("[[A=B]]", "A=B"),
                                           ("[[A<B]]", "B>A"), ("[[B<<A]]", "A>>B"), ("[[a>b]]", "A>B"),
                                           ("[[A>B]] or [[B>A]]", None), ("[[A>B]] [[A>B]]", "A>B"),
                                           ("A is better", None), ("[[A>C]]", None)])
def test_pairwise_verdicts_parse_on_the_five_point_scale(text, verdict):
    assert verdicts.parse_pair(text, PAIR) == verdict


def test_mt_bench_style_pair_letters_read_with_a_user_pattern():
    pattern = r"\[\[([ABC])\]\]"
    assert [verdicts.parse_pair(f"[[{x}]]", pattern) for x in "ABC"] == ["A>B", "B>A", "A=B"]


def test_swapping_reverses_the_scale():
    assert [verdicts.swapped(v) for v in verdicts.SCALE] == list(reversed(verdicts.SCALE))


def test_placeholders_are_filled_once_so_answers_cannot_inject_one():
    out = verdicts.fill("Q: {question} A: {answer} {unknown}", {"question": "say {answer}", "answer": "x"})
    assert out == "Q: say {answer} A: x {unknown}"


def test_a_template_file_replaces_one_protocol_and_keeps_the_other(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("single:\n  system: S\n  turn1: 'Q {question} A {answer}'\n  turn2: 'H {history}'\n"
                    "  pattern: 'Rating: \\[\\[(\\d+)\\]\\]'\n")
    t = verdicts.load_templates(str(path))
    assert t.prompts["single"]["system"] == "S" and t.prompts["pairwise"] == verdicts.SOUPKIT["pairwise"]
    assert t.source == str(path) and t.digest != verdicts.load_templates(None).digest
    msgs = verdicts.messages(t.prompts["single"], 0, {"question": "q?", "answer": "a."})
    assert msgs == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q q? A a."}]


@pytest.mark.parametrize("text, words", [("single: {system: S}\n", "expected exactly the keys"),
                                         ("triple: {}\n", "keys single and/or pairwise"),
                                         ("single: {system: S, turn1: a, turn2: b, pattern: '(x'}\n", "not a regular"),
                                         ("single: {system: S, turn1: a, turn2: b, pattern: 'x'}\n", "needs a group")])
def test_bad_template_files_fail_with_one_line_naming_the_file(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SoupkitError, match=words) as err:
        verdicts.load_templates(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Question sets


def test_question_formats(tmp_path):
    mt = question_of({"question_id": 81, "category": "writing", "turns": ["Write.", "Shorter."],
                      "reference": ["r1", "r2"]}, "w", 1)
    assert mt == Question("81", "writing", ("Write.", "Shorter."), (), ("r1", "r2"))
    arena = question_of({"question_id": "ab12", "category": "arena-hard-v0.1", "cluster": "c",
                         "turns": [{"content": "Solve it."}]}, "w", 2)
    assert arena == Question("ab12", "arena-hard-v0.1", ("Solve it.",))
    v2 = question_of({"uid": "u7", "category": "hard_prompt", "subcategory": "s", "prompt": "Prove it."}, "w", 3)
    assert v2 == Question("u7", "hard_prompt", ("Prove it.",))
    hub = question_of({"prompt_id": 5, "category": "math", "prompt": ["One?", "Two?"], "reference": []}, "w", 4)
    assert hub == Question("5", "math", ("One?", "Two?"))
    conv = question_of({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}, "w", 5)
    assert conv == Question("5", "all", ("Hi",), ({"role": "system", "content": "Be brief."},))
    assert question_of({"prompt": "plain"}, "w", 6) == Question("6", "all", ("plain",))


@pytest.mark.parametrize("rows, words", [([{"turns": []}], "field 'turns': expected a non-empty list"),
                                         ([{"turns": ["a", ""]}], "non-empty strings"),
                                         ([{"question_id": 1, "turns": ["a"]}, {"question_id": 1, "turns": ["b"]}],
                                          "question id '1' appears twice"),
                                         ([{"text": "x"}], "no prompt")])
def test_bad_question_files_fail_with_one_line(tmp_path, rows, words):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SoupkitError, match=words) as err:
        load_questions(str(path))
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------
# Summaries, against hand-worked numbers

QS = [Question("1", "math", ("a", "b")), Question("2", "code", ("c",)), Question("3", "math", ("d",))]


def test_single_grades_average_each_question_over_its_parsed_turns():
    seed0 = [[8.0, 4.0], [None], [10.0]]  # question 2 unparsed: left out, counted
    seed1 = [[6.0, None], [2.0], [9.0]]
    out = summarise_single(QS, [seed0, seed1], n_boot=200)
    assert out["score"][0] == pytest.approx(np.mean([6.0, 10.0, 6.0, 2.0, 9.0]), abs=1e-4)
    assert out["turns"][0][0] == pytest.approx(np.mean([8, 10, 6, 2, 9]), abs=1e-4)
    assert out["turns"][1] == [4.0, 4.0, 4.0]
    assert out["categories"]["math"][0] == pytest.approx(np.mean([6.0, 10.0, 6.0, 9.0]), abs=1e-4)
    assert out["categories"]["code"] == [2.0, 2.0, 2.0]
    assert (out["judgments"], out["unparsed"]) == (8, 2)


def test_pairwise_counts_ties_as_half_and_reports_swap_consistency():
    # per question and turn: (verdict with the run as A, verdict with the run as B read from its side)
    games = [[[("A>>B", "A>B"), ("A=B", "B>A")],  # q1: wins twice, a tie, a loss -> 2.5 / 4
              [("A>B", "B>>A")],                  # q2: position bias: 1 / 2, inconsistent
              [(None, "A=B")]]]                   # q3: one unparsed -> 0.5
    out = summarise_pairs(QS, games, n_boot=200)
    assert out["win_rate"][0] == pytest.approx(np.mean([2.5 / 4, 0.5, 0.5]), abs=1e-4)
    assert out["consistency"] == pytest.approx(1 / 3, abs=1e-4) and out["both_orders_parsed"] == 3
    assert out["verdicts"] == {"A>>B": 1, "A>B": 2, "A=B": 2, "B>A": 1, "B>>A": 1}
    assert (out["judgments"], out["unparsed"]) == (8, 1)
    assert out["categories"]["code"] == [0.5, 0.5, 0.5]


def test_nothing_parsed_gives_no_interval_instead_of_a_zero():
    out = summarise_pairs(QS[1:2], [[[(None, None)]]], n_boot=100)
    assert out["win_rate"] is None and out["unparsed"] == 2 and out["consistency"] is None


# ---------------------------------------------------------------------------------------------
# The endpoint client and the cache, against a local server

CHAT = [{"role": "user", "content": "grade this"}]


def endpoint(server: JudgeServer, **kw) -> EndpointJudge:
    waits = []
    judge = EndpointJudge(server.url, "judge-model", **{"backoff": 0.5, "timeout": 5.0, "sleep": waits.append, **kw})
    judge.waits = waits
    return judge


def test_errors_are_retried_with_doubling_waits_then_answered():
    script = {1: (503, "busy", 0), 2: (200, "not json", 0), 3: (429, "slow down", 0)}
    with JudgeServer(lambda body, n: script.get(n, (200, completion("[[6]]"), 0))) as server:
        judge = endpoint(server, retries=3)
        assert judge.complete([CHAT]) == ["[[6]]"]
    assert server.calls == 4 and judge.waits == [0.5, 1.0, 2.0]
    assert server.requests[-1] == {"model": "judge-model", "messages": CHAT, "max_tokens": 512, "temperature": 0.0}


def test_a_reply_without_text_is_an_empty_reply_not_a_failure():
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": None}}]})
    with JudgeServer(lambda b, n: (200, body, 0)) as server:
        assert endpoint(server).complete([CHAT]) == [""]
    assert server.calls == 1 and verdicts.parse_grade("", SINGLE) is None


def test_a_slow_server_times_out_and_is_retried():
    with JudgeServer(lambda body, n: (200, completion("late"), 1.5 if n == 1 else 0)) as server:
        assert endpoint(server, timeout=0.5).complete([CHAT]) == ["late"]
    assert server.calls == 2


def test_bounded_retries_end_in_one_line_without_the_key(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-secret-123")
    with JudgeServer(lambda body, n: (500, "down", 0)) as server:
        with pytest.raises(SoupkitError, match=r"failed 3 times, last: HTTP 500") as err:
            endpoint(server, retries=2, api_key_env="JUDGE_KEY").complete([CHAT])
    assert server.calls == 3 and "sk-secret" not in str(err.value) and "\n" not in str(err.value)
    assert server.headers[0]["Authorization"] == "Bearer sk-secret-123"


def test_a_refused_request_is_not_retried():
    with JudgeServer(lambda body, n: (401, "no", 0)) as server:
        with pytest.raises(SoupkitError, match="answered HTTP 401"):
            endpoint(server).complete([CHAT])
    assert server.calls == 1


def test_an_unreachable_server_fails_after_its_retries():
    with JudgeServer(lambda body, n: (200, "", 0)) as server:
        url = server.url
    judge = EndpointJudge(url, "m", retries=1, backoff=0, timeout=1.0)
    with pytest.raises(SoupkitError, match="failed 2 times, last: URLError"):
        judge.complete([CHAT])


def test_a_missing_key_variable_is_refused_before_any_request(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(SoupkitError, match="environment variable NO_SUCH_KEY is not set"):
        EndpointJudge("http://127.0.0.1:9/v1", "m", api_key_env="NO_SUCH_KEY")


def test_the_cache_asks_only_for_new_chats_and_survives_a_torn_line(tmp_path):
    chats = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    with JudgeServer(lambda body, n: (200, completion(body["messages"][0]["content"].upper()), 0)) as server:
        judge = endpoint(server)
        cache = JudgmentCache(tmp_path / "c.jsonl")
        assert cache.replies(judge, "t1", chats[:3] + chats[:1]) == ["Q0", "Q1", "Q2", "Q0"]
        assert server.calls == 3
        with open(tmp_path / "c.jsonl", "a") as f:
            f.write('{"key": "torn')  # an interrupted write
        again = JudgmentCache(tmp_path / "c.jsonl")
        assert again.replies(judge, "t1", chats) == ["Q0", "Q1", "Q2", "Q3", "Q4"]
        assert server.calls == 5 and (again.hits, again.misses) == (3, 2)
        assert JudgmentCache(tmp_path / "c.jsonl").replies(judge, "t2", chats[:1]) == ["Q0"]  # another template
        assert server.calls == 6
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert sum(1 for line in lines if line.startswith('{"key": "torn')) == 1 and len(lines) == 7


def test_a_local_judge_must_be_a_chat_model_and_is_refused_at_once(tmp_path, llama_pair):
    from soupkit.evaluation.judge import LocalJudge

    with pytest.raises(SoupkitError, match="has no chat template; a judge must be a chat model"):
        LocalJudge(str(llama_pair[0]))
    with pytest.raises(SoupkitError, match="is not a model directory"):
        LocalJudge(str(tmp_path))
