"""``soupkit eval``: measure every aligned policy, aggregate over seeds, write results and a report.

Writes ``results.json`` (every number, with 95% bootstrap intervals), ``report.md`` (tables, plots
and a plain reading that says when the evidence does not separate the methods) and PNG plots,
atomically into the eval output directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from soupkit.evaluation import stats
from soupkit.evaluation.sampling import Sampling, measure

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RunResult:
    """One finished align run: which method, seed and KL coefficient, its final policy, and how
    to sample from it (the run's own temperature, top-p and lengths)."""

    method: str
    seed: int
    kl_coef: float
    path: Path
    how: Sampling
    points: tuple[tuple[str, str, float], ...] = ()
    """Where its reference sits on the recipe's soup sweeps: ``(sweep, axis, value)``, e.g.
    ``("soup", "alpha", 0.25)``."""


def measure_runs(runs: Sequence[RunResult], prompts: Sequence[str], reward: str, gold: str | None,
                 references: dict[str, str], progress: Progress | None = None) -> list[dict]:
    """Per-prompt measurements of every run; references and scorers are loaded once."""
    from soupkit.evaluation.sampling import load_scorer
    from soupkit.loading import causal_lm, generation_tokenizer

    tok = generation_tokenizer(runs[0].path, "policy")
    reward_scorer = load_scorer(reward, tok)
    gold_scorer = load_scorer(gold, tok) if gold else None
    refs = {name: causal_lm(path, f"eval.references.{name}") for name, path in references.items()}
    out = []
    for i, run in enumerate(runs):
        rows = measure(run.path, prompts, run.how, reward_scorer, gold_scorer, refs)
        out.append({"method": run.method, "seed": run.seed, "kl_coef": run.kl_coef, "points": list(run.points),
                    "rows": rows})
        if progress:
            progress(i + 1, len(runs))
    return out


def _interval(groups: list[np.ndarray], n_boot: int) -> list[float]:
    return [round(x, 4) for x in stats.mean_ci(groups, n_boot=n_boot)]


def summarise(measured: list[dict], baseline: str, primary: str, n_boot: int) -> dict[str, Any]:
    """Per method and KL coefficient: every metric's mean and 95% interval over seeds and prompts,
    and the win rate against ``baseline`` on the ``primary`` score (paired by prompt and seed)."""
    keys = sorted({(m["method"], m["kl_coef"]) for m in measured}, key=lambda k: (k[0] != baseline, k))
    metrics = [k for k in measured[0]["rows"] if k != "examples"]
    summary: dict[str, Any] = {}
    for method, coef in keys:
        runs = [m for m in measured if (m["method"], m["kl_coef"]) == (method, coef)]
        entry = {"method": method, "kl_coef": coef, "seeds": [r["seed"] for r in runs]}
        entry.update({k: _interval([r["rows"][k] for r in runs], n_boot) for k in metrics})
        entry["win_rate"], entry["win_rate_against"] = _win_rate(runs, measured, baseline, coef, primary, n_boot)
        entry["points"] = runs[0].get("points", [])
        entry["examples"] = runs[0]["rows"]["examples"]
        summary[f"{method}@{coef:g}"] = entry
    return summary


def _win_rate(runs: list[dict], measured: list[dict], baseline: str, coef: float, primary: str,
              n_boot: int) -> tuple[list[float] | None, str | None]:
    """Win rate against the baseline at the same kl_coef, else at the nearest one it ran."""
    base_coefs = sorted({m["kl_coef"] for m in measured if m["method"] == baseline})
    if not base_coefs or runs[0]["method"] == baseline:
        return None, None
    near = min(base_coefs, key=lambda c: (abs(c - coef), c))
    base = [m for m in measured if m["method"] == baseline and m["kl_coef"] == near]
    by_seed = {m["seed"]: m for m in base}
    groups = [np.stack([r["rows"][primary], (by_seed.get(r["seed"]) or base[i % len(base)])["rows"][primary]], 1)
              for i, r in enumerate(runs)]
    return [round(x, 4) for x in stats.win_rate_ci(groups, n_boot=n_boot)], f"{baseline}@{near:g}"


def frontiers(summary: dict[str, Any], kl_key: str, primary: str) -> dict[str, Any]:
    """Reward against KL across the kl_coef sweep, per method, and the KL-matched comparison."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for entry in summary.values():
        curves.setdefault(entry["method"], []).append((entry[kl_key][0], entry[primary][0]))
    swept = {k: v for k, v in curves.items() if len({p[0] for p in v}) > 1}  # a point is no frontier
    matched = stats.matched_kl(swept) if swept else {"kl": [], "reward": {}}
    return {"kl": kl_key, "score": primary, "curves": {k: stats.frontier(v) for k, v in curves.items()},
            "matched": matched, "swept": sorted(swept)}


def ablations(summary: dict[str, Any], primary: str) -> dict[str, Any]:
    """Per soup sweep (``NAME-alpha``, ``NAME-n``): one row per run family against a soup of the
    sweep (or its first model) and kl_coef, sorted by the swept value, with the score and win rate
    and their intervals."""
    out: dict[str, Any] = {}
    for key, entry in summary.items():
        for sweep, axis, value in entry.get("points", []):
            table = out.setdefault(f"{sweep}-{axis}", {"sweep": sweep, "axis": axis, "score": primary, "rows": []})
            table["rows"].append({"value": value, "entry": key, "method": entry["method"], "kl_coef": entry["kl_coef"],
                                  "seeds": len(entry["seeds"]), primary: entry[primary], "win_rate": entry["win_rate"]})
    for table in out.values():
        table["rows"].sort(key=lambda r: (r["kl_coef"], r["value"], r["method"]))
    return out


def evaluate(runs: Sequence[RunResult], prompts: Sequence[str], out_dir: Path, *, reward: str,
             gold: str | None, references: dict[str, str], baseline: str, n_boot: int = 2000,
             path: dict[str, Any] | None = None, progress: Progress | None = None,
             judge: Any = None) -> dict[str, Any]:
    """Measure, summarise and write ``results.json``, ``report.md`` and plots into ``out_dir``;
    with a ``judging.JudgeJob``, the judged results too (``results["judge"]``)."""
    from soupkit.evaluation import judge_report, judging, plots, writing

    measured = measure_runs(runs, prompts, reward, gold, references, progress)
    primary = "gold" if gold else "reward"
    summary = summarise(measured, baseline, primary, n_boot)
    kl_key = f"kl_{next(iter(references))}" if references else None
    results = {"baseline": baseline, "primary": primary, "prompts": len(prompts), "methods": summary,
               "frontier": frontiers(summary, kl_key, primary) if kl_key else None, "path": path,
               "ablation": ablations(summary, primary),
               "per_run": [{k: v for k, v in m.items() if k != "rows"} |
                           {"means": {k: float(np.mean(v)) for k, v in m["rows"].items() if k != "examples"}}
                           for m in measured],
               "judge": judging.run_judge(judge, runs, baseline, n_boot) if judge else None}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    figures = plots.write_eval_plots(results, out_dir)
    judge_report.judge_plots(results["judge"], out_dir)  # shown in report.md's judged section
    (out_dir / "report.md").write_text(writing.report_markdown(results, figures))
    return results
