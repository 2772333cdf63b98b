"""Fronts along the line between two policies (``eval.fronts``): WARP's LITI and rewarded soups.

LITI (Ramé et al. 2024, WARP, arXiv 2406.16768, section 3.3) moves from the init towards a merged
policy, ``(1 - eta) * init + eta * merged``; sweeping eta traces a KL-reward front. Rewarded soups
(Ramé et al. 2023, arXiv 2306.04488) interpolate policies trained on different rewards,
``(1 - lambda) * a + lambda * b``, and sweeping lambda traces a front of those rewards. Both are
one measurement: for each value of the grid, the model is built in memory with the merge engine's
arithmetic (``soupkit.diagnostics.path.mix_into``: the grid's ends 0 and 1 are the two models
themselves), its completions sampled and scored exactly as eval's rows (``soupkit.evaluation.
sampling``), each score with a 95% bootstrap interval over prompts. The points that no other point
beats on both axes form the Pareto front; other models (a baseline) are measured the same way
and compared with the front at their own x.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from soupkit.evaluation import stats
from soupkit.evaluation.sampling import Sampling, Scorer, sample, scores, sequence_kl

Progress = Callable[[int, int], None]


def lower_is_better(metric: str) -> bool:
    """KL columns are minimised on a front; scores are maximised."""
    return metric.startswith("kl_")


def measure_model(model: Any, chat: Any, texts: Sequence[str], prompts: Sequence[Any], how: Sampling,
                  scorers: dict[str, Scorer], references: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-prompt scores and KLs of one loaded model, sampled with ``how`` (eval's protocol)."""
    parts = sample(model, chat.tokenizer, texts, how, chat.stops)
    rows = {name: scores(scorer, parts, prompts, chat) for name, scorer in scorers.items()}
    return rows | {f"kl_{name}": sequence_kl(model, ref, parts, how.temperature) for name, ref in references.items()}


def summarise(rows: dict[str, np.ndarray], n_boot: int) -> dict[str, list[float]]:
    return {k: [round(x, 4) for x in stats.mean_ci([v], n_boot=n_boot)] for k, v in rows.items()}


def pareto(points: list[dict[str, Any]], x: str, y: str) -> list[bool]:
    """For each point: True when no other point is at least as good on both axes and better on one
    (KL lower is better, a score higher), judged on the estimates."""
    sx, sy = (-1 if lower_is_better(x) else 1), (-1 if lower_is_better(y) else 1)
    vals = [(sx * p[x][0], sy * p[y][0]) for p in points]
    return [not any(o[0] >= v[0] and o[1] >= v[1] and o != v for o in vals) for v in vals]


def at_x(points: list[dict[str, Any]], x: str, y: str, where: float) -> list[float] | None:
    """The front's ``y`` (estimate, low, high) at ``x = where``: each linearly interpolated between
    neighbouring points of the Pareto front; past its worse end on x (more KL, less of a score) the
    y of that end, which a front point reaches with a better x; None past its better end."""
    order = sorted((p for p, best in zip(points, pareto(points, x, y)) if best), key=lambda p: p[x][0])
    worse = order[-1] if lower_is_better(x) else order[0]
    if (where > worse[x][0]) if lower_is_better(x) else (where < worse[x][0]):
        return list(worse[y])
    curve = [(p[x][0], p[y]) for p in order]
    out = [stats.reward_at([(c[0], c[1][i]) for c in curve], where) for i in range(3)]
    return None if out[0] is None else [round(v, 4) for v in out]


def compare(front: dict[str, Any], other: dict[str, Any]) -> str:
    """``beats`` / ``loses to`` / ``not separated from``: the front's interval on y, interpolated at
    the other model's x, against the other's interval; ``outside`` when x is off the front."""
    x, y = front["axes"]
    got = at_x(front["points"], x, y, other[x][0])
    if got is None:
        return "outside"
    sign = -1.0 if lower_is_better(y) else 1.0  # compare "goodness": higher is better
    mine = sorted(sign * v for v in got[1:])
    theirs = sorted(sign * v for v in other[y][1:])
    if mine[0] > theirs[1]:
        return "beats"
    if mine[1] < theirs[0]:
        return "loses to"
    return "not separated from"


def measure_front(spec: Any, axes: list[str], prompts: Sequence[Any], how: Sampling, scorers: dict[str, Scorer],
                  references: dict[str, Any], n_boot: int, progress: Progress | None = None) -> dict[str, Any]:
    """Every grid point of one ``eval.fronts`` entry, and each of its ``others``."""
    from soupkit.chat import policy_chat, render
    from soupkit.diagnostics.path import mix_into, snapshot
    from soupkit.loading import causal_lm

    chat = policy_chat(Path(spec.a), how.chat_template, f"eval.fronts.{spec.name}.a")
    texts = render(chat.tokenizer, prompts, chat.template, "eval prompts")
    model = causal_lm(Path(spec.a), f"eval.fronts.{spec.name}.a")
    ends = [snapshot(model), snapshot(causal_lm(Path(spec.b), f"eval.fronts.{spec.name}.b"))]
    points, total = [], len(spec.values) + len(spec.others)
    for i, value in enumerate(spec.values):
        mix_into(model, ends, [1.0 - value, value])
        rows = measure_model(model, chat, texts, prompts, how, scorers, references)
        points.append({"value": value, **summarise(rows, n_boot)})
        if progress:
            progress(i + 1, total)
    for point, best in zip(points, pareto(points, axes[0], axes[1])):
        point["pareto"] = best
    result = {"name": spec.name, "a": spec.a, "b": spec.b, "axis": spec.axis, "axes": list(axes), "points": points,
              "others": {}}
    for j, (name, path) in enumerate(spec.others.items()):
        other = causal_lm(Path(path), f"eval.fronts.{spec.name}.others.{name}")
        entry = summarise(measure_model(other, chat, texts, prompts, how, scorers, references), n_boot)
        result["others"][name] = {"path": path, **entry, "front": compare(result, entry)}
        if progress:
            progress(len(spec.values) + j + 1, total)
    return result


