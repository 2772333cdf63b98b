"""Greedy soup (Wortsman et al. 2022, "Model soups", arXiv 2203.05482, Recipe 1).

Rank the ingredients by a held-out score, best first; start the soup with the best one; try each
next ingredient in that order and keep it if the uniform soup with it scores no worse than the soup
without it. The output is the uniform soup of the kept ingredients.

The held-out score is either the mean next-token loss on texts (``parameters: {texts: FILE}``; lower
is better) or the mean reward of one sampled completion per prompt (``parameters: {prompts: FILE,
reward: RM_DIR | module:function}``; higher is better, sampled with the same seed for every
candidate, as ``soupkit eval`` samples). Each candidate soup exists only in memory and is the merge
engine's float32 average, so the score recorded for the kept set is the score of the model written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError

PARAMETERS = ("texts", "prompts", "reward", "chat_template", "split")
"""``merge.parameters`` of ``method: greedy``."""
Score = Callable[[Sequence[int]], float]
"""Indices of ingredients -> held-out score of their uniform soup."""


@dataclass
class GreedyResult:
    """What the greedy search did, for the model card."""

    metric: str
    higher_is_better: bool
    individual: list[float]
    """Score of each ingredient alone, in recipe order."""
    order: list[int]
    """Ingredients by individual score, best first."""
    trials: list[dict[str, Any]] = field(default_factory=list)
    """Per ingredient after the first, in order: ``{model, soup_score, kept}``."""
    kept: list[int] = field(default_factory=list)
    score: float = 0.0
    """Score of the final soup."""


def greedy(count: int, score: Score, higher_is_better: bool, metric: str = "score") -> GreedyResult:
    """The greedy search over ``count`` ingredients; ties in the ranking keep recipe order."""
    individual = [score([i]) for i in range(count)]
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(range(count), key=lambda i: sign * individual[i])
    result = GreedyResult(metric, higher_is_better, individual, order, kept=[order[0]], score=individual[order[0]])
    for i in order[1:]:
        candidate = score(result.kept + [i])
        keep = candidate >= result.score if higher_is_better else candidate <= result.score  # "no worse"
        result.trials.append({"model": i, "soup_score": candidate, "kept": keep})
        if keep:
            result.kept.append(i)
            result.score = candidate
    return result


def check(parameters: dict[str, Any]) -> str:
    """The metric ``parameters`` ask for (``loss`` or ``reward``), or a SoupkitError naming the key."""
    from soupkit.errors import did_you_mean

    for key in parameters:
        if key not in PARAMETERS:
            raise SoupkitError(f"merge.parameters.{key}: unknown parameter for greedy{did_you_mean(key, list(PARAMETERS))}; "
                               f"greedy takes: {', '.join(PARAMETERS)}")
    texts, prompts, reward = (parameters.get(k) for k in ("texts", "prompts", "reward"))
    if texts is not None and (prompts is not None or reward is not None):
        raise SoupkitError("merge.parameters: greedy scores by texts (loss) or by prompts and reward, not both")
    if texts is not None:
        return "loss"
    if prompts is None or reward is None:
        raise SoupkitError("merge.parameters: greedy needs texts: FILE (held-out loss) or prompts: FILE and "
                           "reward: RM_DIR | module:function (mean reward of samples)")
    return "reward"


def reads(parameters: dict[str, Any]) -> list[str]:
    """The files a greedy search reads besides the models (held-out texts or prompts, the reward), for
    ``soupkit run``'s fingerprints."""
    return [str(parameters[key]) for key in ("texts", "prompts", "reward") if key in parameters]


