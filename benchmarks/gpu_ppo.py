"""A few PPO steps of a random-initialised ~1.1B-parameter Llama per memory mode: tokens/s and
peak accelerator memory. Prepared for a GPU session; ``--tiny`` runs the same code on a CPU with
a tiny model (peak memory is then reported as n/a) so the script is tested without a GPU.

The model: hidden 2048, 22 layers, MLP 5632, 32 heads (4 KV heads), vocabulary 32000, untied
(TinyLlama-1.1B's shape), random weights saved once in bf16. Each mode: policy start = reference,
critic from the policy, rule-based reward, 3 PPO steps of 8 prompts x 64 new tokens, 1 epoch.
Modes run one after another in this process; ``torch.cuda.reset_peak_memory_stats`` separates them.

Run:  python benchmarks/gpu_ppo.py [--work benchmarks/.work/gpu-ppo] [--steps 3]   (on a GPU)
      python benchmarks/gpu_ppo.py --tiny --work /tmp/gpu-ppo-tiny                  (CPU check)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "plain": {},
    "bf16": {"bf16": True},
    "bf16 + offload_frozen": {"bf16": True, "offload_frozen": True},
    "bf16 + gradient_checkpointing": {"bf16": True, "gradient_checkpointing": True},
    "lora_rank 16 + bf16": {"lora_rank": 16, "bf16": True},
}
REWARD = "def length(prompts, completions, completion_ids, **kw):\n    return [len(c) / 64 for c in completion_ids]\n"


def build_model(path: Path, tiny: bool) -> Path:
    """Random Llama at ``path`` (bf16 safetensors) with a small word tokenizer, built once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from soupkit.demo.tokenizer import build_tokenizer

    if (path / "config.json").exists():
        return path
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2) \
        if tiny else dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                          num_key_value_heads=4)
    config = LlamaConfig(vocab_size=256 if tiny else 32000, tie_word_embeddings=False, **size)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    build_tokenizer("the a cat dog sat ran on in mat log red blue big small".split()).save_pretrained(path)
    return path


def run_mode(name: str, keys: dict, model: Path, work: Path, steps: int, tiny: bool) -> dict:
    import torch

    from soupkit.rlhf import build_spec, train

    flags = {"ref": [str(model)], "prompts": str(work / "prompts.txt"), "reward": f"{work / 'reward.py'}:length",
             "steps": steps, "batch_size": 8, "max_new_tokens": 8 if tiny else 64, "ppo_epochs": 1, "save_every": 0}
    spec = build_spec(None, flags, ["temperature=1.0"] + [f"{k}={v}" for k, v in keys.items()])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = work / "out" / name.replace(" ", "")
    train(spec, out=out, force=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gc.collect()
    return {"mode": name, "tokens_per_s": sum(r["tokens_per_s"] for r in rows[1:] or rows) / len(rows[1:] or rows),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "gpu-ppo")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny model, CPU is fine: checks the script runs")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "prompts.txt").write_text("\n".join(["the cat sat on", "the dog ran in", "a big red cat",
                                                      "the small blue dog"] * 4) + "\n")
    (args.work / "reward.py").write_text(REWARD)
    model = build_model(args.work / ("tiny-llama" if args.tiny else "llama-1.1b"), args.tiny)
    results = [run_mode(name, keys, model, args.work, args.steps, args.tiny) for name, keys in MODES.items()]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)"
    print(f"device: {device}\n\n| mode | tokens/s (steps 2..) | peak allocated |\n|---|---|---|")
    for r in results:
        peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "n/a"
        print(f"| {r['mode']} | {r['tokens_per_s']:.0f} | {peak} |")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
