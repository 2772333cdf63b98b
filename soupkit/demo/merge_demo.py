"""``soupkit demo`` (merge only, for now): two tiny fine-tunes of one base, and their soup.

Builds a templated corpus and a word-level tokenizer, trains a tiny Llama base on it for a few
steps, fine-tunes it twice with different seeds and data order, merges the two with
``soupkit.run_merge`` and reports the held-out loss of each model and of the soup.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from soupkit.checkpoint import atomic_output_dir, check_output_free

SUBJECTS = "the cat|the dog|a bird|the fish|a child|the farmer".split("|")
VERBS = "sees|likes|finds|eats|follows|draws".split("|")
OBJECTS = "the red ball|a green tree|the small pond|a big stone|the old boat|a blue cup".split("|")


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} ." for _ in range(n)]


def _words() -> list[str]:
    text = " ".join(SUBJECTS + VERBS + OBJECTS) + " ."
    return sorted(set(text.split()))


def _train(model: Any, tok: Any, texts: list[str], steps: int, seed: int, lr: float) -> None:
    import torch

    torch.manual_seed(seed)
    order = random.Random(seed).sample(texts, len(texts))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = order[(step * 16) % len(order):][:16] or order[:16]
        enc = tok([t + " [EOS]" for t in batch], return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def heldout_loss(path: Path, texts: list[str]) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok([t + " [EOS]" for t in texts], return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    with torch.no_grad():
        return float(model(**enc, labels=labels).loss)


def _build_models(root: Path, log: Callable[[str], None]) -> list[Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from soupkit.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(_words())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    log("training a tiny base model on a synthetic corpus ...")
    _train(base, tok, corpus(512, seed=0), steps=60, seed=0, lr=3e-3)
    paths = []
    for name, seed in (("sft-a", 1), ("sft-b", 2)):
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        log(f"fine-tuning {name} (seed {seed}) ...")
        _train(model, tok, corpus(256, seed=seed), steps=40, seed=seed, lr=1e-3)
        with atomic_output_dir(root / name) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        paths.append(root / name)
    return paths


def l2_distance(a: Path, b: Path) -> float:
    """Global L2 distance between two fp32 checkpoints' weights."""
    from safetensors.numpy import load_file

    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return float(sum(((sa[k].astype("f8") - sb[k]) ** 2).sum() for k in sa) ** 0.5)


def run_demo(out: Path, force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build two tiny fine-tunes, soup them, and compare held-out losses; returns a summary."""
    import shutil

    import yaml

    from soupkit.merge import run_merge

    out = Path(out)
    check_output_free(out, force)
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    a, b = _build_models(out, log)
    recipe = {"merge": {"method": "uniform", "models": [str(a), str(b)], "output": str(out / "soup")}}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    log("merging sft-a and sft-b into a uniform soup ...")
    soup = run_merge(recipe)
    texts = corpus(128, seed=99)
    rows = [{"model": p.name, "loss": heldout_loss(p, texts), "l2_to_soup": l2_distance(p, soup)}
            for p in (a, b, soup)]
    return {"rows": rows, "soup": str(soup), "recipe": str(out / "recipe.yaml")}
