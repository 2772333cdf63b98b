"""Under torchrun with the ZeRO-3 launch environment: ``full_weights`` on a DeepSpeed engine gives
whole weights that stay whole inside the block, whatever number of forwards each process runs.

Rank r runs r + 1 forwards inside the block (as sampling does when one process's responses all
end early); each must equal an unsharded copy of the model, and training through the engine must
work afterwards (its gather hooks are back). Prints one ``ok`` line per rank.

Usage: torchrun --nproc_per_node 2 tests/rlhf/zero3_gather_check.py MODEL_DIR
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from transformers import AutoModelForCausalLM

from soupkit.rlhf.sharding import full_weights, sharding


def main(model_dir: str) -> None:
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # before DeepSpeed: unsharded
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    engine, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert sharding(engine) == "zero3", sharding(engine)
    ids = torch.tensor([[5, 6, 7, 8]])
    want = plain(input_ids=ids).logits
    rank = accelerator.process_index
    worst = 0.0
    with torch.no_grad(), full_weights(engine):
        for _ in range(rank + 1):
            got = engine.module(input_ids=ids).logits
            worst = max(worst, (got - want).abs().max().item())
    assert worst < 1e-5, worst
    loss = engine(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    optimizer.step()
    assert torch.isfinite(loss), loss
    print(f"ok rank {rank}: {rank + 1} forwards, max |diff| {worst:.2e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
