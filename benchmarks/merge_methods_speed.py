"""Wall time of each native merge method against the read+write floor, in one process.

Three random bfloat16 Llama checkpoints of ~134M parameters (the merge benchmark's pair and a third
one from the same config): a base and two models; ``--model smollm2``: SmolLM2-135M-Instruct and two
noisy copies of it (``build_smollm2_trio``). Each method merges them with ``run_merge`` (imports
done once, outside the timing), on a warm page cache; the runs of the methods alternate, after one
untimed warm-up run of each (reported as ``first_s``: it includes loading or compiling the numba
kernels, which ``SOUPKIT_JIT=0`` turns off). The floor is
what any merge must do: read the inputs it reads (``cat`` of the files to /dev/null) plus write the
output's bytes (``dd`` from /dev/zero into a file next to the outputs, into the page cache); its
fastest run is reported (a floor is the best the machine does). Every timed merge and floor starts
after ``sync``, so the disk writing back an earlier output does not land inside it. Each run times
every method twice, with the engine's lookahead (a second thread prepares the next tensors'
statistics; the default) and without it (``SOUPKIT_MERGE_THREADS=1``, one core: ``serial_s``).

Run:  python benchmarks/merge_methods_speed.py [--runs 3] [--model llama|smollm2] [--work benchmarks/.work/merge]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import build_llama_pair, pair_benchmark, warm  # noqa: E402

METHODS = {
    "uniform": lambda b, x, y: {"models": [str(x), str(y)]},
    "task_arithmetic": lambda b, x, y: {"base": str(b), "models": [{"model": str(x), "weight": 0.6},
                                                                   {"model": str(y), "weight": 0.4}]},
    "ties": lambda b, x, y: {"base": str(b), "models": [{"model": str(m), "weight": 0.5, "parameters": {"density": 0.5}}
                                                        for m in (x, y)]},
    "dare_ties": lambda b, x, y: {"base": str(b), "models": [{"model": str(m), "weight": 0.5,
                                                              "parameters": {"density": 0.5}} for m in (x, y)]},
    "slerp": lambda b, x, y: {"base": str(b), "models": [str(b), str(x)], "parameters": {"t": 0.5}},
    "model_stock": lambda b, x, y: {"base": str(b), "models": [str(x), str(y)]},
    "task_slerp": lambda b, x, y: {"base": str(b), "models": [str(x), str(y)], "parameters": {"t": 0.5}},
}


def floor(inputs: list[Path], out_bytes: int, work: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", *[str(p / "model.safetensors") for p in inputs]], stdout=subprocess.DEVNULL, check=True)
    target = work / "floor.bin"
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={max(1, out_bytes >> 24)}",
                    "status=none"], check=True)
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


def inputs_of(method: str, base: Path, x: Path, y: Path) -> list[Path]:
    return [x, y] if method == "uniform" else [base, x] if method == "slerp" else [base, x, y]


def build_smollm2_trio(work: Path) -> list[Path]:
    """SmolLM2-135M-Instruct (the real chat model: tied embeddings, a 2 MB BPE tokenizer.json) and two
    "fine-tunes" of it, its weights plus noise of 2% of each tensor's mean |w|, all bfloat16."""
    import torch
    from safetensors.torch import load_file, save_file

    from soupkit.realmodel import smollm2

    source = smollm2()
    paths = []
    for i, scale in enumerate((0.0, 0.02, 0.02)):
        path = work / f"smollm2-{i}"
        if not (path / "model.safetensors").exists():
            shutil.copytree(source, path, dirs_exist_ok=True)
            torch.manual_seed(100 + i)
            state = load_file(source / "model.safetensors")
            save_file({k: (v.float() + scale * v.float().abs().mean() * torch.randn_like(v.float()))
                       .to(torch.bfloat16).contiguous() for k, v in state.items()},
                      path / "model.safetensors", metadata={"format": "pt"})
        paths.append(path)
    return paths


def main() -> None:
    from soupkit import run_merge

    def options(parser):
        parser.add_argument("--model", choices=["llama", "smollm2"], default="llama",
                            help="llama: random 134M-parameter checkpoints; smollm2: the real chat model")

    args, work, _, _ = pair_benchmark(__doc__.splitlines()[0], "merge", options)
    if args.model == "smollm2":
        base, x, y = build_smollm2_trio(work)
    else:
        base, x, y = build_llama_pair(work, (0, 1, 2))
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    serial: dict[str, list[float]] = {m: [] for m in METHODS}
    floors: dict[str, list[float]] = {m: [] for m in METHODS}
    cpus: dict[str, list[float]] = {m: [] for m in METHODS}  # CPU seconds: less sensitive to other jobs
    first = {}
    for method in METHODS:  # warm-up: the first call loads (or compiles) the kernels
        out = work / f"out-{method}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        run_merge({"merge": {"method": method, "output": str(out), **METHODS[method](base, x, y)}})
        first[method] = round(time.perf_counter() - start, 3)
    for run in range(args.runs):
        for method in METHODS if run % 2 == 0 else reversed(list(METHODS)):
            out = work / f"out-{method}"
            spec = {"method": method, "output": str(out), **METHODS[method](base, x, y)}
            for threads, into in (("2", times), ("1", serial)) if run % 2 == 0 else (("1", serial), ("2", times)):
                shutil.rmtree(out, ignore_errors=True)
                warm([base, x, y])
                os.sync()
                os.environ["SOUPKIT_MERGE_THREADS"] = threads
                start, cpu = time.perf_counter(), time.process_time()
                run_merge({"merge": spec})
                into[method].append(time.perf_counter() - start)
                if threads == "2":
                    cpus[method].append(time.process_time() - cpu)
            size = (out / "model.safetensors").stat().st_size
            os.sync()
            floors[method].append(floor(inputs_of(method, base, x, y), size, work))
    os.environ.pop("SOUPKIT_MERGE_THREADS", None)
    report(times, serial, floors, first, cpus, work)


def report(times: dict[str, list[float]], serial: dict[str, list[float]], floors: dict[str, list[float]],
           first: dict[str, float], cpus: dict[str, list[float]], work: Path) -> None:
    median = {m: statistics.median(v) for m, v in times.items()}
    fastest = {m: min(v) for m, v in times.items()}
    summary = {m: {"median_s": round(median[m], 3), "min_s": round(fastest[m], 3),
                   "runs_s": [round(t, 3) for t in times[m]],
                   "serial_s": round(statistics.median(serial[m]), 3),
                   "floor_s": round(min(floors[m]), 3),
                   "over_floor": round(median[m] / min(floors[m]), 2),
                   "over_uniform": round(median[m] / median["uniform"], 2),
                   "over_uniform_min": round(fastest[m] / fastest["uniform"], 2), "first_s": first[m],
                   "cpu_s": round(statistics.median(cpus[m]), 3)} for m in times}
    summary["cpus"] = os.cpu_count()
    summary["jit"] = os.environ.get("SOUPKIT_JIT", "1") != "0"
    summary["load_average"] = [round(v, 2) for v in os.getloadavg()]
    (work / "methods.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
