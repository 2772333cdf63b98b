"""A word-level tokenizer built in-process (nothing downloaded), for the demo world and tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


def build_tokenizer(words: Iterable[str]) -> Any:
    """A ``PreTrainedTokenizerFast`` over ``words``: pad 0, unk 1, bos 2, eos 3, then the words.

    Pad and EOS are distinct on purpose: PPO masks built from ``ids != pad`` would otherwise hide
    real EOS tokens (Huang et al. 2023, https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo). No BOS is added unless asked for.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
        eos_token="[EOS]", padding_side="left", clean_up_tokenization_spaces=False,
    )
