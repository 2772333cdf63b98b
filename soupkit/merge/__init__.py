"""The merging core: a streaming soup engine, weight resolution, preflight checks, and a mergekit
backend for the methods soupkit does not implement itself."""

from soupkit.merge.run import load_merge_spec, run_merge

__all__ = ["load_merge_spec", "run_merge"]
