"""Fixtures for the PPO tests: tiny models, a prompt file, rule-based rewards, and a soup."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import WORDS, make_model, tiny_config, tokenizer

REWARDS = Path(__file__).with_name("rewards.py")


@pytest.fixture(scope="session")
def rl_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rlhf")


@pytest.fixture(scope="session")
def sft_a(rl_dir) -> Path:
    return make_model(rl_dir / "sft-a", seed=101)


@pytest.fixture(scope="session")
def sft_b(rl_dir) -> Path:
    return make_model(rl_dir / "sft-b", seed=102)


@pytest.fixture(scope="session")
def soup(rl_dir, sft_a, sft_b) -> Path:
    from soupkit import run_merge

    return run_merge({"merge": {"method": "uniform", "models": [str(sft_a), str(sft_b)]}}, out=rl_dir / "soup")


@pytest.fixture(scope="session")
def prompts_txt(rl_dir) -> Path:
    path = rl_dir / "prompts.txt"
    path.write_text("\n".join(" ".join(WORDS[i:i + 3]) for i in range(0, 48)) + "\n")
    return path


@pytest.fixture(scope="session")
def reward_model(rl_dir) -> Path:
    """A same-tokenizer LlamaForSequenceClassification with one label."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(7)
    config = tiny_config("llama")
    config.num_labels = 1
    path = rl_dir / "rm"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def other_vocab(rl_dir) -> Path:
    """A model whose vocabulary differs from the policy's."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.vocab_size = 80
    path = rl_dir / "other-vocab"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def good_words_ref() -> str:
    return f"{REWARDS}:good_words"


@pytest.fixture(scope="session")
def reward_model_own_tokenizer(rl_dir) -> Path:
    """A reward model with its own vocabulary (other ids): the text is re-tokenised for it."""
    from transformers import AutoModelForSequenceClassification

    from soupkit.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(list(reversed(WORDS)) + ["extra"])
    config = tiny_config("llama")
    config.num_labels, config.vocab_size = 1, len(tok)
    torch.manual_seed(8)
    path = rl_dir / "rm-own-tokenizer"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
