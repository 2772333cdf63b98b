"""Whole-process wall time of a tiny PPO job: ``soupkit align`` vs TRL 1.12's PPOTrainer.

The same job for both: a random Llama policy (hidden 128, 4 layers, vocabulary 512) that is also
the frozen reference, a same-architecture ``LlamaForSequenceClassification`` reward model (which
also initialises the critic, as TRL's example script does), 8 batches of 32 prompts, 24 new tokens
(temperature 0.7, truncated at EOS), 1 PPO epoch, 1 minibatch, fixed kl_coef 0.05 (k1), no
intermediate checkpoints, the final policy saved. Each run is a whole process, imports included;
runs alternate. TRL 1.12 (the last release with PPO) is installed into its own folder, first on
PYTHONPATH for the TRL runs only:

    pip install --no-deps --target benchmarks/.work/trl112 trl==1.12.0

Both tools get the same torch thread count (``--threads``, default 1): on a shared 2-vCPU box,
two OpenMP threads that wait for each other under load made both tools several times slower.

A third process, run alternately with the two, is the floor of any tool built on transformers: it
only imports torch and the transformers Llama classes both tools load the models with, and exits. Its
ratio to TRL is the smallest ratio such a tool could reach on this job.

Run:  python benchmarks/ppo_speed.py [--runs 3] [--threads 1] [--work benchmarks/.work/ppo]
Goal: soupkit at most 0.33x TRL 1.12's time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL112 = ROOT / "benchmarks" / ".work" / "trl112"
BATCHES, BATCH, NEW_TOKENS = 8, 32, 24
LOAD_BEFORE: tuple[float, ...] = ()

TRL_SCRIPT = '''
import sys
from pathlib import Path
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
import trl
from trl.experimental.ppo import PPOConfig, PPOTrainer

assert trl.__version__ == "1.12.0", trl.__version__
work, out = Path(sys.argv[1]), sys.argv[2]
tok = AutoTokenizer.from_pretrained(work / "policy")
prompts = (work / "prompts.txt").read_text().splitlines()
data = Dataset.from_dict({"prompt": prompts}).map(
    lambda row: {"input_ids": tok(row["prompt"], add_special_tokens=False)["input_ids"]},
    remove_columns=["prompt"])
args = PPOConfig(
    output_dir=out, per_device_train_batch_size=%(batch)d, gradient_accumulation_steps=1,
    num_mini_batches=1, num_ppo_epochs=1, total_episodes=%(episodes)d, response_length=%(tokens)d,
    stop_token="eos", temperature=0.7, kl_coef=0.05, learning_rate=3e-6, seed=0,
    local_rollout_forward_batch_size=%(batch)d, num_sample_generations=0, save_strategy="no",
    report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, logging_steps=1,
    dataloader_num_workers=0,
)
policy = AutoModelForCausalLM.from_pretrained(work / "policy")
ref = AutoModelForCausalLM.from_pretrained(work / "policy")
reward = AutoModelForSequenceClassification.from_pretrained(work / "rm", num_labels=1)
value = AutoModelForSequenceClassification.from_pretrained(work / "rm", num_labels=1)
trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                     train_dataset=data, value_model=value)
trainer.train()
trainer.save_model(out + "/final")
'''


def build(work: Path) -> None:
    """Policy, reward model, tokenizer (512 ids) and 256 prompts of 8 words, from fixed seeds."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from soupkit.demo.tokenizer import build_tokenizer

    if (work / "rm" / "model.safetensors").exists():
        return
    words = [f"w{i}" for i in range(508)]
    tok = build_tokenizer(words)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(work / "policy")
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(work / "rm")
    for path in (work / "policy", work / "rm"):
        tok.save_pretrained(path)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(BATCHES * BATCH)]
    (work / "prompts.txt").write_text("\n".join(lines) + "\n")


def soupkit_cmd(work: Path) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "soupkit", "align", "--ref", str(work / "policy"), "--reward", str(work / "rm"),
           "--prompts", str(work / "prompts.txt"), "--out", str(work / "out-soupkit"), "--force",
           "--steps", str(BATCHES), "--batch-size", str(BATCH), "--max-new-tokens", str(NEW_TOKENS),
           "--ppo-epochs", "1", "--minibatches", "1", "--kl-coef", "0.05", "--save-every", "0",
           "--set", "temperature=0.7", "--set", "learning_rate=3e-6"]
    return cmd, dict(os.environ)


def trl_cmd(work: Path) -> tuple[list[str], dict[str, str]]:
    script = work / "trl_ppo.py"
    script.write_text(TRL_SCRIPT % {"batch": BATCH, "episodes": BATCHES * BATCH, "tokens": NEW_TOKENS})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TRL112), os.environ.get("PYTHONPATH", "")])}
    return [sys.executable, str(script), str(work), str(work / "out-trl")], env


# The Llama classes themselves: ``from transformers import AutoModelForCausalLM`` is lazy (2.2 s
# here) and defers transformers' modelling code to the first ``from_pretrained``.
FLOOR_SCRIPT = "import torch\nfrom transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification\n"


def floor_cmd() -> tuple[list[str], dict[str, str]]:
    """The imports every transformers-based PPO tool pays before its first Llama loads."""
    return [sys.executable, "-c", FLOOR_SCRIPT], dict(os.environ)


def loop_seconds(work: Path) -> float:
    """soupkit's own PPO loop: the per-step ``seconds`` of its last run, summed."""
    import json

    rows = (work / "out-soupkit" / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(row)["seconds"] for row in rows)


def timed(cmd: list[str], env: dict[str, str], threads: int | None) -> float:
    if threads:
        env = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{cmd[:4]} failed:\n{result.stderr[-3000:]}")
    return elapsed


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    import torch
    import transformers

    return (f"{os.cpu_count()} vCPU ({model}), Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "ppo")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both tools (0 = torch's default)")
    args = parser.parse_args()
    if not (TRL112 / "trl" / "experimental" / "ppo").is_dir():
        sys.exit(f"TRL 1.12 not found in {TRL112}; run: pip install --no-deps --target {TRL112} trl==1.12.0")
    global LOAD_BEFORE
    LOAD_BEFORE = os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    build(args.work)
    times: dict[str, list[float]] = {"soupkit": [], "trl 1.12": [], "floor": []}
    runners = {"soupkit": soupkit_cmd(args.work), "trl 1.12": trl_cmd(args.work), "floor": floor_cmd()}
    loops: list[float] = []
    for i in range(args.runs):
        names = list(runners)
        for name in names[i % 3:] + names[:i % 3]:  # rotate the order run by run
            times[name].append(timed(*runners[name], args.threads))
            print(f"run {i + 1} {name}: {times[name][-1]:.2f} s", flush=True)
            if name == "soupkit":
                loops.append(loop_seconds(args.work))
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"\n{machine()}; threads per process: {args.threads or 'torch default'}; "
          f"load average before: {LOAD_BEFORE}, after: {os.getloadavg()}")
    for name, values in times.items():
        print(f"{name:9s} median {med[name]:.2f} s  ({min(values):.2f}-{max(values):.2f}, {len(values)} runs)")
    print(f"soupkit's PPO loop (per-step seconds summed): median {statistics.median(loops):.2f} s "
          f"for {BATCHES} batches")
    print(f"ratio soupkit / trl 1.12: {med['soupkit'] / med['trl 1.12']:.3f}x  (goal <= 0.33x)")
    print(f"ratio floor (imports only) / trl 1.12: {med['floor'] / med['trl 1.12']:.3f}x")


if __name__ == "__main__":
    main()
