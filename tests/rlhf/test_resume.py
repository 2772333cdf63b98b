"""Kill a run with SIGKILL after a checkpoint, resume it, and compare with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from soupkit.rlhf import build_spec, train
from tests.conftest import load_state
from tests.rlhf.conftest import REWARDS

ROOT = Path(__file__).resolve().parents[2]


def _flags(ref: Path, prompts: Path, reward: str) -> dict:
    return {"ref": [str(ref)], "prompts": str(prompts), "reward": reward, "steps": 6, "batch_size": 8,
            "max_new_tokens": 4, "ppo_epochs": 2, "save_every": 2, "seed": 5, "temperature": 1.0,
            "learning_rate": 1e-3, "keep_checkpoints": 0}


def _kill_after_first_checkpoint(out: Path, ref: Path, prompts: Path) -> int:
    cmd = [sys.executable, "-m", "soupkit", "align", "--ref", str(ref), "--prompts", str(prompts),
           "--reward", f"{REWARDS}:slow_good_words", "--out", str(out), "--steps", "6", "--batch-size", "8",
           "--max-new-tokens", "4", "--ppo-epochs", "2", "--save-every", "2", "--seed", "5",
           "--learning-rate", "1e-3", "--set", "temperature=1.0", "--set", "keep_checkpoints=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step-2" / "trainer_state.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    code = proc.wait()
    proc.stderr.close()
    return code


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, sft_a, prompts_txt):
    killed = tmp_path / "killed"
    assert _kill_after_first_checkpoint(killed, sft_a, prompts_txt) == -signal.SIGKILL
    assert not (killed / "final").exists()
    # Resume with the same settings (a resume checks them); the uninterrupted run may use the
    # same reward without the pause.
    train(build_spec(None, _flags(sft_a, prompts_txt, f"{REWARDS}:slow_good_words")), out=killed, resume=True)
    whole = tmp_path / "whole"
    train(build_spec(None, _flags(sft_a, prompts_txt, f"{REWARDS}:good_words")), out=whole)

    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for got, want in zip(rows, reference):
        for key in ("reward", "kl", "policy_loss", "value_loss", "response_length"):
            assert abs(got[key] - want[key]) < 1e-5, (got["step"], key, got[key], want[key])
    final, expected = load_state(killed / "final"), load_state(whole / "final")
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=1e-5)


def test_resume_refuses_other_settings(tmp_path, sft_a, prompts_txt):
    import pytest

    from soupkit.errors import SoupkitError

    spec = build_spec(None, {**_flags(sft_a, prompts_txt, f"{REWARDS}:good_words"), "steps": 3, "save_every": 1})
    train(spec, out=tmp_path / "run")
    with pytest.raises(SoupkitError, match="other settings for kl_coef"):
        train(spec.model_copy(update={"kl_coef": 0.5, "steps": 5}), out=tmp_path / "run", resume=True)
    train(spec.model_copy(update={"steps": 5}), out=tmp_path / "run", resume=True)  # more steps is fine
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_resume_refuses_a_checkpoint_with_position_keyed_optimiser_state(tmp_path, sft_a, prompts_txt):
    """Checkpoints from before name-keyed optimiser state: one clear line, not a KeyError."""
    import pytest

    from soupkit.errors import SoupkitError

    spec = build_spec(None, {**_flags(sft_a, prompts_txt, f"{REWARDS}:good_words"), "steps": 1, "save_every": 1})
    train(spec.model_copy(update={"steps": 2}), out=tmp_path / "run")
    state_file = tmp_path / "run" / "checkpoints" / "step-1" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["optimizer"]["state"] = {i: entry for i, entry in enumerate(state["optimizer"]["state"].values())}
    torch.save(state, state_file)
    with pytest.raises(SoupkitError, match=r"step-1 was written by an earlier soupkit .* start a new --out"):
        train(spec.model_copy(update={"steps": 2}), out=tmp_path / "run", resume=True)
