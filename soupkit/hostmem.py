"""Host memory kept for reuse on a CPU run (glibc only).

glibc's ``malloc`` serves every allocation above its mmap threshold (at most 32 MiB by default)
with a fresh ``mmap`` and returns it to the kernel on ``free``. A PPO step on a CPU allocates and
frees the same large tensors (logits over the vocabulary, activations, gradients) every step, so
each step faults every one of their pages in again: on SmolLM2-135M 150,000-200,000 minor faults
(600-800 MB) per policy + critic forward and backward, on a VM where a fault costs several
microseconds. Raising the mmap and trim thresholds keeps freed memory in the process's heap, where
the next step reuses it without a fault: the same effect as the jemalloc or tcmalloc preload that
PyTorch's CPU performance guide recommends, without a preload (benchmarks/README.md: the SmolLM2
PPO job 49.9 s -> 44.3 s). The price: resident memory no longer shrinks after a peak, and glibc's
aligned allocations reuse freed blocks imperfectly, so the heap grows by some fragments over the
first steps (that job's peak, measured before policy and critic were updated one at a time:
6871 -> 7082 MiB).

``SOUPKIT_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LIMIT = 1 << 30
"""Allocations up to 1 GiB come from the heap; larger ones are still mapped and unmapped."""
_TRIM = (1 << 31) - 1
"""The heap gives memory back to the kernel only when 2 GiB at its top are free (mallopt takes an int)."""

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for the rest of the process (once); True when they
    are raised. A no-op (False) off glibc, or with ``SOUPKIT_KEEP_FREED_MEMORY=0``."""
    global _done
    if _done:
        return True
    if os.environ.get("SOUPKIT_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM))
    return _done
