"""Tiny PEFT LoRA adapters with random A and B (PEFT starts B at 0, which would hide every bug)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(path: Path, base: Path, seed: int, rank: int = 4, alpha: float = 8.0,
                 targets: list[str] | str = "all-linear", std: float = 0.3, **lora_kw) -> Path:
    """Save a LoRA adapter on ``base`` whose factors are random normal with ``std`` (large by
    default, so its update is not lost in a tiny random base's noise)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                        lora_dropout=0.0, task_type="CAUSAL_LM", **lora_kw)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * std)
    peft_model.save_pretrained(path)
    return path


def merged(base: Path, adapter: Path, out: Path | None = None):
    """PEFT's own merge (``merge_and_unload``) of ``adapter`` into ``base``: the oracle model;
    saved at ``out`` when given."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    if out is not None:
        model.save_pretrained(out)
    return model
