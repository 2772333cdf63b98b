"""Do soupkit's speed defaults (``bf16: auto``, ``attention: auto``) learn as well as fp32? A 40-step PPO
run on a hidden-reward task, 3 seeds each, fp32 with SDPA attention (``--no-bf16 --attention sdpa``, the
defaults before issue #12) against the defaults (on a CPU with native bf16: bf16 and eager attention).

Two tasks (``--world``), each trained directly against its world's hidden gold reward (a function
the policy never sees, passed as ``--reward module:function``), policy and reference the same model:

- ``toy``: the SFT model of ``soupkit demo`` (``--demo DIR``, an output of ``soupkit demo``; built
  with ``soupkit demo --small`` when missing) on the demo's prompts; gold reward = the demo world's
  (``soupkit/demo/world.py``); 16 prompts a step, 24 new tokens at temperature 1, learning rate 3e-4.
- ``smollm2``: SmolLM2-135M-Instruct (``soupkit.realmodel``) on the 16 capital-city questions of the
  chat world (``soupkit/demo/chat_world.py``, the model's chat template), gold reward 1 for naming the
  right capital minus 0.01 a word past ten; 8 prompts a step, 24 new tokens, learning rate 5e-6.

kl_coef 0.05. The reward gain of a run is the mean reward of its last 5 steps minus that of its
first 5. The check: the default runs' mean gain lies within the spread (min to max) of the fp32 gains.

Run:  python benchmarks/bf16_learning.py [--world toy] [--steps 40] [--seeds 0 1 2] [--threads 1]
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
MODES = {"fp32": ["--no-bf16", "--attention", "sdpa"], "defaults": []}
"""The baseline is soupkit before issue #12 (fp32, SDPA attention); the candidate is today's defaults
(bf16 auto, attention auto, freed memory kept: on this CPU bf16, eager attention)."""


def gain(metrics: Path, window: int = 5) -> tuple[float, list[float]]:
    rewards = [json.loads(line)["reward"] for line in metrics.read_text().splitlines()]
    return statistics.fmean(rewards[-window:]) - statistics.fmean(rewards[:window]), rewards


def task(world: str, work: Path, demo: Path | None) -> list[str]:
    """The model, prompts, reward and sampling flags of a world."""
    if world == "smollm2":
        from soupkit.demo.chat_world import TRAIN, prompt_rows, write_jsonl
        from soupkit.realmodel import smollm2

        prompts = write_jsonl(work / "prompts.jsonl", prompt_rows(TRAIN))
        return ["--ref", str(smollm2()), "--prompts", str(prompts), "--reward", "soupkit.demo.chat_world:gold_reward",
                "--batch-size", "8", "--max-new-tokens", "24", "--learning-rate", "5e-6"]
    demo = demo or work / "demo"
    if not (demo / "sft-a").is_dir():
        subprocess.run([sys.executable, "-m", "soupkit", "demo", "--small", "--out", str(demo)], check=True,
                       capture_output=True)
    return ["--ref", str(demo / "sft-a"), "--prompts", str(demo / "data" / "prompts.jsonl"),
            "--reward", "soupkit.demo.world:gold_reward", "--batch-size", "16", "--max-new-tokens", "24",
            "--temperature", "1.0", "--learning-rate", "3e-4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=("toy", "smollm2"), default="toy")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--demo", type=Path, default=None, help="a soupkit demo output (toy world)")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = (args.work or ROOT / "benchmarks" / ".work" / f"bf16-learning-{args.world}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    flags = task(args.world, work, args.demo)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    env.pop("SOUPKIT_NATIVE_BF16", None)
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    for seed in args.seeds:
        for mode, mode_flags in MODES.items():
            out = work / f"{mode}-seed{seed}"
            cmd = [sys.executable, "-m", "soupkit", "align", *flags, "--out", str(out), "--force",
                   "--steps", str(args.steps), "--kl-coef", "0.05", "--seed", str(seed), "--save-every", "0", *mode_flags]
            start = time.perf_counter()
            subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
            g, rewards = gain(out / "metrics.jsonl")
            results[mode].append(g)
            print(f"{mode} seed {seed}: gain {g:+.3f} (first 5 steps {statistics.fmean(rewards[:5]):.3f}, "
                  f"last 5 {statistics.fmean(rewards[-5:]):.3f}), {time.perf_counter() - start:.0f} s", flush=True)
    fp32, defaults = results["fp32"], results["defaults"]
    print(f"\nfp32 gains {', '.join(f'{g:+.3f}' for g in fp32)}, mean {statistics.fmean(fp32):+.3f}, "
          f"spread [{min(fp32):+.3f}, {max(fp32):+.3f}]")
    print(f"defaults gains {', '.join(f'{g:+.3f}' for g in defaults)}, mean {statistics.fmean(defaults):+.3f}")
    inside = min(fp32) <= statistics.fmean(defaults) <= max(fp32)
    print(f"defaults' mean gain {'within' if inside else 'OUTSIDE'} the spread of the fp32 seeds")


if __name__ == "__main__":
    main()
