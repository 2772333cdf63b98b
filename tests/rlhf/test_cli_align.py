"""``soupkit align`` through typer's CliRunner: flags, recipes, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from soupkit.cli import app
from soupkit.rlhf import build_spec
from soupkit.rlhf.config import lr_factor, parse_watch
from tests.rlhf.conftest import good_words_ref

runner = CliRunner()


def test_align_command_writes_metrics_and_final(tmp_path, soup, sft_a, prompts_txt):
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "align", "--ref", str(soup), "--init", str(sft_a), "--reward", good_words_ref(),
        "--prompts", str(prompts_txt), "--out", str(out), "--steps", "2", "--batch-size", "4",
        "--max-new-tokens", "3", "--learning-rate", "1e-4", "--kl-coef", "0.1", "--ppo-epochs", "1",
        "--minibatches", "2", "--seed", "1", "--save-every", "1", "--watch", f"sft={sft_a}",
        "--set", "kl_estimator=k3"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["kl_coef"] == 0.1 and "kl_sft" in rows[0]
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "step-1" / "trainer_state.pt").is_file()
    recipe = (out / "final" / "soupkit_recipe.yaml").read_text()
    assert "kl_estimator: k3" in recipe and str(soup) in recipe


def test_recipe_ref_defaults_to_merge_output(tmp_path, soup, prompts_txt):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge:\n  models: [a, b]\n  output: {soup}\n"
                      f"align:\n  reward: {good_words_ref()}\n  prompts: {prompts_txt}\n  kl_coef: 0.2\n")
    spec = build_spec(recipe, {"steps": 3}, ["align.seed=4", "batch_size=2"])
    assert spec.ref == [str(soup)] and spec.kl_coef == 0.2
    assert (spec.steps, spec.seed, spec.batch_size) == (3, 4, 2)
    assert build_spec(recipe, {"ref": ["other"]}).ref == ["other"]  # --ref overrides the rule


@pytest.mark.parametrize("args, message", [
    (["--ref", "/no/ref"], "reference '/no/ref' not found"),
    (["--watch", "no-equals"], "expected NAME=PATH"),
    (["--set", "kl_coeff=1"], "did you mean 'kl_coef'"),
    (["--batch-size", "3", "--minibatches", "2"], "divisible"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, sft_a, prompts_txt, args, message):
    base = ["align", "--reward", good_words_ref(), "--prompts", str(prompts_txt), "--out", str(tmp_path / "o")]
    if "--ref" not in args:
        base += ["--ref", str(sft_a)]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_parse_watch_and_lr_schedule():
    assert parse_watch(["sft=runs/a", "soup=runs/s"]) == {"sft": "runs/a", "soup": "runs/s"}
    spec = build_spec(None, {"ref": ["r"], "reward": "m:f", "prompts": "p.txt", "steps": 10})
    assert [lr_factor(spec, s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    warm = spec.model_copy(update={"warmup_steps": 1, "lr_schedule": "constant"})
    assert [lr_factor(warm, s) for s in (0, 1, 9)] == [0.5, 1.0, 1.0]


DS_WARNING = "Setting accelerator to CPU"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed extra")
def test_no_deepspeed_cpu_warning_outside_a_deepspeed_launch(tmp_path, sft_a, prompts_txt):
    """accelerate imports deepspeed (when installed) to unwrap the policy before saving, and
    DeepSpeed then warns that it fell back to the CPU; soupkit drops that line, not DeepSpeed."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_DEEPSPEED"}
    bare = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True, env=env)
    if DS_WARNING not in bare.stdout + bare.stderr:
        pytest.skip("deepspeed found an accelerator here, so it does not warn")
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "soupkit", "align", "--ref", str(sft_a),
                          "--reward", good_words_ref(), "--prompts", str(prompts_txt), "--out", str(out),
                          "--steps", "1", "--batch-size", "2", "--max-new-tokens", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "final" / "model.safetensors").is_file()
    assert "| deepspeed\n" in run.stderr  # -X importtime: deepspeed was imported during the run
    assert DS_WARNING not in run.stdout + run.stderr


def test_deepspeed_launch_keeps_deepspeeds_logging(monkeypatch):
    from soupkit.launch import _not_cpu_fallback, quiet_deepspeed_detection

    logger = logging.getLogger("DeepSpeed")
    monkeypatch.setattr(logger, "filters", [])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    quiet_deepspeed_detection()
    assert logger.filters == []
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    quiet_deepspeed_detection()
    quiet_deepspeed_detection()
    assert logger.filters == [_not_cpu_fallback]
    record = logging.LogRecord("DeepSpeed", logging.WARNING, "x.py", 1, "Other warning", None, None)
    assert _not_cpu_fallback(record) and not _not_cpu_fallback(
        logging.LogRecord("DeepSpeed", logging.WARNING, "x.py", 1, DS_WARNING + ". If you have GPU", None, None))
