"""Rollout speed of the two engines (``rollout_engine: hf | vllm``) on the same prompts: generated
tokens per second of soupkit's own sampler and of vLLM, with vLLM's per-rollout weight push timed
apart (a PPO run pays it once per step).

Both engines sample the same prompts with the same settings (temperature 1, top_p 1, the model's
end-of-turn ids, per-row seeds) as a PPO run does: the policy in fp32 (the trainer's master weights),
the hf engine under bf16 autocast with ``--dtype bfloat16``, vLLM in that dtype. Each engine gets one
warm-up call (vLLM's includes its start), then ``--repeats`` timed calls; the table reports the
median. For vLLM's samples the trainer's log-probs are recomputed (as in a PPO step) and the gap
|vLLM - trainer| reported: ``logprob_gap_mean`` / ``_max`` over the response tokens.

Run in the vLLM environment (``scripts/test-vllm --venv-only`` builds it):
  CPU:  python benchmarks/rollout_speed.py                       SmolLM2-135M-Instruct, 32 prompts x 48 tokens
  GPU:  python benchmarks/rollout_speed.py --size 1b --prompts 64 --tokens 256 --memory-fraction 0.5
        (a random TinyLlama-1.1B-shaped model, bf16; the goal there is vllm >= 3x hf)
  Test: python benchmarks/rollout_speed.py --size tiny --prompts 4 --tokens 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "How do bees make honey?",
             "Why is the sky blue?", "Give me a synonym for happy.", "What does a thermometer measure?",
             "Explain what a noun is.", "Suggest a name for a pet cat."]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=["smollm2", "1b", "tiny"], default="smollm2")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory-fraction", type=float, default=0.2, help="vLLM gpu_memory_utilization (CPU: RAM share)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--eager", action="store_true", help="vLLM without torch.compile / CUDA graphs")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "rollout-speed")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def build_model(size: str, work: Path) -> Path:
    """SmolLM2 (the cached real model), or a random Llama of TinyLlama-1.1B's shape / a tiny one."""
    if size == "smollm2":
        from soupkit.realmodel import smollm2

        return smollm2()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from soupkit.demo.tokenizer import build_tokenizer

    path = work / f"llama-{size}"
    if (path / "config.json").exists():
        return path
    shape = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000) if size == "1b" else \
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=256)
    tok = build_tokenizer(" ".join(QUESTIONS).replace("?", "").replace(".", "").split())
    config = LlamaConfig(tie_word_embeddings=False, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prompt_batch(model: Path, n: int):
    """``n`` chat prompts rendered and left-padded as the trainer does; the model's end-of-turn ids."""
    from soupkit.chat import policy_chat, render
    from soupkit.rlhf.rollout import encode_prompts

    chat = policy_chat(model, "auto", str(model), False)
    texts = render(chat.tokenizer, [QUESTIONS[i % len(QUESTIONS)] for i in range(n)], chat.template, "bench")
    return encode_prompts(chat.tokenizer, texts, 256), chat.stops, chat.tokenizer.pad_token_id


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    """(first call's seconds, later calls' seconds, last result)."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return first, times, out


def main(argv: list[str] | None = None) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from soupkit.rlhf import build_spec
    from soupkit.rlhf.engines import HFEngine, Sampling, VLLMEngine, policy_weights
    from soupkit.rlhf.rng import keyed_generator

    args = parse(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.size, args.work)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    enc, stops, pad = prompt_batch(model_dir, args.prompts)
    query, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    dtype = getattr(torch, args.dtype)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    sampling = Sampling(1.0, 1.0, args.tokens, stops, pad, seed=0)
    rows = list(range(args.prompts))
    uniforms = torch.stack([torch.rand(args.tokens, generator=keyed_generator(0, 0, r)) for r in rows])
    spec = build_spec(None, {"ref": [str(model_dir)], "prompts": "-", "reward": "-:-", "rollout_engine": "vllm",
                             "max_new_tokens": args.tokens, "bf16": args.dtype == "bfloat16",
                             "vllm_memory_fraction": args.memory_fraction, "vllm_enforce_eager": args.eager,
                             "vllm_sleep": False}, ())
    results = []
    for name in ("hf", "vllm"):
        start = time.perf_counter()
        engine = HFEngine(sampling) if name == "hf" else VLLMEngine(spec, model_dir, sampling, device)
        startup = time.perf_counter() - start

        def call(engine=engine):
            with torch.no_grad(), autocast:
                return engine.sample(policy, query, mask, step=0, rows=rows, uniforms=uniforms)

        first, times, out = timed(call, args.repeats)
        row = {"engine": name, "size": args.size, "device": device.type, "dtype": args.dtype,
               "prompts": args.prompts, "max_new_tokens": args.tokens, "startup_s": round(startup, 2),
               "first_call_s": round(first, 2), "call_s": round(statistics.median(times), 3),
               "tokens": int(_valid_tokens(out.response, stops).sum())}
        if name == "vllm":
            push = timed(lambda engine=engine: engine.push(policy_weights(policy)), args.repeats)[1]
            row["push_s"] = round(statistics.median(push), 3)
            row.update(logprob_gap(policy, query, mask, out, stops, pad, autocast))
        row["tokens_per_s"] = round(row["tokens"] / row["call_s"], 1)
        results.append(row)
        print(json.dumps(row), flush=True)
        del engine
    hf, vllm = results
    print(f"vllm / hf tokens per second: {vllm['tokens_per_s'] / hf['tokens_per_s']:.2f}x "
          f"(the vllm call includes its weight push: {vllm['push_s']} s of {vllm['call_s']} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


def logprob_gap(policy, query, mask, out, stops, pad, autocast) -> dict:
    """|vLLM log-prob - trainer log-prob| of vLLM's samples, mean and max over response tokens."""
    import torch

    from soupkit.rlhf.engines import mismatch_metrics
    from soupkit.rlhf.rollout import (
        Samples,
        in_chunks,
        response_logits,
        token_logprobs,
        truncate_at_stop,
    )

    response, valid = truncate_at_stop(out.response, stops, pad)
    samples = Samples(query, mask.bool(), response, valid)
    with torch.no_grad(), autocast:
        trainer = in_chunks(lambda mb: token_logprobs(response_logits(policy, mb, 1.0), mb.response), samples, 8)
    gaps = mismatch_metrics(trainer, out.logprobs, valid, None)
    return {"logprob_gap_mean": float(gaps["engine_logprob_diff_mean"]),
            "logprob_gap_max": float(gaps["engine_logprob_diff_max"])}


def _valid_tokens(response, stops):
    from soupkit.rlhf.rollout import truncate_at_stop

    return truncate_at_stop(response, stops, -1)[1]


if __name__ == "__main__":  # vLLM may start worker processes with spawn, which re-imports this module
    sys.path.insert(0, str(ROOT))
    main()