def write_fronts(spec: Any, axes: list[list[str]], prompts: Sequence[Any], how: Sampling, reward: str,
                 out_dir: Path) -> list[dict[str, Any]]:
    """Measure every front of ``spec`` (an ``EvalSpec``), write ``fronts.json`` and one plot each,
    and append their section to ``report.md``; returns the fronts."""
    import json

    from soupkit.evaluation.sampling import load_scorer
    from soupkit.loading import causal_lm, generation_tokenizer

    tok = generation_tokenizer(Path(spec.fronts[0].a), "policy")
    shared = {"reward": load_scorer(reward, tok), **({"gold": load_scorer(spec.gold_reward, tok)} if spec.gold_reward else {})}
    refs = {name: causal_lm(Path(path), f"eval.references.{name}") for name, path in spec.references.items()}
    fronts = []
    for front, pair in zip(spec.fronts, axes):
        scorers = shared | {name: load_scorer(r, tok) for name, r in front.rewards.items()}
        fronts.append(measure_front(front, pair, prompts, how, scorers, refs, spec.bootstrap))
    (out_dir / "fronts.json").write_text(json.dumps(fronts, indent=2) + "\n")
    figures = {f["name"]: front_plot(f, out_dir / f"front-{f['name']}.png") for f in fronts}
    with open(out_dir / "report.md", "a") as report:
        report.write("\n".join(front_lines(fronts, figures)) + "\n")
    return fronts


def front_lines(fronts: list[dict[str, Any]], figures: dict[str, Path]) -> list[str]:
    """Markdown: per front, a table of the grid (Pareto points starred) and the others' verdicts."""
    from soupkit.evaluation.writing import format_ci

    lines: list[str] = []
    for front in fronts:
        x, y = front["axes"]
        metrics = [k for k in front["points"][0] if k not in ("value", "pareto")]
        lines += ["", f"## Front `{front['name']}`: {front['axis']} from {front['a']} (0) to {front['b']} (1)", "",
                  f"Axes: {x} ({'lower' if lower_is_better(x) else 'higher'} is better) and {y} "
                  f"({'lower' if lower_is_better(y) else 'higher'} is better); * marks the Pareto front. "
                  "Means with 95% bootstrap intervals over prompts.", "",
                  "| " + front["axis"] + " | " + " | ".join(metrics) + " | front |",
                  "|---" * (len(metrics) + 2) + "|"]
        lines += ["| " + f"{p['value']:g}" + " | " + " | ".join(format_ci(p[m]) for m in metrics)
                  + f" | {'*' if p['pareto'] else ''} |" for p in front["points"]]
        for name, other in front["others"].items():
            got = at_x(front["points"], x, y, other[x][0])
            where = f"{format_ci(got)} at {x} {other[x][0]:.3g}" if got else "no point of the front at its x"
            lines.append(f"\n- **{name}**: {y} {format_ci(other[y])}, {x} {format_ci(other[x])}; the front "
                         f"{front_verdict(other['front'])} it ({where}).")
        if front["name"] in figures:
            lines += ["", f"![{front['name']}]({figures[front['name']].name})"]
    return lines


def front_verdict(word: str) -> str:
    return {"beats": "beats", "loses to": "loses to", "not separated from": "is not separated from",
            "outside": "cannot be compared with"}[word]


def front_plot(front: dict[str, Any], out: Path) -> Path:
    """The grid's points on the two axes, labelled by value, the Pareto front joined, others marked."""
    from soupkit.diagnostics.plots import pyplot

    plt = pyplot()
    x, y = front["axes"]
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    pts = front["points"]
    ax.plot([p[x][0] for p in pts], [p[y][0] for p in pts], color="#bbbbbb", lw=1)
    for p in pts:
        ax.errorbar(p[x][0], p[y][0], xerr=[[p[x][0] - p[x][1]], [p[x][2] - p[x][0]]],
                    yerr=[[p[y][0] - p[y][1]], [p[y][2] - p[y][0]]], fmt="o", capsize=2,
                    color="C0" if p["pareto"] else "C7")
        ax.annotate(f"{p['value']:g}", (p[x][0], p[y][0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for i, (name, o) in enumerate(front["others"].items()):
        ax.errorbar(o[x][0], o[y][0], xerr=[[o[x][0] - o[x][1]], [o[x][2] - o[x][0]]],
                    yerr=[[o[y][0] - o[y][1]], [o[y][2] - o[y][0]]], fmt="s", capsize=2, color=f"C{i + 1}", label=name)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{front['name']}: {front['axis']} grid (blue: Pareto front)", fontsize=9)
    if front["others"]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
