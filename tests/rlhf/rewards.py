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
