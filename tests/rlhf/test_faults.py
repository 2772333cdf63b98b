"""align under faults: SIGTERM / SIGINT stop after the current step with a checkpoint, a full disk
is refused before a checkpoint is written (or fails one and keeps the previous), an unwritable OUT
is refused before models load. Each resumed run is compared with an uninterrupted one."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from soupkit.errors import SoupkitError
from soupkit.rlhf import build_spec, train
from soupkit.rlhf import checkpoints as ckpt
from soupkit.storage import human_bytes
from tests.conftest import load_state, must_not_run, read_only
from tests.rlhf.conftest import REWARDS
from tests.rlhf.test_resume import _flags

ROOT = Path(__file__).resolve().parents[2]
STOP_LINE = re.compile(r"stopped at step (\d+); checkpoint (\S+); continue with --resume")


@pytest.fixture(scope="module")
def whole(tmp_path_factory, sft_a, prompts_txt) -> Path:
    """The uninterrupted run every interrupted one must equal (6 steps, checkpoints every 2)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train(build_spec(None, _flags(sft_a, prompts_txt, f"{REWARDS}:good_words")), out=out)
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(got: Path, want: Path) -> None:
    rows, expected = _metrics(got), _metrics(want)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # each step once
    for row, ref in zip(rows, expected):
        for key in ("reward", "kl", "policy_loss", "value_loss", "response_length", "kl_coef"):
            assert abs(row[key] - ref[key]) < 1e-5, (row["step"], key, row[key], ref[key])
    final, oracle = load_state(got / "final"), load_state(want / "final")
    for name, tensor in oracle.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=1e-5)


def _start_align(out: Path, ref: Path, prompts: Path) -> subprocess.Popen:
    """``soupkit align`` with a slow reward (0.5 s a step) and no periodic checkpoints."""
    cmd = [sys.executable, "-m", "soupkit", "align", "--ref", str(ref), "--prompts", str(prompts),
           "--reward", f"{REWARDS}:slow_good_words", "--out", str(out), "--steps", "6", "--batch-size", "8",
           "--max-new-tokens", "4", "--ppo-epochs", "2", "--save-every", "0", "--seed", "5",
           "--learning-rate", "1e-3", "--set", "temperature=1.0", "--set", "keep_checkpoints=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_first_step(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no step within 120 s"
        time.sleep(0.02)


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_matches(tmp_path, sft_a, prompts_txt, whole):
    out = tmp_path / "run"
    proc = _start_align(out, sft_a, prompts_txt)
    _wait_for_first_step(proc, out)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if "stopped at" in line]
    assert len(lines) == 1 and (match := STOP_LINE.fullmatch(lines[0].strip())), stderr
    step = int(match.group(1))
    assert 1 <= step < 6 and Path(match.group(2)) == out / "checkpoints" / f"step-{step}"
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [step]  # written on the signal (save_every is 0)
    assert [r["step"] for r in _metrics(out)] == list(range(1, step + 1))
    assert not (out / "final").exists()

    resumed = []
    train(build_spec(None, _flags(sft_a, prompts_txt, f"{REWARDS}:slow_good_words")), out=out, resume=True,
          progress=lambda done, total, metrics: resumed.append(done))
    assert resumed == list(range(step + 1, 7))  # nothing redone
    _assert_same_run(out, whole)


def test_a_second_signal_stops_at_once(tmp_path, sft_a, prompts_txt):
    out = tmp_path / "run"
    proc = _start_align(out, sft_a, prompts_txt)
    _wait_for_first_step(proc, out)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)  # well inside the 0.5 s reward of the current step
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == -signal.SIGINT, stderr
    assert "stopped at" not in stderr and "SIGINT: stopping after the current step" in stderr
    assert ckpt.list_checkpoints(out) == []


def test_failed_checkpoint_write_keeps_the_previous_one_for_resume(tmp_path, sft_a, prompts_txt, whole, monkeypatch):
    """The disk fills while step-4's trainer state is written: one line naming the file, the cause
    and the checkpoint --resume will use; step-2 is untouched and resuming from it equals the run."""
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    out = tmp_path / "run"
    spec = build_spec(None, _flags(sft_a, prompts_txt, f"{REWARDS}:good_words"))
    monkeypatch.setattr(ckpt.torch, "save", disk_full_at_step_4)
    with pytest.raises(SoupkitError) as caught:
        train(spec, out=out)
    monkeypatch.undo()
    kept = out / "checkpoints" / "step-2"
    assert str(caught.value) == (f"cannot write {out / 'checkpoints' / 'step-4'}: No space left on device; "
                                 f"the previous checkpoint {kept} is intact and --resume will use it")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name != "step-2"]  # no partial step-4
    train(spec, out=out, resume=True)
    _assert_same_run(out, whole)


def test_too_little_space_for_a_checkpoint_is_refused_before_the_first_step(tmp_path, sft_a, prompts_txt, whole,
                                                                          monkeypatch):
    # Oracle: whole weights of policy and critic as saved, and AdamW's two moments for each.
    step2 = whole / "checkpoints" / "step-2"
    weights = sum(t.numel() * t.element_size() for part in ("policy", "critic")
                  for t in load_state(step2 / part).values())
    monkeypatch.setattr("soupkit.storage.free_bytes", lambda path: 5000)
    out = tmp_path / "run"
    with pytest.raises(SoupkitError) as caught:
        train(build_spec(None, _flags(sft_a, prompts_txt, f"{REWARDS}:good_words")), out=out)
    assert str(caught.value).startswith(f"a checkpoint of this run needs {human_bytes(3 * weights)} but ")
    assert "has only 5.0 kB free" in str(caught.value)
    assert not (out / "metrics.jsonl").exists()


