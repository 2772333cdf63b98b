"""Peak memory of each PPO memory mode on a ~134M-parameter model, as ratios to the plain mode.

Each mode is one whole ``python -m soupkit align`` process (imports included) on the same job: a
random Llama (hidden 768, 12 layers, vocabulary 32000, untied: 134M parameters; ``common.py``)
that is both the policy's start and the reference, the critic built from it, a rule-based reward,
1 PPO step of 4 prompts x 16 new tokens, 1 epoch. The SALSA-with-LoRA modes start the policy at that
model and take as reference the soup of two random rank-8 adapters on it (issue #19): either the
full soup (a second model) or the adapter soup (a second adapter on the policy's base). Peak memory is the largest ``RssAnon`` sampled
every 5 ms from ``/proc/PID/status`` (the whole process). On a CPU ``--offload-frozen`` is a no-op,
so its ratio shows only noise.

Run:  python benchmarks/ppo_memory.py [--work benchmarks/.work/ppo-memory] [--threads 2] [--only TEXT ...]
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
    "SALSA --lora-rank 16, --ref the full soup": ["--lora-rank", "16", "--ref", "{full}"],
    "SALSA --lora-rank 16, --ref the adapter soup": ["--lora-rank", "16", "--ref", "{low}"],
    "SALSA --lora-rank 16 --bf16, --ref the full soup": ["--lora-rank", "16", "--bf16", "--ref", "{full}"],
    "SALSA --lora-rank 16 --bf16, --ref the adapter soup": ["--lora-rank", "16", "--bf16", "--ref", "{low}"],
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


def adapter_soups(work: Path, model: Path) -> dict[str, str]:
    """Two random rank-8 adapters on ``model`` (every linear layer), souped both ways."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from soupkit import run_merge

    names = []
    for seed in (0, 1):
        path = work / f"adapter-{seed}"
        names.append(str(path))
        if not (path / "adapter_model.safetensors").exists():
            torch.manual_seed(seed)
            config = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
            lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model), config)
            lora.save_pretrained(path)
    soups = {}
    for key, fmt in (("full", "model"), ("low", "adapter")):
        out = work / f"soup-{fmt}"
        if not out.exists():
            run_merge({"merge": {"models": names, "output_format": fmt, "output": str(out)}})
        soups[key] = str(out)
    return soups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "ppo-memory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=[], help="run only the modes whose name contains one of these")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = prepare(args.work)
    soups = adapter_soups(args.work, model)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "soupkit", "align", "--init", str(model), "--prompts", str(args.work / "prompts.txt"),
            "--reward", f"{args.work / 'reward.py'}:length", "--steps", "1", "--batch-size", "4",
            "--max-new-tokens", "16", "--ppo-epochs", "1", "--save-every", "0", "--force", "--set", "temperature=1.0"]
    rows = []
    for name, flags in MODES.items():
        if args.only and not any(text in name for text in args.only):
            continue
        flags = [f.format(**soups) for f in flags] if "--ref" in flags else ["--ref", str(model), *flags]
        wall, peak, _ = run_sampled([*base, "--out", str(args.work / "out"), *flags], cwd=ROOT)
        rows.append((name, wall, peak))
        print(f"{name}: {peak / 2**20:.0f} MiB, {wall:.1f} s", flush=True)
    plain = rows[0][2]
    print("\n| mode | peak RssAnon | ratio to plain | wall |\n|---|---|---|---|")
    for name, wall, peak in rows:
        print(f"| {name} | {peak / 2**20:.0f} MiB | {peak / plain:.2f}x | {wall:.1f} s |")


if __name__ == "__main__":
    main()
