"""Real processes against one align output (issue #16). The first run is stopped inside its PPO
loop (``tests.concurrency.Paused``: lock held, some steps and a checkpoint written) while the
second starts, so the order is fixed, not raced. Before the lock, two runs into one ``--out``
both printed ``wrote`` and ``metrics.jsonl`` held both runs' rows, interleaved."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import yaml

from soupkit.locking import lock_file, writer_of
from soupkit.rlhf import build_spec, train
from tests.concurrency import ENV, ROOT, Paused, hold, soupkit
from tests.conftest import load_state
from tests.rlhf.conftest import good_words_ref

SETTINGS = {"steps": 3, "batch_size": 4, "max_new_tokens": 3, "ppo_epochs": 1, "save_every": 2, "seed": 5,
            "learning_rate": 1e-3, "temperature": 1.0, "keep_checkpoints": 0}
COMPARED = ("reward", "kl", "entropy", "policy_loss", "value_loss", "approx_kl", "response_length", "kl_coef")
PPO_STEP = "soupkit.rlhf.trainer:ppo_step"


def _align_args(ref, prompts, out, **overrides) -> list[str]:
    args = ["align", "--ref", str(ref), "--prompts", str(prompts), "--reward", good_words_ref(), "--out", str(out)]
    return args + [f"--set={key}={value}" for key, value in {**SETTINGS, **overrides}.items()]


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(got, want) -> None:
    rows, expected = _metrics(got), _metrics(want)
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [1, 2, 3]
    for row, ref in zip(rows, expected):
        for key in COMPARED:
            assert row[key] == pytest.approx(ref[key], abs=1e-5), (row["step"], key)
    final, oracle = load_state(got / "final"), load_state(want / "final")
    assert final.keys() == oracle.keys()
    for name, tensor in oracle.items():
        assert (final[name] - tensor).abs().max() < 1e-5, name


def _refused(done: subprocess.CompletedProcess, out, holder_pid: int) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: output {out} is being written by another process (pid {holder_pid} on "), line


@pytest.fixture(scope="module")
def alone(tmp_path_factory, sft_a, prompts_txt):
    """The oracle: the same run, uninterrupted and by itself."""
    out = tmp_path_factory.mktemp("alone") / "run"
    flags = {"ref": [str(sft_a)], "prompts": str(prompts_txt), "reward": good_words_ref()}
    train(build_spec(None, flags, [f"{k}={v}" for k, v in SETTINGS.items()]), out=out)
    return out


def test_second_align_fails_and_the_first_equals_a_lone_run(tmp_path, sft_a, prompts_txt, alone):
    out = tmp_path / "run"
    first = Paused(tmp_path / "sync", PPO_STEP, 3, *_align_args(sft_a, prompts_txt, out))
    first.wait_ready()  # steps 1-2 logged, checkpoint step-2 written, lock held
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # Another seed with --force: without the lock it would have cleared the first run's metrics.
    second = soupkit(*_align_args(sft_a, prompts_txt, out, seed=6), "--force")
    _refused(second, out, first.proc.pid)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched

    code, err = first.go()
    assert code == 0, err
    _assert_same_run(out, alone)
    assert not lock_file(out).exists()


def test_kill_9_of_a_locked_align_then_resume_needs_no_clean_up(tmp_path, sft_a, prompts_txt, alone):
    out = tmp_path / "run"
    first = Paused(tmp_path / "sync", PPO_STEP, 3, *_align_args(sft_a, prompts_txt, out))
    first.wait_ready()
    assert f"pid {first.proc.pid} " in writer_of(out)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.communicate()
    assert lock_file(out).is_file() and writer_of(out) is None  # the file stays, the lock went with the process
    resumed = soupkit(*_align_args(sft_a, prompts_txt, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(out, alone)


def test_two_launches_of_one_recipe_do_not_interleave(tmp_path, sft_a, prompts_txt, alone):
    """``soupkit run``: the second launch fails on the align run the first is writing; the merge the
    first skipped as complete is not locked, so readers (and the second launch) may use it."""
    from soupkit.pipeline import run_pipeline

    soup = tmp_path / "soup"
    align = {"ref": str(sft_a), "reward": good_words_ref(), "prompts": str(prompts_txt),
             "output": str(tmp_path / "align"), **SETTINGS}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge": {"method": "uniform", "models": [str(sft_a), str(sft_a)],
                                                "output": str(soup)}, "align": align}))
    assert run_pipeline(recipe, only=["merge"], log=lambda _: None) == {"merge": ["ran"]}  # marked complete
    run = tmp_path / "align" / "align" / "seed-5"

    first = Paused(tmp_path / "sync", PPO_STEP, 3, "run", str(recipe))
    first.wait_ready()
    assert writer_of(soup) is None and f"pid {first.proc.pid} " in writer_of(run)
    second = soupkit("run", str(recipe))
    _refused(second, run, first.proc.pid)
    code, err = first.go()
    assert code == 0, err
    _assert_same_run(run, alone)
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on the CPU is checked on Linux")
def test_torchrun_ranks_stop_together_when_the_output_is_taken(tmp_path, sft_a, prompts_txt):
    """The main process cannot take the lock: every rank stops with the one line, none trains."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "soupkit",
           *_align_args(sft_a, prompts_txt, out)]
    with hold(out) as holder:
        done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
        assert not out.exists()
    assert done.returncode != 0
    refusal = f"error: output {out} is being written by another process (pid {holder.pid} on "
    assert done.stderr.count(refusal) == 2, done.stderr[-3000:]  # rank 0 and rank 1
    assert "align: 2 processes" not in done.stderr  # no Accelerator was built: nobody reached training

