"""Dataset rows in TRL's formats, turned into prompts, SFT examples and preference pairs.

TRL's formats (https://huggingface.co/docs/trl/dataset_formats), each standard (strings) or
conversational (lists of ``{"role", "content"}`` messages):

- prompt-only ``{prompt}``; prompt-completion ``{prompt, completion}``;
- language modelling ``{text}`` (standard) or ``{messages}`` (conversational);
- preference with an explicit prompt ``{prompt, chosen, rejected}`` or an implicit one
  ``{chosen, rejected}``, where each answer is the whole conversation.

Public data also mixes them: UltraFeedback-binarized rows hold ``prompt`` as a string and
``chosen`` / ``rejected`` as whole conversations that repeat it; UltraChat 200k rows hold a string
``prompt`` beside the ``messages``. Every place data enters soupkit goes through this module, so
each shape is accepted (or refused with one line naming the source, the row and the field) the same
way everywhere, before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError

Message = dict[str, str]
Conversation = list[Message]
Prompt = str | Conversation
"""A prompt: a plain string, or the conversation so far (ending with a non-assistant turn)."""
ROLES = ("system", "user", "assistant", "tool")


def is_conversation(value: Any) -> bool:
    """A non-empty list of mappings: what TRL calls conversational (checked by ``conversation``)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, Mapping) for m in value)


