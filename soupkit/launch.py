"""Which process this is under torchrun / accelerate launch, read from the launcher's environment
(``WORLD_SIZE``, ``RANK``), so it can be asked before any process group exists and without
importing torch or accelerate. Without a launcher: one process, the main one."""

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
