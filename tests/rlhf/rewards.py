"""Rule-based reward functions for the PPO tests (TRL signature)."""

from __future__ import annotations

import time

GOOD = {"cat", "dog", "sun", "moon", "red", "blue"}
CALLS = [0]


def good_words(prompts: list[str], completions: list[str], **kw) -> list[float]:
    """Share of the completion's words that are in GOOD (0 for an empty completion)."""
    return [sum(w in GOOD for w in c.split()) / max(1, len(c.split())) for c in completions]


def slow_good_words(prompts: list[str], completions: list[str], **kw) -> list[float]:
    """``good_words`` after a pause, so a test can kill the run between checkpoints."""
    time.sleep(0.5)
    return good_words(prompts, completions)


def huge_from_third_call(prompts: list[str], completions: list[str], **kw) -> list[float]:
    """Finite scores so large that the value loss overflows to inf from the third step on."""
    CALLS[0] += 1
    return [3e38 if CALLS[0] >= 3 else 0.5 for _ in completions]


def fails_at_second_call(prompts: list[str], completions: list[str], **kw) -> list[float]:
    """Scores the first batch, then raises as a user's reward code might (a server gone away)."""
    FAILS[0] += 1
    if FAILS[0] >= 2:
        raise ConnectionError("reward server\nunreachable")  # FAILS_LINE: the line the error names
    return good_words(prompts, completions)


FAILS = [0]


def one_score(prompts: list[str], completions: list[str], **kw) -> list[float]:
    return [1.0]


def nan_scores(prompts: list[str], completions: list[str], **kw) -> list[float]:
    return [float("nan")] * len(completions)


def no_scores(prompts: list[str], completions: list[str], **kw) -> None:
    return None