def select(plan: Any, progress: Callable[[int, int], None] | None = None) -> GreedyResult:
    """Run the greedy search over ``plan``'s ingredients (loaded once each, float32, on the CPU)."""
    from soupkit.adapters import lm_source
    from soupkit.diagnostics.path import snapshot
    from soupkit.loading import causal_lm

    params = plan.spec.parameters
    metric = check(params)
    work, sources = None, []
    for i, ckpt in enumerate(plan.models):  # one working model; the others only as float32 snapshots
        lm = causal_lm(lm_source(ckpt), f"merge.models[{i}]")
        sources.append(snapshot(lm))
        work = work or lm
    sources_dir = plan.models[0].path
    measure = _loss(work, sources_dir, params) if metric == "loss" else _reward(work, sources_dir, params)
    calls = [0]
    total = 2 * len(sources) - 1

    def score(indices: Sequence[int]) -> float:
        from soupkit.diagnostics.path import mix_into

        mix_into(work, [sources[i] for i in indices], [1.0 / len(indices)] * len(indices))
        calls[0] += 1
        if progress is not None:
            progress(calls[0], total)
        return measure(work)

    return greedy(len(sources), score, metric == "reward", metric)


def _loss(work: Any, model_dir: Path, params: dict[str, Any]) -> Callable[[Any], float]:
    """model -> mean next-token loss (nats) on the held-out texts, as ``soupkit inspect`` measures it."""
    from soupkit.chat import render, use_template
    from soupkit.diagnostics.path import mean_loss
    from soupkit.diagnostics.texts import encode, pad_id, read_texts
    from soupkit.loading import load_tokenizer

    tok = load_tokenizer(model_dir, "merge.models[0]")
    template = use_template(tok, params.get("chat_template", "auto"), "merge.parameters.chat_template")
    texts = render(tok, read_texts(str(params["texts"]), params.get("split", "train")), template, "merge.parameters.texts")
    ids = encode(tok, texts, special_tokens=template is None)
    return lambda model: mean_loss(model, ids, pad_id(tok))


def _reward(work: Any, model_dir: Path, params: dict[str, Any]) -> Callable[[Any], float]:
    """model -> mean reward of one sampled completion per prompt (eval's protocol, fixed seed)."""
    from soupkit.chat import policy_chat
    from soupkit.diagnostics.report import _reward as reward_spec
    from soupkit.diagnostics.texts import read_texts
    from soupkit.evaluation.sampling import default_sampling, mean_score
    from soupkit.rlhf.models import reward_model

    setting = params.get("chat_template", "auto")
    prompts = read_texts(str(params["prompts"]), params.get("split", "train"))
    chat = policy_chat(model_dir, setting, "merge.parameters.chat_template")
    spec = reward_spec(str(params["reward"]))
    scorer = reward_model(spec, chat.tokenizer, "cpu") if isinstance(spec, Path) else spec
    sampling = default_sampling(chat_template=setting)
    return lambda model: mean_score(model, prompts, chat, sampling, scorer)


def card_lines(result: GreedyResult, refs: list[str]) -> list[str]:
    """The greedy search as a model-card section: scores, order, and what was kept."""
    better = "higher" if result.higher_is_better else "lower"
    lines = ["## Greedy soup", "",
             f"Held-out {result.metric} ({better} is better); ingredients ranked by their own score, each added "
             "in that order if the uniform soup with it scored no worse (Wortsman et al. 2022, arXiv 2203.05482).", "",
             "| rank | model | own score | soup score with it | kept |", "|---|---|---|---|---|",
             f"| 1 | `{refs[result.order[0]]}` | {result.individual[result.order[0]]:.6g} | - | yes |"]
    for rank, trial in enumerate(result.trials, start=2):
        i = trial["model"]
        lines.append(f"| {rank} | `{refs[i]}` | {result.individual[i]:.6g} | {trial['soup_score']:.6g} | "
                     f"{'yes' if trial['kept'] else 'no'} |")
    lines += ["", f"Kept {len(result.kept)} of {len(refs)}; the soup's score: {result.score:.6g}.", ""]
    return lines


def record(result: GreedyResult, refs: list[str]) -> dict[str, Any]:
    """The greedy search as JSON (``greedy_soup.json`` next to the weights)."""
    return {"metric": result.metric, "higher_is_better": result.higher_is_better,
            "individual": {refs[i]: s for i, s in enumerate(result.individual)},
            "order": [refs[i] for i in result.order],
            "trials": [{**t, "model": refs[t["model"]]} for t in result.trials],
            "kept": [refs[i] for i in result.kept], "score": result.score}
