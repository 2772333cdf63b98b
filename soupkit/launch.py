"""Facts of the launch, read from the launcher's environment and nowhere else: which process this is
under torchrun / accelerate launch (``WORLD_SIZE``, ``RANK``), and whether accelerate set up
DeepSpeed or FSDP. They can be asked before any process group exists and without importing torch
or accelerate, so an unsupported combination is refused before any model loads. Without a
launcher: one process, the main one."""

from __future__ import annotations

import logging
import os


def processes() -> int:
    """How many processes the launch started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def main_process() -> bool:
    """True in rank 0, the process that writes outputs, markers and logs."""
    return int(os.environ.get("RANK", "0")) == 0


def deepspeed_launch() -> bool:
    """Whether ``accelerate launch`` started this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def fsdp_launch() -> bool:
    """Whether ``accelerate launch`` started this process with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def sharded_launch() -> str | None:
    """``"fsdp2"``, ``"zero3"`` or None: whether the launch shards the trained weights over processes,
    read from the variables ``accelerate launch`` sets (``FSDP_VERSION``, ``ACCELERATE_DEEPSPEED_ZERO_STAGE``)."""
    if fsdp_launch():
        return "fsdp2" if os.environ.get("FSDP_VERSION", "1") == "2" else "fsdp1"
    if deepspeed_launch() and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "zero3"
    return None


def check_launch(lora_rank: int = 0) -> None:
    """Refuse, before any model loads, a launch that align cannot train under."""
    from soupkit.errors import SoupkitError

    kind = sharded_launch()
    if kind == "fsdp1":
        raise SoupkitError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                           "(configs/accelerate/fsdp.yaml)")
    if lora_rank and kind:
        raise SoupkitError("lora_rank under FSDP or DeepSpeed ZeRO-3 is not supported: a LoRA policy's "
                           "gradients and optimiser state are small, use DDP (configs/accelerate/ddp.yaml)")


def quiet_deepspeed_detection() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU" warning unless this is a DeepSpeed launch.

    accelerate and transformers import deepspeed whenever it is installed (e.g. to unwrap a model
    before saving), and its accelerator detection warns on every machine without CUDA. The filter
    goes on DeepSpeed's logger before that import: the import resets the logger's level, not its filters.
    """
    if not deepspeed_launch():
        logging.getLogger("DeepSpeed").addFilter(_not_cpu_fallback)


def _not_cpu_fallback(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Setting accelerator to CPU")
