"""Judged evaluation: every align run answers each question set, an LLM judge grades the answers
(``single``) and compares them with the baseline's (``pairwise``), and the grades are summarised
with the same two-level bootstrap as the reward results (seeds, then questions).

Answers are sampled as in eval (the run's own sampling, its chat template), turn by turn: the
policy answers turn 1, then turn 2 seeing its own first answer. Verdicts that do not parse are
counted per run and left out of every mean; pairwise judging runs both orders of every pair and
reports how often the two orders agree (position-swap consistency).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from soupkit.evaluation import stats, verdicts
from soupkit.evaluation.judge import Judge, JudgmentCache
from soupkit.evaluation.questions import Question
from soupkit.evaluation.verdicts import Templates

Answers = list[list[str]]
"""Per question, the answer to each of its turns."""


@dataclass
class JudgeJob:
    """Everything the judged evaluation needs, checked before any model is loaded."""

    judge: Judge
    templates: Templates
    cache: JudgmentCache
    sets: dict[str, list[Question]]
    protocols: tuple[str, ...]
    answer_tokens: int | None = None
    question_tokens: int = 1024
    answer_device: str = "cpu"
    set_protocols: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Protocols of the sets that name their own (the others use ``protocols``)."""


def prepare(spec: Any) -> JudgeJob:
    """A ``JudgeJob`` from an ``eval:`` section with a ``judge:``; bad input fails here, before heavy work."""
    from soupkit.evaluation.judge import make_judge
    from soupkit.evaluation.questions import load_questions

    judge_spec = spec.judge
    sources = spec.sets or {"prompts": spec.prompts}
    sets, own = {}, {}
    for name, src in sources.items():
        if isinstance(src, str):
            sets[name] = load_questions(src, spec.prompt_field, spec.prompt_split)
            continue
        sets[name] = load_questions(src.source, src.field or spec.prompt_field, src.split or spec.prompt_split)
        if src.protocols:
            own[name] = tuple(dict.fromkeys(src.protocols))
    cache = Path(judge_spec.cache or f"{Path(spec.output).expanduser()}-judge-cache.jsonl").expanduser()
    return JudgeJob(make_judge(judge_spec), verdicts.load_templates(judge_spec.template), JudgmentCache(cache), sets,
                    tuple(dict.fromkeys(judge_spec.protocols)), judge_spec.max_answer_tokens or spec.max_new_tokens,
                    judge_spec.max_question_tokens, judge_spec.answer_device, own)


# ---------------------------------------------------------------------------------------------
# Answers


def dialogue(q: Question, answers: Sequence[str], turn: int) -> list[dict[str, str]]:
    """The conversation a policy answers turn ``turn`` (0-based) from: context, earlier turns with
    its own answers, then the user's turn."""
    conv = list(q.context)
    for t in range(turn):
        conv += [{"role": "user", "content": q.turns[t]}, {"role": "assistant", "content": answers[t]}]
    return conv + [{"role": "user", "content": q.turns[turn]}]


