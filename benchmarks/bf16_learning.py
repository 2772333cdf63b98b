"""Does bf16 (``bf16: auto`` on hardware with native bf16) learn as well as fp32? A 40-step PPO run on
a hidden-reward task, 3 seeds each, fp32 (``--no-bf16``) against bf16 (``--bf16``).

The task: SmolLM2-135M-Instruct (``soupkit.realmodel``) answers capital-city questions of the demo's
chat world (``soupkit/demo/chat_world.py``: 16 prompts, rendered with the model's chat template),
trained against the world's hidden gold reward (1 for naming the right capital, minus 0.01 a word
past ten words) as a reward function, 8 prompts a step, up to 24 new tokens, kl_coef 0.05, policy
and reference the instruct model itself. The reward gain of a run is the mean reward of its last 5
steps minus that of its first 5. The check: the bf16 runs' mean gain lies within the spread (min to
max) of the fp32 runs' gains.

Run:  python benchmarks/bf16_learning.py [--steps 40] [--seeds 0 1 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"fp32": "--no-bf16", "bf16": "--bf16"}


def gain(metrics: Path, window: int = 5) -> tuple[float, list[float]]:
    rewards = [json.loads(line)["reward"] for line in metrics.read_text().splitlines()]
    return statistics.fmean(rewards[-window:]) - statistics.fmean(rewards[:window]), rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "bf16-learning")
    args = parser.parse_args()
    from soupkit.demo.chat_world import TRAIN, prompt_rows, write_jsonl
    from soupkit.realmodel import smollm2

    model = smollm2()
    prompts = write_jsonl(args.work / "prompts.jsonl", prompt_rows(TRAIN))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    for seed in args.seeds:
        for mode, flag in MODES.items():
            out = args.work / f"{mode}-seed{seed}"
            cmd = [sys.executable, "-m", "soupkit", "align", "--ref", str(model), "--prompts", str(prompts),
                   "--reward", "soupkit.demo.chat_world:gold_reward", "--out", str(out), "--force",
                   "--steps", str(args.steps), "--batch-size", "8", "--max-new-tokens", "24",
                   "--kl-coef", "0.05", "--learning-rate", str(args.learning_rate), "--seed", str(seed),
                   "--save-every", "0", flag]
            start = time.perf_counter()
            subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
            g, rewards = gain(out / "metrics.jsonl")
            results[mode].append(g)
            print(f"{mode} seed {seed}: gain {g:+.3f} (first 5 steps {statistics.fmean(rewards[:5]):.3f}, "
                  f"last 5 {statistics.fmean(rewards[-5:]):.3f}), {time.perf_counter() - start:.0f} s", flush=True)
    fp32, bf16 = results["fp32"], results["bf16"]
    print(f"\nfp32 gains {', '.join(f'{g:+.3f}' for g in fp32)}, mean {statistics.fmean(fp32):+.3f}, "
          f"spread [{min(fp32):+.3f}, {max(fp32):+.3f}]")
    print(f"bf16 gains {', '.join(f'{g:+.3f}' for g in bf16)}, mean {statistics.fmean(bf16):+.3f}")
    inside = min(fp32) <= statistics.fmean(bf16) <= max(fp32)
    print(f"bf16 mean gain {'within' if inside else 'OUTSIDE'} the spread of the fp32 seeds")


if __name__ == "__main__":
    main()