def conversation(value: Any, where: str) -> Conversation:
    """``value`` as a checked list of ``{"role", "content"}`` messages (content a string)."""
    if not is_conversation(value):
        raise SoupkitError(f"{where}: expected a list of {{role, content}} messages, got {_kind(value)}")
    out = []
    for i, message in enumerate(value):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise SoupkitError(f"{where}[{i}].role: expected one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise SoupkitError(f"{where}[{i}].content: expected a string, got {_kind(content)}")
        out.append({"role": role, "content": content})
    return out


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    return "an empty list" if value == [] else type(value).__name__


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SoupkitError(f"{where}: expected a non-empty string or a list of messages, got {_kind(value)}")
    return value


def _either(value: Any, where: str) -> str | Conversation:
    return conversation(value, where) if isinstance(value, list) else _text(value, where)


def _keys(row: Mapping[str, Any]) -> str:
    return ", ".join(sorted(map(str, row))) or "none"


def _mapping(row: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise SoupkitError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    return row


# ---------------------------------------------------------------------------------------------
# Prompts (align, eval, inspect)


def prompt_of(row: Any, where: str, field: str = "prompt", text: bool = False) -> Prompt:
    """The prompt of a row of any format: ``field``, else the conversation before the last
    assistant turn of ``messages`` or of an implicit-prompt ``chosen``; with ``text``, a
    language-modelling ``text`` too (inspect's probe texts)."""
    row = _mapping(row, where)
    if text and field not in row and "text" in row:
        return _text(row["text"], f"{where}: field 'text'")
    if field in row:
        value = _either(row[field], f"{where}: field {field!r}")
        return _before_answer(value, f"{where}: field {field!r}") if isinstance(value, list) else value
    for key in ("messages", "chosen"):
        if key in row:
            return _before_answer(conversation(row[key], f"{where}: field {key!r}"), f"{where}: field {key!r}")
    also = ", 'text'" if text else ""
    raise SoupkitError(f"{where}: no prompt: expected a {field!r} field (a string or messages), 'messages'{also} "
                       f"or 'chosen' as a conversation; the row has {_keys(row)}")


def _before_answer(conv: Conversation, where: str) -> Conversation:
    """The turns up to (not including) the trailing assistant turns; at least one must remain."""
    end = len(conv)
    while end and conv[end - 1]["role"] == "assistant":
        end -= 1
    if end == 0:
        raise SoupkitError(f"{where}: the conversation has no user turn to prompt with")
    return conv[:end]


def shown(prompt: Prompt) -> str:
    """A prompt as one line of a report: the text, or the last turn of a conversation."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def as_conversation(prompt: Prompt) -> Conversation:
    """A string prompt becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


# ---------------------------------------------------------------------------------------------
# SFT rows


def sft_example(row: Any, where: str) -> dict[str, Any]:
    """One SFT example in a shape TRL's SFTTrainer takes: ``{messages}``, ``{text}`` or
    ``{prompt, completion}`` (both strings, or both conversations when either is one)."""
    row = _mapping(row, where)
    if "messages" in row:  # UltraChat rows also hold a string prompt: the messages are the example
        conv = conversation(row["messages"], f"{where}: field 'messages'")
        if not any(m["role"] == "assistant" for m in conv):
            raise SoupkitError(f"{where}: field 'messages' has no assistant turn to learn from")
        return {"messages": conv}
    if "prompt" in row and "completion" in row:
        return _prompt_completion(row, where)
    if "text" in row:
        return {"text": _text(row["text"], f"{where}: field 'text'")}
    raise SoupkitError(f"{where}: not an SFT example: expected 'messages', 'prompt' + 'completion', or 'text'; "
                       f"the row has {_keys(row)}")


def _prompt_completion(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    prompt = _either(row["prompt"], f"{where}: field 'prompt'")
    completion = _either(row["completion"], f"{where}: field 'completion'")
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "completion": completion}
    completion = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    return {"prompt": as_conversation(prompt), "completion": completion}


# ---------------------------------------------------------------------------------------------
# Preference rows


def preference_pair(row: Any, where: str) -> dict[str, Any]:
    """One preference pair in a shape TRL's RewardTrainer takes: strings ``{prompt?, chosen,
    rejected}``, or conversations with the prompt inside ``chosen`` / ``rejected`` (implicit).

    A string prompt beside conversational answers (UltraFeedback-binarized) is dropped when the
    answers already open with it, and made the first user turn when they do not.
    """
    row = _mapping(row, where)
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise SoupkitError(f"{where}: not a preference pair: no {' or '.join(map(repr, missing))} field; "
                           f"the row has {_keys(row)}")
    chosen, rejected = (_either(row[k], f"{where}: field {k!r}") for k in ("chosen", "rejected"))
    prompt = _either(row["prompt"], f"{where}: field 'prompt'") if "prompt" in row else None
    if not any(isinstance(x, list) for x in (prompt, chosen, rejected)):
        return {"chosen": chosen, "rejected": rejected, **({"prompt": prompt} if prompt else {})}
    return {k: _with_prompt(prompt, answer, f"{where}: field {k!r}")
            for k, answer in (("chosen", chosen), ("rejected", rejected))}


def _with_prompt(prompt: Prompt | None, answer: str | Conversation, where: str) -> Conversation:
    """The whole conversation: the prompt's turns, unless the answer already opens with them,
    then the answer's turns (a string answer is one assistant turn)."""
    turns = answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
    lead = as_conversation(prompt) if prompt is not None else []
    if lead and turns[:len(lead)] == lead:
        lead = []
    conv = lead + turns
    if conv[-1]["role"] != "assistant":
        raise SoupkitError(f"{where}: the conversation must end with an assistant turn (the answer being ranked)")
    if not any(m["role"] != "assistant" for m in conv):
        raise SoupkitError(f"{where}: no prompt: give a 'prompt' field or put the user turn in the conversation")
    return conv


# ---------------------------------------------------------------------------------------------
# Whole datasets


def read_jsonl(path: Path, what: str = "data file") -> list[tuple[str, Any]]:
    """``(where, record)`` for each non-blank line of a ``.jsonl`` file; ``where`` is ``path:line``."""
    if not path.is_file():
        raise SoupkitError(f"{what} {path} not found")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise SoupkitError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
    return out


def normalise(rows: list[tuple[str, Any]], convert: Callable[[Any, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """``convert(row, where)`` for every ``(where, row)``; all results must share one shape (the
    same fields, each a string or a conversation in every row), as a TRL dataset needs."""
    out, first = [], None
    for where, row in rows:
        example = convert(row, where)
        shape = _shape(example)
        if first is None:
            first = (shape, where)
        elif shape != first[0]:
            raise SoupkitError(f"{where}: the row is shaped {_describe(shape)} but {first[1]} is shaped "
                               f"{_describe(first[0])}; one data set takes one format")
        out.append(example)
    return out


def is_conversational(example: Mapping[str, Any]) -> bool:
    """True when any field of a normalised example is a conversation."""
    return any(isinstance(v, list) for v in example.values())


def _shape(example: Mapping[str, Any]) -> tuple[tuple[str, bool], ...]:
    return tuple(sorted((k, isinstance(v, list)) for k, v in example.items()))


def _describe(shape: tuple[tuple[str, bool], ...]) -> str:
    return "{" + ", ".join(f"{k}: {'messages' if conv else 'string'}" for k, conv in shape) + "}"
