"""Real processes against one output, at known points instead of timer races.

``hold(path)``: a helper process that holds ``path``'s write lock until the block ends.
``Paused``: the soupkit CLI in a subprocess that stops inside a library function on its N-th call
(writes ``SYNC/ready``, waits for ``SYNC/go``), so a test can act while it holds its lock mid-write.
Run as a script: ``python -m tests.concurrency SYNC module:function N soupkit-args...``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
HOLD = ("import sys\nfrom soupkit.locking import writing\nwith writing([sys.argv[1]]):\n"
        "    print('held', flush=True)\n    sys.stdin.read()\n")


@contextlib.contextmanager
def hold(path: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``path``'s write lock (its pid is ``.pid``) for the block."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=ROOT, env=ENV, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()


def soupkit(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m soupkit ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "soupkit", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


class Paused:
    """``soupkit ARGS`` in a subprocess, stopped on the ``call``-th call of ``target`` until ``go()``."""

    def __init__(self, sync: Path, target: str, call: int, *args: str):
        sync.mkdir(parents=True, exist_ok=True)
        self.sync = sync
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.concurrency", str(sync), target, str(call), *args],
                                     cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not (self.sync / "ready").exists():
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.stderr.read())
            assert time.monotonic() < deadline, "the paused command never reached its pause"
            time.sleep(0.02)

    def go(self, timeout: int = 300) -> tuple[int, str]:
        """Let it finish; returns its exit code and stderr."""
        (self.sync / "go").touch()
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


def _pause_in(sync: Path, target: str, call: int) -> None:
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    original, calls = getattr(module, name), []

    def paused(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            (sync / "ready").write_text(str(os.getpid()))
            while not (sync / "go").exists():
                time.sleep(0.01)
        return original(*args, **kwargs)

    setattr(module, name, paused)


if __name__ == "__main__":
    _pause_in(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
    sys.argv = ["soupkit", *sys.argv[4:]]
    from soupkit.cli import main

    main()
