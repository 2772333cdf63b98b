"""Merges checked against the fp32 formula computed with torch, and against mergekit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from soupkit import run_merge
from soupkit.merge.engine import Buffers, round_bf16, widen
from tests.conftest import ARCHS, load_state, make_model


def formula(states: list[dict[str, torch.Tensor]], weights_of, out_dtype=None) -> dict[str, torch.Tensor]:
    """The oracle: sum_i fp32(w_i) * fp32(x_i), left to right, rounded once to the output dtype."""
    out = {}
    for name, first in states[0].items():
        ws = weights_of(name)
        acc = states[0][name].float() * ws[0]
        for state, w in zip(states[1:], ws[1:]):
            acc = acc + state[name].float() * w
        out[name] = acc.to(out_dtype or first.dtype)
    return out


def assert_states_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def merge(tmp_path: Path, models, method="uniform", **extra) -> Path:
    spec = {"method": method, "models": models, "output": str(tmp_path / "soup"), **extra}
    return run_merge({"merge": spec})


# ---------------------------------------------------------------------------------------------
# numerics of the kernels


def test_bf16_round_matches_torch_on_edge_cases():
    specials = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 3.4e38, -3.4e38,
                         1e-40, -1e-40, 1.00390625, 1.01171875, 1.0 + 2**-9, 1.0 + 3 * 2**-9], dtype=np.float32)
    bits = np.random.default_rng(0).integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    values = np.concatenate([specials, bits.view(np.float32)])
    got = round_bf16(values.copy(), Buffers(values.size))
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(values)
    assert np.array_equal(got[~nan], want[~nan])
    assert np.all(np.isnan(torch.from_numpy(got.astype(np.int32).astype(np.int16)).view(torch.bfloat16)
                           .float().numpy()[nan]))


def test_widen_bf16_is_exact():
    x = torch.randn(1000).to(torch.bfloat16)
    out = np.empty(1000, dtype=np.float32)
    widen(x.view(torch.int16).numpy().view(np.uint16), "BF16", out)
    assert np.array_equal(out, x.float().numpy())


# ---------------------------------------------------------------------------------------------
# soup semantics


def test_uniform_of_a_model_with_itself_is_the_model(tmp_path, llama_pair):
    a, _ = llama_pair
    out = merge(tmp_path, [str(a), str(a)])
    assert_states_equal(load_state(out), load_state(a))


def test_uniform_bf16_of_itself_is_bit_identical(tmp_path, bf16_pair):
    a, _ = bf16_pair
    out = merge(tmp_path, [str(a), str(a), str(a)])
    assert_states_equal(load_state(out), load_state(a))


def test_weighted_equals_fp32_formula(tmp_path, llama_pair, llama_c):
    paths = [*llama_pair, llama_c]
    raw = [0.2, 0.5, 0.3]
    out = merge(tmp_path, [{"model": str(p), "weight": w} for p, w in zip(paths, raw)], "weighted")
    want = formula([load_state(p) for p in paths], lambda _: [w / sum(raw) for w in raw])
    assert_states_equal(load_state(out), want)


def test_weights_are_normalised(tmp_path, llama_pair):
    a, b = llama_pair
    out = merge(tmp_path, [{"model": str(a), "weight": 2.0}, {"model": str(b), "weight": 6.0}], "weighted")
    want = formula([load_state(a), load_state(b)], lambda _: [0.25, 0.75])
    assert_states_equal(load_state(out), want)


def test_bf16_output_is_fp32_average_rounded_once(tmp_path, llama_pair):
    a, b = llama_pair
    out = merge(tmp_path, [{"model": str(a), "weight": 0.3}, {"model": str(b), "weight": 0.7}], "weighted",
                dtype="bfloat16")
    want = formula([load_state(a), load_state(b)], lambda _: [0.3, 0.7], torch.bfloat16)
    assert_states_equal(load_state(out), want)
    # and not the average of pre-rounded inputs (the double-rounding shortcut) on at least one tensor
    a16 = {k: v.to(torch.bfloat16) for k, v in load_state(a).items()}
    b16 = {k: v.to(torch.bfloat16) for k, v in load_state(b).items()}
    shortcut = formula([a16, b16], lambda _: [0.3, 0.7])
    assert any(not torch.equal(shortcut[k], want[k]) for k in want)


def test_bf16_inputs_default_to_bf16_output(tmp_path, bf16_pair):
    a, b = bf16_pair
    out = merge(tmp_path, [{"model": str(a), "weight": 1}, {"model": str(b), "weight": 2}], "weighted")
    want = formula([load_state(a), load_state(b)], lambda _: [1 / 3, 2 / 3])
    assert_states_equal(load_state(out), want)


def test_fp16_output(tmp_path, llama_pair):
    a, b = llama_pair
    out = merge(tmp_path, [str(a), str(b)], dtype="float16")
    assert_states_equal(load_state(out), formula([load_state(a), load_state(b)], lambda _: [0.5, 0.5], torch.float16))


def test_layerwise_endpoints_and_midpoints(tmp_path, llama4_pair):
    a, b = llama4_pair
    out = load_state(merge(tmp_path, [{"model": str(a), "weight": [1.0, 0.0]},
                                      {"model": str(b), "weight": [0.0, 1.0]}], "layerwise"))
    sa, sb = load_state(a), load_state(b)
    for name in out:
        if ".layers.0." in name or "embed_tokens" in name:
            assert torch.equal(out[name], sa[name]), name
        elif ".layers.3." in name or name in ("lm_head.weight", "model.norm.weight"):
            assert torch.equal(out[name], sb[name]), name
    for layer, t in ((1, 1 / 3), (2, 2 / 3)):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        want = sa[name].float() * np.float32(1 - t) + sb[name].float() * np.float32(t)
        assert torch.equal(out[name], want), name


def test_constant_list_equals_weighted(tmp_path, llama_pair):
    a, b = llama_pair
    layered = load_state(merge(tmp_path / "l", [{"model": str(a), "weight": [0.25, 0.25]},
                                                {"model": str(b), "weight": [0.75]}], "layerwise"))
    weighted = load_state(merge(tmp_path / "w", [{"model": str(a), "weight": 0.25},
                                                 {"model": str(b), "weight": 0.75}], "weighted"))
    assert_states_equal(layered, weighted)


def test_filter_weights(tmp_path, llama_pair):
    a, b = llama_pair
    wa = {"self_attn": 0.9, "mlp": 0.1, "default": 0.5}
    wb = {"self_attn": 0.1, "mlp": 0.9, "default": 0.5}
    out = load_state(merge(tmp_path, [{"model": str(a), "weight": wa}, {"model": str(b), "weight": wb}],
                           "weighted"))

    def weights_of(name):
        return [0.9, 0.1] if "self_attn" in name else [0.1, 0.9] if "mlp" in name else [0.5, 0.5]

    assert_states_equal(out, formula([load_state(a), load_state(b)], weights_of))


@pytest.mark.parametrize("arch", ARCHS)
def test_architectures_merge_load_and_generate(tmp_path, arch_pairs, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = arch_pairs[arch]
    out = merge(tmp_path, [str(a), str(b)])
    assert_states_equal(load_state(out), formula([load_state(a), load_state(b)], lambda _: [0.5, 0.5]))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["the cat sat on the"], return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, ids.input_ids.shape[1] + 4)
    # the loaded model holds exactly the merged weights (tied heads included)
    for name, tensor in load_state(out).items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_tied_embeddings_stay_tied(tmp_path, arch_pairs):
    from transformers import AutoModelForCausalLM

    out = merge(tmp_path, [str(p) for p in arch_pairs["qwen2"]])
    assert "lm_head.weight" not in load_state(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_sharded_inputs_and_outputs(tmp_path, llama_pair):
    a, b = llama_pair
    sharded = [make_model(tmp_path / f"s{i}", seed=s, max_shard_size="2KB") for i, s in enumerate((1, 2))]
    assert (sharded[0] / "model.safetensors.index.json").exists()
    out = merge(tmp_path, [str(p) for p in sharded], shard_size="3KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert_states_equal(load_state(out), formula([load_state(a), load_state(b)], lambda _: [0.5, 0.5]))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_output_carries_provenance(tmp_path, llama_pair):
    import yaml

    from soupkit.recipe import load_recipe

    a, b = llama_pair
    out = merge(tmp_path, [{"model": str(a), "weight": 1}, {"model": str(b), "weight": 3}], "weighted")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "soupkit_recipe.yaml", "README.md"} <= files
    resolved = yaml.safe_load((out / "soupkit_recipe.yaml").read_text())
    assert resolved["merge"]["models"][1] == {"model": str(b.resolve()), "weight": 3.0}
    assert resolved["merge"]["dtype"] == "float32"
    load_recipe(out / "soupkit_recipe.yaml")  # the resolved recipe is itself a valid recipe
    card = (out / "README.md").read_text()
    assert str(a) in card and "0.75 (normalised)" in card


def test_progress_reports_every_byte(tmp_path, llama_pair):
    calls = []
    run_merge({"merge": {"models": [str(p) for p in llama_pair], "output": str(tmp_path / "s")}},
              progress=lambda done, total: calls.append((done, total)))
    file = tmp_path / "s" / "model.safetensors"
    assert calls[-1][0] == calls[-1][1] == file.stat().st_size - _header(file)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def _header(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


# ---------------------------------------------------------------------------------------------
# mergekit: as an oracle, and as the backend for other methods


@pytest.mark.parametrize(("weights", "exact"), [((0.5, 0.5), True), ((0.3, 0.7), False)])
def test_equals_mergekit_linear(tmp_path, bf16_pair, llama_pair, weights, exact):
    """soupkit's weighted soup vs mergekit's linear, run through soupkit's mergekit backend."""
    pair = bf16_pair if exact else llama_pair
    models = [{"model": str(p), "weight": w} for p, w in zip(pair, weights)]
    ours = load_state(merge(tmp_path / "ours", models, "weighted"))
    theirs = load_state(merge(tmp_path / "theirs", models, "linear"))
    sa, sb = load_state(pair[0]), load_state(pair[1])
    for name in ours:
        if exact:  # bf16 inputs times 0.5 are exact in fp32, so both must agree bit for bit
            assert torch.equal(ours[name], theirs[name]), name
        else:
            # mergekit fuses multiply-add (addcmul_) and divides by the fp32 weight sum, so the two
            # differ by rounding only: at most a few fp32 ulps of the summands' magnitude.
            scale = weights[0] * sa[name].abs() + weights[1] * sb[name].abs()
            bound = 4 * torch.finfo(torch.float32).eps * scale
            assert torch.all((ours[name] - theirs[name]).abs() <= bound), name
            assert (ours[name] == theirs[name]).float().mean() > 0.5, name


