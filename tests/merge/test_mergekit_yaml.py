"""``soupkit merge mk.yaml`` reads a mergekit configuration as is and gives mergekit's tensors.

The configurations have the structure and parameters of the examples shipped in mergekit's
repository (https://github.com/arcee-ai/mergekit/tree/main/examples: linear, ties, bio-merge,
gradient-slerp, arcee_fusion, orcamini-platy-44layer), with the model names replaced by tiny
checkpoints stored in the example's dtype. The oracle is mergekit's own ``run_merge`` on the same
file, the function ``mergekit-yaml`` calls.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from soupkit import run_merge
from soupkit.errors import SoupkitError
from soupkit.recipe import load_recipe
from tests.conftest import load_state, make_model

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def family(root: Path, dtype: str, n: int = 3) -> list[Path]:
    """A 4-layer base and ``n`` fine-tunes of it (base + noise), stored in ``dtype``."""
    from safetensors.torch import save_file

    base = make_model(root / "base", seed=51, layers=4, dtype=DTYPES[dtype])
    state = load_state(base)
    out = [base]
    for i in range(n):
        torch.manual_seed(60 + i)
        dst = root / f"ft{i}"
        shutil.copytree(base, dst)
        save_file({k: (v.float() + 0.03 * torch.randn_like(v.float())).to(v.dtype) for k, v in state.items()},
                  dst / "model.safetensors", metadata={"format": "pt"})
        out.append(dst)
    return out


def examples(m: list[Path]) -> dict[str, dict]:
    """mergekit's example configurations with tiny models (m[0] is the base)."""
    base, a, b, c = (str(p) for p in m)
    return {
        "linear": {"merge_method": "linear", "dtype": "float16", "models": [
            {"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 0.3}},
            {"model": c, "parameters": {"weight": 0.5}}]},
        "ties": {"merge_method": "ties", "base_model": base, "dtype": "float16",
                 "parameters": {"normalize": True, "int8_mask": True}, "models": [
                     {"model": a, "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                     {"model": b, "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                     {"model": c, "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5},
                                                                             {"value": 0}]}}]},
        "bio-merge": {"merge_method": "ties", "base_model": base, "dtype": "float16",
                      "parameters": {"normalize": False, "int8_mask": True}, "models": [
                          {"model": a, "parameters": {"density": 0.5, "weight": 0.5}},
                          {"model": b, "parameters": {"density": 0.5, "weight": 0.5}}]},
        "gradient-slerp": {"merge_method": "slerp", "base_model": a, "dtype": "float16",
                           "slices": [{"sources": [{"model": a, "layer_range": [0, 4]},
                                                   {"model": b, "layer_range": [0, 4]}]}],
                           "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                                {"value": 0.5}]}},
    }


def through_mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_run_merge

    mergekit_run_merge(MergeConfiguration.model_validate(config), str(out),
                       options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    return load_state(out)


def through_soupkit(config: dict, tmp_path: Path, name: str) -> tuple[dict[str, torch.Tensor], Path]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = run_merge(load_recipe(path), out=tmp_path / f"{name}-soupkit")
    return load_state(out), out


def ulps16(ours: torch.Tensor, theirs: torch.Tensor) -> np.ndarray:
    """Distance in float16 units in the last place (of the larger magnitude)."""
    x, y = ours.float().numpy(), theirs.float().numpy()
    spacing = np.spacing(np.maximum(np.abs(x), np.abs(y)).astype(np.float16)).astype(np.float32)
    return np.abs(x - y) / spacing


@pytest.fixture(scope="module")
def fp16_family(tmp_path_factory) -> list[Path]:
    return family(tmp_path_factory.mktemp("mk16"), "float16")


BOUNDS = {"ties": (0, 0), "bio-merge": (None, 2), "linear": (1, None), "gradient-slerp": (1, None)}
"""(largest float16 ulp distance, most elements that may differ) per example; None: no limit."""


@pytest.mark.parametrize("name", list(BOUNDS))
def test_native_examples_give_mergekits_tensors(tmp_path, fp16_family, name):
    """The task-arithmetic family computes in the configuration's dtype as mergekit does (every step
    rounded to float16, sums accumulated in float32), so ties.yml is bit-identical. bio-merge (measured:
    1 element of 11408) differs only where several deltas tie in magnitude at the density cut, where
    mergekit's pick is argsort's and unspecified. linear (soupkit's weighted soup: weights normalised
    before the sum, mergekit divides after it; measured 64 elements) and slerp (the angle from float64
    sums; measured 1 element) are computed in float32 by both and differ by at most 1 float16 ulp."""
    config = examples(fp16_family)[name]
    ours, out = through_soupkit(config, tmp_path, name)
    theirs = through_mergekit(config, tmp_path / f"{name}-mergekit")
    spec = yaml.safe_load((out / "soupkit_recipe.yaml").read_text())["merge"]
    assert spec["method"] == ("weighted" if name == "linear" else config["merge_method"])
    assert spec.get("backend", "auto") == "auto"  # soupkit's engine ran it
    assert sorted(ours) == sorted(theirs)
    worst, differing = 0.0, 0
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype == torch.float16, key
        u = ulps16(ours[key], theirs[key])
        worst, differing = max(worst, float(u.max())), differing + int((u > 0).sum())
    max_ulps, max_differing = BOUNDS[name]
    assert max_ulps is None or worst <= max_ulps, worst
    assert max_differing is None or differing <= max_differing, differing


def test_other_methods_and_slices_run_through_mergekit(tmp_path, tmp_path_factory):
    """arcee_fusion (not native) and a passthrough frankenmerge of layer slices: mergekit runs the
    configuration as written, so the tensors are mergekit's own."""
    m = family(tmp_path_factory.mktemp("mkbf16"), "bfloat16", n=1)
    base, a = (str(p) for p in m)
    configs = {
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "dtype": "bfloat16",
                         "models": [{"model": base}, {"model": a}]},
        "orcamini-platy-44layer": {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
            {"sources": [{"model": base, "layer_range": [0, 3]}]},
            {"sources": [{"model": a, "layer_range": [1, 4]}]}]},
    }
    for name, config in configs.items():
        ours, out = through_soupkit(config, tmp_path, name)
        theirs = through_mergekit(config, tmp_path / f"{name}-mergekit")
        assert sorted(ours) == sorted(theirs), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
        assert yaml.safe_load((out / "soupkit_recipe.yaml").read_text())["merge"]["backend"] == "mergekit"
    # the frankenmerge has 3 + 3 layers: base's 0-2, then a's 1-3
    sa = load_state(m[1])
    assert torch.equal(ours["model.layers.5.mlp.up_proj.weight"], sa["model.layers.3.mlp.up_proj.weight"])
    assert "model.layers.6.mlp.up_proj.weight" not in ours


