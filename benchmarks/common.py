"""Shared by the benchmarks: the ~134M-parameter test checkpoints and whole-process measurement."""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def build_llama_pair(work: Path, seeds: tuple[int, ...] = (0, 1)) -> list[Path]:
    """Two (or ``len(seeds)``) random bf16 Llama checkpoints (hidden 768, 12 layers, vocab 32000, untied:
    134M params), built once from a config and reused."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=False)
    paths = []
    for seed in seeds:
        path = work / f"model-{seed}"
        if not (path / "model.safetensors").exists():
            torch.manual_seed(seed)
            with torch.device("meta"):
                model = LlamaForCausalLM(config)
            model = model.to_empty(device="cpu").to(torch.bfloat16)
            for p in model.parameters():
                torch.nn.init.normal_(p, 0.0, 0.02)
            model.save_pretrained(path)
        paths.append(path)
    return paths


def pair_benchmark(description: str, name: str, options: Callable[[argparse.ArgumentParser], None] | None = None
                   ) -> tuple[argparse.Namespace, Path, Path | None, Path | None]:
    """The command line shared by the two-checkpoint benchmarks (``--runs``, ``--work``, and what
    ``options`` adds), the work folder created, and the Llama pair built in it: ``(args, work, a, b)``
    (no pair when a ``--model`` option names another model)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / ".work" / name)
    if options is not None:
        options(parser)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if getattr(args, "model", "llama") != "llama":
        return args, work, None, None
    a, b = build_llama_pair(work)
    return args, work, a, b


def resident(pid: int) -> dict[str, int]:
    """``RssAnon`` (the process's own memory) and ``VmRSS`` (that plus the file pages it maps: code,
    memory-mapped weights) of a process, in bytes; empty once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {key: int(rest.split()[0]) * 1024 for key, _, rest in (ln.partition(":") for ln in f)
                    if key in ("RssAnon", "VmRSS")}
    except (FileNotFoundError, ProcessLookupError):
        return {}


def run_sampled(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RssAnon (bytes, sampled every 5 ms) and stdout of a whole process."""
    wall, peaks, out = run_sampled_peaks(cmd, cwd, env)
    return wall, peaks["RssAnon"], out


def run_sampled_peaks(cmd: list[str], cwd: Path | None = None,
                      env: dict[str, str] | None = None) -> tuple[float, dict[str, int], str]:
    """Wall seconds, the peaks of ``resident`` (bytes, sampled every 5 ms) and stdout of a whole process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peaks = {"RssAnon": 0, "VmRSS": 0}
    while proc.poll() is None:
        for key, value in resident(proc.pid).items():
            peaks[key] = max(peaks[key], value)
        time.sleep(0.005)
    wall = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed: {err.decode()[-2000:]}")
    return wall, peaks, out.decode()


def warm(paths: list[Path]) -> None:
    """Read each checkpoint once so runs start from a warm page cache."""
    for p in paths:
        with open(p / "model.safetensors", "rb") as f:
            while f.read(1 << 24):
                pass