def test_mergekit_method_runs_with_provenance(tmp_path, llama_pair, llama_c):
    from transformers import AutoModelForCausalLM

    base, a = llama_pair
    b = llama_c
    out = merge(tmp_path, [{"model": str(a), "weight": 0.5, "parameters": {"density": 0.5}},
                           {"model": str(b), "weight": 0.5, "parameters": {"density": 0.5}}],
                "ties", base=str(base))
    assert (out / "soupkit_recipe.yaml").exists() and (out / "tokenizer.json").exists()
    AutoModelForCausalLM.from_pretrained(out)
    # task_arithmetic with weight 1 on A and lambda 1 reproduces A exactly: base + (A - base)
    ta = merge(tmp_path / "ta", [{"model": str(a), "weight": 1.0}], "task_arithmetic", base=str(base))
    sa = load_state(a)
    for name, tensor in load_state(ta).items():
        assert torch.allclose(tensor, sa[name], atol=1e-6), name


def test_slerp_through_mergekit(tmp_path, llama_pair):
    a, b = llama_pair
    out = load_state(merge(tmp_path, [str(a), str(b)], "slerp", base=str(a), parameters={"t": 0.0}))
    sa = load_state(a)
    for name, tensor in out.items():
        assert torch.allclose(tensor, sa[name], atol=1e-6), name
