"""Data-parallel PPO on the CPU: 2 processes (torchrun, gloo) against 1, and resume across counts.

What "match" means here: the global batch (``batch_size`` x processes) gets the same prompts, and
each row the same sampling noise (keyed by seed, step and global row, not by rank), the same
minibatch shuffle, whitening statistics and loss normalisation (token mean over the global
micro-batch), so a 2-process run with batch_size 4 computes the same PPO steps as 1 process with 8.
What is left is floating-point order: prompts are padded to the longest of 4 rows instead of 8,
and gloo sums two half-gradients. Observed differences are below 1e-6 over 3 steps; the tolerance
1e-5 leaves headroom for that and is still 100x below what per-process loss normalisation
gives (KL off by 1.8e-3 at step 2, measured while writing this). Exact agreement holds for minibatches = grad_accum = 1;
with more, each rank splits its own rows, so micro-batches are composed differently.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from soupkit.rlhf import build_spec, train
from tests.conftest import load_state
from tests.rlhf.conftest import good_words_ref

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
COMPARED = ("reward", "kl", "entropy", "policy_loss", "value_loss", "approx_kl", "clipfrac",
            "explained_variance", "response_length", "eos_rate", "kl_coef")
SETTINGS = {"steps": 3, "max_new_tokens": 4, "ppo_epochs": 2, "seed": 5, "learning_rate": 1e-3,
            "save_every": 1, "temperature": 1.0, "keep_checkpoints": 0, "kl_target": 0.5}


def _cli_args(ref: Path, prompts: Path, out: Path, batch_size: int, **overrides) -> list[str]:
    args = ["align", "--ref", str(ref), "--prompts", str(prompts), "--reward", good_words_ref(), "--out", str(out),
            "--batch-size", str(batch_size)]
    for key, value in {**SETTINGS, **overrides}.items():
        args += ["--set", f"{key}={value}"]
    return args


def _torchrun(args: list[str], launcher: Path | None = None, env: dict[str, str] | None = None,
              timeout: int = 180) -> str:
    """``torchrun --nproc_per_node 2 -m soupkit ...`` (or ``launcher``); returns stdout, then stderr."""
    target = [str(launcher)] if launcher else ["-m", "soupkit"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _one_process(ref: Path, prompts: Path, out: Path, resume: bool = False, **overrides) -> None:
    flags = {"ref": [str(ref)], "prompts": str(prompts), "reward": good_words_ref(), "batch_size": 8}
    train(build_spec(None, flags, [f"{k}={v}" for k, v in {**SETTINGS, **overrides}.items()]), out=out, resume=resume)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(got: Path, want: Path) -> None:
    rows, expected = _metrics(got), _metrics(want)
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [1, 2, 3]
    for row, ref in zip(rows, expected):
        for key in COMPARED:
            assert row[key] == pytest.approx(ref[key], abs=TOL, nan_ok=True), (row["step"], key)
    final, oracle = load_state(got / "final"), load_state(want / "final")
    assert final.keys() == oracle.keys()
    for name, tensor in oracle.items():
        assert (final[name] - tensor).abs().max() < TOL, name


def _keep_only_first_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of a finished run as if it had been stopped right after checkpoint step-1."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final")
    shutil.rmtree(dst / "checkpoints" / "step-2")
    return dst


@pytest.fixture(scope="module")
def one(tmp_path_factory, sft_a, prompts_txt) -> Path:
    """The reference: one process, batch 8."""
    out = tmp_path_factory.mktemp("one") / "run"
    _one_process(sft_a, prompts_txt, out)
    return out


@pytest.fixture(scope="module")
def one_unclipped(tmp_path_factory, sft_a, prompts_txt) -> Path:
    out = tmp_path_factory.mktemp("one-unclipped") / "run"
    _one_process(sft_a, prompts_txt, out, max_grad_norm="null")
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on the CPU is checked on Linux")
def test_two_processes_match_one_and_resume_across_process_counts(tmp_path, sft_a, prompts_txt, one):
    # 2 processes x batch_size 4 == 1 process x 8; the CLI prints once, files are written once.
    two = tmp_path / "two"
    stdout = _torchrun(_cli_args(sft_a, prompts_txt, two, batch_size=4))
    assert stdout.count("wrote") == 1, stdout
    _assert_same_run(two, one)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert not [p for p in two.rglob("*") if p.name.startswith(".")]  # no temporary siblings left

    # Written by 2 processes, resumed by 1 ...
    two_to_one = _keep_only_first_checkpoint(two, tmp_path / "two-to-one")
    _one_process(sft_a, prompts_txt, two_to_one, resume=True)
    _assert_same_run(two_to_one, one)

    # ... and written by 1, resumed by 2.
    one_to_two = _keep_only_first_checkpoint(one, tmp_path / "one-to-two")
    _torchrun([*_cli_args(sft_a, prompts_txt, one_to_two, batch_size=4), "--resume"])
    _assert_same_run(one_to_two, one)


def test_resume_refuses_another_global_batch(tmp_path, sft_a, prompts_txt):
    from soupkit.errors import SoupkitError

    run = tmp_path / "run"
    _one_process(sft_a, prompts_txt, run)
    flags = {"ref": [str(sft_a)], "prompts": str(prompts_txt), "reward": good_words_ref(), "batch_size": 4}
    spec = build_spec(None, flags, [f"{k}={v}" for k, v in {**SETTINGS, "steps": 4}.items()])
    with pytest.raises(SoupkitError, match=r"global batch \(8 = batch_size x processes, now 4\)"):
        train(spec, out=run, resume=True)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on the CPU is checked on Linux")
def test_fsdp2_full_shard_matches_one_process_and_resumes_either_way(tmp_path, sft_a, prompts_txt, one):
    """Policy + critic sharded by FSDP2 over 2 processes: the rollout samples from gathered weights,
    checkpoints hold whole weights and whole optimiser state, so the run equals 1 unsharded process
    and its checkpoints resume without FSDP (and an unsharded checkpoint resumes under FSDP)."""
    launcher = Path(__file__).with_name("fsdp2_launch.py")
    sharded = tmp_path / "fsdp2"
    stdout = _torchrun(_cli_args(sft_a, prompts_txt, sharded, batch_size=4), launcher)
    assert "weights sharded (fsdp2), frozen models replicated" in stdout and stdout.count("wrote") == 1, stdout
    _assert_same_run(sharded, one)
    state = load_state(sharded / "checkpoints" / "step-1" / "policy")
    assert state.keys() == load_state(sft_a).keys()  # whole tensors under their plain names
    assert all(t.shape == w.shape for t, w in zip(state.values(), load_state(sft_a).values()))

    fsdp_to_one = _keep_only_first_checkpoint(sharded, tmp_path / "fsdp2-to-one")
    _one_process(sft_a, prompts_txt, fsdp_to_one, resume=True)
    _assert_same_run(fsdp_to_one, one)

    one_to_fsdp = _keep_only_first_checkpoint(one, tmp_path / "one-to-fsdp2")
    _torchrun([*_cli_args(sft_a, prompts_txt, one_to_fsdp, batch_size=4), "--resume"], launcher)
    _assert_same_run(one_to_fsdp, one)


def _launch_env(config: Path) -> dict[str, str]:
    """The ``ACCELERATE_*`` settings ``accelerate launch --config_file CONFIG`` gives each process,
    from accelerate's own launcher code (it starts one process on a machine without GPUs, so
    torchrun starts the two here)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", "-m", "soupkit"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config) if defaults else ""
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on the CPU is checked on Linux")
@pytest.mark.parametrize("mode", ["fsdp2", "zero3"])
def test_gathered_weights_stay_whole_for_any_number_of_forwards(sft_a, mode):
    """Rank 0 runs 1 forward and rank 1 runs 2 inside ``full_weights``: under ZeRO-3 with
    DeepSpeed's per-layer gather hooks left on, the extra forward's gathers had no partner and the
    run hung (measured while writing this)."""
    if mode == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    env = _launch_env(ROOT / "configs" / "accelerate" / "zero3.yaml") if mode == "zero3" else {}
    args = [str(sft_a)] + (["--fsdp2"] if mode == "fsdp2" else [])
    log = _torchrun(args, Path(__file__).with_name("gather_check.py"), env=env, timeout=300)
    assert "ok rank 0: 1 forwards" in log and "ok rank 1: 2 forwards" in log, log[-3000:]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on the CPU is checked on Linux")
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("config, weights", [
    ("zero2.yaml", "weights replicated, frozen models replicated"),
    ("zero3.yaml", "weights sharded (zero3), frozen models sharded (zero3)")])
