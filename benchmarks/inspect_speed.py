"""Wall time and peak anonymous memory of ``soupkit inspect A B --json`` vs a plain script.

Two random bfloat16 Llama checkpoints of ~134M parameters are built from a config. Each run is a
whole process, imports included, on a warm page cache; runs alternate. The plain script is what
one writes by hand: ``safetensors.torch.load_file`` both state dicts, then the global L2 distance
and cosine in float64, tensor by tensor. Peak anonymous memory is the largest RssAnon sampled from
/proc/PID/status every 5 ms (mmap'd inputs are page cache, RssFile, not the tool's memory). The
two tools' numbers are compared too. Goal: at most half the memory, no slower.

Run:  python benchmarks/inspect_speed.py [--runs 3] [--work benchmarks/.work/inspect]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import pair_benchmark, run_sampled, warm  # noqa: E402

BIN = Path(sys.executable).parent
PLAIN = '''
import json, sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1] + "/model.safetensors"), load_file(sys.argv[2] + "/model.safetensors")
aa = bb = ab = dd = 0.0
for name in a:
    x, y = a[name].double().flatten(), b[name].double().flatten()
    aa += float(x @ x); bb += float(y @ y); ab += float(x @ y); dd += float((x - y) @ (x - y))
print(json.dumps({"l2": dd ** 0.5, "cosine": ab / (aa * bb) ** 0.5}))
'''


def commands(work: Path, a: Path, b: Path) -> dict[str, list[str]]:
    (work / "plain.py").write_text(PLAIN)
    return {
        "soupkit": [str(BIN / "soupkit"), "inspect", str(a), str(b), "--json", str(work / "report.json"), "--force"],
        "plain": [sys.executable, str(work / "plain.py"), str(a), str(b)],
    }


def main() -> None:
    args, work, a, b = pair_benchmark(__doc__.splitlines()[0], "inspect")
    cmds = commands(work, a, b)
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in cmds}
    plain_out = ""
    for i in range(args.runs):
        for name in (list(cmds) if i % 2 == 0 else list(reversed(cmds))):
            warm([a, b])
            wall, peak, out = run_sampled(cmds[name])
            results[name].append((wall, peak))
            plain_out = out if name == "plain" else plain_out
    summarise(results, json.loads(plain_out), json.loads((work / "report.json").read_text()), work)


def summarise(results: dict, plain: dict, ours: dict, work: Path) -> None:
    wall = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    mem = {k: max(m for _, m in v) for k, v in results.items()}
    pair = ours["pairs"][0]
    summary = {
        "runs": {k: [{"wall_s": round(w, 3), "peak_rss_anon_mib": round(m / 2**20, 1)} for w, m in v]
                 for k, v in results.items()},
        "median_wall_s": {k: round(v, 3) for k, v in wall.items()},
        "peak_rss_anon_mib": {k: round(v / 2**20, 1) for k, v in mem.items()},
        "wall_ratio_soupkit_over_plain": round(wall["soupkit"] / wall["plain"], 3),
        "memory_ratio_soupkit_over_plain": round(mem["soupkit"] / mem["plain"], 3),
        "l2_relative_difference": abs(pair["l2"] - plain["l2"]) / plain["l2"],
        "cosine_absolute_difference": abs(pair["cosine"] - plain["cosine"]),
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Python {platform.python_version()}",
    }
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
