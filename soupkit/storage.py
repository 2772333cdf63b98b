"""Output safety: never a partial result or a clobbered directory, and disk faults met before
they cost work (or told in one line when they cannot be).

An output is written into a temporary sibling and renamed into place at the end; an existing
non-empty output is replaced only with ``--force``.

A full disk or a read-only output used to surface as a traceback after the work was done (a merge
that had read every weight, an align run hours in). So: the output is probed for writability and
its filesystem for free space before heavy work, and an I/O error while writing becomes one
``SoupkitError`` naming the file, the cause and what is left intact.

No heavy imports here: ``soupkit merge`` calls this before loading anything.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from soupkit.errors import SoupkitError


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (where a new directory would be created)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    return shutil.disk_usage(nearest_existing(path)).free


def human_bytes(n: float) -> str:
    """``2.2 GB``, ``100.0 MB``, ``512 B`` (decimal units, as ``df -H`` prints them)."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def check_free_space(path: Path, needed: int, what: str, kept: str = "") -> None:
    """Refuse when the filesystem of ``path`` has less than ``needed`` bytes free; ``kept`` says
    what stays intact (a refusal mid-run)."""
    free = free_bytes(path)
    if needed > free:
        raise SoupkitError(f"{what} needs {human_bytes(needed)} but {nearest_existing(path)} has only "
                           f"{human_bytes(free)} free; free some space or write elsewhere"
                           + (f"; {kept}" if kept else ""))


def check_writable(out: Path, into: bool = False) -> None:
    """Refuse an output that cannot be written, before any model loads.

    Atomic outputs are written as a temporary sibling and renamed, so the directory that must take
    new files is the parent; ``into`` is for outputs written inside (align's OUT). A real file is
    created and removed: permission bits do not stop root, a read-only filesystem does.
    """
    out = Path(out)
    where = out if into and out.is_dir() else nearest_existing(out.parent)
    if not where.is_dir():
        raise SoupkitError(f"output {out}: {where} is a file, not a directory")
    try:
        _probe(where)
    except OSError as exc:
        raise SoupkitError(f"output {out}: cannot write in {where} ({_cause(exc)})") from None


def _probe(directory: Path) -> None:
    fd, name = tempfile.mkstemp(prefix=".soupkit-probe-", dir=directory)
    os.close(fd)
    os.unlink(name)


@contextmanager
def write_errors(target: Path, kept: str | Callable[[], str]) -> Iterator[None]:
    """Turn an I/O error raised while writing ``target`` into one line: the file, the cause, and
    ``kept`` (what is still intact, e.g. which checkpoint ``--resume`` will use; a callable is
    asked when the error comes, for a run that checkpoints inside the block)."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not _torch_write_failure(exc):
            raise
        where = getattr(exc, "filename", None) or target
        raise SoupkitError(f"cannot write {where}: {_cause(exc)}; {kept() if callable(kept) else kept}") from None


def _torch_write_failure(exc: RuntimeError) -> bool:
    """``torch.save(obj, path)`` reports a full disk as a RuntimeError from its zip writer."""
    return any(mark in str(exc) for mark in ("PytorchStreamWriter", "inline_container"))


def _cause(exc: BaseException) -> str:
    """``No space left on device`` from an OSError, or the library's message (safetensors)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.strerror or errno.errorcode.get(exc.errno, str(exc))
    if isinstance(exc, RuntimeError):
        return f"torch.save failed, is the disk full? ({str(exc).strip().splitlines()[0]})"
    return str(exc).strip() or type(exc).__name__


def dir_is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def check_output_free(out: Path, force: bool) -> None:
    """Refuse an existing non-empty output unless ``force``."""
    if dir_is_nonempty(out) and not force:
        raise SoupkitError(f"output {out} already exists and is not empty; pass --force to replace it")


@contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out`` by renames.

    Nothing is written at ``out`` until the body succeeds, and an existing non-empty ``out`` is
    only replaced with ``force``. On failure the temporary directory is removed.
    """
    out = Path(out)
    check_output_free(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is a normal directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, out: Path) -> None:
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
