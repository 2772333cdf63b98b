"""Graceful stop on SIGTERM / SIGINT: finish the current step, checkpoint it, leave with one line.

A cluster scheduler sends SIGTERM some seconds before it preempts a job, and Ctrl-C is SIGINT;
dying at once loses every step since the last checkpoint. The first signal only raises a flag the
training loop reads between steps; a second one takes the default action at once (the user means
it, and atomic writes keep every finished checkpoint intact).

Under torchrun the signal may reach one process, or each at a different moment, so the loop asks
``agreed()`` each step: one all-reduce (max) of the flag, after which every process stops after the
same step (each would otherwise wait forever in the next collective of the others).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):  # noqa: N818 - it reports a request, not a fault
    """Training stopped on a signal after ``step``, checkpointed at ``checkpoint``.

    Not a ``SoupkitError``: nothing is wrong. The CLI prints the message and exits with the
    conventional code for the signal (128 + number: 143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, step: int, checkpoint: Path, signum: int, hint: str = "continue with --resume",
                 message: str | None = None):
        self.step, self.checkpoint, self.signum, self.hint = step, checkpoint, signum, hint
        super().__init__(message or f"stopped at step {step}; checkpoint {checkpoint}; {hint}")

    @classmethod
    def after(cls, name: str, output: Path, signum: int) -> Stopped:
        """A stop between two pieces of work: ``name`` finished (its output is complete)."""
        return cls(0, output, signum, message=f"stopped after {name}, which is complete ({output}); "
                                              "rerun soupkit run to continue")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_DEFERRED = {"signum": 0}


def defer(signum: int) -> None:
    """Record a stop request that came while a run's last step was being taken: that run finished
    (nothing to checkpoint), and whoever runs the next piece of work must not start it."""
    _DEFERRED["signum"] = signum


def deferred() -> int:
    """The signal of a stop request a finished run left behind (0 = none); reading it clears it."""
    signum, _DEFERRED["signum"] = _DEFERRED["signum"], 0
    return signum


class GracefulStop:
    """A context that catches SIGTERM and SIGINT while training; ``signum`` is 0 until one comes.

    Handlers are installed only from the main thread (Python allows no other) and the previous
    ones are put back on exit.
    """

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:  # the second signal: stop now, as if soupkit had installed nothing
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.announce:
            print(f"{signal.Signals(signum).name}: stopping after the current step and writing a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    def agreed(self, device: Any = "cpu") -> int:
        """The signal any process has received (0 = none), the same answer on every process.

        With a process group this is a collective: every process must call it at the same step.
        """
        import torch

        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
