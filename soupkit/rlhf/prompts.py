"""Prompt sets and the order they are visited in.

The order is a pure function of (seed, step), so a resumed run needs only the step number to
continue where it stopped (the "data position" of a checkpoint).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from soupkit.errors import SoupkitError


def load_prompts(source: str, field: str = "prompt", split: str = "train") -> list[str]:
    """Prompts from ``.jsonl`` (``field`` per line), ``.txt`` (one per line) or a dataset
    (its ``split`` when it is a Hub dataset)."""
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        prompts = read_jsonl_field(path, (field,))
    elif path.suffix == ".txt":
        prompts = _read_txt(path)
    else:
        prompts = _read_dataset(source, field, split)
    if not prompts:
        raise SoupkitError(f"prompts {source}: no prompts found (the prompt set is empty)")
    return prompts


def _read_txt(path: Path) -> list[str]:
    if not path.is_file():
        raise SoupkitError(f"prompts file {path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_jsonl_field(path: Path, fields: tuple[str, ...]) -> list[str]:
    """The first of ``fields`` present on each line of a ``.jsonl`` file (errors name the line)."""
    if not path.is_file():
        raise SoupkitError(f"prompts file {path} not found")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SoupkitError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        value = next((record[f] for f in fields if f in record), None) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise SoupkitError(f"{path}:{number}: no string field {' or '.join(map(repr, fields))}")
        out.append(value)
    return out


def _read_dataset(source: str, field: str, split: str) -> list[str]:
    """A saved dataset directory, or a local/Hub dataset loadable by ``datasets``."""
    from soupkit.train.data import load_rows

    if not Path(source).expanduser().exists() and "/" not in source:
        raise SoupkitError(f"prompts {source!r} not found (expected .jsonl, .txt or a dataset)")
    data = load_rows(source, split, columns=[(field,)], what="prompts")
    return [p for p in data[field] if isinstance(p, str) and p.strip()]


def batch_indices(n_prompts: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Prompt indices for 0-based ``step``: a fresh permutation per pass over the set."""
    start = step * batch_size
    out = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n_prompts)
        out.append(int(_permutation(n_prompts, seed, epoch)[offset]))
    return out


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int):
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)
