"""soupkit: model soups for LLMs, soup diagnostics, and PPO against any reference (SALSA).

Public API (heavy modules load on first use, so ``import soupkit`` stays fast)::

    soupkit.run_merge(recipe_or_path, out=None, force=False) -> Path          # soupkit merge
    soupkit.inspect(models, base=None, prompts=None, path=False, ...) -> dict  # soupkit inspect
    soupkit.align(spec, out=None, force=False, resume=False) -> Path           # soupkit align
    soupkit.run_pipeline(recipe, only=(), force=()) -> dict                    # soupkit run
    soupkit.run_eval(recipe) -> dict                                           # soupkit eval
    soupkit.load_recipe(path, overrides=()) -> Recipe
    soupkit.SoupkitError
"""

from __future__ import annotations

from typing import Any

from soupkit.errors import SoupkitError

__version__ = "0.1.0.dev0"

__all__ = ["SoupkitError", "__version__", "align", "inspect", "load_recipe", "run_eval", "run_merge",
           "run_pipeline"]

_LAZY = {
    "run_merge": ("soupkit.merge", "run_merge"),
    "inspect": ("soupkit.diagnostics.report", "report"),
    "align": ("soupkit.rlhf.trainer", "train"),
    "run_pipeline": ("soupkit.pipeline", "run_pipeline"),
    "run_eval": ("soupkit.pipeline", "run_eval"),
    "load_recipe": ("soupkit.recipe", "load_recipe"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'soupkit' has no attribute {name!r}")
