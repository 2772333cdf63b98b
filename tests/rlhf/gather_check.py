"""Under torchrun: ``full_weights`` gives whole weights that stay whole inside the block, whatever
number of forwards each process runs, for a DeepSpeed ZeRO-3 engine (run with the ZeRO-3 launch
environment) or an FSDP2-sharded model (``--fsdp2``, torch's ``fully_shard`` over gloo).

Rank r runs r + 1 forwards inside the block (as sampling does when one process's responses all
end early); each must equal an unsharded copy of the model, and a training step must work
afterwards (the wrapper's own gathering is back). Prints one ``ok`` line per rank.

Usage: torchrun --nproc_per_node 2 tests/rlhf/gather_check.py MODEL_DIR [--fsdp2]
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from transformers import AutoModelForCausalLM

from soupkit.rlhf.sharding import full_weights, sharding


def zero3(model_dir: str) -> tuple[Accelerator, torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    engine, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    return accelerator, engine, engine.module, optimizer


def fsdp2(model_dir: str) -> tuple[Accelerator, torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    from tests.rlhf.fsdp2_launch import shard

    accelerator = Accelerator(cpu=True)
    model = shard(AutoModelForCausalLM.from_pretrained(model_dir), accelerator.num_processes)
    return accelerator, model, model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def main(model_dir: str, mode: str) -> None:
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # before sharding: whole
    accelerator, wrapped, inner, optimizer = (fsdp2 if mode == "fsdp2" else zero3)(model_dir)
    assert sharding(wrapped) == mode, sharding(wrapped)
    ids = torch.tensor([[5, 6, 7, 8]])
    want = plain(input_ids=ids).logits
    rank = accelerator.process_index
    worst = 0.0
    with torch.no_grad(), full_weights(wrapped):
        for _ in range(rank + 1):
            worst = max(worst, (inner(input_ids=ids).logits - want).abs().max().item())
    assert worst < 1e-5, worst
    loss = wrapped(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    optimizer.step()
    assert torch.isfinite(loss), loss
    print(f"ok rank {rank}: {rank + 1} forwards, max |diff| {worst:.2e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], "fsdp2" if "--fsdp2" in sys.argv[2:] else "zero3")
