"""Hugging Face model directories read without loading models.

Reads ``config.json`` and safetensors headers (milliseconds, no torch) and gives zero-copy numpy
views of tensors through ``mmap`` (the pages belong to the page cache, not to the process).
Pickle weights (``pytorch_model*.bin``) are opened only when the caller allows them.

Safetensors format: https://github.com/huggingface/safetensors#format (8-byte little-endian header
length, a JSON header of ``name -> {dtype, shape, data_offsets}``, then the raw bytes).
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from soupkit.errors import SoupkitError

# safetensors dtype code -> (numpy storage dtype, is floating point). bfloat16 has no numpy dtype:
# it is stored as uint16 and widened to float32 by a 16-bit shift (see soupkit.merge.engine).
STORAGE = {
    "F64": (np.dtype("<f8"), True),
    "F32": (np.dtype("<f4"), True),
    "F16": (np.dtype("<f2"), True),
    "BF16": (np.dtype("<u2"), True),
    "I64": (np.dtype("<i8"), False),
    "I32": (np.dtype("<i4"), False),
    "I16": (np.dtype("<i2"), False),
    "I8": (np.dtype("i1"), False),
    "U8": (np.dtype("u1"), False),
    "BOOL": (np.dtype("?"), False),
}
FP8 = {"F8_E4M3", "F8_E5M2"}
DTYPE_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
CONFIG_DTYPE = {code: name for name, code in DTYPE_NAMES.items()}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file`` and absolute byte ``start`` of its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FP8 or STORAGE.get(self.dtype, (None, False))[1]


@dataclass
class Checkpoint:
    """A checkpoint directory opened for lazy reads: config plus tensor locations."""

    ref: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    pickled: dict[str, Any] | None = None
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)

    def array(self, name: str) -> np.ndarray:
        """Flat zero-copy numpy view of tensor ``name`` in its storage dtype."""
        info = self.tensors[name]
        if self.pickled is not None:
            return torch_to_numpy(self.pickled[name])
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                mm = self._maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        storage = STORAGE[info.dtype][0]
        return np.frombuffer(mm, dtype=storage, count=info.numel, offset=info.start)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a caller still holds a view; the map dies with it
                pass
        self._maps.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()




def resolve_model_dir(ref: str, what: str = "model") -> Path:
    """A local directory for ``ref``: the path itself, or a Hub snapshot (offline-cache aware)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SoupkitError(f"{what} {ref!r} is a file; expected a checkpoint directory")
    if not HUB_ID.match(ref) or ref.startswith((".", "/")):
        raise SoupkitError(f"{what} {ref!r} not found (no such directory)")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        return Path(snapshot_download(ref, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not available here"
        raise SoupkitError(
            f"{what} {ref!r} not found: not a local directory, and not available from the "
            f"Hugging Face Hub ({type(exc).__name__})"
        ) from None


def read_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory, as a dict."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise SoupkitError(f"{path}: missing config.json; is {model_dir} a Hugging Face checkpoint?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SoupkitError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor locations from a safetensors header, checking the file is complete."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SoupkitError(f"{path}: truncated or corrupt safetensors file (no header)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100_000_000:
            raise SoupkitError(f"{path}: truncated or corrupt safetensors file (header length)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SoupkitError(f"{path}: truncated or corrupt safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    return _tensor_infos(path, header, data_start=8 + length, size=size)


def _tensor_infos(path: Path, header: dict, data_start: int, size: int) -> dict[str, TensorInfo]:
    infos = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SoupkitError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        itemsize = _itemsize(dtype, path, name)
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise SoupkitError(f"{path}: corrupt safetensors header: tensor {name!r} has bad offsets")
        if data_start + end > size:
            raise SoupkitError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                f"{data_start + end} but the file has {size} bytes"
            )
        infos[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    return infos


def _itemsize(dtype: str, path: Path, name: str) -> int:
    if dtype in FP8:
        return 1
    if dtype not in STORAGE:
        raise SoupkitError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    return STORAGE[dtype][0].itemsize


def open_checkpoint(ref: str, *, allow_pickle: bool = False, what: str = "model") -> Checkpoint:
    """Open a checkpoint for lazy reads; reads only config and headers."""
    model_dir = resolve_model_dir(ref, what)
    config = read_config(model_dir)
    files = _safetensors_files(model_dir)
    if files:
        tensors = _read_all_headers(files, model_dir)
        return Checkpoint(ref, model_dir, config, tensors)
    pickles = _pickle_files(model_dir)
    if not pickles:
        raise SoupkitError(f"{what} {ref!r}: no *.safetensors or pytorch_model*.bin weights in {model_dir}")
    if not allow_pickle:
        raise SoupkitError(
            f"{what} {ref!r} has only pickle weights ({pickles[0].name}); pickle files can run "
            "code when loaded, so soupkit refuses them unless you pass --allow-pickle"
        )
    return _open_pickled(ref, model_dir, config, pickles)


def tensor_headers(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a directory's safetensors weights (one file or sharded), from the headers
    only; empty when it has none."""
    files = _safetensors_files(model_dir)
    return _read_all_headers(files, model_dir) if files else {}


def has_pickle_weights(model_dir: Path) -> bool:
    """Whether the directory holds ``pytorch_model*.bin`` weights (not opened)."""
    return bool(_pickle_files(model_dir))


def _safetensors_files(model_dir: Path) -> list[Path]:
    return _weight_files(model_dir, "model.safetensors")


def _pickle_files(model_dir: Path) -> list[Path]:
    return _weight_files(model_dir, "pytorch_model.bin")


def _weight_files(model_dir: Path, single: str) -> list[Path]:
    """The shards an index ``SINGLE.index.json`` lists, else the one file ``single``, else []."""
    index = model_dir / f"{single}.index.json"
    if index.is_file():
        return _files_from_index(index)
    path = model_dir / single
    return [path] if path.is_file() else []


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SoupkitError(f"{index}: invalid index file (no weight_map)") from None
    files = []
    for name in dict.fromkeys(weight_map.values()):
        shard = index.parent / name
        if not shard.is_file():
            raise SoupkitError(f"{index}: shard {name} is listed but missing")
        files.append(shard)
    return files


def _read_all_headers(files: Sequence[Path], model_dir: Path) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name in tensors:
                raise SoupkitError(f"{model_dir}: tensor {name!r} appears in two shards")
            tensors[name] = info
    return tensors


def _open_pickled(ref: str, model_dir: Path, config: dict, files: list[Path]) -> Checkpoint:
    import torch

    state: dict[str, Any] = {}
    tensors: dict[str, TensorInfo] = {}
    codes = {v: k for k, v in torch_dtype_codes().items()}
    for file in files:
        try:
            shard = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a broken pickle is the user's file
            raise SoupkitError(f"{file}: cannot read pickle checkpoint ({exc})") from None
        for name, t in shard.items():
            if t.dtype not in codes:
                raise SoupkitError(f"{file}: tensor {name!r} has unsupported dtype {t.dtype}")
            tensors[name] = TensorInfo(name, codes[t.dtype], tuple(t.shape), file, 0, t.numel() * t.element_size())
        state.update(shard)
    return Checkpoint(ref, model_dir, config, tensors, pickled=state)


def torch_dtype_codes() -> dict[str, Any]:
    """safetensors dtype code -> torch dtype."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
    }


def torch_to_numpy(t: Any) -> np.ndarray:
    """Flat numpy view of a CPU tensor in its storage dtype (bf16 as uint16, as in a file)."""
    import torch

    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()
