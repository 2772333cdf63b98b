"""Every bad input is one clear line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from soupkit.cli import app

runner = CliRunner()


def run_cli(tmp_path: Path, recipe: dict | str, *args: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return runner.invoke(app, ["merge", str(path), *args])


def assert_clean_error(result, pattern: str, out: Path | None = None) -> None:
    import re

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())  # rich may wrap long lines in a narrow terminal
    assert re.search(pattern, text), text
    assert text.startswith("error:"), text
    if out is not None:
        assert not out.exists() or (out / "keep").exists()
        assert not list(out.parent.glob(f".{out.name}.partial-*"))


def recipe(models, out, method="uniform", **extra) -> dict:
    return {"merge": {"method": method, "models": [str(m) if isinstance(m, Path) else m for m in models],
                      "output": str(out), **extra}}


def test_missing_ingredient(tmp_path, llama_pair):
    out = tmp_path / "soup"
    result = run_cli(tmp_path, recipe([llama_pair[0], tmp_path / "nope"], out))
    assert_clean_error(result, r"merge\.models\[1\] '.*nope' not found", out)


def test_architecture_mismatch(tmp_path, llama_pair, arch_pairs):
    out = tmp_path / "soup"
    result = run_cli(tmp_path, recipe([llama_pair[0], arch_pairs["gpt2"][0]], out))
    assert_clean_error(result, r"architecture mismatch: .*llama-a has architectures=\['LlamaForCausalLM'\]", out)


def test_layer_count_mismatch(tmp_path, llama_pair, llama4_pair):
    result = run_cli(tmp_path, recipe([llama_pair[0], llama4_pair[0]], tmp_path / "soup"))
    assert_clean_error(result, "num_hidden_layers=2 but .* has num_hidden_layers=4")


def _copy_with(tmp_path: Path, src: Path, name: str, edit) -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_tensor_name_mismatch(tmp_path, llama_pair):
    b = _copy_with(tmp_path, llama_pair[1], "b", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    out = tmp_path / "soup"
    result = run_cli(tmp_path, recipe([llama_pair[0], b], out))
    assert_clean_error(result, "tensor name mismatch: 'model.layers.1.mlp.up_proj.weight' is in .*llama-a but not in .*/b", out)


def test_tensor_shape_mismatch(tmp_path, llama_pair):
    def widen(s):
        s["model.norm.weight"] = torch.ones(17)

    b = _copy_with(tmp_path, llama_pair[1], "b", widen)
    result = run_cli(tmp_path, recipe([llama_pair[0], b], tmp_path / "soup"))
    assert_clean_error(result, r"tensor shape mismatch: 'model.norm.weight' is \[16\] in .* but \[17\] in")


def test_vocab_size_mismatch(tmp_path, llama_pair):
    b = tmp_path / "b"
    shutil.copytree(llama_pair[1], b)
    config = json.loads((b / "config.json").read_text())
    config["vocab_size"] = 72
    (b / "config.json").write_text(json.dumps(config))
    result = run_cli(tmp_path, recipe([llama_pair[0], b], tmp_path / "soup"))
    assert_clean_error(result, "vocabulary mismatch: .* has vocab_size=64 but .* has 72")


def test_tokenizer_mismatch(tmp_path, llama_pair):
    b = tmp_path / "b"
    shutil.copytree(llama_pair[1], b)
    tok = json.loads((b / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]
    (b / "tokenizer.json").write_text(json.dumps(tok))
    result = run_cli(tmp_path, recipe([llama_pair[0], b], tmp_path / "soup"))
    assert_clean_error(result, "vocabulary mismatch: the tokenizers of .* differ \\(token 'cat'")


def test_identical_tokenizer_files_are_parsed_once(tmp_path, llama_pair, monkeypatch):
    """A tokenizer.json byte-identical to the first ingredient's is not parsed again; one with the
    same vocabulary written differently is parsed and accepted."""
    from soupkit import run_merge
    from soupkit.merge import preflight

    parsed = []
    vocab = preflight.tokenizer_vocab

    def counted(path):
        parsed.append(Path(path).name)
        return vocab(path)

    monkeypatch.setattr(preflight, "tokenizer_vocab", counted)
    assert (llama_pair[0] / "tokenizer.json").read_bytes() == (llama_pair[1] / "tokenizer.json").read_bytes()
    run_merge(recipe(list(llama_pair), tmp_path / "soup"))
    assert parsed == [llama_pair[0].name]
    b = tmp_path / "b"
    shutil.copytree(llama_pair[1], b)
    (b / "tokenizer.json").write_text(json.dumps(json.loads((b / "tokenizer.json").read_text()), indent=1))
    parsed.clear()
    run_merge(recipe([llama_pair[0], b], tmp_path / "soup2"))
    assert parsed == [llama_pair[0].name, "b"]


def test_weights_summing_to_zero(tmp_path, llama_pair):
    models = [{"model": str(llama_pair[0]), "weight": 1.0}, {"model": str(llama_pair[1]), "weight": -1.0}]
    assert_clean_error(run_cli(tmp_path, recipe(models, tmp_path / "soup", "weighted")), "weights sum to 0")


def test_layerwise_zero_sum_names_tensor(tmp_path, llama_pair):
    models = [{"model": str(llama_pair[0]), "weight": [1.0, 0.0]},
              {"model": str(llama_pair[1]), "weight": [-1.0, 1.0]}]  # sums to 0 at t = 0 only
    result = run_cli(tmp_path, recipe(models, tmp_path / "soup", "layerwise"))
    assert_clean_error(result, r"merge weights for tensor '(model\.embed_tokens\.weight|model\.layers\.0\.[\w.]+)' sum to 0")


def test_unknown_method(tmp_path, llama_pair):
    result = run_cli(tmp_path, recipe(list(llama_pair), tmp_path / "soup", "dare-ties"))
    assert_clean_error(result, "unknown method 'dare-ties' \\(did you mean 'dare_ties'\\?\\)")


@pytest.mark.parametrize(("edit", "pattern"), [
    (lambda r: r["merge"].update(modelz=r["merge"]["models"]), r"merge\.modelz: unknown key \(did you mean 'models'\?\)"),
    (lambda r: r.update(marge={}), r"marge: unknown key \(did you mean 'merge'\?\)"),
    (lambda r: r["merge"]["models"].__setitem__(0, {"model": r["merge"]["models"][0], "wieght": 1}),
     r"merge\.models\[0\]\.wieght: unknown key \(did you mean 'weight'\?\)"),
    (lambda r: r["merge"].update(dtype="bf16"), r"merge\.dtype: Input should be 'float32', 'float16' or 'bfloat16'"),
])
def test_unknown_or_misspelt_keys(tmp_path, llama_pair, edit, pattern):
    r = recipe(list(llama_pair), tmp_path / "soup")
    edit(r)
    assert_clean_error(run_cli(tmp_path, r), pattern)


def test_misspelt_mergekit_parameter_is_an_error(tmp_path, llama_pair, llama_c):
    models = [{"model": str(llama_pair[1]), "weight": 0.5, "parameters": {"densty": 0.5}}]
    result = run_cli(tmp_path, recipe(models, tmp_path / "soup", "ties", base=str(llama_pair[0])))
    assert_clean_error(result, r"models\[0\]\.parameters\.densty: unknown per-model parameter for ties \(did you mean 'density'\?\)")


def test_mergekit_method_rules(tmp_path, llama_pair, llama_c):
    three = [*llama_pair, llama_c]
    assert_clean_error(run_cli(tmp_path, recipe(three, tmp_path / "s", "slerp", base=str(llama_pair[0]),
                                                 parameters={"t": 0.5})), "slerp needs exactly 2 models")
    assert_clean_error(run_cli(tmp_path, recipe([{"model": str(llama_pair[1]), "weight": 1}], tmp_path / "s", "ties")),
                       "merge.base: method ties needs a base model")
    assert_clean_error(run_cli(tmp_path, recipe(list(llama_pair), tmp_path / "s", "slerp", base=str(llama_pair[0]))),
                       r"merge\.parameters\.t: required by method slerp")


def test_yaml_syntax_error_names_line(tmp_path):
    text = "merge:\n  method: uniform\n  models: [a, b\n  output: x\n"
    assert_clean_error(run_cli(tmp_path, text), r"recipe\.yaml: line \d+, column \d+: YAML syntax error")


def test_truncated_safetensors(tmp_path, llama_pair):
    b = tmp_path / "b"
    shutil.copytree(llama_pair[1], b)
    data = (b / "model.safetensors").read_bytes()
    (b / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = run_cli(tmp_path, recipe([llama_pair[0], b], tmp_path / "soup"))
    assert_clean_error(result, r"b/model\.safetensors: truncated safetensors file: tensor '.*' ends at byte")


def test_existing_output_is_left_untouched(tmp_path, llama_pair):
    out = tmp_path / "soup"
    out.mkdir()
    (out / "keep").write_text("precious")
    result = run_cli(tmp_path, recipe(list(llama_pair), out))
    assert_clean_error(result, "already exists and is not empty; pass --force", out)
    assert [p.name for p in out.iterdir()] == ["keep"]
    ok = run_cli(tmp_path, recipe(list(llama_pair), out), "--force")
    assert ok.exit_code == 0, ok.output
    assert not (out / "keep").exists() and (out / "model.safetensors").exists()


def _pickled(tmp_path: Path, src: Path) -> Path:
    dst = tmp_path / "pickled"
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_pickle_refused_unless_allowed(tmp_path, llama_pair):
    from tests.conftest import load_state
    from tests.merge.test_merge import formula

    pickled = _pickled(tmp_path, llama_pair[1])
    out = tmp_path / "soup"
    result = run_cli(tmp_path, recipe([llama_pair[0], pickled], out))
    assert_clean_error(result, "only pickle weights \\(pytorch_model.bin\\).*--allow-pickle", out)
    ok = run_cli(tmp_path, recipe([llama_pair[0], pickled], out), "--allow-pickle")
    assert ok.exit_code == 0, ok.output
    want = formula([load_state(p) for p in llama_pair], lambda _: [0.5, 0.5])
    got = load_state(out)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_no_output_anywhere(tmp_path, llama_pair):
    r = recipe(list(llama_pair), "")
    del r["merge"]["output"]
    assert_clean_error(run_cli(tmp_path, r), "merge.output: no output directory")


def test_method_weight_rules(tmp_path, llama_pair):
    a, b = (str(p) for p in llama_pair)
    cases = [
        (recipe([{"model": a, "weight": 1}, b], tmp_path / "s"), "method 'uniform' takes no weights"),
        (recipe([{"model": a, "weight": 1}, b], tmp_path / "s", "weighted"), r"models\[1\]\.weight: method 'weighted' needs a weight"),
        (recipe([{"model": a, "weight": [1, 0]}, {"model": b, "weight": 1}], tmp_path / "s", "weighted"), "use method: layerwise"),
        (recipe([a], tmp_path / "s"), "a soup needs at least two models"),
        (recipe([{"model": a, "weight": "heavy"}, {"model": b, "weight": 1}], tmp_path / "s", "weighted"), "weight must be a finite number"),
    ]
    for r, pattern in cases:
        assert_clean_error(run_cli(tmp_path, r), pattern)


def test_cli_success_prints_summary(tmp_path, llama_pair):
    result = run_cli(tmp_path, recipe(list(llama_pair), tmp_path / "soup"))
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "uniform of 2 models" in result.output


def test_set_override(tmp_path, llama_pair):
    result = run_cli(tmp_path, recipe(list(llama_pair), tmp_path / "soup"), "--set", "merge.dtype=bfloat16")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "soup" / "config.json").read_text())["dtype"] == "bfloat16"


def test_python_m_soupkit_reports_error_with_exit_2(tmp_path):
    import subprocess
    import sys

    (tmp_path / "r.yaml").write_text("merge: {models: [a, b], output: o, methd: x}\n")
    proc = subprocess.run([sys.executable, "-m", "soupkit", "merge", str(tmp_path / "r.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "methd: unknown key (did you mean 'method'?)" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_bad_shard_size_is_named(tmp_path, llama_pair):
    r = recipe(list(llama_pair), tmp_path / "soup", shard_size="1.2.3GB")
    assert_clean_error(run_cli(tmp_path, r), r"merge\.shard_size: bad size '1\.2\.3GB'")


def test_tokenizer_with_an_extra_token_is_named(tmp_path, llama_pair):
    b = tmp_path / "b"
    shutil.copytree(llama_pair[1], b)
    tok = json.loads((b / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zebra"] = 60
    (b / "tokenizer.json").write_text(json.dumps(tok))
    result = run_cli(tmp_path, recipe([llama_pair[0], b], tmp_path / "soup"))
    assert_clean_error(result, "token 'zebra' has id None vs 60")


def _with_template(tmp_path: Path, src: Path, name: str, template: str | None) -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    if template is not None:
        (dst / "chat_template.jinja").write_text(template)
    return dst


def test_chat_templates_must_agree_and_the_soup_keeps_them(tmp_path, llama_pair):
    a = _with_template(tmp_path, llama_pair[0], "a", "{{ 'A' }}")
    b = _with_template(tmp_path, llama_pair[1], "b", "{{ 'B' }}")
    out = tmp_path / "soup"
    assert_clean_error(run_cli(tmp_path, recipe([a, b], out)),
                       r"chat template mismatch: .*/a and .*/b render conversations differently; set merge.chat_template", out)
    (tmp_path / "chosen.jinja").write_text("{{ 'C' }}")
    result = run_cli(tmp_path, recipe([a, b], out, chat_template=str(tmp_path / "chosen.jinja")))
    assert result.exit_code == 0, result.output
    assert (out / "chat_template.jinja").read_text() == "{{ 'C' }}"
    (b / "chat_template.jinja").write_text("{{ 'A' }}")
    result = run_cli(tmp_path, recipe([a, b], tmp_path / "soup2"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "soup2" / "chat_template.jinja").read_text() == "{{ 'A' }}"


def test_chatml_soup_needs_the_markers_in_the_vocabulary(tmp_path, llama_pair):
    out = tmp_path / "soup"
    assert_clean_error(run_cli(tmp_path, recipe(list(llama_pair), out, chat_template="chatml")),
                       r"merge.chat_template chatml: .*llama-a has no <\|im_end\|> token", out)
