"""The engine's lookahead (soupkit.merge.engine.Lookahead): a worker thread prepares the coming tensors'
statistics while the caller writes; the output is the serial merge's, byte for byte, and a failure in
the worker stops the merge with its own message and leaves no output."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from soupkit import run_merge
from soupkit.errors import SoupkitError
from soupkit.merge import engine, kernels, methods
from tests.conftest import load_state, make_model
from tests.merge.test_methods import _save_like

SPECS = {
    "ties": {"models": [{"model": 1, "weight": 0.6, "parameters": {"density": 0.4}},
                        {"model": 2, "weight": 0.5, "parameters": {"density": 0.7}}]},
    "dare_ties": {"models": [{"model": 1, "weight": 0.5, "parameters": {"density": 0.5}},
                             {"model": 2, "weight": 0.5, "parameters": {"density": 0.3}}]},
    "task_arithmetic": {"models": [{"model": 1, "weight": 0.7}, {"model": 2, "weight": 0.4}]},
    "model_stock": {"models": [1, 2]},
    "slerp": {"models": [0, 1], "parameters": {"t": 0.3}},
    "task_slerp": {"models": [1, 2], "parameters": {"t": 0.5}},
}


@pytest.fixture(scope="module")
def bf16_trio(tmp_path_factory) -> list[Path]:
    """A bfloat16 base and two fine-tunes of it (the inputs the fused kernels read as stored)."""
    root = tmp_path_factory.mktemp("bf16trio")
    base = make_model(root / "base", seed=51, layers=3, dtype=torch.bfloat16)
    state = load_state(base)
    paths = [base]
    for seed in (52, 53):
        torch.manual_seed(seed)
        tuned = {k: (v.float() + 0.02 * torch.randn_like(v.float())).to(v.dtype) for k, v in state.items()}
        paths.append(_save_like(base, root / f"ft{seed}", tuned))
    return paths


def spec(method: str, paths: list[Path], out: Path) -> dict:
    def model(entry):
        return {**entry, "model": str(paths[entry["model"]])} if isinstance(entry, dict) else str(paths[entry])

    return {"merge": {"method": method, "base": str(paths[0]), "output": str(out), "seed": 7,
                      **{k: ([model(m) for m in v] if k == "models" else v) for k, v in SPECS[method].items()}}}


@pytest.mark.parametrize("method", list(SPECS))
def test_lookahead_output_equals_the_serial_merge(tmp_path, monkeypatch, bf16_trio, method):
    """With the lookahead on (forced: CI may have one CPU) the first tensor is prepared by the caller
    (TIES's and DARE's per-model statistics split with the worker) and every other one on the worker
    thread; the file is the serial merge's byte for byte, also across small chunks."""
    monkeypatch.setattr(methods, "CHUNK", 1000)
    monkeypatch.setenv("SOUPKIT_MERGE_THREADS", "1")
    serial = run_merge(spec(method, bf16_trio, tmp_path / "serial"))
    threads: list[str] = []
    split: list[tuple[str, tuple[int, ...]]] = []
    prepare, statistics = engine.prepare, kernels.gta_statistics

    def recorded(*args):
        threads.append(threading.current_thread().name)
        return prepare(*args)

    def recorded_statistics(method, job, models):
        split.append((threading.current_thread().name, tuple(models)))
        return statistics(method, job, models)

    monkeypatch.setattr(engine, "prepare", recorded)
    monkeypatch.setattr(kernels, "gta_statistics", recorded_statistics)
    monkeypatch.setattr(engine, "merge_threads", lambda: 2)
    ahead = run_merge(spec(method, bf16_trio, tmp_path / "ahead"))
    assert (ahead / "model.safetensors").read_bytes() == (serial / "model.safetensors").read_bytes()
    floats = sum(v.is_floating_point() for v in load_state(serial).values())
    assert len(threads) == floats
    assert threads[0] == threading.current_thread().name
    assert all(name.startswith("soupkit-prepare") for name in threads[1:])
    if method in ("ties", "dare_ties"):  # the first tensor: model 0 on the worker, model 1 here
        first = sorted(split[:2])
        assert first[0] == (threading.current_thread().name, (1,)) and first[1][1] == (0,)
        assert first[1][0].startswith("soupkit-prepare")


def test_a_failure_on_the_worker_stops_the_merge_with_its_message(tmp_path, monkeypatch, bf16_trio):
    prepare = engine.prepare

    def failing(method, job, *helper):
        if "layers.1." in job.name:
            raise SoupkitError(f"tensor {job.name}: refused")
        return prepare(method, job, *helper)

    monkeypatch.setattr(engine, "prepare", failing)
    monkeypatch.setattr(engine, "merge_threads", lambda: 2)
    out = tmp_path / "out"
    with pytest.raises(SoupkitError, match=r"tensor model\.layers\.1\..*: refused"):
        run_merge(spec("ties", bf16_trio, out))
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_thread_count_is_one_line_naming_the_variable(tmp_path, monkeypatch, bf16_trio, value):
    monkeypatch.setenv("SOUPKIT_MERGE_THREADS", value)
    out = tmp_path / "out"
    with pytest.raises(SoupkitError, match=f"SOUPKIT_MERGE_THREADS: '{value}' is not a positive integer"):
        run_merge(spec("ties", bf16_trio, out))
    assert not out.exists()


def test_one_thread_prepares_in_the_caller(monkeypatch, bf16_trio, tmp_path):
    """``SOUPKIT_MERGE_THREADS=1``: no worker thread is started."""
    monkeypatch.setenv("SOUPKIT_MERGE_THREADS", "1")
    started = []
    monkeypatch.setattr(engine, "ThreadPoolExecutor", lambda *a, **k: started.append(1))
    run_merge(spec("ties", bf16_trio, tmp_path / "out"))
    assert started == []
