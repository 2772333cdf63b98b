"""The JSON schema, the CLI, plots, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from soupkit.cli import app
from soupkit.diagnostics import report, verdict

runner = CliRunner()
PAIR_KEYS = {"a", "b", "l2", "relative_l2", "cosine", "task_cosine", "sign_conflict", "kl", "kl_reverse",
             "js", "top1_agreement", "layers", "modules", "task_norm_a", "task_norm_b"}
ROW_KEYS = {"l2", "relative_l2", "cosine", "task_cosine", "sign_conflict", "task_norm_a", "task_norm_b"}
PATH_KEYS = {"a", "b", "alpha", "loss", "reward", "barrier", "barrier_chord", "plane"}


def check_schema(result: dict, *, base: bool, prompts: bool, path: bool) -> None:
    assert set(result) == {"models", "pairs"} | ({"path"} if path else set())
    assert all(isinstance(m, str) for m in result["models"])
    n = len(result["models"])
    assert len(result["pairs"]) == n * (n - 1) // 2
    for pair in result["pairs"]:
        required = {"a", "b", "l2", "relative_l2", "cosine", "layers", "modules"}
        required |= {"task_cosine", "sign_conflict", "task_norm_a", "task_norm_b"} if base else set()
        required |= {"kl", "kl_reverse", "js", "top1_agreement"} if prompts else set()
        assert set(pair) == required, set(pair) ^ required
        assert pair["a"] in result["models"] and pair["b"] in result["models"]
        assert all(isinstance(pair[k], float) for k in required - {"a", "b", "layers", "modules"})
        for row in pair["layers"]:
            assert isinstance(row["layer"], int) and set(row) - {"layer"} <= ROW_KEYS
            assert {"l2", "cosine"} <= set(row)
        for row in pair["modules"]:
            assert row["module"] in {"embeddings", "attention", "mlp", "norms", "other"}
            assert set(row) - {"module"} <= ROW_KEYS
    if path:
        assert set(result["path"]) <= PATH_KEYS
        assert len(result["path"]["loss"]) == len(result["path"]["alpha"])


def test_json_schema_keys_absent_when_not_computed(family, texts_file):
    models = [str(family["ft1"]), str(family["ft2"])]
    check_schema(report(models), base=False, prompts=False, path=False)
    check_schema(report(models, base=str(family["base"])), base=True, prompts=False, path=False)
    check_schema(report(models, prompts=texts_file), base=False, prompts=True, path=False)


def test_cli_writes_json_and_plots(tmp_path, family, texts_file, monkeypatch):
    monkeypatch.chdir(family["ft1"].parent)  # relative paths stay exactly as given
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    args = ["inspect", "ft1", "ft2", "ft3", "--base", "base", "--prompts", str(texts_file), "--path",
            "--points", "5", "--json", str(out), "--plots", str(plots)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    check_schema(data, base=True, prompts=True, path=True)
    assert data["models"] == ["ft1", "ft2", "ft3"] and data["pairs"][0]["a"] == "ft1"
    assert data["path"]["plane"]["models"] == ["ft1", "ft2", "ft3"]
    assert sorted(p.name for p in plots.iterdir()) == ["layers.png", "path.png", "plane.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots.iterdir())
    text = " ".join(result.output.split())
    assert "Can these be souped? yes" in text and "Weight space" in text and "Output space" in text
    again = runner.invoke(app, args)  # never overwrite without --force
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_verdict_says_no_for_unrelated_models():
    pairs = [{"a": "x", "b": "y", "cosine": 0.02, "l2": 1.0}]
    got = verdict({"models": ["x", "y"], "pairs": pairs})
    assert got["answer"] == "no" and "Entezari" in got["reasons"][0]


def test_verdict_from_barrier():
    pairs = [{"a": "x", "b": "y", "cosine": 0.99, "sign_conflict": 0.49}]
    path = {"a": "x", "b": "y", "alpha": [0.0, 0.5, 1.0], "loss": [2.0, 2.03, 2.0],
            "barrier": 0.03, "barrier_chord": 0.03}
    assert verdict({"pairs": pairs, "path": path})["answer"] == "yes"  # 1.5% <= 2%
    path = {**path, "loss": [2.0, 2.1, 2.0], "barrier": 0.1, "barrier_chord": 0.1}
    got = verdict({"pairs": pairs, "path": path})
    assert got["answer"] == "no" and any("sign conflicts" in n for n in got["notes"])
    assert verdict({"pairs": pairs})["answer"] == "likely"
    three = {"a": "x", "b": "y", "alpha": [-0.5, 0.5, 1.5], "loss": [2.5, 2.1, 2.6]}  # --points 3: no 0 or 1, no barrier
    assert not any("midpoint" in n for n in verdict({"pairs": pairs, "path": three})["notes"])


def clean_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:") and re.search(pattern, text), text


@pytest.fixture
def outs(tmp_path):
    return tmp_path / "r.json", tmp_path / "plots"


def invoke(outs, *args: str):
    return runner.invoke(app, ["inspect", *map(str, args), "--json", str(outs[0]), "--plots", str(outs[1])])


def nothing_written(outs) -> None:
    assert not outs[0].exists() and not outs[1].exists()
    assert not list(outs[0].parent.glob(".*partial*"))


def test_bad_models(outs, family, arch_pairs, llama4_pair, tmp_path):
    ft1 = family["ft1"]
    clean_error(invoke(outs, ft1, tmp_path / "nope"), r"model 2 '.*nope' not found")
    clean_error(invoke(outs, ft1), "at least two models")
    clean_error(invoke(outs, ft1, arch_pairs["gpt2"][0]), "architecture mismatch")
    clean_error(invoke(outs, ft1, llama4_pair[0]), "num_hidden_layers=2 but .* has num_hidden_layers=4")
    clean_error(invoke(outs, ft1, family["ft2"], "--base", tmp_path / "nobase"), r"--base '.*nobase' not found")
    nothing_written(outs)


def test_tensor_mismatch(outs, family, tmp_path):
    from safetensors.torch import load_file, save_file

    b = tmp_path / "b"
    shutil.copytree(family["ft2"], b)
    state = load_file(b / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, b / "model.safetensors", metadata={"format": "pt"})
    clean_error(invoke(outs, family["ft1"], b), "tensor name mismatch: 'model.layers.1.mlp.up_proj.weight'")
    nothing_written(outs)


def test_bad_options(outs, family, texts_file, tmp_path):
    a, b = family["ft1"], family["ft2"]
    clean_error(invoke(outs, a, b, "--path"), "--path and --reward need --prompts")
    clean_error(invoke(outs, a, b, "--prompts", texts_file, "--reward", "x:y"), "add --path")
    clean_error(invoke(outs, a, b, "--prompts", texts_file, "--path", "--points", "1"), "--points 1")
    clean_error(invoke(outs, a, b, "--prompts", texts_file, "--path", "--reward", "no_such_mod:f"),
                "reward 'no_such_mod:f': cannot import")
    clean_error(invoke(outs, a, b, "--prompts", texts_file, "--path", "--reward", tmp_path / "rm"),
                "neither a reward-model directory nor module:function")
    clean_error(invoke(outs, a, b, "--soup", tmp_path), "--soup .* is not one of the models")
    nothing_written(outs)


def test_bad_prompts(outs, family, tmp_path):
    a, b = family["ft1"], family["ft2"]
    clean_error(invoke(outs, a, b, "--prompts", tmp_path / "none.txt"), "--prompts .*none.txt: no such file")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "the cat"}\n{"prompt": \n')
    clean_error(invoke(outs, a, b, "--prompts", bad), r"p\.jsonl:2: invalid JSON")
    bad.write_text('{"prompt": "the cat"}\n{"question": "x"}\n')
    clean_error(invoke(outs, a, b, "--prompts", bad), r"p\.jsonl:2: no prompt: expected a 'prompt' field .*'text' or 'chosen' .* the row has question")
    csv = tmp_path / "p.csv"
    csv.write_text("x\n")
    clean_error(invoke(outs, a, b, "--prompts", csv), "expected a .jsonl or .txt file")
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    clean_error(invoke(outs, a, b, "--prompts", empty), "no texts")
    nothing_written(outs)


def test_jsonl_text_field(family, tmp_path):
    from soupkit.diagnostics.texts import read_texts

    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "the cat"}\n\n{"text": "hello world"}\n')
    assert read_texts(path) == ["the cat", "hello world"]


def test_existing_outputs_are_refused_before_work(family, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("keep")
    result = runner.invoke(app, ["inspect", str(family["ft1"]), str(family["ft2"]), "--json", str(out)])
    clean_error(result, "already exists; pass --force")
    assert out.read_text() == "keep"
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "keep").write_text("x")
    result = runner.invoke(app, ["inspect", str(family["ft1"]), str(family["ft2"]), "--plots", str(plots)])
    clean_error(result, "already exists and is not empty")


def test_help_lists_inspect():
    result = runner.invoke(app, ["inspect", "--help"])
    assert result.exit_code == 0
    for option in ("--base", "--prompts", "--json", "--plots", "--path", "--reward", "--points"):
        assert option in result.output
