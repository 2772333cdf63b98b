"""Wall time and peak anonymous memory of a uniform soup: soupkit vs mergekit, against a read floor.

Two random bfloat16 Llama checkpoints of ~134M parameters are built from a config. Each run is a
whole process (``soupkit merge`` / ``mergekit-yaml``, imports included, as a user runs them) on a
warm page cache; runs alternate between the tools. Peak anonymous memory is the largest RssAnon
sampled from /proc/PID/status: mmap'd input pages are page cache (RssFile), not the tool's memory.
The floor is ``cat`` of both inputs to /dev/null, warm. The outputs are compared bit for bit.

Run:  python benchmarks/merge_speed.py [--runs 3] [--work benchmarks/.work/merge]
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
from common import pair_benchmark, run_sampled, warm  # noqa: E402

BIN = Path(sys.executable).parent


def write_recipes(work: Path, a: Path, b: Path) -> None:
    import yaml

    soupkit = {"merge": {"method": "uniform", "models": [str(a), str(b)], "output": str(work / "out-soupkit")}}
    mergekit = {"merge_method": "linear", "dtype": "bfloat16", "out_dtype": "bfloat16",
                "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                           {"model": str(b), "parameters": {"weight": 0.5}}]}
    (work / "soupkit.yaml").write_text(yaml.safe_dump(soupkit))
    (work / "mergekit.yaml").write_text(yaml.safe_dump(mergekit))


def commands(work: Path) -> dict[str, list[str]]:
    return {
        "soupkit": [str(BIN / "soupkit"), "merge", str(work / "soupkit.yaml")],
        "mergekit": [str(BIN / "mergekit-yaml"), str(work / "mergekit.yaml"), str(work / "out-mergekit"),
                     "--lazy-unpickle", "--quiet", "--no-copy-tokenizer"],
    }


def cat_floor(paths: list[Path]) -> float:
    files = [str(p / "model.safetensors") for p in paths]
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def same_weights(work: Path) -> bool:
    from safetensors.torch import load_file

    ours = load_file(work / "out-soupkit" / "model.safetensors")
    theirs = {}
    for f in (work / "out-mergekit").glob("*.safetensors"):
        theirs.update(load_file(f))
    return sorted(ours) == sorted(theirs) and all(ours[k].equal(theirs[k]) for k in ours)


def main() -> None:
    args, work, a, b = pair_benchmark(__doc__.splitlines()[0], "merge")
    write_recipes(work, a, b)
    cmds = commands(work)
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in cmds}
    floors = []
    for i in range(args.runs):
        order = list(cmds) if i % 2 == 0 else list(reversed(cmds))
        for name in order:
            shutil.rmtree(work / f"out-{name}", ignore_errors=True)
            warm([a, b])
            results[name].append(run_sampled(cmds[name], work)[:2])
        warm([a, b])
        floors.append(cat_floor([a, b]))
    report(results, floors, same_weights(work), work)


def report(results: dict, floors: list[float], identical: bool, work: Path) -> None:
    wall = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    mem = {k: max(m for _, m in v) for k, v in results.items()}
    floor = statistics.median(floors)
    summary = {
        "runs": {k: [{"wall_s": round(w, 3), "peak_rss_anon_mib": round(m / 2**20, 1)} for w, m in v]
                 for k, v in results.items()},
        "median_wall_s": {k: round(v, 3) for k, v in wall.items()},
        "peak_rss_anon_mib": {k: round(v / 2**20, 1) for k, v in mem.items()},
        "cat_floor_s": round(floor, 3),
        "wall_ratio_soupkit_over_mergekit": round(wall["soupkit"] / wall["mergekit"], 3),
        "memory_ratio_soupkit_over_mergekit": round(mem["soupkit"] / mem["mergekit"], 3),
        "soupkit_over_cat_floor": round(wall["soupkit"] / floor, 1),
        "outputs_bit_identical": identical,
        "cpus": os.cpu_count(),
    }
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
