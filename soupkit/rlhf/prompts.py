"""Prompt sets (any TRL dataset format, ``soupkit.formats``) and the order they are visited in.

The order is a pure function of (seed, step), so a resumed run needs only the step number to
continue where it stopped (the "data position" of a checkpoint).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError
from soupkit.formats import Prompt, prompt_of, read_jsonl


def load_prompts(source: str, field: str = "prompt", split: str = "train", text: bool = False) -> list[Prompt]:
    """Prompts from ``.jsonl`` / a dataset (rows of any TRL format, see ``soupkit.formats``) or
    ``.txt`` (one per line): strings, or conversations ending before the answer."""
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        prompts: list[Prompt] = _read_txt(path)
    else:
        rows = read_jsonl(path, "prompts file") if path.suffix == ".jsonl" else _read_dataset(source, split)
        prompts = [prompt_of(row, where, field, text) for where, row in rows]
    if not prompts:
        raise SoupkitError(f"prompts {source}: no prompts found (the prompt set is empty)")
    return prompts


def _read_txt(path: Path) -> list[str]:
    if not path.is_file():
        raise SoupkitError(f"prompts file {path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_dataset(source: str, split: str) -> list[tuple[str, Any]]:
    """Rows of a saved dataset directory, or of a local/Hub dataset loadable by ``datasets``."""
    from soupkit.train.data import load_rows

    if not Path(source).expanduser().exists() and "/" not in source:
        raise SoupkitError(f"prompts {source!r} not found (expected .jsonl, .txt or a dataset)")
    data = load_rows(source, split, what="prompts")
    return [(f"{source} row {number}", row) for number, row in enumerate(data, start=1)]


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

    from soupkit.rlhf.rng import keyed_generator

    return torch.randperm(n, generator=keyed_generator(seed, epoch))
