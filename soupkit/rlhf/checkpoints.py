"""Resumable checkpoints under ``OUT/checkpoints/step-N`` and the metrics log.

A checkpoint holds the policy and critic (HF format), and ``trainer_state.pt``: optimiser,
scheduler, RNG states, KL controller and the step (the prompt order is a function of the step,
see ``prompts.batch_indices``). Each is written to a temporary sibling and renamed, so a run
killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from soupkit.storage import atomic_output_dir

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_root(out: Path) -> Path:
    return out / "checkpoints"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, path)``, oldest first."""
    root = checkpoints_root(out)
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if match and (path / "trainer_state.pt").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def save_checkpoint(out: Path, step: int, policy: Any, critic: Any, tokenizer: Any,
                    state: dict[str, Any], keep: int, weights: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``step-N`` atomically, then drop all but the newest ``keep`` (0 = keep all).
    ``weights``: whole state dicts ``{"policy": ..., "critic.seq_cls": ...}`` when the modules
    themselves hold shards (``sharding.full_state_dicts``)."""
    final = checkpoints_root(out) / f"step-{step}"
    weights = weights or {}
    with atomic_output_dir(final, force=True) as tmp:
        policy.save_pretrained(tmp / "policy", state_dict=weights.get("policy"))
        tokenizer.save_pretrained(tmp / "policy")
        critic.save_pretrained(tmp / "critic", state_dict=weights.get("critic.seq_cls"))
        with open(tmp / "trainer_state.pt", "wb") as f:  # through Python's file: a full disk is an OSError
            torch.save(state, f)
    if keep:
        for _, old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Our own file, read with ``weights_only=True`` all the same (tensors and plain data only)."""
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from: sampling, minibatch shuffles."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def append_metrics(path: Path, metrics: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Complete lines of ``metrics.jsonl`` (a line cut by a kill is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps <= ``step``: later ones are redone after a resume."""
    rows = [row for row in read_metrics(path) if row.get("step", 0) <= step]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
