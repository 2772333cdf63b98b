"""``soupkit align`` under torchrun with policy + critic sharded by FSDP2 on the CPU (gloo).

accelerate builds FSDP only on accelerators, so this stand-in does on the CPU what its FSDP2 path
does on GPUs: ``fully_shard`` every submodule whose class the module lists in
``_no_split_modules`` (the decoder layers), then the root, and an optimiser over the sharded
parameters. Everything else is the unchanged CLI.

Usage: torchrun --nproc_per_node 2 tests/rlhf/fsdp2_launch.py align ...
"""

from __future__ import annotations

import sys

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from soupkit.rlhf import trainer
from soupkit.rlhf.sharding import sharding


def shard(module, processes: int):
    """``fully_shard`` each layer whose class ``module`` lists in ``_no_split_modules``, then the root."""
    mesh = init_device_mesh("cpu", (processes,))
    layers = set(module._no_split_modules)
    assert layers, f"{type(module).__name__} lists no layer classes to shard"
    for sub in list(module.modules()):
        if type(sub).__name__ in layers:
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def prepare_fsdp2(accelerator, spec, models):
    module = shard(trainer.PolicyAndValue(models.policy, models.critic), accelerator.num_processes)
    if accelerator.is_main_process:
        print(f"sharding: {sharding(module)}", flush=True)
    return module, trainer._optimizer(spec, models)


if __name__ == "__main__":
    trainer.prepare_trained = prepare_fsdp2
    from soupkit.cli import main

    sys.argv[0] = "soupkit"
    sys.exit(main())