def test_read_only_out_is_refused_before_models_load(tmp_path, sft_a, prompts_txt, monkeypatch):
    monkeypatch.setattr("soupkit.storage._probe", read_only)
    monkeypatch.setattr("soupkit.rlhf.trainer.preflight", must_not_run)
    with pytest.raises(SoupkitError, match=r"output .*run: cannot write in .* \(Read-only file system\)"):
        train(build_spec(None, _flags(sft_a, prompts_txt, f"{REWARDS}:good_words")), out=tmp_path / "run")


def test_soupkit_run_says_to_rerun_it_after_a_stop(tmp_path, sft_a, prompts_txt, monkeypatch):
    """Under ``soupkit run`` the hint is the rerun (which resumes by itself), and no marker is written."""
    import yaml

    from soupkit.pipeline import run_pipeline
    from soupkit.stopping import Stopped

    def stopped(spec, out, **kwargs):
        raise Stopped(3, out / "checkpoints" / "step-3", signal.SIGTERM)

    monkeypatch.setattr("soupkit.rlhf.train", stopped)
    align = {"ref": str(sft_a), "reward": f"{REWARDS}:good_words", "prompts": str(prompts_txt),
             "output": str(tmp_path / "align")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"align": align}))
    with pytest.raises(Stopped) as caught:
        run_pipeline(tmp_path / "recipe.yaml", log=lambda line: None)
    run = tmp_path / "align" / "align" / "seed-0"
    assert str(caught.value) == f"stopped at step 3; checkpoint {run}/checkpoints/step-3; rerun soupkit run to continue"
    assert caught.value.exit_code == 143 and not (run / ".soupkit-complete").exists()


def test_a_signal_in_the_last_step_finishes_that_run_and_stops_soupkit_run_after_it(tmp_path, sft_a, prompts_txt,
                                                                                     monkeypatch):
    """SIGINT during an align run's last step: nothing is left to checkpoint, so the run completes
    (final written, marker written), and soupkit run stops there instead of starting the next run."""
    import yaml

    from soupkit.pipeline import run_pipeline
    from soupkit.rlhf import trainer
    from soupkit.stopping import Stopped

    real_step = trainer.ppo_step

    def step_with_ctrl_c(run, step):
        if step == run.spec.steps - 1:
            os.kill(os.getpid(), signal.SIGINT)  # caught by GracefulStop: a flag, not an exception
        return real_step(run, step)

    monkeypatch.setattr(trainer, "ppo_step", step_with_ctrl_c)
    align = {"ref": str(sft_a), "reward": f"{REWARDS}:good_words", "prompts": str(prompts_txt),
             "output": str(tmp_path / "align"), "steps": 2, "batch_size": 4, "max_new_tokens": 3,
             "save_every": 0, "seeds": [0, 1]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"align": align}))
    with pytest.raises(Stopped) as caught:
        run_pipeline(tmp_path / "recipe.yaml", log=lambda line: None)
    first, second = (tmp_path / "align" / "align" / f"seed-{s}" for s in (0, 1))
    assert (first / "final").is_dir() and (first / ".soupkit-complete").exists()
    assert not second.exists()  # the next run never started
    assert caught.value.exit_code == 130 and str(caught.value).startswith("stopped after align/seed-0")
    assert "rerun soupkit run to continue" in str(caught.value)


def _worker_of_rank(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process with ``RANK=rank`` (Linux /proc)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        for pid in children:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on the CPU is checked on Linux")
def test_sigterm_to_one_torchrun_worker_stops_both_after_the_same_step(tmp_path, sft_a, prompts_txt):
    """Only rank 1 gets SIGTERM: both processes stop after the same step, join the checkpoint's
    collectives, and rank 0 writes step-N and prints the one line; the run then resumes to the end."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "soupkit",
           "align", "--ref", str(sft_a), "--prompts", str(prompts_txt), "--reward", f"{REWARDS}:slow_good_words",
           "--out", str(out), "--steps", "4", "--batch-size", "4", "--max-new-tokens", "4", "--save-every", "0",
           "--seed", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rank1 = _worker_of_rank(proc.pid, 1)
    _wait_for_first_step(proc, out)
    os.kill(rank1, signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    lines = [line.strip() for line in stderr.splitlines() if "stopped at" in line]
    assert len(lines) == 1 and (match := STOP_LINE.fullmatch(lines[0])), stderr[-3000:]
    step = int(match.group(1))
    assert "exitcode  : 143" in stderr, stderr[-3000:]  # torchrun's report of its workers
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [step] and step < 4
    assert [r["step"] for r in _metrics(out)] == list(range(1, step + 1))
    flags = {"ref": [str(sft_a)], "prompts": str(prompts_txt), "reward": f"{REWARDS}:slow_good_words",
             "steps": 4, "batch_size": 8, "max_new_tokens": 4, "save_every": 0, "seed": 5}
    train(build_spec(None, flags), out=out, resume=True)
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
