"""``soupkit align``'s settings flags come from the ``AlignSpec`` schema: one flag per setting."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from soupkit.cli import ALIGN_NOT_FLAGS, app
from soupkit.flags import flag_type, spec_options
from soupkit.recipe import AlignSpec


def _flags_of_align() -> set[str]:
    import typer

    command = typer.main.get_command(app).commands["align"]
    return {opt for param in command.params for opt in param.opts + param.secondary_opts}


def test_every_align_setting_has_its_flag_and_help():
    flags = _flags_of_align()
    for name, field in AlignSpec.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name not in ALIGN_NOT_FLAGS:
            assert flag in flags, name
            assert field.description, f"AlignSpec.{name} has no docstring for --help"
    assert {"--bf16", "--no-bf16", "--out", "-o", "--watch", "--resume", "--force", "--set"} <= flags
    assert not {"--runs", "--seeds", "--kl-coefs", "--output", "--lora-target-modules"} & flags


def test_flag_types():
    from typing import Literal

    assert flag_type(int | None) == (int, None)
    assert flag_type(Literal["k1", "k2"]) == (str, "[k1|k2]")
    assert flag_type(list[str]) == (list[str], None)
    assert flag_type(dict[str, str]) == (None, None)
    assert flag_type(list[str] | str) == (None, None)


def test_a_setting_no_flag_can_carry_must_be_excluded():
    with pytest.raises(TypeError, match="AlignSpec.watch"):
        spec_options(AlignSpec, exclude=["output", "lora_target_modules", "runs", "seeds", "kl_coefs"])


def test_flags_reach_the_spec(monkeypatch, tmp_path):
    """The values given on the command line arrive in the AlignSpec that train() receives; the
    others keep the schema's defaults."""
    seen = {}

    def fake_train(spec, **kw):
        seen["spec"] = spec
        (tmp_path / "final").mkdir(exist_ok=True)
        return tmp_path / "final"

    monkeypatch.setattr("soupkit.rlhf.train", fake_train)
    result = CliRunner().invoke(app, [
        "align", "--ref", "a", "--ref", "b", "--reward", "m:f", "--prompts", "p.txt", "--temperature", "0.9",
        "--kl-estimator", "k3", "--no-whiten-advantages", "--bf16", "--max-grad-norm", "0.5", "--ref-mode",
        "mean_kl", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    spec = seen["spec"]
    assert spec.ref == ["a", "b"] and spec.ref_mode == "mean_kl" and spec.output == str(tmp_path / "o")
    assert (spec.temperature, spec.kl_estimator, spec.whiten_advantages, spec.bf16, spec.max_grad_norm) == (
        0.9, "k3", False, True, 0.5)
    assert spec.kl_coef == AlignSpec.model_fields["kl_coef"].default and spec.whiten_rewards is False


def test_a_bad_choice_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["align", "--ref", "a", "--reward", "m:f", "--prompts", "p.txt",
                                      "--kl-estimator", "k9", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "kl_estimator" in result.output and "Traceback" not in result.output
