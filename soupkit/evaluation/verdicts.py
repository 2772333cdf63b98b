"""Judge prompts and verdicts: soupkit's own templates, a user's template file, and parsing.

Two protocols, after MT-Bench (Zheng et al. 2023, arXiv 2306.05685) and Arena-Hard (Li et al. 2024,
arXiv 2406.11939):

- ``single``: the judge grades one answer from 1 to 10; in a multi-turn question it grades the
  answer to each turn, seeing the dialogue so far;
- ``pairwise``: the judge compares two answers to the same turn on a five-point scale
  ``A>>B, A>B, A=B, B>A, B>>A``; every pair is judged in both orders to cancel position bias.

A template file (``eval.judge.template``) is YAML with one mapping per protocol it replaces::

    single:   {system: ..., turn1: ..., turn2: ..., pattern: ...}
    pairwise: {system: ..., turn1: ..., turn2: ..., pattern: ...}

``turn1`` grades the first turn, ``turn2`` a later one (it sees the whole dialogue). Placeholders
(replaced literally, so other braces are safe): ``{question}``, ``{answer}`` (``{answer_a}``,
``{answer_b}`` in pairwise), ``{reference}``; in ``turn2`` also ``{history}`` (the earlier turns as
text, each answered by the model being graded, or ``{history_a}`` / ``{history_b}``). ``pattern`` is
a regular expression whose first group captures the verdict: a number for ``single``; one of
``A>>B, A>B, A=B, B>A, B>>A`` (``A<B``, ``A<<B``, ``A``, ``B``, ``C``/``tie`` also read) for pairwise.
A verdict that does not parse, or several that disagree, is counted as unparsed, never scored.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError

PROTOCOLS = ("single", "pairwise")
KEYS = ("system", "turn1", "turn2", "pattern")
SCALE = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
"""The five pairwise verdicts, A's best first."""
ALIASES = {"A<B": "B>A", "A<<B": "B>>A", "B<A": "A>B", "B<<A": "A>>B", "B=A": "A=B", "A": "A>B", "B": "B>A",
           "C": "A=B", "TIE": "A=B"}
POINTS = {"A>>B": 1.0, "A>B": 1.0, "A=B": 0.5, "B>A": 0.0, "B>>A": 0.0}
"""A's share of the game: a win, a tie as half, a loss (strong and weak verdicts alike)."""

_SINGLE_SYSTEM = (
    "You grade answers written by an AI assistant. Judge how well the answer serves the user: whether it is "
    "correct, helpful, relevant, complete where it matters, and clear. Length is not merit: a short answer that "
    "does the job beats a long one that pads. When a reference answer is given, check the answer against it. "
    "Explain your grade in a few sentences, then give it on the last line exactly as \"Grade: [[G]]\" with G a "
    "whole number from 1 (useless or wrong) to 10 (could not be better).")
_PAIR_SYSTEM = (
    "You compare two answers written by AI assistants to the same user message. Decide which serves the user "
    "better: correctness first, then helpfulness, relevance and clarity. Ignore the order the answers are shown "
    "in, their length and the assistants' names. When a reference answer is given, check both against it. "
    "Explain your choice in a few sentences, then give your verdict on the last line as exactly one of: "
    "[[A>>B]] (A is much better), [[A>B]] (A is better), [[A=B]] (about the same), [[B>A]] (B is better), "
    "[[B>>A]] (B is much better).")
