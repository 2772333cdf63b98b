"""The native task-vector methods on the real chat model, SmolLM2-135M-Instruct (tied embeddings, 30
layers, ChatML): against mergekit on the same files, and the merged model still answers a chat prompt."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from soupkit import run_merge
from tests.conftest import load_state

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    """SmolLM2 and two "fine-tunes" of it (its weights plus 2% relative noise), bfloat16."""
    from safetensors.torch import save_file

    from soupkit.realmodel import smollm2

    root = tmp_path_factory.mktemp("smol-methods")
    state = load_state(smollm2())
    out = []
    for i, scale in enumerate((0.0, 0.02, 0.02)):
        dst = root / f"m{i}"
        shutil.copytree(smollm2(), dst)
        torch.manual_seed(100 + i)
        save_file({k: (v + scale * v.abs().mean() * torch.randn_like(v)).to(torch.bfloat16).contiguous()
                   for k, v in state.items()}, dst / "model.safetensors", metadata={"format": "pt"})
        out.append(dst)
    return out


def merge(tmp_path: Path, name: str, spec: dict) -> Path:
    return run_merge({"merge": {**spec, "output": str(tmp_path / name)}})


def test_ties_and_task_slerp_on_smollm2(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, a, b = (str(p) for p in family)
    states = [load_state(p) for p in family]
    for density in (1.0, 0.5):
        ties = {"method": "ties", "base": base, "models": [
            {"model": m, "weight": w, "parameters": {"density": density}} for m, w in ((a, 0.6), (b, 0.4))]}
        so = load_state(merge(tmp_path, f"ties{density}", ties))
        st = load_state(merge(tmp_path, f"ties{density}-mk", {**ties, "backend": "mergekit"}))
        # Both work in float32 and round once to bfloat16: without trimming, bit for bit. With trimming,
        # bfloat16 deltas tie in magnitude at the cut and mergekit keeps an unspecified subset of the tied
        # elements (argsort's order), soupkit the earliest: every element that differs must be one where
        # some model's |delta| equals its cut.
        for name in so:
            differ = (so[name] != st[name]).reshape(-1)
            if density == 1.0 or not differ.any():
                assert not differ.any(), name
                continue
            at_cut = torch.zeros_like(differ)
            for state in states[1:]:
                mags = (state[name].float() - states[0][name].float()).abs().reshape(-1)
                cut = torch.topk(mags, max(1, int(density * mags.numel()))).values[-1]
                at_cut |= mags == cut
            assert bool(at_cut[differ].all()), name
    slerp = merge(tmp_path, "ts", {"method": "task_slerp", "base": base, "models": [a, b], "parameters": {"t": 0.5}})
    nuslerp = merge(tmp_path, "nu", {"method": "nuslerp", "base": base, "models": [
        {"model": a, "weight": 0.5}, {"model": b, "weight": 0.5}]})
    ss, sn = load_state(slerp), load_state(nuslerp)
    for name in ss:
        init, d1, d2 = (state[name].double() for state in states)
        d1, d2 = d1 - init, d2 - init
        omega = torch.arccos((d1 * d2).sum() / d1.norm() / d2.norm())
        oracle = (init + (torch.sin(0.5 * omega) * (d1 + d2)) / torch.sin(omega)).float()  # the closed form, float64
        x, y = ss[name].float(), sn[name].float()
        inputs = init.abs().float() + d1.abs().float() + d2.abs().float()
        # ours: float32 from a float64 angle, rounded once to bfloat16: one bfloat16 ulp of the oracle
        # (<= 2^-7 of the value) plus a few float32 ulps of the inputs where the sum cancels
        assert bool(((x - oracle).abs() <= 2.0 ** -7 * oracle.abs() + 8 * 2.0 ** -23 * inputs).all()), name
        # mergekit's nuslerp takes the cosine from a float32 sum over the whole tensor (28M elements for
        # the embeddings), off by up to ~1e-4 relative here (measured 4e-5), which moves both coefficients
        task = (d1.abs() + d2.abs()).float()
        assert bool(((x - y).abs() <= 2.0 ** -7 * torch.maximum(x.abs(), y.abs()) + 1e-4 * task).all()), name
    tok = AutoTokenizer.from_pretrained(slerp)
    model = AutoModelForCausalLM.from_pretrained(slerp, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    text = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in text, text
