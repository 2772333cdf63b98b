"""Weight-space statistics against the same formulas computed with torch in float64."""

from __future__ import annotations

import re

import pytest
import torch

from soupkit.diagnostics import report
from soupkit.diagnostics import weights as W
from soupkit.modeldir import open_checkpoint
from tests.conftest import load_state


def oracle(a: dict, b: dict, base: dict | None = None, keep=lambda name: True) -> dict[str, float]:
    """L2, relative L2, cosine, task cosine and sign conflicts over the tensors ``keep`` selects."""
    names = [n for n in a if keep(n)]
    x = torch.cat([a[n].double().flatten() for n in names])
    y = torch.cat([b[n].double().flatten() for n in names])
    out = {"l2": float((x - y).norm()), "relative_l2": float((x - y).norm() / x.norm()),
           "cosine": float(torch.nn.functional.cosine_similarity(x, y, dim=0))}
    if base is not None:
        z = torch.cat([base[n].double().flatten() for n in names])
        ta, tb = x - z, y - z
        out["task_cosine"] = float(torch.nn.functional.cosine_similarity(ta, tb, dim=0))
        both = (ta != 0) & (tb != 0)
        out["sign_conflict"] = float(((torch.sign(ta) != torch.sign(tb)) & both).sum().double() / both.sum().double())
        out["task_norm_a"], out["task_norm_b"] = float(ta.norm()), float(tb.norm())
    return out


def assert_close(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("chunk", [W.CHUNK, 100])  # 100: many chunks per tensor, ragged last chunk
@pytest.mark.parametrize("which", ["family", "bf16_family"])
def test_global_and_task_stats_match_torch(request, monkeypatch, chunk, which):
    monkeypatch.setattr(W, "CHUNK", chunk)
    fam = request.getfixturevalue(which)
    got = report([str(fam["ft1"]), str(fam["ft2"])], base=str(fam["base"]))["pairs"][0]
    states = [load_state(fam[k]) for k in ("ft1", "ft2", "base")]
    assert_close(got, oracle(*states))


def test_per_layer_and_module_match_torch(family):
    got = report([str(family["ft1"]), str(family["ft3"])], base=str(family["base"]))["pairs"][0]
    a, b, base = (load_state(family[k]) for k in ("ft1", "ft3", "base"))
    assert [row["layer"] for row in got["layers"]] == [0, 1]
    for row in got["layers"]:
        assert_close(row, oracle(a, b, base, lambda n, i=row["layer"]: f"layers.{i}." in n))
    kinds = {  # an independent classification of Llama's tensor names
        "embeddings": lambda n: "embed_tokens" in n or "lm_head" in n,
        "attention": lambda n: "self_attn" in n,
        "mlp": lambda n: ".mlp." in n,
        "norms": lambda n: re.search(r"norm", n) is not None,
    }
    rows = {row["module"]: row for row in got["modules"]}
    assert sorted(rows) == sorted(kinds)
    for kind, keep in kinds.items():
        want = oracle(a, b, base, keep)
        if kind == "norms":  # every norm weight is ones in base and noised in the fine-tunes
            assert want["task_norm_a"] > 0
        assert_close(rows[kind], want)


def test_identical_models_are_at_distance_zero(family):
    pair = report([str(family["ft1"]), str(family["ft1"])], base=str(family["base"]))["pairs"][0]
    assert pair["l2"] == 0.0 and pair["relative_l2"] == 0.0
    assert pair["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert pair["task_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert pair["sign_conflict"] == 0.0


def test_model_equal_to_base_has_no_task_cosine(family):
    pair = report([str(family["base"]), str(family["ft1"])], base=str(family["base"]))["pairs"][0]
    assert pair["task_norm_a"] == 0.0
    assert "task_cosine" not in pair and "sign_conflict" not in pair  # undefined: key absent


@pytest.mark.parametrize(("name", "kind"), [
    ("model.embed_tokens.weight", "embeddings"), ("lm_head.weight", "embeddings"),
    ("model.layers.3.self_attn.q_proj.weight", "attention"), ("model.layers.3.self_attn.q_norm.weight", "norms"),
    ("model.layers.0.mlp.down_proj.weight", "mlp"), ("model.layers.0.input_layernorm.weight", "norms"),
    ("transformer.h.1.ln_2.bias", "norms"), ("transformer.h.1.attn.c_attn.weight", "attention"),
    ("transformer.h.1.mlp.c_fc.weight", "mlp"), ("transformer.wte.weight", "embeddings"),
    ("transformer.ln_f.weight", "norms"), ("model.norm.weight", "norms"),
])
def test_module_kind(name, kind):
    assert W.module_kind(name) == kind


def test_weight_pass_does_not_import_torch(family):
    import subprocess
    import sys

    code = ("import sys; from soupkit.diagnostics import report; "
            f"report([{str(family['ft1'])!r}, {str(family['ft2'])!r}], base={str(family['base'])!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fp8_is_refused(family):
    ckpt = open_checkpoint(str(family["ft1"]))
    name = next(iter(ckpt.tensors))
    object.__setattr__(ckpt.tensors[name], "dtype", "F8_E4M3")
    from soupkit.errors import SoupkitError

    with pytest.raises(SoupkitError, match="fp8"):
        W.float_names([ckpt], [name])
