"""Inventory of bad inputs to ``soupkit align`` that once trained silently or printed a traceback
(issue #11), each run through the CLI: one ``error:`` line saying what is wrong, exit code 2, and a
traceback only when ``--debug`` / ``SOUPKIT_DEBUG=1`` asks for one.

Refused elsewhere and tested there: missing paths, bad flags and ``--set`` keys, batch sizes
(test_cli_align.py); prompt files and unimportable reward functions (test_prompts_reward.py);
a non-finite loss, disk full and signals (test_faults.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from soupkit.cli import app
from soupkit.errors import SoupkitError
from tests.conftest import tiny_config, tokenizer
from tests.rlhf.conftest import REWARDS

runner = CliRunner()
TINY = ["--steps", "2", "--batch-size", "4", "--max-new-tokens", "3", "--ppo-epochs", "1", "--seed", "1",
        "--save-every", "0"]
NO_HEAD = ("a reward model must be a sequence classifier (one label) whose score head was saved: train one with "
           "the reward_model: stage of `soupkit run`, or pass a reward function as module:function")
DEBUG_HINT = "(`soupkit --debug ...` or SOUPKIT_DEBUG=1 prints its traceback)"


def align(tmp_path: Path, ref: Path, prompts: Path, reward: str, *before: str, env: dict | None = None):
    """``soupkit [before] align`` on a tiny run."""
    args = [*before, "align", "--ref", str(ref), "--reward", reward, "--prompts", str(prompts),
            "--out", str(tmp_path / "out"), *TINY]
    return runner.invoke(app, args, env=env)


def error_line(result) -> str:
    """The one ``error:`` line of a refused command (exit code 2, no traceback), without ``error: ``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "╭" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0].removeprefix("error: ")


def seq_cls_dir(path: Path, labels: int = 1, shard: str | None = None) -> Path:
    """A tiny LlamaForSequenceClassification saved with ``labels`` outputs (sharded when asked)."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config("llama")
    config.num_labels = labels
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tokenizer().save_pretrained(path)
    return path


def fails_line() -> int:
    """The line of rewards.py that raises in ``fails_at_second_call``."""
    lines = REWARDS.read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if "FAILS_LINE" in line)


# --- reward models without a trained score head: refused in preflight, before any model loads ---

@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if training gets as far as loading models."""
    def load_models(*args, **kwargs):
        raise AssertionError("models were loaded: the bad reward model was not refused in preflight")

    monkeypatch.setattr("soupkit.rlhf.trainer.load_models", load_models)


def test_causal_lm_as_reward_model_is_refused_before_loading(tmp_path, sft_a, prompts_txt, no_loading):
    line = error_line(align(tmp_path, sft_a, prompts_txt, str(sft_a)))
    assert line == f"reward model {sft_a}: no trained score head (LlamaForCausalLM; no score.weight in its weights); {NO_HEAD}"
    assert not (tmp_path / "out").exists()


def test_sharded_causal_lm_is_refused_and_sharded_classifier_accepted(tmp_path):
    from transformers import AutoModelForCausalLM

    from soupkit.rlhf.reward import reward_model_dir

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path / "lm", max_shard_size="20KB")
    assert (tmp_path / "lm" / "model.safetensors.index.json").is_file()
    with pytest.raises(SoupkitError, match="no trained score head"):
        reward_model_dir(str(tmp_path / "lm"))
    rm = seq_cls_dir(tmp_path / "rm", shard="20KB")
    assert (rm / "model.safetensors.index.json").is_file() and reward_model_dir(str(rm)) == rm


@pytest.mark.parametrize("case, problem", [
    ("two_labels", "its score head has 2 outputs, not 1"),
    ("config_only", "no weights (*.safetensors or pytorch_model*.bin) in the directory"),
])
def test_other_unusable_reward_models(tmp_path, sft_a, prompts_txt, no_loading, case, problem):
    if case == "two_labels":
        rm = seq_cls_dir(tmp_path / "rm", labels=2)
    else:
        rm = tmp_path / "rm"
        rm.mkdir()
        shutil.copy(sft_a / "config.json", rm / "config.json")
    assert error_line(align(tmp_path, sft_a, prompts_txt, str(rm))) == f"reward model {rm}: {problem}; {NO_HEAD}"


def test_eval_and_inspect_refuse_the_same_way(tmp_path, sft_a, sft_b, prompts_txt):
    """One check (``reward_model_dir``) serves align, eval's scorer and inspect's path reward."""
    from soupkit.evaluation.sampling import load_scorer

    want = f"reward model {sft_a}: no trained score head (LlamaForCausalLM; no score.weight in its weights); {NO_HEAD}"
    with pytest.raises(SoupkitError) as refused:
        load_scorer(str(sft_a), tokenizer())
    assert str(refused.value) == want
    result = runner.invoke(app, ["inspect", str(sft_a), str(sft_b), "--prompts", str(prompts_txt), "--path",
                                 "--reward", str(sft_a), "--json", str(tmp_path / "r.json")])
    assert error_line(result) == want and not (tmp_path / "r.json").exists()


def test_a_trained_reward_model_still_trains(tmp_path, sft_a, prompts_txt, reward_model):
    result = align(tmp_path, sft_a, prompts_txt, str(reward_model))
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]


# --- reward functions that fail or return something unusable: one line naming function and step ---

@pytest.mark.parametrize("name, step, problem", [
    ("fails_at_second_call", 2, f"raised ConnectionError: reward server unreachable (at rewards.py:{fails_line()}) "
                                f"{DEBUG_HINT}"),
    ("one_score", 1, "returned 1 scores for 4 completions"),
    ("nan_scores", 1, "returned a NaN or infinite score"),
    ("no_scores", 1, "returned NoneType; expected a list of floats"),
])
def test_reward_function_failures_name_function_and_step(tmp_path, sft_a, prompts_txt, name, step, problem):
    line = error_line(align(tmp_path, sft_a, prompts_txt, f"{REWARDS}:{name}"))
    assert line == f"PPO step {step}: reward function {name} {problem}"


@pytest.mark.parametrize("before, env", [(["--debug"], None), ([], {"SOUPKIT_DEBUG": "1"})])
def test_debug_prints_the_users_traceback_then_the_line(tmp_path, sft_a, prompts_txt, before, env):
    result = align(tmp_path, sft_a, prompts_txt, f"{REWARDS}:fails_at_second_call", *before, env=env)
    assert result.exit_code == 2, result.output
    out = result.output
    assert "Traceback" in out and 'raise ConnectionError("reward server' in out  # the user's own frame
    assert out.index("The above exception was the direct cause") < out.index("error: PPO step 2: reward function")
    assert out.rstrip().splitlines()[-1].startswith("error: PPO step 2: reward function fails_at_second_call raised")


def test_debug_is_off_unless_asked(tmp_path, sft_a, prompts_txt):
    """SOUPKIT_DEBUG=0 is off, and one invocation's --debug does not leak into the next."""
    assert align(tmp_path, sft_a, prompts_txt, "no_module_xyz:f", "--debug").exit_code == 2
    result = align(tmp_path, sft_a, prompts_txt, "no_module_xyz:f", env={"SOUPKIT_DEBUG": "0"})
    assert error_line(result).startswith("reward 'no_module_xyz:f': cannot import 'no_module_xyz'")
