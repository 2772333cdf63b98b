"""Question sets for judged evaluation: MT-Bench, Arena-Hard, and soupkit's prompt formats.

Accepted rows (one format per file or dataset, detected per row):

- MT-Bench (https://github.com/lm-sys/FastChat, ``fastchat/llm_judge/data/mt_bench/question.jsonl``):
  ``{question_id, category, turns: [str, ...], reference?: [str, ...]}``; the Hub copy
  ``HuggingFaceH4/mt_bench_prompts`` names them ``prompt_id`` and ``prompt``;
- Arena-Hard v0.1 (https://github.com/lmarena/arena-hard-auto): ``{question_id, category, cluster,
  turns: [{content}]}``; Arena-Hard v2: ``{uid, category, subcategory, prompt}``;
- any prompt row ``soupkit.formats`` reads (a string prompt, or a conversation whose last turn is
  the user's; earlier turns are kept as context), with an optional ``category``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError
from soupkit.formats import Conversation, prompt_of, read_jsonl


@dataclass(frozen=True)
class Question:
    """One question: the user's turns (the policy answers each in turn, with its own history),
    earlier context turns (a system prompt), and reference answers when the set has them."""

    id: str
    category: str
    turns: tuple[str, ...]
    context: tuple[dict[str, str], ...] = ()
    reference: tuple[str, ...] = ()


def load_questions(source: str, field: str = "prompt", split: str = "test") -> list[Question]:
    """Every question of ``source`` (``.jsonl``, ``.txt`` or a dataset); ids must be unique."""
    from soupkit.rlhf.prompts import _read_dataset, _read_txt

    path = Path(source).expanduser()
    if path.suffix == ".txt":
        rows: list[tuple[str, Any]] = [(f"{path}:{i}", {field: t}) for i, t in enumerate(_read_txt(path), start=1)]
    else:
        rows = read_jsonl(path, "questions file") if path.suffix == ".jsonl" else _read_dataset(source, split)
    questions = [question_of(row, where, number, field) for number, (where, row) in enumerate(rows, start=1)]
    if not questions:
        raise SoupkitError(f"questions {source}: no questions found (the set is empty)")
    _unique_ids(questions, source)
    return questions


def _unique_ids(questions: list[Question], source: str) -> None:
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise SoupkitError(f"questions {source}: question id {q.id!r} appears twice")
        seen.add(q.id)


def question_of(row: Any, where: str, number: int, field: str = "prompt") -> Question:
    """One row of any accepted format as a ``Question``."""
    if not isinstance(row, Mapping):
        raise SoupkitError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    qid = str(next((row[k] for k in ("question_id", "uid", "prompt_id", "id") if row.get(k) is not None), number))
    category = str(row.get("category") or "all")
    reference = _strings(row.get("reference") or [], f"{where}: field 'reference'")
    if "turns" in row:
        return Question(qid, category, _turns(row["turns"], f"{where}: field 'turns'"), (), reference)
    if isinstance(row.get("prompt"), list) and all(isinstance(t, str) for t in row["prompt"]):
        return Question(qid, category, _turns(row["prompt"], f"{where}: field 'prompt'"), (), reference)
    prompt = prompt_of(row, where, field)
    if isinstance(prompt, str):
        return Question(qid, category, (prompt,), (), reference)
    return _from_conversation(prompt, qid, category, reference, where)


def _from_conversation(conv: Conversation, qid: str, category: str, reference: tuple[str, ...],
                       where: str) -> Question:
    if conv[-1]["role"] != "user":
        raise SoupkitError(f"{where}: the conversation must end with a user turn to answer, "
                           f"not a {conv[-1]['role']} turn")
    return Question(qid, category, (conv[-1]["content"],), tuple(conv[:-1]), reference)


def _turns(value: Any, where: str) -> tuple[str, ...]:
    """MT-Bench turns (strings) or Arena-Hard turns (``{content}``), at least one, none empty."""
    if not isinstance(value, list) or not value:
        raise SoupkitError(f"{where}: expected a non-empty list of turns")
    texts = [t.get("content") if isinstance(t, Mapping) else t for t in value]
    return _strings(texts, where, empty=False)


def _strings(value: Any, where: str, empty: bool = True) -> tuple[str, ...]:
    if not isinstance(value, list) or any(not isinstance(t, str) or (not empty and not t.strip()) for t in value):
        raise SoupkitError(f"{where}: expected a list of {'strings' if empty else 'non-empty strings'}")
    return tuple(value)
