"""Fixtures for diagnostics: fine-tunes of one base (base + small noise), probe texts, a soup."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_model

TEXTS = [
    "the cat sat on the mat",
    "the dog ran in the pond and then it was night",
    "hello world",
    "a big red bird flew over the tree and the sun was good",
    "one two three four five",
]


def perturb(src: Path, dst: Path, seed: int, scale: float = 0.02) -> Path:
    """A "fine-tune": a copy of ``src`` with Gaussian noise added to every float tensor."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name, t in state.items():
        noise = torch.randn(t.shape, generator=gen) * scale
        state[name] = (t.float() + noise).to(t.dtype)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def diag_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("diag")


@pytest.fixture(scope="session")
def family(diag_dir) -> dict[str, Path]:
    """base, three fine-tunes of it (ft1..ft3), and an unrelated model (other)."""
    base = make_model(diag_dir / "base", seed=40)
    out = {"base": base, "other": make_model(diag_dir / "other", seed=41)}
    for i in (1, 2, 3):
        out[f"ft{i}"] = perturb(base, diag_dir / f"ft{i}", seed=i)
    return out


@pytest.fixture(scope="session")
def bf16_family(diag_dir) -> dict[str, Path]:
    base = make_model(diag_dir / "bf16-base", seed=50, dtype=torch.bfloat16)
    return {"base": base, "ft1": perturb(base, diag_dir / "bf16-ft1", seed=5),
            "ft2": perturb(base, diag_dir / "bf16-ft2", seed=6)}


@pytest.fixture(scope="session")
def texts_file(diag_dir) -> Path:
    path = diag_dir / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


@pytest.fixture(scope="session")
def soup(diag_dir, family) -> Path:
    from soupkit import run_merge

    return run_merge({"merge": {"method": "uniform", "models": [str(family["ft1"]), str(family["ft2"])],
                                "output": str(diag_dir / "soup")}})
