"""Where a PPO step's time goes: seconds per stage, and what fraction of this CPU's (or GPU's)
measured matrix-product rate each stage achieves.

Runs ``soupkit align`` once on a job of ``ppo_speed.py`` (``--model smollm2`` by default), reads the
per-stage seconds it logs (``time_*`` in ``metrics.jsonl``), and counts each stage's matrix-product
FLOPs from the model's shapes and the step's token counts: a forward pass over n tokens costs
2 x n x (body weights) plus 2 x m x (LM head weights) for the m positions whose logits are kept;
a backward pass twice a forward. (Embedding lookups are not products; attention scores are left out:
at these lengths they are a few percent.) The peak is measured in the same run: ``F.linear`` on
the shapes of a forward pass (tokens x hidden by hidden x intermediate), fp32 and bf16.

Run:  python benchmarks/ppo_profile.py [--model smollm2] [--threads 2] [--soupkit-flags "--no-bf16"]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ppo_speed import JOBS, ROOT, build, machine, soupkit_cmd  # noqa: E402


def shapes(model_dir: Path) -> dict[str, int]:
    """Weights that take part in matrix products: the body (all but embeddings) and the LM head."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    body = total - embed - (0 if config.tie_word_embeddings else head)
    return {"body": body, "head": head, "hidden": config.hidden_size, "intermediate": config.intermediate_size}


def prompt_tokens(work: Path, job_name: str, batch: int, steps: int) -> float:
    """Mean padded prompt length per batch, as soupkit renders the prompts (the model's chat template)."""
    from transformers import AutoTokenizer

    from soupkit.rlhf.prompts import batch_indices

    tok = AutoTokenizer.from_pretrained(work / "policy")
    if job_name == "smollm2":
        prompts = [json.loads(line)["prompt"] for line in (work / "prompts.jsonl").read_text().splitlines()]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts]
    else:
        texts = (work / "prompts.txt").read_text().splitlines()
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    padded = [max(lengths[i] for i in batch_indices(len(texts), batch, step, 0)) for step in range(steps)]
    return sum(padded) / len(padded)


def stage_flops(size: dict[str, int], b: int, p: float, t: float) -> dict[str, float]:
    """Matrix-product FLOPs of one step's stages, for b rows, p prompt and t response tokens."""
    seq = b * (p + t)
    body_fwd = 2 * size["body"] * seq
    head_fwd = 2 * size["head"] * b * (t + 1)
    policy_fwd = body_fwd + head_fwd
    return {
        "generate": 2 * size["body"] * b * (p + t) + 2 * size["head"] * b * t,  # prefill + one token at a time
        "logprobs": policy_fwd,
        "reference": policy_fwd,
        "values": body_fwd,
        "reward": body_fwd,
        "optimise": 3 * (policy_fwd + body_fwd),  # policy and critic, forward + backward
    }


def peak_rates(size: dict[str, int], tokens: int, threads: int) -> dict[str, float]:
    """Measured FLOP/s of ``F.linear`` (tokens x hidden by hidden x intermediate), fp32 and bf16."""
    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)
    x = torch.randn(tokens, size["hidden"])
    w = torch.randn(size["intermediate"], size["hidden"])
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        xs, ws = x.to(dtype), w.to(dtype)
        F.linear(xs, ws)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < 2.0:
            F.linear(xs, ws)
            reps += 1
        rates[name] = 2 * tokens * size["hidden"] * size["intermediate"] * reps / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(JOBS), default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--soupkit-flags", default="")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    job = JOBS[args.model]
    work = (args.work or ROOT / "benchmarks" / ".work" / f"ppo-{job.name}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    build(job, work)
    cmd, env = soupkit_cmd(job, work, args.soupkit_flags.split())
    if args.threads:
        env = {**env, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    subprocess.run(cmd, env={**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}, cwd=ROOT, check=True,
                   capture_output=True)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (work / "out-soupkit" / "metrics.jsonl").read_text().splitlines()]
    size = shapes(work / "policy")
    p = prompt_tokens(work, job.name, job.batch, job.batches)
    t = sum(r["response_length"] for r in rows) / len(rows)
    bf16 = _final_bf16(work)
    flops = stage_flops(size, job.batch, p, t)
    rates = peak_rates(size, int(job.batch * (p + t)), args.threads)
    seconds = {k[5:]: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k.startswith("time_")}
    step = sum(r["seconds"] for r in rows) / len(rows)
    peak = rates["bf16" if bf16 else "fp32"]
    print(f"{machine()}; threads {args.threads}; job {job.name}: {job.batch} prompts x {job.batches} steps, "
          f"mean padded prompt {p:.0f} tokens, mean response {t:.1f} tokens; bf16 {bf16}; "
          f"soupkit flags: {args.soupkit_flags or '(defaults)'}")
    print(f"whole process {wall:.1f} s; mean step {step:.2f} s; stages add up to "
          f"{sum(v for k, v in seconds.items() if k != 'other'):.2f} s + other {seconds['other']:.2f} s")
    print(f"measured peak: fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s "
          f"(F.linear {int(job.batch * (p + t))} x {size['hidden']} by {size['hidden']} x {size['intermediate']})")
    print(f"\n| stage | s/step | share | GFLOP | GFLOP/s | of peak ({'bf16' if bf16 else 'fp32'}) |\n|---|---|---|---|---|---|")
    for name, secs in sorted(seconds.items(), key=lambda kv: -kv[1]):
        f = flops.get(name)
        rate = f / secs if f and secs > 0 else None
        print(f"| {name} | {secs:.2f} | {secs / step:.0%} | {f / 1e9 if f else 0:.1f} | "
              f"{rate / 1e9 if rate else 0:.0f} | {f'{rate / peak:.0%}' if rate else '-'} |")
    total = sum(flops.values())
    print(f"| step | {step:.2f} | 100% | {total / 1e9:.1f} | {total / step / 1e9:.0f} | {total / step / peak:.0%} |")


def _final_bf16(work: Path) -> bool:
    """Whether the run used bf16: the resolved ``bf16`` in the final policy's provenance."""
    import yaml

    recipe = yaml.safe_load((work / "out-soupkit" / "final" / "soupkit_recipe.yaml").read_text())
    return bool(recipe["align"]["bf16"])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
