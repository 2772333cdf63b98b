"""Probe texts: reading the prompts file, tokenising, and right-padded teacher-forced batches.

Right padding on purpose: with causal attention a real token never sees the padding after it, and
position ids start at 0 for every row, so each text's logits equal those of the text alone (left
padding shifts absolute positions, which changes GPT-2's outputs).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError
from soupkit.formats import Prompt
from soupkit.rlhf.prompts import load_prompts

MAX_TOKENS = 512
BATCH = 8


def read_texts(path: str | Path, split: str = "train") -> list[Prompt]:
    """Probe texts from ``.jsonl`` (rows of any TRL format, or a ``text`` field), ``.txt`` (one
    per line) or a dataset (its ``split``); rendered with the chat template later, when the
    tokenizer is known."""
    if Path(path).suffix not in (".jsonl", ".txt") and (Path(path).is_dir() or not Path(path).exists()):
        return load_prompts(str(path), split=split, text=True)  # a saved or Hub dataset
    path = Path(path)
    if not path.is_file():
        raise SoupkitError(f"--prompts {path}: no such file")
    if path.suffix not in (".jsonl", ".txt"):
        raise SoupkitError(f"--prompts {path}: expected a .jsonl or .txt file")
    if not path.read_text(encoding="utf-8").strip():
        raise SoupkitError(f"--prompts {path}: no texts in the file")
    try:
        return load_prompts(str(path), text=True)
    except SoupkitError as exc:
        raise SoupkitError(f"--prompts {exc}") from None


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer saved with a checkpoint (shared by all models: preflight checks the vocab)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # noqa: BLE001 - a missing or broken tokenizer is the user's input
        raise SoupkitError(f"{model_dir}: no usable tokenizer for --prompts ({type(exc).__name__})") from None


def encode(tokenizer: Any, texts: list[str], max_tokens: int = MAX_TOKENS, special_tokens: bool = True) -> list[list[int]]:
    """Token ids per text, truncated to ``max_tokens``; texts under two tokens predict nothing."""
    ids = [tokenizer(t, add_special_tokens=special_tokens)["input_ids"][:max_tokens] for t in texts]
    if not any(len(x) >= 2 for x in ids):
        raise SoupkitError("--prompts: every text has fewer than 2 tokens; nothing to predict")
    return ids


def batches(ids: list[list[int]], pad_id: int, size: int = BATCH) -> Iterator[tuple[Any, Any]]:
    """Right-padded ``(input_ids, mask)`` batches of (b, t); mask True = real token."""
    import torch

    rows = [x for x in ids if len(x) >= 2]
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        width = max(map(len, chunk))
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, row in enumerate(chunk):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        yield input_ids, mask


def next_token_logprobs(model: Any, input_ids: Any, mask: Any) -> tuple[Any, Any, Any]:
    """Teacher-forced log p(x_{i+1} | x_{<=i}).

    (b, t) ids and mask -> logprobs (b, t-1, v) float32, targets (b, t-1), valid (b, t-1).
    """
    import torch

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask.long()).logits[:, :-1].float()
    return torch.log_softmax(logits, -1), input_ids[:, 1:], mask[:, 1:]


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def load_lm(model_dir: Path, what: str) -> Any:
    """A causal LM in float32 (CPU matmuls in bf16 are slow and less exact), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from soupkit import adapters

    try:
        if adapters.is_adapter_ref(str(model_dir)):  # a LoRA adapter, merged into its base (issue #19)
            return adapters.merged_causal_lm(str(model_dir), torch.float32).eval()
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    except Exception as exc:  # noqa: BLE001 - a checkpoint transformers cannot load is bad input
        raise SoupkitError(f"{what} {model_dir}: cannot load as a causal LM ({type(exc).__name__}: {exc})") from None