def test_deepspeed_configs_match_one_process_and_resume_either_way(tmp_path, sft_a, prompts_txt, one_unclipped,
                                                                    config, weights):
    """The shipped ZeRO-2 / ZeRO-3 configs over 2 processes (DeepSpeed's CPU accelerator, gloo):
    under ZeRO-3 the policy, critic and the frozen reference load sharded and are gathered for the
    rollout, checkpoints and final/; checkpoints hold whole Adam moments under parameter names, so
    a ZeRO run resumes in 1 plain process and the other way round, and every run equals 1 process.
    Gradient clipping is off on both sides: DeepSpeed clips policy and critic by their joint norm,
    soupkit elsewhere by each one's own (with clipping on, explained variance differs by 1.6e-5 at
    step 2). The first DeepSpeed run on a machine compiles a small C++ op (about 40 s)."""
    env = _launch_env(ROOT / "configs" / "accelerate" / config)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    unclipped = {"max_grad_norm": "null"}
    out = tmp_path / "ds"
    log = _torchrun(_cli_args(sft_a, prompts_txt, out, batch_size=4, **unclipped), env=env, timeout=600)
    assert weights in log and log.count("wrote") == 1, log[-3000:]
    _assert_same_run(out, one_unclipped)

    ds_to_one = _keep_only_first_checkpoint(out, tmp_path / "ds-to-one")
    _one_process(sft_a, prompts_txt, ds_to_one, resume=True, **unclipped)
    _assert_same_run(ds_to_one, one_unclipped)

    one_to_ds = _keep_only_first_checkpoint(one_unclipped, tmp_path / "one-to-ds")
    _torchrun([*_cli_args(sft_a, prompts_txt, one_to_ds, batch_size=4, **unclipped), "--resume"], env=env)
    _assert_same_run(one_to_ds, one_unclipped)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on the CPU is checked on Linux")
