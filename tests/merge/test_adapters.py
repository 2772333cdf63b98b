"""LoRA adapters as soup ingredients (issue #19), against PEFT's own merge and the formula.

Oracles: PEFT's ``merge_and_unload`` (an independent implementation of W + s B A), the documented
arithmetic written out in torch (``adapter_formula``), and the logits of the full soup model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from soupkit import run_merge
from soupkit.errors import SoupkitError
from soupkit.merge import engine
from tests.conftest import load_state, make_model
from tests.lora import make_adapter, merged
from tests.merge.test_merge import formula


@pytest.fixture(scope="module")
def lora_world(tmp_path_factory) -> dict[str, Path]:
    """One tiny Llama base and three adapters on it: two rank 4 (alpha 8), one rank 2 (alpha 16,
    rsLoRA) on the attention only, and one with a whole ``lm_head`` (modules_to_save)."""
    root = tmp_path_factory.mktemp("lora")
    base = make_model(root / "base", seed=5)
    return {
        "base": base,
        "a": make_adapter(root / "a", base, seed=1),
        "b": make_adapter(root / "b", base, seed=2),
        "c": make_adapter(root / "c", base, seed=3),
        "r2": make_adapter(root / "r2", base, seed=4, rank=2, alpha=16, use_rslora=True),
        "attn": make_adapter(root / "attn", base, seed=6, targets=["q_proj", "v_proj"]),
        "head": make_adapter(root / "head", base, seed=7, modules_to_save=["lm_head"]),
    }


def adapter_formula(base: Path, adapter: Path, size=lambda t: t) -> dict[str, torch.Tensor]:
    """The documented arithmetic: float32(W) + float32(s * (B @ A)), the product in float64;
    with ``size=torch.abs``, the magnitudes |W| + s |B| @ |A| that bound its rounding errors."""
    import json

    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(adapter / "adapter_model.safetensors")
    state = {k: size(v.float()) for k, v in load_state(base).items()}
    for key, a in factors.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_B." in name:
            continue
        if ".lora_A." not in name:
            state[name.replace(".modules_to_save", "")] = size(a.float())
            continue
        b = factors[key.replace("lora_A", "lora_B")]
        r = a.shape[0]
        s = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
        state[name.replace(".lora_A", "")] += (s * (size(b.double()) @ size(a.double()))).float()
    return state


def soup(tmp_path: Path, models, name="soup", weights=None, **extra) -> Path:
    spec = {"method": "uniform" if weights is None else "weighted", "output": str(tmp_path / name)}
    spec["models"] = [str(m) for m in models] if weights is None else \
        [{"model": str(m), "weight": w} for m, w in zip(models, weights)]
    return run_merge({"merge": {**spec, **extra}})


@pytest.mark.parametrize("names,weights", [(("a", "b"), None), (("a", "b", "r2"), [0.5, 0.2, 0.3])])
def test_adapter_soup_is_the_formula_bit_for_bit(tmp_path, lora_world, names, weights, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", 37)  # chunks that start and stop mid-row
    out = soup(tmp_path, [lora_world[n] for n in names], weights=weights)
    states = [adapter_formula(lora_world["base"], lora_world[n]) for n in names]
    total = sum(weights) if weights else len(names)
    ws = [np.float32(w / total) for w in (weights or [1.0] * len(names))]
    want = formula(states, lambda name: ws)
    got = load_state(out)
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_adapter_soup_equals_the_soup_of_peft_merged_models(tmp_path, lora_world, names):
    """PEFT multiplies B @ A in float32; soupkit sums the r products in float64 and rounds once,
    so the two differ by rounding only. Bound (Higham's dot-product bound, r = 4 terms, plus the
    two roundings of the sum): (r + 2) float32 epsilons of max_i (|W| + s |B_i| @ |A_i|), the
    magnitudes the products are made of (an ulp of the result can be far smaller where W and
    s B A cancel)."""
    full = [tmp_path / f"merged-{n}" for n in names]
    for n, path in zip(names, full):
        merged(lora_world["base"], lora_world[n], path)
    got = load_state(soup(tmp_path, [lora_world[n] for n in names]))
    want = load_state(soup(tmp_path, full, name="full-soup"))
    sizes = [adapter_formula(lora_world["base"], lora_world[n], torch.abs) for n in names]
    worst = 0.0
    for name, w in want.items():
        largest = torch.stack([s[name] for s in sizes]).amax(dim=0)
        worst = max(worst, float(((got[name] - w).abs() / (largest * 2**-23)).max()))
    print(f"\n{len(names)} adapters: largest difference {worst:.3f} eps of the magnitudes")
    assert worst <= 4 + 2, worst


def test_gpt2_conv1d_adapter_matches_peft(tmp_path):
    """GPT-2 stores its projections transposed (Conv1D, PEFT's fan_in_fan_out): the update is (B A)^T."""
    base = make_model(tmp_path / "gpt2", "gpt2", seed=3)
    adapters = [make_adapter(tmp_path / f"g{i}", base, seed=i, targets=["c_attn", "c_fc"], fan_in_fan_out=True)
                for i in (1, 2)]
    got = load_state(soup(tmp_path, adapters))
    want = [merged(base, a).state_dict() for a in adapters]
    for name, value in got.items():
        if name in want[0]:
            torch.testing.assert_close(value, (want[0][name] + want[1][name]) / 2, rtol=0, atol=1e-6)


def test_modules_to_save_replace_the_base_tensor(tmp_path, lora_world):
    out = soup(tmp_path, [lora_world["head"], lora_world["a"]])
    head = load_file(lora_world["head"] / "adapter_model.safetensors")["base_model.model.lm_head.weight"]
    a = merged(lora_world["base"], lora_world["a"]).state_dict()["lm_head.weight"]
    torch.testing.assert_close(load_state(out)["lm_head.weight"], (head + a) / 2, rtol=0, atol=1e-7)


def test_mergekit_spelling_base_plus_adapter(tmp_path, lora_world):
    """``BASE+ADAPTER`` (mergekit's spelling) names the base when the adapter's own record is stale."""
    import json
    import shutil

    moved = shutil.copytree(lora_world["a"], tmp_path / "moved")
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/nowhere/base"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SoupkitError, match=r"base '/nowhere/base' .*not found; name the base as BASE\+"):
        soup(tmp_path, [moved, lora_world["b"]])
    got = load_state(soup(tmp_path, [f"{lora_world['base']}+{moved}", lora_world["b"]], name="s2"))
    want = load_state(soup(tmp_path, [lora_world["a"], lora_world["b"]], name="s3"))
    assert all(torch.equal(got[n], want[n]) for n in want)


# ---------------------------------------------------------------------------------------------
# output_format: adapter, the exact low-rank soup


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter), ids)


