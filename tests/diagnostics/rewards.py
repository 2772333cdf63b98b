"""Reward callables with TRL's signature, for ``--reward tests.diagnostics.rewards:...``."""

from __future__ import annotations


def word_count(prompts: list[str], completions: list[str], **kw) -> list[float]:
    return [float(len(c.split())) for c in completions]


def wrong_length(prompts: list[str], completions: list[str], **kw) -> list[float]:
    return [0.0]
