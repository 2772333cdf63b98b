"""The prepared GPU benchmark runs end to end on the CPU at a tiny size (no GPU figures here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_ppo.py"


@pytest.mark.smoke
def test_gpu_script_runs_tiny_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_ppo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--tiny", "--steps", "2", "--work", str(tmp_path)])
    assert [r["mode"] for r in results] == list(module.MODES)
    assert all(r["tokens_per_s"] > 0 for r in results)
