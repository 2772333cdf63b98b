"""Whole-process wall time and peak memory of a PPO job: ``soupkit align`` vs TRL 1.12's PPOTrainer.

Two jobs (``--model``):

- ``smollm2`` (the real one): SmolLM2-135M-Instruct (``soupkit.realmodel``) as policy and frozen
  reference, a ``LlamaForSequenceClassification`` from the same base (score head drawn from seed 0)
  as reward model and critic start, 4 batches of 8 chat-templated prompts (the model's own template
  for both tools), up to 48 new tokens at temperature 0.7 ending at ``<|im_end|>``, 1 PPO epoch,
  1 minibatch, fixed kl_coef 0.05 (k1), fp32 weights, no intermediate checkpoints, final policy
  saved. soupkit runs with its defaults (on a CPU with native bf16 that means bf16 frozen models,
  see ``--frozen-dtype``); ``--soupkit-flags`` adds flags to its command, e.g. ``--frozen-dtype float32``.
- ``tiny``: a random Llama policy (hidden 128, 4 layers, vocabulary 512) that is also the frozen
  reference, a same-architecture reward model that also initialises the critic, 8 batches of 32
  prompts, 24 new tokens; here the imports are a third of the run, so a third process, the floor
  (import torch and the transformers Llama classes, exit), is timed too.

Each run is a whole process, imports included; the tools alternate, in rotated order. TRL 1.12 (the
last release with PPO) is installed into its own folder, first on PYTHONPATH for its runs only:

    pip install --no-deps --target benchmarks/.work/trl112 trl==1.12.0

Both tools get the same torch thread count (``--threads``). Peak memory is the largest ``RssAnon``
sampled every 5 ms. For soupkit the per-stage seconds of its last run (``time_*`` in
``metrics.jsonl``) are printed as well.

Run:  python benchmarks/ppo_speed.py --model smollm2 [--runs 3] [--threads 2]
Goal (smollm2): soupkit at most 0.5x TRL 1.12's whole-process time, peak memory not above TRL's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import run_sampled_peaks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRL112 = ROOT / "benchmarks" / ".work" / "trl112"

TRL_SCRIPT = """
import sys
from pathlib import Path
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
import trl
from trl.experimental.ppo import PPOConfig, PPOTrainer

assert trl.__version__ == "1.12.0", trl.__version__
work, out, chat = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "chat"
tok = AutoTokenizer.from_pretrained(work / "policy")
prompts = (work / "prompts.txt").read_text().splitlines()
def encode(row):
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
        return {"input_ids": tok(text, add_special_tokens=False)["input_ids"]}
    return {"input_ids": tok(row["prompt"], add_special_tokens=False)["input_ids"]}
data = Dataset.from_dict({"prompt": prompts}).map(encode, remove_columns=["prompt"])
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
"""

# Everyday instructions of the kind a chat model is aligned on (written for this benchmark).
CHAT_PROMPTS = (
    "Why is the sky blue?", "Give me three tips for sleeping better.", "What is a prime number?",
    "Explain photosynthesis to a child.", "How do I boil an egg?", "Write a haiku about autumn.",
    "What causes the seasons on Earth?", "Suggest a name for a grey cat.", "How does a rainbow form?",
    "What is the difference between weather and climate?", "List three healthy breakfast ideas.",
    "Why do we have leap years?", "How can I learn to play the guitar?", "What does a compiler do?",
    "Describe the water cycle.", "What is the capital of Australia?", "How do vaccines work?",
    "Give me a short motivational quote.", "What is gravity?", "How do I make a cup of tea?",
    "Why do leaves change colour in autumn?", "What is machine learning?", "Name three planets.",
    "How should I prepare for a job interview?", "What is the tallest mountain in the world?",
    "Explain what a noun is.", "How do bees make honey?", "What is the speed of light?",
    "Suggest a weekend activity for a rainy day.", "How does a refrigerator keep food cold?",
    "What is the boiling point of water?", "Tell me a fun fact about octopuses.",
)


@dataclass
class Job:
    name: str
    batches: int
    batch: int
    new_tokens: int
    chat: bool

    @property
    def episodes(self) -> int:
        return self.batches * self.batch


JOBS = {"tiny": Job("tiny", 8, 32, 24, chat=False), "smollm2": Job("smollm2", 4, 8, 48, chat=True)}


def build(job: Job, work: Path) -> None:
    """Policy, reward model, tokenizer and prompts of the job, from fixed seeds, built once."""
    if (work / "rm" / "model.safetensors").exists():
        return
    (build_smollm2 if job.name == "smollm2" else build_tiny)(job, work)


def build_tiny(job: Job, work: Path) -> None:
    """A random Llama (512 ids) and 256 prompts of 8 words."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from soupkit.demo.tokenizer import build_tokenizer

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
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(job.episodes)]
    (work / "prompts.txt").write_text("\n".join(lines) + "\n")


