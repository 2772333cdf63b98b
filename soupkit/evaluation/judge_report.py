"""The judged part of ``report.md`` and its plots: per set, grades, win rates, verdict counts,
unparsed verdicts, position-swap consistency, and per-category scores."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from soupkit.evaluation.verdicts import SCALE
from soupkit.evaluation.writing import format_ci


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "set"


def judge_lines(judge: dict[str, Any] | None) -> list[str]:
    """Markdown for ``results["judge"]``; nothing when no judge ran."""
    if not judge:
        return []
    template = "soupkit's own templates" if judge["template"] == "soupkit" else f"templates from `{judge['template']}`"
    lines = ["", "## Judged by an LLM", "",
             f"Judge: {judge['judge']}, {template}. {judge['judged']} new judgments, {judge['cached']} read from "
             f"the cache. Unparsed verdicts are counted and left out of every mean. Intervals resample seeds, "
             "then questions."]
    for name, result in judge["sets"].items():
        lines += ["", f"### {name}: {result['questions']} question(s), up to {result['turns']} turn(s)"]
        lines += _single(result.get("single")) + _pairwise(result.get("pairwise")) + _categories(result)
        lines += ["", *[f"![{p}]({p}.png)" for p in _plot_names(name, result)]]
    return lines


def _single(single: dict[str, Any] | None) -> list[str]:
    if not single:
        return []
    turns = len(next(iter(single.values()))["turns"])
    head = "| run | seeds | grade (1-10) | " + " | ".join(f"turn {t + 1}" for t in range(turns)) + " | unparsed |"
    lines = ["", "Single-answer grades:", "", head, "|---" * (turns + 4) + "|"]
    for key, e in single.items():
        lines.append(f"| {key} | {len(e['seeds'])} | {format_ci(e['score'])} | "
                     + " | ".join(format_ci(t) for t in e["turns"]) + f" | {e['unparsed']} of {e['judgments']} |")
    return lines


def _pairwise(pairs: dict[str, Any] | None) -> list[str]:
    if not pairs:
        return []
    lines = ["", "Pairwise, both orders (verdicts from the run's side, ties as half a win):", "",
             "| run | against | win rate | " + " | ".join(f"`{v}`" for v in SCALE) + " | unparsed | swap consistency |",
             "|---" * (len(SCALE) + 5) + "|"]
    for key, e in pairs.items():
        consistency = "–" if e["consistency"] is None else f"{e['consistency']:.1%} of {e['both_orders_parsed']}"
        lines.append(f"| {key} | {e['against']} | {format_ci(e['win_rate'])} | "
                     + " | ".join(str(e["verdicts"][v]) for v in SCALE)
                     + f" | {e['unparsed']} of {e['judgments']} | {consistency} |")
    lines += ["", *[_verdict_sentence(key, e) for key, e in pairs.items()]]
    return lines


def _verdict_sentence(key: str, e: dict[str, Any]) -> str:
    if not e["win_rate"]:
        return f"- **{key}**: no verdict against {e['against']} parsed; no win rate."
    win, lo, hi = e["win_rate"]
    where = "above" if lo > 0.5 else "below" if hi < 0.5 else "containing"
    line = f"- **{key}** vs {e['against']}: win rate {win:.1%}, interval [{lo:.1%}, {hi:.1%}] {where} 50%."
    if e["consistency"] is not None and e["consistency"] < 0.5:
        line += (f" The two orders agree on only {e['consistency']:.0%} of pairs: the judge's verdicts follow "
                 "the answers' positions more than their content, so this win rate says little.")
    return line


def _categories(result: dict[str, Any]) -> list[str]:
    if len(result["categories"]) < 2:
        return []
    lines = []
    for protocol, label in (("single", "grade"), ("pairwise", "win rate")):
        entries = result.get(protocol) or {}
        if not entries:
            continue
        lines += ["", f"Per category, {label}:", "", "| category | " + " | ".join(entries) + " |",
                  "|---" * (len(entries) + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(format_ci(e["categories"][c]) for e in entries.values()) + " |"
                  for c in result["categories"]]
    return lines


def _plot_names(name: str, result: dict[str, Any]) -> list[str]:
    return [f"judge-{_slug(name)}-{p}" for p in ("single", "pairwise") if result.get(p)]


def judge_plots(judge: dict[str, Any] | None, out_dir: Path) -> list[Path]:
    """One bar chart per set and protocol: the grade or the win rate per run, with 95% intervals."""
    if not judge:
        return []
    figures = []
    for name, result in judge["sets"].items():
        for plot, protocol in zip(_plot_names(name, result), [p for p in ("single", "pairwise") if result.get(p)]):
            key = "score" if protocol == "single" else "win_rate"
            label = "judge grade (1-10)" if protocol == "single" else "win rate vs baseline"
            figures.append(_bars({k: e[key] for k, e in result[protocol].items()}, label, name,
                                 0.5 if protocol == "pairwise" else None, out_dir / f"{plot}.png"))
    return figures


def _bars(values: dict[str, list[float] | None], label: str, title: str, line: float | None, out: Path) -> Path:
    from soupkit.diagnostics.plots import pyplot

    plt = pyplot()
    names = list(values)
    est = [v[0] if v else float("nan") for v in values.values()]
    err = [[v[0] - v[1] if v else 0 for v in values.values()], [v[2] - v[0] if v else 0 for v in values.values()]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.2))
    ax.bar(range(len(names)), est, color="#c2a27a", yerr=err, capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(f"{label} (95% CI)")
    ax.set_title(title, fontsize=9)
    if line is not None:
        ax.axhline(line, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
