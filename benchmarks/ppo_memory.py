"""Peak memory of each PPO memory mode on a ~134M-parameter model, as ratios to the plain mode.

Each mode is one whole ``python -m soupkit align`` process (imports included) on the same job: a
random Llama (hidden 768, 12 layers, vocabulary 32000, untied: 134M parameters; ``common.py``)
that is both the policy's start and the reference, the critic built from it, a rule-based reward,
1 PPO step of 4 prompts x 16 new tokens, 1 epoch. Peak memory is the largest ``RssAnon`` sampled
every 5 ms from ``/proc/PID/status`` (the whole process). On a CPU ``--offload-frozen`` is a no-op,
so its ratio shows only noise.

Run:  python benchmarks/ppo_memory.py [--work benchmarks/.work/ppo-memory] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_llama_pair, run_sampled  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "plain (fp32, full fine-tuning)": [],
    "--bf16": ["--bf16"],
    "--gradient-checkpointing": ["--gradient-checkpointing"],
    "--offload-frozen (CPU: no-op)": ["--offload-frozen"],
    "--lora-rank 16": ["--lora-rank", "16"],
    "--lora-rank 16 --bf16": ["--lora-rank", "16", "--bf16"],
    "--lora-rank 16 --bf16 --gradient-checkpointing": ["--lora-rank", "16", "--bf16", "--gradient-checkpointing"],
}
REWARD = "def length(prompts, completions, completion_ids, **kw):\n    return [len(c) / 16 for c in completion_ids]\n"


def prepare(work: Path) -> Path:
    from soupkit.demo.tokenizer import build_tokenizer

    model = build_llama_pair(work)[0]
    if not (model / "tokenizer.json").exists():
        build_tokenizer("the a cat dog sat ran on in mat log red blue big small".split()).save_pretrained(model)
    (work / "prompts.txt").write_text("the cat sat on\nthe dog ran in\na big red cat\nthe small blue dog\n")
    (work / "reward.py").write_text(REWARD)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "ppo-memory")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = prepare(args.work)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "soupkit", "align", "--ref", str(model), "--prompts", str(args.work / "prompts.txt"),
            "--reward", f"{args.work / 'reward.py'}:length", "--steps", "1", "--batch-size", "4",
            "--max-new-tokens", "16", "--ppo-epochs", "1", "--save-every", "0", "--force", "--set", "temperature=1.0"]
    rows = []
    for name, flags in MODES.items():
        wall, peak, _ = run_sampled([*base, "--out", str(args.work / "out"), *flags], cwd=ROOT)
        rows.append((name, wall, peak))
        print(f"{name}: {peak / 2**20:.0f} MiB, {wall:.1f} s", flush=True)
    plain = rows[0][2]
    print("\n| mode | peak RssAnon | ratio to plain | wall |\n|---|---|---|---|")
    for name, wall, peak in rows:
        print(f"| {name} | {peak / 2**20:.0f} MiB | {peak / plain:.2f}x | {wall:.1f} s |")


if __name__ == "__main__":
    main()