def test_soupkit_run_align_stage_under_two_processes(tmp_path, sft_a, prompts_txt):
    """``torchrun ... -m soupkit run RECIPE --only align``: every run of the grid trains over both
    processes, markers and logs are written once, and a second launch skips the finished runs."""
    import yaml

    align = {"ref": str(sft_a), "reward": good_words_ref(), "prompts": str(prompts_txt), "batch_size": 4,
             "output": str(tmp_path / "align"), "seeds": [0, 1], "runs": {"ppo": {}},
             **{k: v for k, v in SETTINGS.items() if k not in ("seed", "save_every")}, "steps": 2}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"align": align}))
    log = _torchrun(["run", str(recipe), "--only", "align"])
    assert log.count("done: 2 unit(s) run, 0 skipped") == 1, log[-3000:]
    assert log.count("[align] ppo/seed-0/kl-0.05: running") == 1, log[-3000:]
    for seed in (0, 1):
        run = tmp_path / "align" / "ppo" / f"seed-{seed}"
        assert (run / "final" / "config.json").is_file() and (run / ".soupkit-complete").is_file()
        assert [r["step"] for r in _metrics(run)] == [1, 2]
    assert _metrics(tmp_path / "align" / "ppo" / "seed-0") != _metrics(tmp_path / "align" / "ppo" / "seed-1")
    again = _torchrun(["run", str(recipe), "--only", "align"])
    assert again.count("done: 0 unit(s) run, 2 skipped") == 1, again[-3000:]


def test_soupkit_run_refuses_other_stages_under_several_processes(tmp_path, sft_a, monkeypatch):
    from soupkit.errors import SoupkitError
    from soupkit.pipeline import run_pipeline

    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = {"merge": {"method": "uniform", "models": [str(sft_a), str(sft_a)], "output": str(tmp_path / "soup")}}
    with pytest.raises(SoupkitError, match="runs the sft, reward_model, align stages only: pick them with --only"):
        run_pipeline(recipe)
    assert not (tmp_path / "soup").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on the CPU is checked on Linux")
def test_soupkit_run_sft_and_reward_model_stages_under_two_processes(tmp_path, sft_a):
    """TRL trains over both processes; the model is written once, by the main process, and loads."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft_rows = [{"prompt": "good cat", "completion": " sat on the mat"}] * 16
    prefs = [{"prompt": "good cat", "chosen": " sat on the mat", "rejected": " bad bad bad"}] * 16
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    common = {"learning_rate": 1e-3, "batch_size": 4, "epochs": 1, "max_length": 16}
    recipe = {"sft": [{"name": "a", "base": str(sft_a), "data": str(tmp_path / "sft.jsonl"),
                       "output": str(tmp_path / "sft-a"), **common}],
              "reward_model": {"base": str(sft_a), "data": str(tmp_path / "prefs.jsonl"),
                               "output": str(tmp_path / "rm"), **common}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    log = _torchrun(["run", str(tmp_path / "recipe.yaml"), "--only", "sft", "--only", "reward_model"])
    assert log.count("done: 2 unit(s) run, 0 skipped") == 1, log[-3000:]
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft-a")
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert (tmp_path / "sft-a" / ".soupkit-complete").is_file() and (tmp_path / "rm" / ".soupkit-complete").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or scratch dirs left


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on the CPU is checked on Linux")
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_steps_once_per_minibatch_with_gradient_accumulation(tmp_path, sft_a, prompts_txt):
    """grad_accum 2 x ppo_epochs 2 x minibatches 1: DeepSpeed takes 2 optimiser steps per PPO step,
    as one process does (it would take 4 if it stepped after every micro-batch)."""
    import torch

    out = tmp_path / "ds"
    env = _launch_env(ROOT / "configs" / "accelerate" / "zero3.yaml")
    _torchrun(_cli_args(sft_a, prompts_txt, out, batch_size=4, steps=2, grad_accum=2), env=env, timeout=600)
    state = torch.load(out / "checkpoints" / "step-1" / "trainer_state.pt", weights_only=True)
    assert {int(entry["step"]) for entry in state["optimizer"]["state"].values()} == {2}
