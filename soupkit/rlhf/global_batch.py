"""One PPO batch spread over P processes, with maths that does not depend on P.

``batch_size`` prompts per process make a global batch of ``batch_size * P`` rows; rank r of P holds
rows r, r + P, ... . Whitening, loss normalisation and metrics use statistics of the whole global
batch, gathered or summed over processes here, so a run on 1 process and on P processes with the
same global batch compute the same numbers. On one process every function is the local computation.
"""

from __future__ import annotations

from typing import Any

import torch

from soupkit.rlhf.advantage import masked_mean, masked_var, whiten_with


def global_batch_size(accelerator: Any, batch_size: int) -> int:
    """Rows in the global batch: ``batch_size`` per process."""
    return batch_size * accelerator.num_processes


def my_rows(accelerator: Any, batch_size: int) -> list[int]:
    """This process's rows of the global batch (rank r of P holds rows r, r + P, ...)."""
    acc = accelerator
    return list(range(global_batch_size(acc, batch_size)))[acc.process_index::acc.num_processes]


def gather_rows(accelerator: Any, x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every process, padded with 0 to the longest response. (b, ...) -> (P b, ...)."""
    acc = accelerator
    if acc.num_processes == 1:
        return x
    return acc.gather(acc.pad_across_processes(x.float(), dim=1) if x.dim() > 1 else x.float())


def whiten_global(accelerator: Any, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``whiten`` with the mean and variance of the global batch. Shapes: (b, t), (b, t) -> (b, t)."""
    every, every_mask = gather_rows(accelerator, x), gather_rows(accelerator, mask)
    return whiten_with(x, mask, masked_mean(every, every_mask), masked_var(every, every_mask), shift_mean)


def token_share(accelerator: Any, mask: torch.Tensor) -> torch.Tensor:
    """This process's share of the micro-batch's valid tokens across processes (1 on one process).

    DDP averages gradients over P processes, so scaling each process's token-mean loss by
    ``P * share`` makes the update that of the token mean over the global micro-batch.
    """
    local = mask.sum().float()
    return local / accelerator.reduce(local.clone(), "sum").clamp(min=1)


def sum_over_processes(accelerator: Any, stats: dict[str, list[torch.Tensor]]) -> dict[str, list[float]]:
    """Token-share-weighted statistics (0-d tensors, one per micro-batch) summed over processes:
    global token means per micro-batch. One reduction and one device-to-host copy for all of them."""
    if not stats:
        return {}
    keys = list(stats)
    summed = accelerator.reduce(torch.stack([torch.stack(stats[k]) for k in keys]), "sum")
    return {k: row.tolist() for k, row in zip(keys, summed)}
