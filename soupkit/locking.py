"""One writer per output: an exclusive advisory lock held for as long as a command writes.

Why: the "output exists, pass --force" check runs when a command starts, so two processes aimed
at one output both passed it and both reported success while one silently replaced or interleaved
the other's results (issue #16). A writer now takes ``writing([OUT])`` before its first look at
``OUT`` and keeps it until the last byte is written; a second writer fails at once, in one line
naming the output and the process holding it, and touches nothing.

Where the lock lives: ``.NAME.lock`` beside the output, in its parent directory. Not inside it,
because merge, eval and the trainers write a temporary sibling and rename it over ``OUT`` (and
``--force`` renames the old one away), which would carry a lock file inside with it. The parent
survives every rename, ``--force`` and ``--resume``, and two spellings of one path (relative,
absolute, through a symlink) resolve to one lock file.

Why ``flock``: the kernel drops the lock when its process dies, ``kill -9`` included, so a dead
run never leaves a stale lock that blocks ``--resume`` (a left-over lock *file* locks nothing).
The file is removed on release while still locked; a process that locked a file just removed
sees that its inode is no longer at the path and tries again (the usual unlink-while-locked
protocol), so removal cannot let two writers in.

Readers are never blocked: ``check_not_being_written(path)`` only peeks (a shared lock taken and
dropped at once) and refuses to read what another process is still writing. A writer retries for
``GRACE`` seconds before giving up, so a reader's peek is never mistaken for a writer.

Under torchrun / accelerate launch only the main process (rank 0, the one that writes) locks; it
tells the other ranks through the launcher's store whether it holds the locks, and all of them
stop with the same line when it does not, before any of them loads a model or trains.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from soupkit.errors import SoupkitError
from soupkit.launch import main_process, processes

GRACE = 0.5
"""Seconds a writer retries a held lock: long against a reader's peek, short against a real run."""
_HELD: dict[Path, int] = {}
"""Lock files this process holds, with their descriptors: taking one again is a no-op (nesting)."""
_agreements = 0


def lock_file(out: str | Path) -> Path:
    """``.NAME.lock`` beside ``out`` (symlinks and relative parts resolved)."""
    real = Path(os.path.realpath(out))
    return real.parent / f".{real.name or 'root'}.lock"


class Held:
    """The locks one ``writing`` block holds; ``release(out)`` lets one go early."""

    def __init__(self) -> None:
        self.paths: dict[Path, Callable[[], None]] = {}

    def release(self, out: str | Path) -> None:
        drop = self.paths.pop(lock_file(out), None)
        if drop is not None:
            drop()

    def release_all(self) -> None:
        for out in list(self.paths):
            self.paths.pop(out)()


@contextlib.contextmanager
def writing(outputs: Iterable[str | Path], keep: Callable[[Path], bool] | None = None) -> Iterator[Held]:
    """Hold the write lock of every output for the body, or raise a one-line ``SoupkitError``.

    ``keep(out)`` is asked right after ``out`` is locked (so it may look at ``out`` safely); a
    False answer releases that lock at once (``soupkit run`` does so for complete stages it skips,
    which stay open to readers). Locks this process already holds are nested, not retaken.
    """
    held, error = Held(), None
    try:
        if main_process():
            error = _take_all(held, [Path(o) for o in outputs], keep)
        _agree(error)
        yield held
    finally:
        held.release_all()


def _take_all(held: Held, outputs: list[Path], keep: Callable[[Path], bool] | None) -> str | None:
    """Lock each output in order; returns the one-line error of the first that is busy (holding none)."""
    try:
        for out in outputs:
            release = _acquire(out)
            if release is not None:
                held.paths[lock_file(out)] = release
            if keep is not None and not keep(out):
                held.release(out)
    except SoupkitError as exc:
        held.release_all()
        return str(exc)
    return None


def _acquire(out: Path) -> Callable[[], None] | None:
    """Take ``out``'s lock; returns its release (None when this process already holds it)."""
    path = lock_file(out)
    if path in _HELD:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SoupkitError(f"output {out}: cannot create its directory {path.parent} ({exc.strerror})") from None
    deadline = time.monotonic() + GRACE
    while True:
        fd = _locked_fd(path)
        if fd is not None:
            _HELD[path] = fd
            os.write(fd, (json.dumps(_me()) + "\n").encode())
            return lambda: _release(path)
        if time.monotonic() > deadline:
            raise SoupkitError(f"output {out} is being written by another process ({describe(path)}); "
                               "nothing was changed: wait for it to finish or pick another output")
        time.sleep(0.02)


def _locked_fd(path: Path) -> int | None:
    """An exclusively locked, emptied descriptor of ``path``, or None while another process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise SoupkitError(f"cannot create the lock file {path} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            return fd
        os.close(fd)  # its holder removed it between our open and our lock: take the new one


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _release(path: Path) -> None:
    fd = _HELD.pop(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # still locked here, so nobody can be holding the file we remove
    os.close(fd)


def _me() -> dict[str, object]:
    """Who holds the lock: shown to a second writer or a reader."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py":
        argv[:1] = ["python", "-m", Path(argv[0]).parent.name]
    elif argv:
        argv[0] = Path(argv[0]).name
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(argv)[:300],
            "started": started}


def describe(path: Path) -> str:
    """``pid N on HOST, started T: COMMAND`` from a lock file (its holder writes it just after locking)."""
    for _ in range(10):
        try:
            info = json.loads(path.read_text())
            return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.02)
    return "a process that left no details"


def writer_of(path: str | Path) -> str | None:
    """Who is writing ``path`` or a directory holding it (another process), or None."""
    real = Path(os.path.realpath(path))
    for candidate in (real, *real.parents):
        lock = candidate.parent / f".{candidate.name or 'root'}.lock"
        if lock not in _HELD and lock.is_file() and _busy(lock):
            return describe(lock)
    return None


def _busy(lock: Path) -> bool:
    """Whether another process holds ``lock``: peeks with a shared lock, retried for ``GRACE`` so
    that a lock taken and let go at once (``soupkit run`` looking at a stage it skips) is not busy."""
    deadline = time.monotonic() + GRACE
    while True:
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return False  # removed: its writer has finished
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            if time.monotonic() > deadline:
                return True
        finally:
            os.close(fd)
        time.sleep(0.02)


def check_not_being_written(paths: Iterable[str | Path], what: str) -> None:
    """Refuse to read an input that another process is still writing (a partial result). Paths
    that do not exist are left to the caller's own "not found" (a Hub id, an output renamed into
    place only when complete)."""
    for path in paths:
        holder = writer_of(path) if Path(path).exists() else None
        if holder is not None:
            raise SoupkitError(f"{what} {path} is still being written ({holder}); wait for it to finish")


def _agree(error: str | None) -> None:
    """Under a multi-process launch the main process tells the others whether it holds the locks,
    through the TCP store torchrun's agent runs for the launch (no process group exists yet), so
    they raise the same line instead of starting to train. Launchers without an agent store: the
    others would wait for the main process in their first collective and be stopped with it."""
    global _agreements
    _agreements += 1
    if processes() == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        if error is not None:
            raise SoupkitError(error)
        return
    from torch.distributed import TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=_dt.timedelta(minutes=30))
    key = f"soupkit/writing/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_agreements}"
    if main_process():
        store.set(key, error or "")
    else:
        error = store.get(key).decode() or None
    if error is not None:
        raise SoupkitError(error)