def test_filter_lists_become_mappings():
    from soupkit.merge.mergekit_yaml import to_setting

    assert to_setting([{"filter": "mlp", "value": 0.5}, {"value": 0}], "w") == {"mlp": 0.5, "default": 0}
    assert to_setting([{"filter": "a", "value": 1}, {"filter": "*", "value": 2}, {"filter": "b", "value": 3}],
                      "w") == {"a": 1, "default": 2}
    assert to_setting([0, 0.5, 1], "w") == [0, 0.5, 1]


def test_tokenizer_source_and_dtype(tmp_path, fp16_family):
    base, a, b, _ = fp16_family
    (tmp_path / "tok").mkdir()
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "out_dtype": "float32",
              "dtype": "float16", "tokenizer_source": str(a),
              "models": [{"model": str(a), "parameters": {"weight": 1.0}}]}
    merged, out = through_soupkit(config, tmp_path, "ta")
    assert merged["model.norm.weight"].dtype == torch.float32
    assert (out / "tokenizer.json").read_bytes() == (Path(a) / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(("config", "message"), [
    ({"merge_method": "ties", "modelz": []}, r"modelz: not a mergekit configuration key \(did you mean 'models'\?\)"),
    ({"merge_method": "ties", "base_model": "B", "models": [{"model": "A", "parameters": {"densty": 0.5, "weight": 1}}]},
     r"merge.models\[0\].parameters.densty: unknown per-model parameter for ties \(did you mean 'density'\?\)"),
    ({"merge_method": "linear", "dtype": "int8", "models": [{"model": "A", "parameters": {"weight": 1}}]},
     "out_dtype/dtype 'int8'"),
])
def test_bad_mergekit_configs_are_one_line(tmp_path, config, message):
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SoupkitError, match=message):
        run_merge(load_recipe(path), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bf16_working_dtype_and_cli(tmp_path, tmp_path_factory):
    """``soupkit merge mk.yaml --out DIR`` on bfloat16 TIES configurations. Without trimming (density 1)
    every step is rounded to bfloat16 as in mergekit: bit-identical. With density 0.6, bfloat16 deltas
    often tie in magnitude at the cut and torch's argsort picks among them in no specified order
    (measured: 21 of 11408 elements differ), so only a small fraction may differ."""
    from typer.testing import CliRunner

    from soupkit.cli import app

    base, a, b = family(tmp_path_factory.mktemp("bf16ties"), "bfloat16", n=2)
    for density, most in ((1.0, 0), (0.6, 0.005)):
        config = {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
                  "parameters": {"normalize": True, "lambda": 0.9},
                  "models": [{"model": str(a), "parameters": {"density": density, "weight": 0.7}},
                             {"model": str(b), "parameters": {"density": density, "weight": 0.4}}]}
        path = tmp_path / f"mk{density}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = CliRunner().invoke(app, ["merge", str(path), "--out", str(tmp_path / f"soup{density}")])
        assert result.exit_code == 0, result.output
        ours, theirs = load_state(tmp_path / f"soup{density}"), through_mergekit(config, tmp_path / f"mk{density}")
        differing = sum(int((ours[k] != theirs[k]).sum()) for k in ours)
        assert all(ours[k].dtype == torch.bfloat16 for k in ours)
        assert differing <= most * sum(v.numel() for v in ours.values()), (density, differing)