def build_smollm2(job: Job, work: Path) -> None:
    """SmolLM2 (from its PyPI wheel, cached per machine) and a reward model on the same base."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from soupkit.realmodel import smollm2

    base = smollm2()
    if not (work / "policy").exists():
        shutil.copytree(base, work / "policy")
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm.config.pad_token_id = rm.config.eos_token_id
    rm.save_pretrained(work / "rm")
    AutoTokenizer.from_pretrained(base).save_pretrained(work / "rm")
    prompts = CHAT_PROMPTS[:job.episodes]
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def soupkit_cmd(job: Job, work: Path, flags: list[str]) -> tuple[list[str], dict[str, str]]:
    prompts = work / ("prompts.jsonl" if job.chat else "prompts.txt")
    cmd = [sys.executable, "-m", "soupkit", "align", "--ref", str(work / "policy"), "--reward", str(work / "rm"),
           "--prompts", str(prompts), "--out", str(work / "out-soupkit"), "--force",
           "--steps", str(job.batches), "--batch-size", str(job.batch), "--max-new-tokens", str(job.new_tokens),
           "--ppo-epochs", "1", "--minibatches", "1", "--kl-coef", "0.05", "--save-every", "0",
           "--set", "temperature=0.7", "--set", "learning_rate=3e-6", *flags]
    return cmd, dict(os.environ)


def trl_cmd(job: Job, work: Path) -> tuple[list[str], dict[str, str]]:
    script = work / "trl_ppo.py"
    script.write_text(TRL_SCRIPT % {"batch": job.batch, "episodes": job.episodes, "tokens": job.new_tokens})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TRL112), os.environ.get("PYTHONPATH", "")])}
    return [sys.executable, str(script), str(work), str(work / "out-trl"), "chat" if job.chat else "plain"], env


# The Llama classes themselves: ``from transformers import AutoModelForCausalLM`` is lazy (2.2 s
# here) and defers transformers' modelling code to the first ``from_pretrained``.
FLOOR_SCRIPT = "import torch\nfrom transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification\n"


def floor_cmd() -> tuple[list[str], dict[str, str]]:
    """The imports every transformers-based PPO tool pays before its first Llama loads."""
    return [sys.executable, "-c", FLOOR_SCRIPT], dict(os.environ)


def stage_seconds(work: Path) -> dict[str, float]:
    """soupkit's own PPO loop, from its last run's ``metrics.jsonl``: ``seconds`` and every
    ``time_*`` summed over the steps."""
    rows = [json.loads(row) for row in (work / "out-soupkit" / "metrics.jsonl").read_text().splitlines()]
    keys = [k for k in rows[0] if k == "seconds" or k.startswith("time_")]
    return {k: sum(r[k] for r in rows) for k in keys}


def timed(cmd: list[str], env: dict[str, str], threads: int | None) -> tuple[float, dict[str, int]]:
    """Wall seconds and peak ``RssAnon`` and ``VmRSS`` (bytes) of one whole process."""
    if threads:
        env = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}
    wall, peaks, _ = run_sampled_peaks(cmd, cwd=ROOT, env=env)
    return wall, peaks


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    import torch
    import transformers

    return (f"{os.cpu_count()} vCPU ({model}), Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(JOBS), default="smollm2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="default: benchmarks/.work/ppo-MODEL")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch intra-op threads for both tools (0 = torch's default)")
    parser.add_argument("--soupkit-flags", default="", help="extra flags for soupkit align, one string")
    parser.add_argument("--no-trl", action="store_true", help="time soupkit only (profiling)")
    args = parser.parse_args()
    job = JOBS[args.model]
    work = (args.work or ROOT / "benchmarks" / ".work" / f"ppo-{job.name}").resolve()
    if not args.no_trl and not (TRL112 / "trl" / "experimental" / "ppo").is_dir():
        sys.exit(f"TRL 1.12 not found in {TRL112}; run: pip install --no-deps --target {TRL112} trl==1.12.0")
    load_before = os.getloadavg()
    work.mkdir(parents=True, exist_ok=True)
    build(job, work)
    runners = {"soupkit": soupkit_cmd(job, work, args.soupkit_flags.split())}
    if not args.no_trl:
        runners["trl 1.12"] = trl_cmd(job, work)
    if job.name == "tiny":
        runners["floor"] = floor_cmd()
    times: dict[str, list[float]] = {name: [] for name in runners}
    peaks: dict[str, list[dict[str, int]]] = {name: [] for name in runners}
    stages: list[dict[str, float]] = []
    for i in range(args.runs):
        names = list(runners)
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate the order run by run
            wall, peak = timed(*runners[name], args.threads)
            times[name].append(wall)
            peaks[name].append(peak)
            print(f"run {i + 1} {name}: {wall:.2f} s, peak RssAnon {peak['RssAnon'] / 2**20:.0f} MiB, "
                  f"VmRSS {peak['VmRSS'] / 2**20:.0f} MiB", flush=True)
            if name == "soupkit":
                stages.append(stage_seconds(work))
    report(job, args, times, peaks, stages, load_before)


def report(job: Job, args: argparse.Namespace, times: dict[str, list[float]], peaks: dict[str, list[dict[str, int]]],
           stages: list[dict[str, float]], load_before: tuple[float, ...]) -> None:
    med = {name: statistics.median(v) for name, v in times.items()}
    top = {name: {key: max(p[key] for p in runs) for key in ("RssAnon", "VmRSS")} for name, runs in peaks.items()}
    print(f"\njob {job.name}: {job.batches} batches x {job.batch} prompts, {job.new_tokens} new tokens; "
          f"soupkit flags: {args.soupkit_flags or '(defaults)'}")
    print(f"{machine()}; threads per process: {args.threads or 'torch default'}; "
          f"load average before: {load_before}, after: {os.getloadavg()}")
    for name, values in times.items():
        print(f"{name:9s} median {med[name]:.2f} s  ({min(values):.2f}-{max(values):.2f}, {len(values)} runs), "
              f"peak RssAnon max {top[name]['RssAnon'] / 2**20:.0f} MiB, VmRSS max {top[name]['VmRSS'] / 2**20:.0f} MiB")
    loop = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    print(f"soupkit's PPO loop, median over runs, summed over {job.batches} steps: {loop['seconds']:.2f} s")
    for key, value in sorted(loop.items(), key=lambda kv: -kv[1]):
        if key != "seconds":
            print(f"  {key[5:]:11s} {value:7.2f} s  {100 * value / loop['seconds']:5.1f}%")
    if "trl 1.12" in med:
        mine, theirs = top["soupkit"], top["trl 1.12"]
        print(f"ratio soupkit / trl 1.12: {med['soupkit'] / med['trl 1.12']:.3f}x; peak memory ratio "
              f"RssAnon {mine['RssAnon'] / theirs['RssAnon']:.2f}x, VmRSS {mine['VmRSS'] / theirs['VmRSS']:.2f}x")
    if "floor" in med and "trl 1.12" in med:
        print(f"ratio floor (imports only) / trl 1.12: {med['floor'] / med['trl 1.12']:.3f}x")


if __name__ == "__main__":
    main()
