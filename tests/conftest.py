"""Tiny models built from configs, and a tokenizer built in-process. Nothing touches the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# ``bf16: auto`` means fp32 in tests (and in the soupkit processes they start), whatever this CPU can
# do: their oracles are exact fp32 identities (KL 0 at step 0, resume = uninterrupted run). Tests of
# bf16 ask for it by name.
os.environ["SOUPKIT_NATIVE_BF16"] = "0"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

WORDS = (
    "the a cat dog bird fish sat ran flew swam on in under over mat log tree pond red blue green "
    "small big quick slow happy sad and then it is was very good bad day night sun moon rain snow "
    "one two three four five yes no hello world soup model merge"
).split()
VOCAB = 64
ARCHS = ("llama", "gpt2", "qwen2")


def tiny_config(arch: str, layers: int = 2):
    """A transformers config small enough that a model is a few kB."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                           tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=128,
                          pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                           tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    raise ValueError(arch)


def tokenizer():
    from soupkit.demo.tokenizer import build_tokenizer

    return build_tokenizer(WORDS)


def make_model(path: Path, arch: str = "llama", seed: int = 0, layers: int = 2,
               dtype: torch.dtype = torch.float32, with_tokenizer: bool = True, **save_kw) -> Path:
    """Save a randomly initialised tiny causal LM (and the tokenizer) at ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers)).to(dtype)
    model.save_pretrained(path, **save_kw)
    if with_tokenizer:
        tokenizer().save_pretrained(path)
    return path


def read_only(directory: Path) -> None:
    """A stand-in for ``soupkit.storage._probe`` on a read-only file system (root ignores chmod)."""
    import errno

    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(directory))


def must_not_run(*args, **kwargs) -> None:
    """Patched over a loader to prove a check refused the input before it."""
    raise AssertionError("loaded before the check")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (sharded or not), read with safetensors."""
    from safetensors.torch import load_file

    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    return state


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two OpenMP threads that
    wait for each other make them several times slower; one thread is also reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_pair(models_dir) -> tuple[Path, Path]:
    return (make_model(models_dir / "llama-a", seed=1), make_model(models_dir / "llama-b", seed=2))


@pytest.fixture(scope="session")
def llama_c(models_dir) -> Path:
    return make_model(models_dir / "llama-c", seed=3)


@pytest.fixture(scope="session")
def llama4_pair(models_dir) -> tuple[Path, Path]:
    """Four decoder layers, for layer-wise tests."""
    return (make_model(models_dir / "llama4-a", seed=11, layers=4),
            make_model(models_dir / "llama4-b", seed=12, layers=4))


@pytest.fixture(scope="session")
def bf16_pair(models_dir) -> tuple[Path, Path]:
    return (make_model(models_dir / "bf16-a", seed=21, dtype=torch.bfloat16),
            make_model(models_dir / "bf16-b", seed=22, dtype=torch.bfloat16))


@pytest.fixture(scope="session")
def arch_pairs(models_dir) -> dict[str, tuple[Path, Path]]:
    return {arch: (make_model(models_dir / f"{arch}-x", arch, seed=31),
                   make_model(models_dir / f"{arch}-y", arch, seed=32)) for arch in ARCHS}
