"""PPO for causal LMs against a frozen reference loaded from any path (a soup, an SFT model).

Entry point: ``soupkit.rlhf.train(spec, out=None, force=False, resume=False, progress=None)``.
Modules: ``rollout`` (sampling, log-probs), ``reward``, ``kl``, ``advantage``, ``losses`` (pure
maths), ``models`` and ``prompts`` (inputs), ``checkpoints``, ``trainer`` (the loop).
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_spec", "train"]


def __getattr__(name: str) -> Any:
    # Lazy, so ``import soupkit.rlhf.advantage`` does not pull in transformers.
    if name == "train":
        from soupkit.rlhf.trainer import train

        return train
    if name == "build_spec":
        from soupkit.rlhf.config import build_spec

        return build_spec
    raise AttributeError(f"module 'soupkit.rlhf' has no attribute {name!r}")
