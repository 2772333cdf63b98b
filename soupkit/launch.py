"""Which process this is under torchrun / accelerate launch, read from the launcher's environment
(``WORLD_SIZE``, ``RANK``), so it can be asked before any process group exists and without
importing torch or accelerate. Without a launcher: one process, the main one."""

from __future__ import annotations

import os


def processes() -> int:
    """How many processes the launch started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def main_process() -> bool:
    """True in rank 0, the process that writes outputs, markers and logs."""
    return int(os.environ.get("RANK", "0")) == 0
