"""A moving KL reference: the exponential moving average of the policy (``align.ref_ema``).

WARP (Ramé et al. 2024, arXiv 2406.16768, section 3.1) regularises RL towards an EMA of the
policy instead of the frozen SFT model: after every update, ``ref <- (1 - mu) * ref + mu * policy``.
Here the update follows every optimiser step (each minibatch of each PPO epoch), starting from the
run's reference. The EMA is held in float32 (bfloat16 would round away updates of size
``mu * (policy - ref)``) and saved in every checkpoint, so a resumed run continues the same
average. The KL to the starting policy is logged beside it as ``kl_init``.
"""

from __future__ import annotations

from typing import Any

import torch

from soupkit.errors import SoupkitError
from soupkit.launch import fsdp_launch
from soupkit.recipe import AlignSpec
from soupkit.rlhf.sharding import zero3_loading

INIT_WATCH = "init"
"""The watch model added by ``ref_ema``: the policy's start, so metrics carry ``kl_init``."""


def check(spec: AlignSpec) -> None:
    """Refuse the settings under which the reference is not one whole model the policy's size."""
    if spec.ref_ema is None:
        return
    if spec.lora_rank:
        raise SoupkitError("align.ref_ema: a moving reference needs the full policy weights; it does not work with "
                           "lora_rank (the reference would be the base, or a second adapter)")
    if len(spec.ref) > 1 and spec.ref_mode == "mean_kl":
        raise SoupkitError("align.ref_ema: one moving reference; several refs need ref_mode: soup")
    if fsdp_launch() or zero3_loading():
        raise SoupkitError("align.ref_ema: not supported with sharded weights (FSDP, DeepSpeed ZeRO-3); "
                           "use one process or DDP")


def with_init_watch(spec: AlignSpec) -> AlignSpec:
    """``spec`` with the policy's start watched as ``init`` (unless a watch of that name exists)."""
    if spec.ref_ema is None or INIT_WATCH in spec.watch:
        return spec
    return spec.model_copy(update={"watch": {INIT_WATCH: spec.init or spec.ref[0], **spec.watch}})


def prepare(ref: Any) -> Any:
    """The reference as the EMA keeps it: float32, its own tensors (never shared with the policy)."""
    return ref.float()


@torch.no_grad()
def update(ref: Any, policy: Any, mu: float) -> None:
    """``ref <- (1 - mu) * ref + mu * policy`` for every parameter, in place; ``ref`` and ``policy``
    have the same parameter names (a tied weight is one parameter and is updated once)."""
    theirs = dict(policy.named_parameters())
    for name, param in ref.named_parameters():
        param.mul_(1.0 - mu).add_(theirs[name].detach().to(param.device, param.dtype), alpha=mu)


def state(ref: Any) -> dict[str, torch.Tensor]:
    """The EMA weights for a checkpoint (CPU copies)."""
    return {name: p.detach().cpu().clone() for name, p in ref.named_parameters()}


@torch.no_grad()
def load(ref: Any, saved: dict[str, torch.Tensor] | None, where: str) -> None:
    """Put checkpointed EMA weights back; a checkpoint without them cannot continue the average."""
    if saved is None:
        raise SoupkitError(f"--resume: {where} holds no moving reference (align.ref_ema); it was written without "
                           "ref_ema, so the run cannot continue with one: start a new --out")
    params = dict(ref.named_parameters())
    if set(saved) != set(params):
        raise SoupkitError(f"--resume: {where}: the saved moving reference does not match the model's parameters")
    for name, param in params.items():
        param.copy_(saved[name])
