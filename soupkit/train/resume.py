"""Checkpoints of the SFT and reward-model stages, so an interrupted stage continues where it was.

TRL's trainers are transformers ``Trainer``s: every ``save_steps`` optimiser steps they write the
model, optimiser, scheduler, RNG states and trainer state to ``checkpoint-N``, and
``train(resume_from_checkpoint=...)`` continues exactly (the epoch's data order is rebuilt from the
seed and the batches already seen are skipped). Hours of a 7B SFT are then not lost to a kill.

The checkpoints live beside the output, in ``OUTPUT.checkpoints/``, because the output itself only
appears, atomically, when the stage is complete; they are removed then. The settings that made them
are recorded there, so a changed recipe never continues from another run's optimiser state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError
from soupkit.launch import main_process
from soupkit.recipe import to_plain

SETTINGS = "soupkit_settings.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
FREE = ("save_steps",)
"""Settings a continued run may change: they do not touch the maths."""


def checkpoints_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".checkpoints")


def latest(out: Path) -> Path | None:
    """The newest complete ``checkpoint-N``: the Trainer writes ``trainer_state.json`` last, so a
    checkpoint cut short by a kill (no such file) is passed over."""
    root = checkpoints_dir(out)
    found = [(int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
             if (m := CHECKPOINT.match(p.name)) and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def prepare(spec: Any, out: Path, force: bool, stage: str) -> Path | None:
    """The checkpoint to continue from (None: start afresh), after checking it was made with
    ``spec``'s settings; ``force`` drops earlier checkpoints. Only the main process writes."""
    root, settings = checkpoints_dir(out), _settings(spec)
    if force and main_process():
        shutil.rmtree(root, ignore_errors=True)
    recorded = _recorded(root) if not force else None
    if recorded is not None and recorded != settings:
        changed = sorted(k for k in {*recorded, *settings} if recorded.get(k) != settings.get(k))
        raise SoupkitError(f"{root}: checkpoints of an interrupted {stage} run made with other settings "
                           f"({', '.join(changed)}); pass --force {stage} to start over, or remove it")
    if main_process():
        root.mkdir(parents=True, exist_ok=True)
        _write_json(root / SETTINGS, settings)
    return None if force else latest(out)


def finish(out: Path) -> None:
    """Drop the checkpoints once the output is complete (main process)."""
    if main_process():
        shutil.rmtree(checkpoints_dir(out), ignore_errors=True)


def _settings(spec: Any) -> dict[str, Any]:
    return {k: v for k, v in to_plain(spec).items() if k not in FREE}


def _recorded(root: Path) -> dict[str, Any] | None:
    path = root / SETTINGS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SoupkitError(f"{path}: unreadable; remove {root} to start over") from None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic, so another process reading it never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
    os.replace(tmp, path)
