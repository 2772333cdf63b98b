""""Can these be souped?": a short verdict from a report, with every threshold's source.

Evidence, strongest first:
1. The loss barrier along the path (``--path``): the direct test of whether the average of the
   weights is as good as the models (linear mode connectivity).
2. Weight-space closeness: souping assumes fine-tunes of one pretrained checkpoint, which stay in
   one basin (Neyshabur et al. 2020, arXiv 2008.11687); independently trained networks are not
   linearly connected unless their permutations are aligned (Entezari et al. 2022, arXiv
   2110.06296; Ainsworth et al. 2023, arXiv 2209.04836).
3. Task-vector interference (``--base``): sign conflicts (TIES, Yadav et al. 2023, arXiv 2306.01708).
"""

from __future__ import annotations

from typing import Any

# Frankle et al. 2020 (arXiv 1912.05671, section 2) treat an error barrier within 2 percentage
# points as no barrier, i.e. linearly connected. soupkit applies the same 2 % to the loss barrier
# relative to the mean endpoint loss (our adaptation: the paper measures classification error).
# The verdict uses the chord barrier (Entezari et al. 2022): Frankle's max-minus-mean is at least
# half the gap between the endpoint losses, so two fine-tunes of unequal quality would "fail"
# on a perfectly convex path. Both are reported.
BARRIER_RELATIVE = 0.02
# Fine-tunes of one base are nearly parallel in weight space, because fine-tuning moves weights
# little relative to their norm (the premise of task arithmetic, arXiv 2212.04089, and of DARE,
# arXiv 2311.03099), while independent random initialisations are nearly orthogonal in high
# dimension (cosine near 0, apart from the norm weights, which start at 1).
# 0.5 is soupkit's own cut between those two regimes, not a published threshold.
COSINE_SHARED_INIT = 0.5
# Sign conflicts: 0.5 is what unrelated changes give by chance; TIES (arXiv 2306.01708, section 3)
# shows averaging conflicting signs shrinks both updates. 0.45 (near chance) is soupkit's cut.
SIGN_CONFLICT_HIGH = 0.45


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """``{"answer": "yes"|"likely"|"no", "reasons": [...], "notes": [...]}`` for a report dict."""
    reasons = _far_apart(report["pairs"])
    if reasons:
        return {"answer": "no", "reasons": reasons, "notes": _notes(report)}
    path = report.get("path", {})
    if "barrier_chord" in path:
        answer, reasons = _barrier_verdict(path)
    else:
        answer = "likely"
        reasons = [f"every pair has weight cosine >= {COSINE_SHARED_INIT}: consistent with fine-tunes "
                   "of one base; run with --path --prompts to measure the loss barrier"]
    return {"answer": answer, "reasons": reasons, "notes": _notes(report)}


def _far_apart(pairs: list[dict[str, Any]]) -> list[str]:
    return [
        f"{p['a']} vs {p['b']}: weight cosine {p['cosine']:.3f} < {COSINE_SHARED_INIT}; these look like "
        "independently trained models, which are not linearly connected (Entezari et al. 2022, "
        "Ainsworth et al. 2023): averaging them breaks both"
        for p in pairs if p.get("cosine") is not None and p["cosine"] < COSINE_SHARED_INIT
    ]


def _barrier_verdict(path: dict[str, Any]) -> tuple[str, list[str]]:
    mean_end = (path["loss"][path["alpha"].index(0.0)] + path["loss"][path["alpha"].index(1.0)]) / 2
    relative = path["barrier_chord"] / mean_end if mean_end > 0 else float("inf")
    text = (f"loss barrier above the chord {path['barrier_chord']:.4f} nats ({relative:.1%} of the mean endpoint loss) "
            f"between {path['a']} and {path['b']}")
    if relative <= BARRIER_RELATIVE:
        return "yes", [f"{text} <= {BARRIER_RELATIVE:.0%}: linearly connected (Frankle et al. 2020; Entezari et al. 2022)"]
    return "no", [f"{text} > {BARRIER_RELATIVE:.0%}: the average is worse than the models; "
                  "try a weighted or greedy soup (Wortsman et al. 2022, arXiv 2203.05482)"]


def _notes(report: dict[str, Any]) -> list[str]:
    notes = [
        f"{p['a']} vs {p['b']}: sign conflicts {p['sign_conflict']:.1%} of coordinates both changed "
        "(0.5 is chance); a plain average cancels much of both updates: consider ties or dare_ties"
        for p in report["pairs"] if p.get("sign_conflict", 0.0) >= SIGN_CONFLICT_HIGH
    ]
    path = report.get("path", {})
    if "loss" in path and {0.0, 0.5, 1.0} <= set(path["alpha"]):  # e.g. --points 3 has no endpoints
        mid = path["loss"][path["alpha"].index(0.5)]
        best = min(path["loss"][path["alpha"].index(0.0)], path["loss"][path["alpha"].index(1.0)])
        word = "below" if mid < best else "above"
        notes.append(f"the midpoint (uniform soup) loss {mid:.4f} is {word} the better endpoint's {best:.4f}")
    return notes
