"""SFT and reward-model stages checkpoint every ``save_steps`` and continue an interrupted run from
the newest checkpoint: fewer steps redone than the total, the same weights as an uninterrupted run."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from soupkit.errors import SoupkitError
from soupkit.pipeline import run_pipeline
from soupkit.recipe import RewardModelSpec, SFTSpec
from soupkit.train import resume, train_reward_model, train_sft
from tests.conftest import load_state, must_not_run, read_only
from tests.train.test_trainers import PREFS, SFT_ROWS, _jsonl, base  # noqa: F401 - base is a fixture

ROOT = Path(__file__).resolve().parents[2]
SFT = {"name": "a", "seed": 1, "learning_rate": 5e-3, "batch_size": 8, "epochs": 4, "max_length": 32, "save_steps": 4}
TOTAL = len(SFT_ROWS) // 8 * 4  # optimiser steps of the whole run


def _count_steps(monkeypatch) -> list[int]:
    from transformers import Trainer

    calls, real = [], Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def _assert_same_weights(got: Path, want: Path) -> None:
    final, oracle = load_state(got), load_state(want)
    assert final.keys() == oracle.keys()
    for name, tensor in oracle.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=0)


def _kill_after_first_checkpoint(recipe: Path, out: Path) -> None:
    cmd = [sys.executable, str(Path(__file__).with_name("slow_steps.py")), "run", str(recipe), "--only", "sft"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while resume.latest(out) is None:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()


def test_sft_killed_after_a_checkpoint_resumes_from_it(tmp_path, base, monkeypatch):  # noqa: F811
    data = _jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    out = tmp_path / "sft-a"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"sft": [{**SFT, "base": str(base), "data": str(data), "output": str(out)}]}))
    _kill_after_first_checkpoint(recipe, out)
    assert not out.exists()

    steps, logs = _count_steps(monkeypatch), []
    run_pipeline(recipe, only=["sft"], log=logs.append)
    resumed = [int(m.group(1)) for line in logs if (m := re.search(r"resuming from .*checkpoint-(\d+)$", line))]
    assert len(resumed) == 1 and resumed[0] >= SFT["save_steps"], logs
    assert len(steps) == TOTAL - resumed[0] < TOTAL  # only the steps after the checkpoint are redone
    assert (out / ".soupkit-complete").is_file() and not resume.checkpoints_dir(out).exists()

    whole = train_sft(SFTSpec(**{**SFT, "base": str(base), "data": str(data), "output": str(tmp_path / "whole")}))
    _assert_same_weights(out, whole)


def test_reward_model_disk_full_at_a_checkpoint_then_resume(tmp_path, base, monkeypatch):  # noqa: F811
    """The disk fills while checkpoint-4's optimiser state is written: one line naming the file and
    the checkpoint kept; a rerun continues from checkpoint-2 and ends where an uninterrupted run
    does. A rerun with other settings is refused rather than mixing two runs."""
    data = _jsonl(tmp_path / "prefs.jsonl", PREFS)
    spec = RewardModelSpec(base=str(base), data=str(data), output=str(tmp_path / "rm"), learning_rate=5e-3,
                           batch_size=8, epochs=2, max_length=32, save_steps=2)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SoupkitError) as caught:
        train_reward_model(spec)
    monkeypatch.undo()
    root = resume.checkpoints_dir(tmp_path / "rm")
    assert str(caught.value) == (f"cannot write {root / 'checkpoint-4' / 'optimizer.pt'}: No space left on device; "
                                 f"the checkpoint {root / 'checkpoint-2'} is intact and a rerun continues from it")
    assert not (tmp_path / "rm").exists()

    with pytest.raises(SoupkitError, match=r"rm\.checkpoints: checkpoints of an interrupted reward_model run made "
                                           r"with other settings \(learning_rate\); pass --force reward_model"):
        train_reward_model(spec.model_copy(update={"learning_rate": 1e-3}))
    done: list[int] = []
    train_reward_model(spec, progress=lambda step, total: done.append(step))
    assert done == [3, 4, 5, 6, 7, 8]
    whole = train_reward_model(spec.model_copy(update={"output": str(tmp_path / "whole")}))
    _assert_same_weights(tmp_path / "rm", whole)
    assert not root.exists() and not resume.checkpoints_dir(whole).exists()


def test_unwritable_output_is_refused_before_the_model_loads(tmp_path, base, monkeypatch):  # noqa: F811
    monkeypatch.setattr("soupkit.storage._probe", read_only)
    monkeypatch.setattr("soupkit.train.trainers.read_examples", must_not_run)
    spec = SFTSpec(name="a", base=str(base), data=str(tmp_path / "x.jsonl"), output=str(tmp_path / "a"))
    with pytest.raises(SoupkitError, match=r"output .*a: cannot write in .* \(Read-only file system\)"):
        train_sft(spec)