IDS = torch.tensor([[2, 5, 9, 14, 20, 33, 41, 7, 60, 3], [2, 8, 8, 17, 30, 44, 52, 11, 1, 3]])


@pytest.mark.parametrize("names,weights", [(("a", "b"), None), (("a", "b", "r2"), [0.5, 0.2, 0.3])])
def test_adapter_format_soup_has_the_full_soups_logits(tmp_path, lora_world, names, weights):
    from transformers import AutoModelForCausalLM

    models = [lora_world[n] for n in names]
    low = soup(tmp_path, models, weights=weights, output_format="adapter")
    full = soup(tmp_path, models, name="full", weights=weights)
    config = __import__("json").loads((low / "adapter_config.json").read_text())
    assert config["r"] == sum(4 if n != "r2" else 2 for n in names)
    want = logits(AutoModelForCausalLM.from_pretrained(full), IDS)
    got = peft_logits(lora_world["base"], low, IDS)
    assert (got - want).abs().max() < 1e-5


def test_mean_of_factors_is_not_the_soup(tmp_path, lora_world):
    """The tempting shortcut, mean(B) @ mean(A), adds cross terms B_a A_b: far from the soup."""
    import shutil

    from transformers import AutoModelForCausalLM

    fa, fb = (load_file(lora_world[n] / "adapter_model.safetensors") for n in ("a", "b"))
    mean = shutil.copytree(lora_world["a"], tmp_path / "mean")
    from safetensors.torch import save_file

    save_file({k: (fa[k] + fb[k]) / 2 for k in fa}, mean / "adapter_model.safetensors")
    full = soup(tmp_path, [lora_world["a"], lora_world["b"]])
    want = logits(AutoModelForCausalLM.from_pretrained(full), IDS)
    assert (peft_logits(lora_world["base"], mean, IDS) - want).abs().max() > 1e-2


def test_adapter_format_refusals(tmp_path, lora_world, models_dir):
    with pytest.raises(SoupkitError, match=r"output_format adapter: .*attn.* \(different target modules\)"):
        soup(tmp_path, [lora_world["a"], lora_world["attn"]], output_format="adapter")
    with pytest.raises(SoupkitError, match=r"output_format adapter: .*base.* is not a LoRA adapter"):
        soup(tmp_path, [lora_world["a"], lora_world["base"]], output_format="adapter")
    with pytest.raises(SoupkitError, match=r"modules_to_save"):
        soup(tmp_path, [lora_world["a"], lora_world["head"]], output_format="adapter")
    with pytest.raises(SoupkitError, match=r"method 'ties' is not"):
        run_merge({"merge": {"method": "ties", "models": [str(lora_world["a"])], "output_format": "adapter",
                             "output": str(tmp_path / "x")}})
    assert not (tmp_path / "soup").exists()


