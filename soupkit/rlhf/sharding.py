"""Whole weights and whole optimiser state from a sharded policy + critic (FSDP2, DeepSpeed ZeRO-3).

Under FSDP full shard or ZeRO-3 each process holds a slice of every trained weight; the wrapper's
own ``forward`` gathers them layer by layer, but the rollout calls the policy *outside* that forward
(token-by-token sampling, log-probs, values, the LoRA reference with its adapter off) and the
checkpoint writer reads ``state_dict()``. ``full_weights`` gathers every weight for the duration
(the cost: one whole copy of policy + critic per process while it lasts, as in TRL's and OpenRLHF's
generation under ZeRO-3), without writing anything back. Under DDP or on one process it does
nothing.

``full_state_dicts``, ``full_optimizer_state`` / ``load_optimizer_state`` read whole weights and
the optimiser state keyed by parameter name, unsharded, so a checkpoint resumes under any process
count and any of none / DDP / FSDP2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from soupkit.errors import SoupkitError


def sharding(module: torch.nn.Module) -> str | None:
    """``"fsdp2"``, ``"zero3"`` or None (whole weights on every process)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        raise SoupkitError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                           "(configs/accelerate/fsdp.yaml)")
    if any(isinstance(m, FSDPModule) for m in module.modules()):
        return "fsdp2"
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        return "zero3"
    return None


@contextmanager
def full_weights(module: torch.nn.Module | None, part: torch.nn.Module | None = None,
                 modify: bool = False) -> Iterator[None]:
    """The parameters of ``part`` (a submodule of ``module``; default: all of it) whole on this
    process inside the block (a collective: every process must enter it). Nothing is written back
    to the shards, unless ``modify`` (ZeRO-3 only: the main process's changes are scattered back
    on exit)."""
    kind = sharding(module) if isinstance(module, torch.nn.Module) else None
    part = module if part is None else part
    if kind is None:
        yield
    elif kind == "fsdp2":
        if modify:
            raise SoupkitError("internal: FSDP2 weights cannot be modified through full_weights")
        with _fsdp2_unsharded(module, part):
            yield
    else:
        import deepspeed

        params = [p for p in part.parameters() if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield


def zero3_loading() -> bool:
    """True when transformers loads models partitioned (``deepspeed.zero.Init``): under ZeRO-3,
    once accelerate has set it up, every ``from_pretrained`` - frozen models too - is sharded."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


@contextmanager
def _fsdp2_unsharded(module: torch.nn.Module, part: torch.nn.Module) -> Iterator[None]:
    """All-gather once every FSDP2 unit that holds weights of ``part`` (the units inside it and
    the ones around it, such as the root holding the embeddings); inner forwards then neither
    gather nor reshard (reshard-after-forward is switched off for the block, as torch documents
    for evaluation)."""
    from torch.distributed.fsdp import FSDPModule

    every = [m for m in module.modules() if isinstance(m, FSDPModule)]
    _init_roots(every)
    inside = {id(m) for m in part.modules()}
    units = [u for u in every if id(u) in inside or any(m is part for m in u.modules())]
    reshard_after = [_reshards_after_forward(u) for u in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, again in zip(units, reshard_after):
            unit.reshard()
            unit.set_reshard_after_forward(again, recurse=False)


def _init_roots(units: list[Any]) -> None:
    """FSDP2 picks its root lazily, as the first unit to run forward. Calling a layer before the
    root has ever run would make that layer a root and break the next training forward, so the
    outermost units are initialised as roots first (no public API for this in torch 2.13)."""
    inner = {id(sub) for unit in units for sub in list(unit.modules())[1:]}
    for unit in units:
        if id(unit) not in inner:
            unit._get_fsdp_state()._lazy_init()


def _reshards_after_forward(unit: Any) -> bool:
    """The unit's current setting (torch keeps it per parameter group, with no public getter)."""
    groups = getattr(unit._get_fsdp_state(), "_fsdp_param_groups", [])
    return any(getattr(g, "post_forward_mesh_info", None) is not None for g in groups)


def full_state_dicts(module: torch.nn.Module, names: tuple[str, ...]) -> dict[str, dict[str, Any]] | None:
    """Whole weights of the submodules ``names`` (dotted paths in ``module``) as plain state dicts
    on the CPU, on the main process ({} elsewhere); None when nothing is sharded (then each
    submodule's own ``state_dict()`` is whole). A collective: every process must call it.

    Under FSDP2 a module's ``state_dict()`` holds sharded DTensors even while it is unsharded, so
    the whole one comes from torch's distributed-checkpoint helper.
    """
    kind = sharding(module)
    if kind is None:
        return None
    inner = getattr(module, "module", module)  # a DeepSpeed engine holds the module
    if kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        every = get_model_state_dict(inner, options=_options(cpu_offload=True))
    else:
        import torch.distributed as dist

        with full_weights(module):
            main = dist.get_rank() == 0
            every = {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()} if main else {}
    return {name: {k[len(name) + 1:]: v for k, v in every.items() if k.startswith(name + ".")} for name in names}


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_optimizer_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimiser state keyed by parameter name, whole and on the CPU (a collective under
    FSDP2). ``optimizer`` may be accelerate's wrapper."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if sharding(model) == "zero3":
        raise SoupkitError("checkpoints under DeepSpeed ZeRO-3 are not supported yet (its optimiser state "
                           "stays sharded): use FSDP (configs/accelerate/fsdp.yaml) or --save-every 0")
    return get_optimizer_state_dict(model, _inner(optimizer), options=_options(cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load ``full_optimizer_state``'s output; each process keeps its own shard of it."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, _inner(optimizer), state, options=_options())


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)
