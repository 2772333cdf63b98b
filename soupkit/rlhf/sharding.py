"""Whole weights and whole optimiser state from a sharded policy + critic (FSDP2, DeepSpeed ZeRO).

Under FSDP full shard or ZeRO-3 each process holds a slice of every trained weight; the wrapper's
own ``forward`` gathers them layer by layer, but the rollout calls the policy *outside* that forward
(token-by-token sampling, log-probs, values) and the checkpoint writer reads ``state_dict()``.
``full_weights`` gathers the weights of the whole module or of one part of it for a block (the
cost: one whole copy of that part per process while it lasts, as in TRL's and OpenRLHF's
generation under ZeRO-3), without writing anything back. Under DDP or on one process it does
nothing.

``full_state_dicts``, ``full_optimizer_state`` / ``load_optimizer_state`` read whole weights and
the optimiser state keyed by parameter name, unsharded, in one format for every launch (none, DDP,
FSDP2, DeepSpeed ZeRO-2 / ZeRO-3), so a checkpoint is not tied to the launch that wrote it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from soupkit.errors import SoupkitError


def sharding(module: torch.nn.Module) -> str | None:
    """``"fsdp2"``, ``"zero3"`` or None (whole weights on every process). FSDP version 1 never
    gets here: ``launch.check_launch`` refuses it before any model loads."""
    from torch.distributed.fsdp import FSDPModule

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
        with _fsdp2_unsharded(module, part):
            yield
    else:
        import deepspeed

        params = [p for p in part.parameters() if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None), \
                _zero3_hooks_off(_deepspeed_engine(module)):
            yield


@contextmanager
def _zero3_hooks_off(engine: Any) -> Iterator[None]:
    """A ZeRO-3 engine's module hooks gather each layer before its forward and release it after,
    each gather a collective. Inside ``full_weights`` that would re-gather layer by layer for every
    sampled token, and a process whose responses all ended early would run fewer forwards than
    the others and desynchronise the collectives. So the hooks come off for the block and go back
    on after it (DeepSpeed 0.19.8's offload object; TRL does the same for generation)."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:
        yield
        return
    from deepspeed.runtime.zero import parameter_offload

    for param in offload.module.parameters():
        param.ds_active_sub_modules.clear()
    offload.destroy()  # removes the forward/backward hooks
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload.setup_zero_stage3_hooks()
        stack = parameter_offload.FWD_MODULE_STACK  # setup pushes the module again: keep one entry
        if len(stack) > 1 and stack[-1] is offload.module and stack[-2] is offload.module:
            stack.pop()


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
    try:
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
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
    else:  # ZeRO-3: one part gathered at a time, copied to the CPU on the main process only
        main, parts = torch.distributed.get_rank() == 0, {}
        for name in names:
            part = inner.get_submodule(name)
            with full_weights(module, part):
                parts[name] = {k: v.detach().cpu().clone() for k, v in part.state_dict().items()} if main else {}
        return parts
    return {name: {k[len(name) + 1:]: v for k, v in every.items() if k.startswith(name + ".")} for name in names}


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_optimizer_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimiser state keyed by parameter name, whole and on the CPU, in the layout of torch's
    ``get_optimizer_state_dict(..., full_state_dict=True)``: ``{"state": {name: {...}},
    "param_groups": [{..., "params": [names]}]}``. A collective under FSDP2 and DeepSpeed.
    ``optimizer`` may be accelerate's wrapper."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    engine = _deepspeed_engine(model)
    if engine is not None:
        return _zero_optimizer_state(engine)
    return get_optimizer_state_dict(model, _inner(optimizer), options=_options(cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load ``full_optimizer_state``'s output; each process keeps its own shard of it."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    engine = _deepspeed_engine(model)
    target = engine.optimizer.optimizer if engine is not None else _inner(optimizer)
    # Hyperparameters the target optimiser knows: DeepSpeed may run its own Adam (CPU offload) with
    # extra group keys such as bias_correction, which torch's AdamW does not take, and vice versa.
    groups = [{k: v for k, v in saved.items() if k == "params" or k in mine}
              for saved, mine in zip(state["param_groups"], target.param_groups)]
    state = {**state, "param_groups": groups}
    if engine is not None:
        _load_zero_optimizer_state(engine, state)
    else:
        set_optimizer_state_dict(model, _inner(optimizer), state, options=_options())


def _deepspeed_engine(model: torch.nn.Module) -> Any:
    """``model`` when it is a DeepSpeed engine (deepspeed is only looked up if already imported)."""
    deepspeed = sys.modules.get("deepspeed")
    return model if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine) else None


def _zero_optimizer_state(engine: Any) -> dict[str, Any]:
    """DeepSpeed ZeRO keeps Adam's moments as fp32 slices of flattened partitions; DeepSpeed's
    fragment API reassembles each parameter's whole moment (a collective) under its name."""
    from deepspeed.utils import safe_get_full_optimizer_state

    _link_moments(engine)
    inner = engine.optimizer.optimizer  # the torch optimizer over this process's fp32 partitions
    first = next(iter(inner.state.values()), {})
    keys, step = [k for k in first if k != "step"], first.get("step")
    main = torch.distributed.get_rank() == 0
    state: dict[str, dict[str, Any]] = {}
    for name, param in _trained_parameters(engine):
        whole = {k: safe_get_full_optimizer_state(param, k) for k in keys}  # every process gathers
        if any(v is None for v in whole.values()):
            raise SoupkitError(f"checkpoint: DeepSpeed has no optimiser state for {name}")
        if main:  # only the writer keeps a CPU copy
            state[name] = {k: v.detach().float().cpu() for k, v in whole.items()}
            if step is not None:
                state[name]["step"] = torch.as_tensor(step).detach().float().cpu().clone()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    for group, names in zip(groups, _group_names(engine)):
        group["params"] = names
    return {"state": state, "param_groups": groups}


def _load_zero_optimizer_state(engine: Any, saved: dict[str, Any]) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    inner = engine.optimizer.optimizer
    keys = sorted({k for entry in saved["state"].values() for k in entry if k != "step"})
    _create_moments(engine, keys)
    _link_moments(engine)
    names = [name for name, _ in _trained_parameters(engine)]
    missing = sorted(set(names) - set(saved["state"]))
    if missing:
        raise SoupkitError(f"--resume: the checkpoint has no optimiser state for {missing[0]} "
                           f"(and {len(missing) - 1} more parameters)")
    for name, param in _trained_parameters(engine):
        for key, value in saved["state"][name].items():
            if key != "step":
                safe_set_full_optimizer_state(param, value.to(param.device, torch.float32), key)
    step = next((entry["step"] for entry in saved["state"].values() if "step" in entry), None)
    for entry in inner.state.values():  # one entry per flat partition, each with its own step count
        if step is not None and "step" in entry:
            old = entry["step"]
            entry["step"] = (torch.tensor(float(step), dtype=old.dtype, device=old.device) if torch.is_tensor(old)
                             else type(old)(float(step)))
    for group, saved_group in zip(inner.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})


@torch.no_grad()
def _create_moments(engine: Any, keys: list[str]) -> None:
    """Adam creates its moments at its first step, and a resumed run has not stepped yet: give each
    of this process's flat fp32 partitions zero moments (``keys``) and a step count, to be
    overwritten from the checkpoint next."""
    zero = engine.optimizer
    inner = zero.optimizer
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups", [])
    torch_counts = type(inner).__module__.startswith("torch.optim")  # torch keeps step as a tensor
    for flat in flats:
        entry = inner.state[flat]
        for key in keys:
            entry.setdefault(key, torch.zeros_like(flat))
        entry.setdefault("step", torch.tensor(0.0) if torch_counts else 0)


def _link_moments(engine: Any) -> None:
    """ZeRO-1/2 map each parameter to its slice of Adam's moments once, right after the first
    optimiser step of the first group, when the later groups (here the critic) have no moments yet,
    so theirs stay unmapped (DeepSpeed 0.19.8). Map them again now that every group has them."""
    zero = engine.optimizer
    if getattr(zero, "_hp_optimizer_states_linked", None) is not None and len(zero.optimizer.state):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _trained_parameters(engine: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _group_names(engine: Any) -> list[list[str]]:
    """Parameter names per optimiser group: soupkit's optimiser has the policy's trainable
    parameters in group 0 and the critic's in group 1 (``trainer._optimizer``)."""
    names = [name for name, _ in _trained_parameters(engine)]
    return [[n for n in names if n.startswith("policy.")], [n for n in names if n.startswith("critic.")]]


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)