def test_bad_adapters_get_one_line(tmp_path, lora_world):
    import shutil

    other = make_adapter(tmp_path / "other", make_model(tmp_path / "other-base", seed=9), seed=1)
    with pytest.raises(SoupkitError, match=r"adapters on different bases: .* is on .*base but .* is on .*other-base"):
        soup(tmp_path, [lora_world["a"], other])
    empty = shutil.copytree(lora_world["a"], tmp_path / "empty")
    (empty / "adapter_model.safetensors").unlink()
    with pytest.raises(SoupkitError, match=r"missing adapter_model.safetensors in .*empty"):
        soup(tmp_path, [empty, lora_world["b"]])
    dora = shutil.copytree(lora_world["a"], tmp_path / "dora")
    text = (dora / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true')
    (dora / "adapter_config.json").write_text(text)
    with pytest.raises(SoupkitError, match=r"dora.*use_dora is set; DoRA"):
        soup(tmp_path, [dora, lora_world["b"]])
    wide = make_adapter(tmp_path / "wide", make_model(tmp_path / "wide-base", seed=9, layers=3), seed=1)
    shutil.copy(lora_world["a"] / "adapter_config.json", wide / "adapter_config.json")  # claims the tiny base
    with pytest.raises(SoupkitError, match=r"adapts 'model.layers.2.*', which its base .* does not have"):
        soup(tmp_path, [wide, lora_world["b"]])
    assert not (tmp_path / "soup").exists()


def test_mergekit_methods_take_adapters(tmp_path, lora_world):
    """A mergekit method gets ``BASE+ADAPTER`` and merges the adapter itself (its own LoRA path):
    task arithmetic of two adapters is base + sum of their updates."""
    spec = {"method": "task_arithmetic", "base": str(lora_world["base"]), "output": str(tmp_path / "ta"),
            "models": [{"model": str(lora_world[n]), "weight": 1.0} for n in ("a", "b")]}
    got = load_state(run_merge({"merge": spec}))
    base = load_state(lora_world["base"])
    ma, mb = (merged(lora_world["base"], lora_world[n]).state_dict() for n in ("a", "b"))
    for name, value in got.items():
        torch.testing.assert_close(value, ma[name] + mb[name] - base[name], rtol=0, atol=1e-6)
    assert not list(tmp_path.glob(".lora-merge-cache-*"))


def test_inspect_reads_adapters_as_their_merged_models(tmp_path, lora_world):
    """``soupkit inspect`` on adapters measures what it measures on PEFT's merged models."""
    from soupkit.diagnostics import report
    from soupkit.shards import copy_support_files

    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat\na dog ran in the sun\n")
    full = []
    for n in ("a", "b"):
        merged(lora_world["base"], lora_world[n], tmp_path / n)
        copy_support_files(lora_world["base"], tmp_path / n)
        full.append(str(tmp_path / n))
    got = report([str(lora_world["a"]), str(lora_world["b"])], base=str(lora_world["base"]), prompts=texts)
    want = report(full, base=str(lora_world["base"]), prompts=texts)
    for key in ("l2", "cosine", "task_cosine", "sign_conflict", "kl", "js", "top1_agreement"):
        assert got["pairs"][0][key] == pytest.approx(want["pairs"][0][key], rel=1e-5, abs=1e-7), key


def test_embedding_adapter_matches_peft(tmp_path, lora_world):
    """LoRA on an embedding stores A as r x vocab and B as dim x r: the update is (B A)^T."""
    emb = make_adapter(tmp_path / "emb", lora_world["base"], seed=8, targets=["embed_tokens", "q_proj"])
    got = load_state(soup(tmp_path, [emb, lora_world["a"]]))
    want = [merged(lora_world["base"], m).state_dict() for m in (emb, lora_world["a"])]
    for name, value in got.items():
        torch.testing.assert_close(value, (want[0][name] + want[1][name]) / 2, rtol=0, atol=1e-6)


def test_cli_bad_adapter_is_one_line_and_writes_nothing(tmp_path, lora_world):
    from tests.merge.test_bad_input import assert_clean_error, recipe, run_cli

    out = tmp_path / "soup"
    other = make_adapter(tmp_path / "other", make_model(tmp_path / "other-base", seed=9), seed=1)
    result = run_cli(tmp_path, recipe([lora_world["a"], other], out))
    assert_clean_error(result, r"adapters on different bases", out)
    result = run_cli(tmp_path, recipe([lora_world["a"], lora_world["attn"]], out, output_format="adapter"))
    assert_clean_error(result, r"different target modules", out)
