"""A tiny world for the embedded demo: a grammar, its corpus, prompts, and a hidden gold reward.

Prompts ask about an animal (``describe the fox :``). Good answers talk about that animal, say
kind things about it, stay short, and do not repeat themselves. The gold reward scores exactly that;
the proxy reward model only ever sees noisy preferences labelled by it (Bradley-Terry sampling), so
a policy that optimises the proxy hard can drift from the gold judgement: reward over-optimisation
(Gao et al. 2022, arXiv 2210.10760) shows up at toy scale.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

ANIMALS = ("cat", "dog", "fox", "owl", "fish", "bird")
COLOURS = ("red", "blue", "green", "brown")
GOOD = ("happy", "kind", "calm", "bright", "gentle")
BAD = ("sad", "angry", "dull", "cold", "lazy")
VERBS = ("runs", "sleeps", "sings", "jumps", "swims", "eats")
PLACES = ("park", "river", "house", "forest", "garden")
GLUE = ("the", "a", "is", "in", "near", "and", "very", "it", "describe", "tell", "me", "about", ":", ".")
EOS = "[EOS]"


def words() -> list[str]:
    """Every word of the world, in a fixed order (the tokenizer's vocabulary)."""
    return list(dict.fromkeys(GLUE + ANIMALS + COLOURS + GOOD + BAD + VERBS + PLACES))


def sentence(rng: random.Random, animal: str, p_good: float = 0.5) -> str:
    """One sentence about ``animal``: a description, an action, or a place."""
    adjective = rng.choice(GOOD if rng.random() < p_good else BAD)
    kind = rng.randrange(4)
    if kind == 0:
        return f"the {animal} is {adjective} ."
    if kind == 1:
        return f"the {animal} is very {adjective} ."
    if kind == 2:
        return f"the {rng.choice(COLOURS)} {animal} {rng.choice(VERBS)} in the {rng.choice(PLACES)} ."
    return f"it {rng.choice(VERBS)} near the {rng.choice(PLACES)} and it is {adjective} ."


def prompt(rng: random.Random) -> str:
    animal = rng.choice(ANIMALS)
    return f"{rng.choice(('describe the', 'tell me about the'))} {animal} :"


def animal_of(text: str) -> str | None:
    return next((w for w in text.split() if w in ANIMALS), None)


def response(rng: random.Random, prompt_text: str, p_good: float = 0.5, p_off: float = 0.15) -> str:
    """An answer of 1-3 sentences; with probability ``p_off`` it drifts to another animal."""
    animal = animal_of(prompt_text) or rng.choice(ANIMALS)
    n = rng.choice((1, 2, 2, 3))
    subject = rng.choice(ANIMALS) if rng.random() < p_off else animal
    return " ".join(sentence(rng, subject, p_good) for _ in range(n))


def pretraining_corpus(n: int, seed: int) -> list[str]:
    """Plain text of the world: prompts followed by answers, as one stream."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        p = prompt(rng)
        texts.append(f"{p} {response(rng, p)} {EOS}")
    return texts


def sft_data(n: int, seed: int) -> list[dict[str, str]]:
    """``prompt``/``completion`` pairs: on-topic answers of mixed quality (no preference signal)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = prompt(rng)
        rows.append({"prompt": p, "completion": " " + response(rng, p, p_good=0.5, p_off=0.05) + f" {EOS}"})
    return rows


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [prompt(rng) for _ in range(n)]


def gold_score(prompt_text: str, completion: str) -> float:
    """The hidden judge. On topic (+1), kind (+0.5 per good, -0.5 per bad adjective, at most 2
    counted), short (-0.15 per word beyond 14), no repeated content words besides the animal
    (-0.4 each), no other animals (-0.5 each). Text after the first EOS and padding are ignored."""
    tokens = [t for t in completion.split(EOS)[0].split() if t != "[PAD]"]
    animal = animal_of(prompt_text)
    score = 1.0 if animal in tokens else 0.0
    good = sum(t in GOOD for t in tokens)
    bad = sum(t in BAD for t in tokens)
    score += 0.5 * min(good, 2) - 0.5 * min(bad, 2)
    score -= 0.15 * max(0, len(tokens) - 14)
    content = [t for t in tokens if t not in GLUE and t != animal]
    score -= 0.4 * (len(content) - len(set(content)))
    score -= 0.5 * sum(t in ANIMALS and t != animal for t in set(tokens))
    return score


def gold_reward(prompts: Sequence[str], completions: Sequence[str], **_: object) -> list[float]:
    """TRL-style reward function over the gold judge: ``fn(prompts, completions, **kw)``."""
    return [gold_score(p, c) for p, c in zip(prompts, completions)]


def kind_score(prompt_text: str, completion: str) -> float:
    """The gold judge's kindness term alone: +0.5 per good, -0.5 per bad adjective (2 counted)."""
    tokens = completion.split(EOS)[0].split()
    return 0.5 * min(sum(t in GOOD for t in tokens), 2) - 0.5 * min(sum(t in BAD for t in tokens), 2)


def focus_score(prompt_text: str, completion: str) -> float:
    """The gold judge's other terms (on topic, short, no repeats, no other animals):
    ``gold_score = kind_score + focus_score``."""
    return gold_score(prompt_text, completion) - kind_score(prompt_text, completion)


def kind_reward(prompts: Sequence[str], completions: Sequence[str], **_: object) -> list[float]:
    """Reward function of the kindness term: one of the two rewards of the rewarded-soups recipe."""
    return [kind_score(p, c) for p, c in zip(prompts, completions)]


def focus_reward(prompts: Sequence[str], completions: Sequence[str], **_: object) -> list[float]:
    """Reward function of the focus terms: the other reward of the rewarded-soups recipe."""
    return [focus_score(p, c) for p, c in zip(prompts, completions)]


def preference_pairs(n: int, seed: int, temperature: float = 0.5) -> list[dict[str, str]]:
    """``prompt``/``chosen``/``rejected`` labelled by the gold judge with Bradley-Terry noise:
    the better answer is chosen with probability sigmoid((g_a - g_b) / temperature)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        p = prompt(rng)
        a, b = (response(rng, p, p_good=rng.random(), p_off=0.2) + f" {EOS}" for _ in range(2))
        ga, gb = gold_score(p, a), gold_score(p, b)
        if ga == gb:
            continue
        a_wins = rng.random() < 1.0 / (1.0 + math.exp(-(ga - gb) / temperature))
        chosen, rejected = (a, b) if a_wins else (b, a)
        rows.append({"prompt": p, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows
