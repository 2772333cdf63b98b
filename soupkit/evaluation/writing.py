"""``report.md`` for ``soupkit eval``: tables, plots, and a reading that follows the intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def format_ci(v: list[float] | None) -> str:
    return "–" if not v else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def kl_keys(entry: dict[str, Any]) -> list[str]:
    """The ``kl_<reference>`` measurements of a method entry."""
    return sorted(k for k in entry if k.startswith("kl_") and k != "kl_coef")


def _table(results: dict[str, Any]) -> list[str]:
    methods = results["methods"]
    first = next(iter(methods.values()))
    cols = ["reward"] + (["gold"] if "gold" in first else []) + kl_keys(first) + ["length"] + (["ended"] if "ended" in first else [])
    lines = ["| method | kl_coef | seeds | " + " | ".join(cols) + f" | win rate vs {results['baseline']} |",
             "|---" * (len(cols) + 4) + "|"]
    for m in methods.values():
        cells = [format_ci(m.get(c)) for c in cols]
        lines.append(f"| {m['method']} | {m['kl_coef']:g} | {len(m['seeds'])} | " + " | ".join(cells)
                     + f" | {format_ci(m['win_rate'])} |")
    return lines


def reading(results: dict[str, Any]) -> list[str]:
    """Plain sentences: which differences the 95% intervals support, and which they do not."""
    primary, base = results["primary"], results["baseline"]
    methods = results["methods"]
    out = []
    for name, m in methods.items():
        if m["method"] == base or not m["win_rate"]:
            continue
        base_entry = methods.get(m.get("win_rate_against") or "")
        win, lo, hi = m["win_rate"]
        against = m.get("win_rate_against") or base
        if lo > 0.5:
            verdict = f"beats {against}: win rate {win:.1%}, interval [{lo:.1%}, {hi:.1%}] above 50%"
        elif hi < 0.5:
            verdict = f"loses to {against}: win rate {win:.1%}, interval [{lo:.1%}, {hi:.1%}] below 50%"
        else:
            verdict = (f"is not distinguishable from {against}: win rate {win:.1%} with interval "
                       f"[{lo:.1%}, {hi:.1%}] containing 50%")
        out.append(f"- **{name}** {verdict} (on {primary}, {len(m['seeds'])} seed(s)).")
        if base_entry is not None:
            out += _kl_sentence(name, m, against, base_entry) + _overoptimised(name, m, against, base_entry)
    out += _matched_sentence(results)
    return out or ["- Only the baseline was evaluated; nothing to compare."]


def _kl_sentence(name: str, m: dict[str, Any], base: str, base_entry: dict[str, Any]) -> list[str]:
    lines = []
    for key in kl_keys(m):
        a, b = f"{m[key][0]:.3f}", f"{base_entry[key][0]:.3f}"
        # compared as printed: two KLs that read the same are called the same
        where = " (the same)" if a == b else (" (further away)" if float(a) > float(b) else " (closer)")
        lines.append(f"  - {key.removeprefix('kl_')}: {name} sits at KL {a} vs {b} for {base}{where}.")
    return lines


def _matched_sentence(results: dict[str, Any]) -> list[str]:
    front = results.get("frontier")
    if not front:
        return []
    matched, swept = front["matched"], front.get("swept", [])
    if len(swept) < 2:
        return ["- Fewer than two methods swept kl_coef, so there is no KL-matched comparison; differences "
                "above may reflect looser regularisation. Sweep `kl_coefs` to compare at equal KL."]
    if not matched["kl"]:
        return ["- The swept methods' KL ranges do not overlap, so no KL-matched comparison is possible: any "
                "difference above may be looser regularisation rather than a better method."]
    lines = [f"- At matched KL ({front['kl']} from {matched['kl'][0]:.3f} to {matched['kl'][-1]:.3f}; "
             f"frontiers interpolated between kl_coef points, so these are estimates without intervals):"]
    base = results["baseline"]
    for name, values in matched["reward"].items():
        lines.append(f"  - {name}: " + ", ".join(f"{v:.3f}" for v in values))
    if base in matched["reward"]:
        for name, values in matched["reward"].items():
            if name != base:
                wins = sum(v > b for v, b in zip(values, matched["reward"][base]))
                lines.append(f"  - {name} is above {base} at {wins} of {len(values)} matched KL values.")
    return lines


def _overoptimised(name: str, m: dict[str, Any], base: str, base_entry: dict[str, Any]) -> list[str]:
    """Higher proxy reward but lower gold reward than the baseline: the proxy was over-optimised
    (Gao et al. 2022, arXiv 2210.10760)."""
    if "gold" not in m or "gold" not in base_entry:
        return []
    # only when the gold drop is clear: the method's whole gold interval lies below the baseline's estimate
    if m["reward"][0] > base_entry["reward"][0] and m["gold"][2] < base_entry["gold"][0]:
        return [f"  - {name} scores higher than {base} on the proxy reward model ({m['reward'][0]:.3f} vs "
                f"{base_entry['reward'][0]:.3f}) but lower on the gold judge ({m['gold'][0]:.3f} vs "
                f"{base_entry['gold'][0]:.3f}): the proxy is being over-optimised."]
    return []


def _matched_table(results: dict[str, Any]) -> list[str]:
    front = results.get("frontier")
    if not front or not front["matched"]["kl"]:
        return []
    matched = front["matched"]
    names = list(matched["reward"])
    lines = ["", f"### {front['score']} at matched {front['kl']}", "",
             "| KL | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, kl in enumerate(matched["kl"]):
        lines.append(f"| {kl:.3f} | " + " | ".join(f"{matched['reward'][n][i]:.3f}" for n in names) + " |")
    return lines


def ablation_lines(results: dict[str, Any]) -> list[str]:
    """One table per soup sweep: the score and the win rate against the baseline at each swept value."""
    lines: list[str] = []
    for table in (results.get("ablation") or {}).values():
        score, axis = table["score"], table["axis"]
        lines += ["", f"## Ablation over {axis}: the soups of `{table['sweep']}`", "",
                  f"| {axis} | run | kl_coef | seeds | {score} | win rate vs {results['baseline']} |", "|---" * 6 + "|"]
        lines += [f"| {r['value']:g} | {r['method']} | {r['kl_coef']:g} | {r['seeds']} | {format_ci(r[score])} | "
                  f"{format_ci(r['win_rate'])} |" for r in table["rows"]]
        origin = 0 if axis == "alpha" else 1
        lines += ["", f"{axis} = {origin:g} is the sweep's first model as the reference (plain PPO when it is "
                  "also the policy's start); the baseline's own win rate is not measured (–)."]
    return lines


def _path_lines(path: dict[str, Any] | None) -> list[str]:
    if not path:
        return []
    lines = ["", "## Along the path between the SFT models", "",
             "| alpha | loss | reward |" if "reward" in path else "| alpha | loss |",
             "|---|---|---|" if "reward" in path else "|---|---|"]
    for i, alpha in enumerate(path["alpha"]):
        cells = [f"{alpha:g}", f"{path['loss'][i]:.4f}"] + ([f"{path['reward'][i]:.3f}"] if "reward" in path else [])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report_markdown(results: dict[str, Any], figures: list[Path]) -> str:
    from soupkit.evaluation.judge_report import judge_lines

    examples = []
    for name, m in results["methods"].items():
        ex = m["examples"][0]
        examples.append(f"- {name}: `{ex['prompt']}` → `{ex['completion']}`")
    lines = ["# soupkit eval", "",
             f"{results['prompts']} held-out prompts, one sampled completion each per run. Intervals are 95% "
             "bootstrap intervals resampling seeds, then prompts. Win rates count ties as half.", "",
             "## Results", "", *_table(results), *_matched_table(results), *ablation_lines(results), "",
             "## Reading", "", *reading(results), *_path_lines(results.get("path")),
             *judge_lines(results.get("judge")), "",
             "## Plots", "", *[f"![{f.stem}]({f.name})" for f in figures], "",
             "## Sample completions", "", *examples, ""]
    return "\n".join(lines)
