"""Datasets for training stages: local JSON lines / JSON / saved datasets, or a Hub dataset, in
any of TRL's formats (``soupkit.formats``), checked row by row before anything is written."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError


def load_rows(source: str, split: str = "train", columns: Sequence[Sequence[str]] = (), what: str = "data") -> Any:
    """A ``datasets.Dataset`` from ``source``; ``columns`` lists acceptable column sets (any one)."""
    dataset = _load(source, split, what)
    if columns and not any(set(cols) <= set(dataset.column_names) for cols in columns):
        wanted = " or ".join("/".join(cols) for cols in columns)
        raise SoupkitError(f"{what} {source!r}: needs columns {wanted}; it has {', '.join(dataset.column_names)}")
    if len(dataset) == 0:
        raise SoupkitError(f"{what} {source!r}: no rows")
    return dataset


def _load(source: str, split: str, what: str) -> Any:
    import datasets

    path = Path(source)
    try:
        if path.is_file() and path.suffix in (".jsonl", ".json"):
            return datasets.load_dataset("json", data_files=str(path), split="train")
        if path.is_dir() and (path / "dataset_info.json").exists():
            return datasets.load_from_disk(str(path))
        if path.exists():
            raise SoupkitError(f"{what} {source!r}: expected a .jsonl/.json file or a saved dataset directory")
        return datasets.load_dataset(source, split=split)
    except SoupkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad data source for the user
        raise SoupkitError(f"{what} {source!r}: cannot load ({type(exc).__name__}: {str(exc)[:200]})") from None


def read_examples(source: str, split: str, convert: Any, what: str) -> Any:
    """A ``datasets.Dataset`` of ``convert(row, where)`` over every row of ``source`` (one shape);
    a ``.jsonl`` file is read line by line, so errors name the line and rows may mix types."""
    import datasets

    from soupkit.formats import normalise, read_jsonl

    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        rows = read_jsonl(path, what)
    else:
        rows = [(f"{what} {source!r} row {n}", row) for n, row in enumerate(load_rows(source, split, what=what), 1)]
    if not rows:
        raise SoupkitError(f"{what} {source!r}: no rows")
    return datasets.Dataset.from_list(normalise(rows, convert))
