"""The provenance every soupkit output directory carries: the resolved recipe and a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_provenance(dst: Path, recipe: dict[str, Any], card: str) -> None:
    """Write the resolved recipe (``soupkit_recipe.yaml``) and the model card (``README.md``)."""
    import yaml

    from soupkit import __version__

    header = f"# Written by soupkit {__version__}: the resolved recipe that produced this directory.\n"
    (dst / "soupkit_recipe.yaml").write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    (dst / "README.md").write_text(card)

