"""Independent oracles: each text run alone (no padding, no batching) through transformers."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def text_ids(path: Path, texts: list[str]) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return [torch.tensor([tok(t)["input_ids"]]) for t in texts]


def own_loss(path: Path, texts: list[str]) -> float:
    """transformers' own shifted cross-entropy, weighted by each text's predicted tokens."""
    model, total, count = lm(path), 0.0, 0
    with torch.no_grad():
        for ids in text_ids(path, texts):
            n = ids.shape[1] - 1
            total += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    return total / count


def kl_stats(path_a: Path, path_b: Path, texts: list[str]) -> dict[str, float]:
    """Mean per predicted token of KL both ways, JS and top-1 agreement, via F.kl_div."""
    a, b = lm(path_a), lm(path_b)
    sums, count = dict.fromkeys(("kl", "kl_reverse", "js", "top1_agreement"), 0.0), 0
    with torch.no_grad():
        for ids in text_ids(path_a, texts):
            lp = torch.log_softmax(a(input_ids=ids).logits[0, :-1].double(), -1)
            lq = torch.log_softmax(b(input_ids=ids).logits[0, :-1].double(), -1)
            m = ((lp.exp() + lq.exp()) / 2).log()
            sums["kl"] += float(F.kl_div(lq, lp, log_target=True, reduction="sum"))
            sums["kl_reverse"] += float(F.kl_div(lp, lq, log_target=True, reduction="sum"))
            sums["js"] += float(0.5 * F.kl_div(m, lp, log_target=True, reduction="sum")
                                + 0.5 * F.kl_div(m, lq, log_target=True, reduction="sum"))
            sums["top1_agreement"] += float((lp.argmax(-1) == lq.argmax(-1)).sum())
            count += lp.shape[0]
    return {k: v / count for k, v in sums.items()}
