"""Writing a model directory: sharded safetensors streamed as tensors are produced, the config
and the tokenizer and generation files.

Each shard's header is computed up front from the planned shapes, so the output never has to sit
in memory (format: https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from soupkit.errors import SoupkitError
from soupkit.modeldir import CONFIG_DTYPE, STORAGE

SUPPORT_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)



@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * STORAGE[self.dtype][0].itemsize


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (one tensor minimum)."""
    shards: list[list[PlannedTensor]] = [[]]
    used = 0
    for t in tensors:
        if shards[-1] and used + t.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes
    return shards


def _header_bytes(shard: Sequence[PlannedTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes planned tensors to ``out_dir`` in order, one buffer at a time.

    ``write(name, chunk)`` may be called several times per tensor; the bytes of each tensor must
    add up to its planned size before the next tensor starts.
    """

    def __init__(self, out_dir: Path, tensors: Sequence[PlannedTensor], max_shard_bytes: int):
        self.out_dir = out_dir
        self.shards = plan_shards(tensors, max_shard_bytes)
        n = len(self.shards)
        self.names = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
        self._order: Iterator[tuple[int, PlannedTensor]] = (
            (i, t) for i, shard in enumerate(self.shards) for t in shard
        )
        self._file = None
        self._shard = -1
        self._current: PlannedTensor | None = None
        self._remaining = 0

    def write(self, name: str, chunk: np.ndarray) -> None:
        if self._remaining == 0:
            self._next_tensor(name)
        if self._current is None or self._current.name != name:
            raise RuntimeError(f"tensor {name!r} written out of order")
        self._file.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        self._remaining -= chunk.nbytes
        if self._remaining < 0:
            raise RuntimeError(f"tensor {name!r} got more bytes than planned")

    def _next_tensor(self, name: str) -> None:
        shard, planned = next(self._order)
        if shard != self._shard:
            self._open_shard(shard)
        self._current, self._remaining = planned, planned.nbytes

    def _open_shard(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        self._shard = shard
        self._file = open(self.out_dir / self.names[shard], "wb")
        self._file.write(_header_bytes(self.shards[shard]))

    def abort(self) -> None:
        """Close the open shard after a failure (the caller discards the directory)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Finish the last shard and write the index when there are several."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._remaining or next(self._order, None) is not None:
            raise RuntimeError("ShardedWriter closed before every planned tensor was written")
        if len(self.shards) > 1:
            self._write_index()

    def _write_index(self) -> None:
        total = sum(t.nbytes for shard in self.shards for t in shard)
        weight_map = {t.name: self.names[i] for i, shard in enumerate(self.shards) for t in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_support_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer and generation-config files from ``src``; returns the names copied."""
    copied = []
    for name in SUPPORT_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def write_config(dst: Path, config: dict[str, Any], dtype: str | None = None) -> None:
    """Write ``config.json``; ``dtype`` (a safetensors code) overrides the recorded dtype."""
    config = dict(config)
    if dtype is not None and dtype in CONFIG_DTYPE:
        config["dtype"] = CONFIG_DTYPE[dtype]
        config.pop("torch_dtype", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or an int -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise SoupkitError(f"bad size {text!r}; use e.g. 5GB, 500MB or 2GiB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    try:
        value = float(number)
    except ValueError:
        raise SoupkitError(f"bad size {text!r}; use e.g. 5GB, 500MB or 2GiB") from None
    return int(value * base ** " KMGT".index(unit.upper() or " "))