def answer(run: Any, questions: Sequence[Question], job: JudgeJob) -> Answers:
    """Every run's answer to every turn of every question, sampled as in eval."""
    from soupkit.chat import policy_chat, render
    from soupkit.evaluation.sampling import completions, sample
    from soupkit.loading import causal_lm

    how = replace(run.how, max_new_tokens=job.answer_tokens or run.how.max_new_tokens,
                  max_prompt_tokens=job.question_tokens)
    chat = policy_chat(run.path, how.chat_template, f"policy {run.path}")
    policy = causal_lm(run.path, "policy", device=device(job.answer_device))
    out: Answers = [[] for _ in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        idx = [i for i, q in enumerate(questions) if len(q.turns) > turn]
        convs = [dialogue(questions[i], out[i], turn) for i in idx]
        prompts = [c[0]["content"] if len(c) == 1 else c for c in convs]  # one user turn: a plain prompt
        texts = render(chat.tokenizer, prompts, chat.template, f"eval questions, turn {turn + 1}")
        for i, text in zip(idx, completions(sample(policy, chat.tokenizer, texts, how, chat.stops), chat)):
            out[i].append(text)
    return out


def device(setting: str) -> str:
    """``auto``: CUDA when available, else the CPU; any other setting as given."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if setting == "auto" else setting


# ---------------------------------------------------------------------------------------------
# Judging


def _history(q: Question, answers: Sequence[str], turn: int) -> str:
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in q.context]
    for t in range(turn):
        lines += [f"User: {q.turns[t]}", f"Assistant: {answers[t]}"]
    return "\n\n".join(lines)


def _reference(q: Question, turn: int) -> str:
    return verdicts.reference_block(q.reference[turn] if turn < len(q.reference) else "")


def single_chat(job: JudgeJob, q: Question, answers: Sequence[str], turn: int) -> list[dict[str, str]]:
    values = {"question": q.turns[turn], "answer": answers[turn], "reference": _reference(q, turn),
              "history": _history(q, answers, turn)}
    return verdicts.messages(job.templates.prompts["single"], turn, values)


def pair_chat(job: JudgeJob, q: Question, a: Sequence[str], b: Sequence[str], turn: int) -> list[dict[str, str]]:
    values = {"question": q.turns[turn], "answer_a": a[turn], "answer_b": b[turn], "reference": _reference(q, turn),
              "history_a": _history(q, a, turn), "history_b": _history(q, b, turn)}
    return verdicts.messages(job.templates.prompts["pairwise"], turn, values)


def _turns(questions: Sequence[Question]) -> list[tuple[int, int]]:
    return [(i, t) for i, q in enumerate(questions) for t in range(len(q.turns))]


def grade(job: JudgeJob, questions: Sequence[Question], answers: Answers) -> list[list[float | None]]:
    """Per question, the judge's 1-10 grade of each turn's answer (None: the verdict did not parse)."""
    slots = _turns(questions)
    chats = [single_chat(job, questions[i], answers[i], t) for i, t in slots]
    replies = job.cache.replies(job.judge, job.templates.digest, chats)
    out: list[list[float | None]] = [[] for _ in questions]
    pattern = job.templates.prompts["single"]["pattern"]
    for (i, _), reply in zip(slots, replies):
        out[i].append(verdicts.parse_grade(reply, pattern))
    return out


def compare(job: JudgeJob, questions: Sequence[Question], mine: Answers, base: Answers) -> list[list[tuple]]:
    """Per question and turn, the two verdicts from the first answers' side: ``(as A, as B)``, the
    second read back through ``swapped`` (None: did not parse)."""
    slots = _turns(questions)
    chats = [c for i, t in slots for c in (pair_chat(job, questions[i], mine[i], base[i], t),
                                           pair_chat(job, questions[i], base[i], mine[i], t))]
    replies = job.cache.replies(job.judge, job.templates.digest, chats)
    pattern = job.templates.prompts["pairwise"]["pattern"]
    parsed = [verdicts.parse_pair(r, pattern) for r in replies]
    out: list[list[tuple]] = [[] for _ in questions]
    for k, (i, _) in enumerate(slots):
        first, second = parsed[2 * k], parsed[2 * k + 1]
        out[i].append((first, verdicts.swapped(second) if second else None))
    return out


# ---------------------------------------------------------------------------------------------
# Summaries


def _ci(groups: list[list[float]], n_boot: int) -> list[float] | None:
    groups = [g for g in groups if g]
    return [round(x, 4) for x in stats.mean_ci([np.asarray(g) for g in groups], n_boot=n_boot)] if groups else None


def _per_question(values: list[list[float | None]]) -> list[float | None]:
    """Each question's mean over its parsed values (None when none parsed)."""
    return [float(np.mean(p)) if (p := [v for v in vs if v is not None]) else None for vs in values]


def _by_category(questions: Sequence[Question], per_seed: list[list[float | None]], n_boot: int) -> dict:
    cats = sorted({q.category for q in questions})
    return {c: _ci([[v for q, v in zip(questions, seed) if q.category == c and v is not None] for seed in per_seed],
                   n_boot) for c in cats}


def summarise_single(questions: Sequence[Question], grades: list[list[list[float | None]]], n_boot: int) -> dict:
    """One run family (its seeds): mean grade, per turn, per category, and the unparsed count."""
    per_seed = [_per_question(g) for g in grades]
    turns = max(len(q.turns) for q in questions)
    flat = [v for g in grades for vs in g for v in vs]
    return {"score": _ci([[v for v in s if v is not None] for s in per_seed], n_boot),
            "turns": [_ci([[vs[t] for vs in g if len(vs) > t and vs[t] is not None] for g in grades], n_boot)
                      for t in range(turns)],
            "categories": _by_category(questions, per_seed, n_boot),
            "judgments": len(flat), "unparsed": sum(v is None for v in flat)}


def summarise_pairs(questions: Sequence[Question], games: list[list[list[tuple]]], n_boot: int) -> dict:
    """One run family against the baseline: win rate (ties half), per category, verdict counts from
    the run's side, unparsed verdicts, and the share of pairs whose two orders agree."""
    points = [[[verdicts.POINTS[v] for pair in turns for v in pair if v] for turns in g] for g in games]
    per_seed = [[float(np.mean(p)) if p else None for p in seed] for seed in points]
    flat = [pair for g in games for turns in g for pair in turns]
    both = [(a, b) for a, b in flat if a and b]
    agree = sum(verdicts.POINTS[a] == verdicts.POINTS[b] for a, b in both)
    return {"win_rate": _ci([[v for v in s if v is not None] for s in per_seed], n_boot),
            "categories": _by_category(questions, per_seed, n_boot),
            "verdicts": {v: sum(pair.count(v) for pair in flat) for v in verdicts.SCALE},
            "judgments": 2 * len(flat), "unparsed": sum(v is None for pair in flat for v in pair),
            "consistency": round(agree / len(both), 4) if both else None, "both_orders_parsed": len(both)}


def _families(runs: Sequence[Any]) -> dict[str, list[int]]:
    """Run indices per ``method@kl_coef``, the keys of the reward results."""
    out: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        out.setdefault(f"{r.method}@{r.kl_coef:g}", []).append(i)
    return out


def _opponents(runs: Sequence[Any], members: list[int], baseline: str) -> tuple[str, list[int]] | None:
    """The baseline's runs to compare ``members`` with: same kl_coef (else the nearest), same seed
    (else in turn), as the reward win rates pair them."""
    coefs = sorted({r.kl_coef for r in runs if r.method == baseline})
    if not coefs or runs[members[0]].method == baseline:
        return None
    near = min(coefs, key=lambda c: (abs(c - runs[members[0]].kl_coef), c))
    base = [i for i, r in enumerate(runs) if r.method == baseline and r.kl_coef == near]
    by_seed = {runs[i].seed: i for i in base}
    return f"{baseline}@{near:g}", [by_seed.get(runs[m].seed, base[k % len(base)]) for k, m in enumerate(members)]


def judge_set(job: JudgeJob, runs: Sequence[Any], questions: list[Question], answers: list[Answers], baseline: str,
              n_boot: int, protocols: tuple[str, ...]) -> dict[str, Any]:
    """The protocols on one question set: ``{questions, turns, categories, single?, pairwise?}``."""
    out: dict[str, Any] = {"questions": len(questions), "turns": max(len(q.turns) for q in questions),
                           "categories": sorted({q.category for q in questions}), "protocols": list(protocols)}
    families = _families(runs)
    if "single" in protocols:
        out["single"] = {key: {"seeds": [runs[i].seed for i in idx]} |
                         summarise_single(questions, [grade(job, questions, answers[i]) for i in idx], n_boot)
                         for key, idx in families.items()}
    if "pairwise" in protocols:
        out["pairwise"] = {}
        for key, idx in families.items():
            if (against := _opponents(runs, idx, baseline)) is not None:
                games = [compare(job, questions, answers[i], answers[b]) for i, b in zip(idx, against[1])]
                out["pairwise"][key] = {"against": against[0], "seeds": [runs[i].seed for i in idx]} | \
                    summarise_pairs(questions, games, n_boot)
    return out


def run_judge(job: JudgeJob, runs: Sequence[Any], baseline: str, n_boot: int) -> dict[str, Any]:
    """Answer every set with every run, judge, summarise: the ``judge`` entry of results.json."""
    sets = {}
    for name, questions in job.sets.items():
        answers = [answer(run, questions, job) for run in runs]
        sets[name] = judge_set(job, runs, questions, answers, baseline, n_boot,
                               job.set_protocols.get(name, job.protocols))
        sets[name]["examples"] = [{"question": questions[0].turns[0], "run": f"{r.method}@{r.kl_coef:g} seed {r.seed}",
                                   "answer": a[0][0]} for r, a in zip(runs, answers)][:4]
    return {"judge": job.judge.name, "template": job.templates.source, "protocols": list(job.protocols),
            "cache": str(job.cache.path), "cached": job.cache.hits, "judged": job.cache.misses, "sets": sets}