SOUPKIT = {
    "single": {
        "system": _SINGLE_SYSTEM,
        "turn1": "{reference}[User's message]\n{question}\n\n[Answer to grade]\n{answer}\n[End of answer]",
        "turn2": ("{reference}[Dialogue so far]\n{history}\n\n[User's latest message]\n{question}\n\n"
                  "[Answer to grade: the reply to the latest message]\n{answer}\n[End of answer]"),
        "pattern": r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]",
    },
    "pairwise": {
        "system": _PAIR_SYSTEM,
        "turn1": ("{reference}[User's message]\n{question}\n\n[Answer A]\n{answer_a}\n[End of answer A]\n\n"
                  "[Answer B]\n{answer_b}\n[End of answer B]"),
        "turn2": ("{reference}[Dialogue with assistant A]\n{history_a}\n\n[Dialogue with assistant B]\n{history_b}"
                  "\n\n[User's latest message]\n{question}\n\n[Answer A]\n{answer_a}\n[End of answer A]\n\n"
                  "[Answer B]\n{answer_b}\n[End of answer B]\n\nCompare only the replies to the latest message."),
        "pattern": r"(?i)\[\[\s*([AB]\s*(?:>>|>|=|<<|<)\s*[AB])\s*\]\]",
    },
}


@dataclass(frozen=True)
class Templates:
    """The prompts of both protocols, where they came from, and a digest for the cache key."""

    prompts: dict[str, dict[str, str]]
    source: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.prompts, sort_keys=True).encode()).hexdigest()[:16]


def load_templates(path: str | None) -> Templates:
    """soupkit's templates, with the protocols a user file gives replaced by the file's."""
    if path is None:
        return Templates(SOUPKIT, "soupkit")
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise SoupkitError(f"eval.judge.template: file {file} not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SoupkitError(f"{file}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, Mapping) or not data or set(data) - set(PROTOCOLS):
        raise SoupkitError(f"{file}: expected a mapping with keys single and/or pairwise")
    return Templates({p: _checked(data[p], f"{file}: {p}") if p in data else SOUPKIT[p] for p in PROTOCOLS}, str(file))


def _checked(entry: Any, where: str) -> dict[str, str]:
    if not isinstance(entry, Mapping) or set(entry) != set(KEYS):
        raise SoupkitError(f"{where}: expected exactly the keys {', '.join(KEYS)}")
    if not all(isinstance(entry[k], str) and entry[k].strip() for k in KEYS):
        raise SoupkitError(f"{where}: every key must hold non-empty text")
    try:
        if re.compile(entry["pattern"]).groups < 1:
            raise SoupkitError(f"{where}.pattern: needs a group that captures the verdict")
    except re.error as exc:
        raise SoupkitError(f"{where}.pattern: not a regular expression ({exc})") from None
    return dict(entry)


def fill(text: str, values: Mapping[str, str]) -> str:
    """``text`` with each ``{name}`` replaced literally (one pass, so answers cannot inject one)."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


def reference_block(reference: str) -> str:
    return f"[Reference answer]\n{reference}\n[End of reference answer]\n\n" if reference else ""


def messages(template: Mapping[str, str], turn: int, values: Mapping[str, str]) -> list[dict[str, str]]:
    """The chat messages asking the judge about turn ``turn`` (0-based)."""
    body = fill(template["turn1" if turn == 0 else "turn2"], values)
    return [{"role": "system", "content": template["system"]}, {"role": "user", "content": body}]


def parse_grade(text: str, pattern: str) -> float | None:
    """The 1-10 grade in the judge's reply; None when absent, out of range or ambiguous."""
    found = {float(m) for m in _captures(pattern, text) if _is_number(m)}
    grade = found.pop() if len(found) == 1 else None
    return grade if grade is not None and 1.0 <= grade <= 10.0 else None


def parse_pair(text: str, pattern: str) -> str | None:
    """The five-point verdict in the judge's reply (one of ``SCALE``); None when absent or ambiguous."""
    found = {_verdict(m) for m in _captures(pattern, text)}
    return found.pop() if len(found) == 1 and None not in found else None


def _captures(pattern: str, text: str) -> list[str]:
    return [m.group(1) or "" for m in re.finditer(pattern, text)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _verdict(raw: str) -> str | None:
    token = re.sub(r"\s+", "", raw).upper()
    return token if token in SCALE else ALIASES.get(token)


def swapped(verdict: str) -> str:
    """The verdict with A and B exchanged: what the same judgment reads as from the other side."""
    return SCALE[len(SCALE) - 1 - SCALE.index(verdict)]
