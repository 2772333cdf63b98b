"""LoRA adapters on the real chat model, SmolLM2-135M-Instruct (issue #19): two random rank-4
adapters souped by soupkit against PEFT's ``merge_and_unload``; the exact adapter soup against
the full soup's logits; and a LoRA PPO step whose reference is the adapter soup against the same
step with the full soup as reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from soupkit import run_merge
from tests.conftest import load_state
from tests.lora import make_adapter, merged
from tests.merge.test_adapters import adapter_formula

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from soupkit.realmodel import smollm2

    root, base = tmp_path_factory.mktemp("smollm2-lora"), smollm2()
    adapters = [make_adapter(root / f"a{i}", base, seed=i, rank=4, alpha=8, std=0.02) for i in (1, 2)]
    models = [str(a) for a in adapters]
    return {"root": root, "base": base, "a1": adapters[0], "a2": adapters[1],
            "full": run_merge({"merge": {"models": models, "output": str(root / "full")}}),
            "low": run_merge({"merge": {"models": models, "output_format": "adapter", "output": str(root / "low")}})}


def test_adapter_soup_is_the_soup_of_peft_merged_models(world):
    """The bound of tests/merge/test_adapters.py: (r + 2) float32 epsilons of the magnitudes
    |W| + s |B| @ |A| (PEFT rounds B @ A in one float32 sgemm, soupkit from float64)."""
    states = [merged(world["base"], world[n]).state_dict() for n in ("a1", "a2")]
    sizes = [adapter_formula(world["base"], world[n], torch.abs) for n in ("a1", "a2")]
    got = load_state(world["full"])
    assert set(got) <= set(states[0])
    worst = 0.0
    for name, value in got.items():
        want = states[0][name] * np.float32(0.5) + states[1][name] * np.float32(0.5)
        largest = torch.maximum(sizes[0][name], sizes[1][name])
        worst = max(worst, float(((value - want).abs() / (largest * 2**-23)).max()))
    print(f"largest difference to PEFT's merge: {worst:.3f} eps of the magnitudes")
    assert worst <= 4 + 2


def test_adapter_format_soup_has_the_full_soups_logits(world):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["base"])
    ids = tok(["Hello, how are you today?", "Write a haiku about soup."], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(world["full"], dtype=torch.float32)(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32)
        got = PeftModel.from_pretrained(base, world["low"])(**ids).logits
    assert json.loads((world["low"] / "adapter_config.json").read_text())["r"] == 8
    print(f"largest logit difference: {float((got - want).abs().max()):.3g}")
    assert (got - want).abs().max() < 1e-5 * want.abs().max().clamp(min=1)


def test_lora_ppo_step0_kl_against_the_adapter_soup(world):
    from soupkit.rlhf import build_spec, train
    from tests.rlhf.conftest import good_words_ref

    prompts = world["root"] / "prompts.txt"
    prompts.write_text("Tell me about cats.\nWhat is a soup?\nName a colour.\nSay hello.\n")
    kls = {}
    for name in ("low", "full"):
        spec = build_spec(None, {"ref": [str(world[name])], "init": str(world["a1"]), "prompts": str(prompts),
                                 "reward": good_words_ref(), "steps": 1, "batch_size": 4,
                                 "max_new_tokens": 16, "ppo_epochs": 1, "save_every": 0, "temperature": 1.0},
                          ["lora_rank=4"])
        out = world["root"] / f"ppo-{name}"
        train(spec, out=out)
        kls[name] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["kl"]
    print(f"step-0 KL: adapter-soup reference {kls['low']:.7f}, full-soup reference {kls['full']:.7f}")
    # The two references are one model computed two ways in float32 (adapters applied on the fly vs merged
    # weights), through 30 layers: their step-0 KLs differed by 1.2e-6 with SDPA attention and 2.1e-5 with eager
    # (attention: auto on a CPU).
    assert abs(kls["full"]) > 1e-4 and abs(kls["low"] - kls["full"]) < 5e-5
