"""Output-space agreement between models on probe texts, teacher-forced.

Every model reads the same texts; for each pair the exact per-token KL both ways, the JS
divergence and top-1 agreement are averaged over predicted tokens (a token counts when it and the
token it is predicted from are both real). The models are held in memory together so each batch's
log-probabilities are computed once per model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from typing import Any

from soupkit.diagnostics import kl as K
from soupkit.diagnostics.texts import batches, next_token_logprobs

Progress = Callable[[str, int, int], None]
FIELDS = ("kl", "kl_reverse", "js", "top1_agreement")


def pair_sums(lp: Any, lq: Any, valid: Any) -> dict[str, float]:
    """Summed KL(p||q), KL(q||p), JS and top-1 agreement over the valid positions of a batch."""
    return {
        "kl": K.masked_sum(K.token_kl(lp, lq), valid),
        "kl_reverse": K.masked_sum(K.token_kl(lq, lp), valid),
        "js": K.masked_sum(K.token_js(lp, lq), valid),
        "top1_agreement": K.masked_sum(K.top1_agree(lp, lq).double(), valid),
    }


def output_stats(models: Sequence[Any], ids: list[list[int]], pad: int,
                 progress: Progress | None = None) -> tuple[list[dict[str, float]], list[float]]:
    """Per-pair means per predicted token (combinations order), and each model's mean NLL."""
    pairs = list(combinations(range(len(models)), 2))
    sums = [dict.fromkeys(FIELDS, 0.0) for _ in pairs]
    nll, count, done = [0.0] * len(models), 0, 0
    for input_ids, mask in batches(ids, pad):
        outs = [next_token_logprobs(m, input_ids, mask) for m in models]
        valid, targets = outs[0][2], outs[0][1]
        count += int(valid.sum())
        for i, (lp, _, _) in enumerate(outs):
            nll[i] += K.masked_sum(K.token_nll(lp, targets), valid)
        for p, (i, j) in enumerate(pairs):
            for key, value in pair_sums(outs[i][0], outs[j][0], valid).items():
                sums[p][key] += value
        done += len(input_ids)
        if progress is not None:
            progress("outputs", done, len(ids))
    return [{k: v / count for k, v in s.items()} for s in sums], [x / count for x in nll]
