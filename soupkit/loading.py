"""Models and tokenizers loaded with transformers, and the vocabulary checks between them.

Every command loads through here: ``align`` (policy, critic, references, reward model), ``eval``
and ``inspect``. A checkpoint transformers cannot load, or one without a usable tokenizer, is the
user's input and becomes one ``SoupkitError`` naming it. The vocabulary checks read only
``config.json`` and ``tokenizer.json`` where they can, so they run before any weight loads.
transformers and torch are imported inside the functions (``soupkit --help`` stays fast).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError


def vocab_size(config: dict[str, Any]) -> Any:
    """``vocab_size`` of a ``config.json`` (a multimodal model's ``text_config``'s), or None."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return text.get("vocab_size")


def tokenizer_vocab(model_dir: Path) -> dict[str, int] | None:
    """Token -> id from ``tokenizer.json`` without loading a tokenizer (added tokens included);
    None when the directory has no ``tokenizer.json``."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SoupkitError(f"{path}: invalid JSON") from None
    vocab = dict(data.get("model", {}).get("vocab") or {})
    if isinstance(data.get("model", {}).get("vocab"), list):  # unigram: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _) in enumerate(data["model"]["vocab"])}
    vocab.update({tok["content"]: tok["id"] for tok in data.get("added_tokens", [])})
    return vocab


def vocab_difference(a: dict[str, int], b: dict[str, int]) -> str | None:
    """The one test of "same vocabulary": None when both map every token to the same id, else
    the first token that differs, as ``token 'x' has id 5 vs 7``."""
    if a == b:
        return None
    token = next(t for t in [*a, *b] if a.get(t) != b.get(t))
    return f"token {token!r} has id {a.get(token)} vs {b.get(token)}"


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def same_tokenizer_file(tokenizer: Any, path: Path) -> bool:
    """Byte-identical ``tokenizer.json`` files: the same vocabulary without loading a second one."""
    mine, theirs = Path(tokenizer.name_or_path) / "tokenizer.json", Path(path) / "tokenizer.json"
    return mine.is_file() and theirs.is_file() and mine.read_bytes() == theirs.read_bytes()


def load_tokenizer(path: Path, what: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with checkpoint ``path`` (``what`` names it in the error), as saved."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a missing or broken tokenizer is the user's input
        raise SoupkitError(f"{what} {path}: cannot load its tokenizer ({type(exc).__name__})") from None


def generation_tokenizer(path: Path, what: str, trust_remote_code: bool = False) -> Any:
    """A tokenizer set up to generate: prompts padded and truncated on the left, an EOS token to
    end responses, pad = EOS only when it has no pad token."""
    tokenizer = load_tokenizer(path, what, trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise SoupkitError(f"{what} {path}: the tokenizer has no EOS token to end responses")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe here: every mask is explicit, never ids != pad
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    return tokenizer


def causal_lm(path: Path, what: str, dtype: Any = None, device: Any = "cpu", trust_remote_code: bool = False) -> Any:
    """A causal LM (float32 unless ``dtype``: CPU matmuls in bf16 are slow and less exact) on
    ``device``, in eval mode (no dropout). ``path`` may be a LoRA adapter (``soupkit.adapters``):
    it is merged into its base."""
    import torch
    from transformers import AutoModelForCausalLM

    from soupkit import adapters

    try:
        if adapters.is_adapter_ref(str(path)):  # a LoRA adapter, merged into its base
            model = adapters.merged_causal_lm(str(path), dtype or torch.float32, trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a checkpoint transformers cannot load is bad input
        raise SoupkitError(f"{what} {path}: cannot load as a causal LM ({type(exc).__name__}: {exc})") from None
    contiguous_head_input(model)
    return model.eval().to(device)


def contiguous_head_input(model: Any) -> None:
    """Hand the LM head a contiguous input. transformers slices the positions whose logits are kept
    (``logits_to_keep``) out of the hidden states, a strided view; for a weight that does not
    require grad (a frozen reference) torch's ``matmul`` then takes a batched path that copies the
    whole head weight once per row (measured on SmolLM2: 450 MB copied per forward, 1.2 s instead of
    0.74 s). Copying the few kept positions instead costs kilobytes. The hook travels with
    ``copy.deepcopy`` and under peft."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head.register_forward_pre_hook(_contiguous_first_arg)


def _contiguous_first_arg(module: Any, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:]) if args else args


EAGER_FP32 = "soupkit_eager"
"""The name soupkit registers its eager attention under (``eager_attention_fp32``)."""


def use_attention(model: Any, implementation: str, strict: bool) -> None:
    """Switch a transformers model (or the base of a peft model) to ``sdpa`` or ``eager`` attention;
    anything else (a reward function, a wrapper around the policy) is left alone. ``eager`` is
    ``eager_attention_fp32`` where the model's code takes a registered attention function, else
    transformers' own. A model whose code cannot run ``implementation`` keeps its own kernel, unless
    ``strict`` (the user asked for it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "set_attn_implementation"):
        return
    names = [register_eager_fp32(), implementation] if implementation == "eager" else [implementation]
    if base.config._attn_implementation in names:
        return
    for name in names:
        try:
            base.set_attn_implementation(name)
            return
        except (ValueError, ImportError) as exc:
            error = exc
    if strict:
        raise SoupkitError(f"attention {implementation}: {type(base).__name__} cannot use it ({error})") from None


def register_eager_fp32() -> str:
    """Register ``eager_attention_fp32`` with transformers (once); its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if EAGER_FP32 not in AttentionInterface._global_mapping:
        AttentionInterface.register(EAGER_FP32, eager_attention_fp32)
        AttentionMaskInterface.register(EAGER_FP32, eager_mask)  # the additive float mask eager takes
    return EAGER_FP32


def eager_attention_fp32(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float,
                         dropout: float = 0.0, **kwargs: Any) -> tuple[Any, Any]:
    """Attention as plain matrix products (transformers' ``eager`` signature), with the scores, the
    softmax and the weighted sum in float32 whatever the inputs' dtype. transformers' eager rounds the
    scores q.k to the inputs' dtype before the softmax: under bf16 autocast to 3 significant digits,
    where torch's SDPA kernel keeps them in float32. Shapes: (b, h, s, d) x3, mask (b, 1, s, s_kv) ->
    (b, s, h, d) in the query's dtype, and the probabilities (b, h, s, s_kv), float32."""
    import torch

    groups = getattr(module, "num_key_value_groups", 1)
    with torch.autocast(query.device.type, enabled=False):
        k = key.float().repeat_interleave(groups, dim=1) if groups > 1 else key.float()
        v = value.float().repeat_interleave(groups, dim=1) if groups > 1 else value.float()
        scores = torch.matmul(query.float(), k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
        out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out.to(query.dtype), probs


def seq_cls(path: Path, what: str, dtype: Any = None, device: Any = "cpu", trust_remote_code: bool = False) -> Any:
    """A one-label sequence classifier (a reward model, or a critic built on a causal LM, whose
    ``score`` head transformers then creates: that is by design, so its warning is silenced)."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a checkpoint transformers cannot load is bad input
        raise SoupkitError(f"{what} {path}: cannot load a sequence-classification model "
                           f"({type(exc).__name__}: {exc})") from None
    finally:
        logging.set_verbosity(verbosity)
    return model.eval().to(device)


def freeze(model: Any) -> Any:
    """Eval mode and no gradients: frozen models are read, never written."""
    model.eval()
    model.requires_grad_(False)
    return model
