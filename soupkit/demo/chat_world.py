"""A small chat world for the real model: capital-city questions, with data shaped like the paper's.

SFT rows are shaped like UltraChat 200k (``prompt``, ``prompt_id``, ``messages``), preference rows
like UltraFeedback-binarized (``prompt`` a string; ``chosen`` / ``rejected`` whole conversations
that repeat it; ``score_chosen`` / ``score_rejected``), prompts are ``{"prompt": ...}`` rows. The
hidden gold judge rewards naming the right capital, briefly; the reward model only sees pairs
where a correct, short answer beats a wrong or rambling one.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

TRAIN = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Russia", "Moscow"), ("Egypt", "Cairo"), ("China", "Beijing"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Austria", "Vienna"), ("Norway", "Oslo"), ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Peru", "Lima"),
    ("Thailand", "Bangkok"),
)
HELD_OUT = (
    ("England", "London"), ("Mexico", "Mexico City"), ("Sweden", "Stockholm"), ("Kenya", "Nairobi"),
    ("Argentina", "Buenos Aires"), ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("Denmark", "Copenhagen"),
    ("South Korea", "Seoul"), ("Cuba", "Havana"),
)
QUESTIONS = ("What is the capital of {}?", "Which city is the capital of {}?", "Name the capital city of {}.")
ANSWERS = ("The capital of {0} is {1}.", "{1} is the capital of {0}.", "{1}.")
RAMBLE = ("Capitals are important cities. Many countries have one, and {0} is a country with a long history, "
          "so its capital is worth discussing in detail before giving any answer at all.")


def _conv(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sft_rows(seed: int, n: int) -> list[dict[str, Any]]:
    """UltraChat-shaped rows: a question and a correct answer, as ``messages``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        country, capital = rng.choice(TRAIN)
        question = rng.choice(QUESTIONS).format(country)
        rows.append({"prompt": question, "prompt_id": _id(question),
                     "messages": _conv(question, rng.choice(ANSWERS).format(country, capital))})
    return rows


def preference_rows(seed: int, n: int) -> list[dict[str, Any]]:
    """UltraFeedback-binarized-shaped rows: correct and short beats wrong or rambling."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        (country, capital), (_, wrong) = rng.sample(TRAIN, 2)
        question = rng.choice(QUESTIONS).format(country)
        bad = rng.choice((rng.choice(ANSWERS).format(country, wrong), RAMBLE.format(country)))
        chosen, rejected = _conv(question, rng.choice(ANSWERS).format(country, capital)), _conv(question, bad)
        rows.append({"prompt": question, "prompt_id": _id(question), "chosen": chosen, "rejected": rejected,
                     "messages": chosen, "score_chosen": 9.0, "score_rejected": 2.0})
    return rows


def prompt_rows(pairs: tuple[tuple[str, str], ...], conversational: bool = False) -> list[dict[str, Any]]:
    """One prompt per country: ``{"prompt": str}``, or TRL's conversational ``{"prompt": [user turn]}``."""
    questions = [QUESTIONS[0].format(country) for country, _ in pairs]
    return [{"prompt": [{"role": "user", "content": q}] if conversational else q} for q in questions]


def capital_for(prompt: Any) -> str | None:
    """The right answer to a prompt of this world (string or conversation), if it is one."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return next((capital for country, capital in TRAIN + HELD_OUT if country in text), None)


def gold_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """The hidden judge: 1 for naming the right capital, minus 0.01 a word past ten words."""
    out = []
    for prompt, completion in zip(prompts, completions):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        capital = capital_for(prompt)
        correct = float(capital is not None and capital.lower() in text.lower())
        out.append(correct - 0.01 * max(0, len(text.split()) - 10))
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_data(root: Path, sft_n: int = 32, pref_n: int = 48) -> dict[str, Path]:
    """Every data file of the world under ``root``: two SFT sets, preferences, train and held-out prompts."""
    return {
        "sft_a": write_jsonl(root / "ultrachat-a.jsonl", sft_rows(1, sft_n)),
        "sft_b": write_jsonl(root / "ultrachat-b.jsonl", sft_rows(2, sft_n)),
        "prefs": write_jsonl(root / "ultrafeedback.jsonl", preference_rows(3, pref_n)),
        "prompts": write_jsonl(root / "prompts.jsonl", prompt_rows(TRAIN)),
        "heldout": write_jsonl(root / "heldout.jsonl", prompt_rows(HELD_OUT)),
    }
