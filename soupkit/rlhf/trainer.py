"""The PPO loop: ``train(spec)`` runs ``spec.steps`` PPO steps and writes ``OUT/final``.

Each step reads as five numbered stages (rollout, score, advantages, optimise, control/log); the
maths lives in small pure functions in the sibling modules. Built on ``accelerate.Accelerator``
so the loop runs unchanged on a CPU, one GPU, or under ``accelerate launch``: only the main
process writes metrics and checkpoints, and each rank samples with its own seed ([N]).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soupkit.checkpoint import atomic_output_dir, check_output_free, write_provenance
from soupkit.errors import SoupkitError
from soupkit.recipe import AlignSpec
from soupkit.rlhf import checkpoints as ckpt
from soupkit.rlhf.advantage import explained_variance, gae, masked_mean, per_token_rewards, whiten
from soupkit.rlhf.config import lr_factor, micro_batch_size
from soupkit.rlhf.kl import ESTIMATORS, AdaptiveKL, FixedKL
from soupkit.rlhf.losses import policy_loss, value_loss
from soupkit.rlhf.models import Models, Sources, load_models, preflight
from soupkit.rlhf.prompts import batch_indices
from soupkit.rlhf.reward import ModelReward, function_scores, missing_eos_penalty, model_scores
from soupkit.rlhf.rollout import (
    Rollout,
    entropy,
    generate,
    in_chunks,
    response_logits,
    token_logprobs,
    truncate_at_stop,
)

Progress = Callable[[int, int, dict[str, Any]], None]


@dataclass
class Run:
    """Everything one training run holds between steps."""

    spec: AlignSpec
    sources: Sources
    models: Models
    accelerator: Any
    optimizer: Any
    scheduler: Any
    kl_ctl: FixedKL | AdaptiveKL
    out: Path
    start_step: int = 0


def train(spec: AlignSpec, *, out: str | Path | None = None, force: bool = False,
          resume: bool = False, progress: Progress | None = None) -> Path:
    """Run PPO as ``spec`` says; return the path of ``OUT/final`` (an HF-format policy).

    ``progress(done, total, metrics)`` is called after each step (main process only).
    ``resume`` continues from the newest checkpoint under ``OUT/checkpoints``; ``force`` replaces
    a non-empty ``OUT``.
    """
    target = out or spec.output
    if not target:
        raise SoupkitError("align: no output directory; pass --out or set align.output")
    out_dir = Path(target)
    resume_dir = _check_output(out_dir, force, resume)
    sources = preflight(spec)
    run = setup(spec, sources, out_dir, resume_dir)
    for step in range(run.start_step, spec.steps):
        metrics = ppo_step(run, step)
        _finish_step(run, step + 1, metrics)
        if progress is not None and run.accelerator.is_main_process:
            progress(step + 1, spec.steps, metrics)
    return write_final(run)


def _check_output(out: Path, force: bool, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuse to clobber a previous run."""
    if resume:
        found = ckpt.latest_checkpoint(out)
        if found is None:
            raise SoupkitError(f"--resume: no checkpoint under {ckpt.checkpoints_root(out)}")
        return found
    check_output_free(out, force)
    return None


def setup(spec: AlignSpec, sources: Sources, out: Path, resume_dir: Path | None) -> Run:
    """Load models, build the optimiser, scheduler and KL controller; restore a checkpoint."""
    from accelerate import Accelerator
    from transformers.utils import logging

    logging.disable_progress_bar()  # per-file load/save bars would drown the run's own progress
    accelerator = Accelerator()
    torch.manual_seed(spec.seed + 100003 * accelerator.process_index)
    models = load_models(spec, sources, accelerator.device, resume_dir)
    optimizer = _optimizer(spec, models)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(spec, step))
    models.policy, models.critic, optimizer = accelerator.prepare(models.policy, models.critic, optimizer)
    kl_ctl = AdaptiveKL(spec.kl_coef, spec.kl_target, spec.kl_horizon) if spec.kl_target else FixedKL(spec.kl_coef)
    run = Run(spec, sources, models, accelerator, optimizer, scheduler, kl_ctl, out)
    if resume_dir is not None:
        _restore(run, resume_dir)
    elif accelerator.is_main_process:
        _clear_previous_run(out)
    return run


def _clear_previous_run(out: Path) -> None:
    """With --force over an old run, drop only what align writes, so a later --resume cannot pick
    up a stale checkpoint (other files in OUT are left alone)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(ckpt.checkpoints_root(out), ignore_errors=True)


def _optimizer(spec: AlignSpec, models: Models) -> torch.optim.Optimizer:
    """AdamW with eps 1e-5 ([N]); the critic may have its own learning rate ([S], OpenRLHF)."""
    groups = [
        {"params": list(models.policy.parameters()), "lr": spec.learning_rate},
        {"params": list(models.critic.parameters()), "lr": spec.value_learning_rate or spec.learning_rate},
    ]
    return torch.optim.AdamW(groups, eps=spec.adam_eps, weight_decay=spec.weight_decay)


def ppo_step(run: Run, step: int) -> dict[str, Any]:
    """One PPO step on the batch of prompts for 0-based ``step``; returns its metrics."""
    spec, started = run.spec, time.perf_counter()
    learning_rate = run.optimizer.param_groups[0]["lr"]
    prompts = [run.sources.prompts[i] for i in _my_indices(run, step)]

    # 1. Rollout: sample responses, cut at EOS, and read policy / reference / critic on them.
    roll = rollout(run, prompts)

    # 2. Score: sequence reward (+ missing-EOS penalty), then the per-token KL penalty.
    roll.scores = score(run, roll, prompts)
    kl = reference_kl(run, roll) * roll.mask
    rewards = per_token_rewards(roll.scores, kl, roll.mask, run.kl_ctl.value)
    if spec.whiten_rewards:
        rewards = whiten(rewards, roll.mask, shift_mean=False)

    # 3. Advantages: GAE over the response, whitened per batch ([N], [N+]).
    advantages, returns = gae(rewards, roll.values, roll.mask, spec.gamma, spec.gae_lambda)
    if spec.whiten_advantages:
        advantages = whiten(advantages, roll.mask)

    # 4. Optimise: epochs x minibatches of clipped policy + value loss.
    stats = optimise(run, roll, advantages, returns, step)

    # 5. Control and log: adapt beta to the measured sequence KL (Ziegler et al. 2019).
    seq_kl = float(kl.sum(dim=1).mean())
    metrics = _metrics(run, roll, kl, returns, stats, time.perf_counter() - started)
    metrics["learning_rate"] = learning_rate
    run.kl_ctl.update(seq_kl, spec.batch_size * run.accelerator.num_processes)
    return metrics


def _my_indices(run: Run, step: int) -> list[int]:
    """This rank's share of the step's prompts: every rank draws the same order, then strides."""
    acc = run.accelerator
    total = run.spec.batch_size * acc.num_processes
    return batch_indices(len(run.sources.prompts), total, step, run.spec.seed)[acc.process_index::acc.num_processes]


@torch.no_grad()
def rollout(run: Run, prompts: list[str]) -> Rollout:
    """Sample one response per prompt and fill log-probs, entropy, reference log-probs, values."""
    spec, models, tok = run.spec, run.models, run.models.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True, truncation=True,
              max_length=spec.max_prompt_tokens, add_special_tokens=False).to(run.accelerator.device)
    policy = run.accelerator.unwrap_model(models.policy)
    response = generate(policy, enc["input_ids"], enc["attention_mask"], max_new_tokens=spec.max_new_tokens,
                        temperature=spec.temperature, top_p=spec.top_p, eos_id=tok.eos_token_id,
                        pad_id=tok.pad_token_id)
    response, mask = truncate_at_stop(response, tok.eos_token_id, tok.pad_token_id)
    roll = Rollout(enc["input_ids"], enc["attention_mask"].bool(), response, mask)
    both = in_chunks(lambda mb: _logprobs_and_entropy(policy, mb, spec.temperature), roll, spec.forward_batch_size)
    roll.logprobs, roll.entropy = both.unbind(dim=-1)
    roll.ref_logprobs = torch.stack([_logprobs(m, roll, spec) for m in models.refs], dim=1)  # (b, refs, t)
    roll.values = in_chunks(lambda mb: _values(models.critic, mb), roll, spec.forward_batch_size)
    roll.extra = {f"kl_{name}": _logprobs(m, roll, spec) for name, m in models.watch.items()}
    return roll


def _logprobs_and_entropy(model: Any, mb: Rollout, temperature: float) -> torch.Tensor:
    logits = response_logits(model, mb, temperature)
    return torch.stack([token_logprobs(logits, mb.response), entropy(logits)], dim=-1)


def _logprobs(model: Any, roll: Rollout, spec: AlignSpec) -> torch.Tensor:
    fn = lambda mb: token_logprobs(response_logits(model, mb, spec.temperature), mb.response)  # noqa: E731
    return in_chunks(fn, roll, spec.forward_batch_size)


def _values(critic: Any, mb: Rollout) -> torch.Tensor:
    """Critic output at the positions that predict each response token. Shape: (b, t)."""
    from soupkit.rlhf.rollout import position_ids

    mask = mb.attention_mask
    values = critic(input_ids=mb.sequences, attention_mask=mask.long(), position_ids=position_ids(mask))
    return values[:, -mb.response.shape[1] - 1:-1]


def score(run: Run, roll: Rollout, prompts: list[str]) -> torch.Tensor:
    """Sequence scores (b,), with the missing-EOS penalty applied when configured."""
    reward, tok = run.models.reward, run.models.tokenizer
    ids = [row[m].tolist() for row, m in zip(roll.response, roll.mask)]
    if isinstance(reward, ModelReward):
        texts = lambda: [tok.decode(roll.sequences[i][roll.attention_mask[i]], skip_special_tokens=True)  # noqa: E731
                         for i in range(len(prompts))]
        scores = model_scores(reward, roll, texts)
    else:
        completions = tok.batch_decode(ids, skip_special_tokens=True)
        scores = function_scores(reward, prompts, completions, ids, roll.query.device)
    if run.spec.missing_eos_penalty is not None:
        ended = (roll.response == tok.eos_token_id).any(dim=1)
        scores = missing_eos_penalty(scores, ended, run.spec.missing_eos_penalty)
    return scores


def reference_kl(run: Run, roll: Rollout) -> torch.Tensor:
    """Per-token KL estimate against the reference; with several refs in ``mean_kl`` mode, the
    mean of the estimates against each. Shape: (b, t)."""
    estimator = ESTIMATORS[run.spec.kl_estimator]
    return estimator(roll.logprobs.unsqueeze(1), roll.ref_logprobs).mean(dim=1)


def optimise(run: Run, roll: Rollout, advantages: torch.Tensor, returns: torch.Tensor, step: int) -> dict[str, float]:
    """``ppo_epochs`` passes of ``minibatches`` optimiser steps, each accumulating ``grad_accum``
    micro-batches; stops early when the epoch's approx KL exceeds ``target_kl``."""
    spec, acc = run.spec, run.accelerator
    b, micro = roll.query.shape[0], micro_batch_size(spec)
    roll.extra.update(advantages=advantages, returns=returns)
    stats: dict[str, list[float]] = defaultdict(list)
    for _ in range(spec.ppo_epochs):
        order = torch.randperm(b, device=roll.query.device)
        for minibatch in order.split(b // spec.minibatches):
            for rows in minibatch.split(micro):
                loss, mb_stats = minibatch_loss(run, roll.select(rows))
                _check_finite(run, loss, step)
                acc.backward(loss / spec.grad_accum)
                for key, value in mb_stats.items():
                    stats[key].append(value)
            _optimizer_step(run)
        if spec.target_kl is not None and _epoch_approx_kl(run, stats) > spec.target_kl:
            break
    run.scheduler.step()
    return {key: _mean(values) for key, values in stats.items()}


def _epoch_approx_kl(run: Run, stats: dict[str, list[float]]) -> float:
    """Mean approx KL of the epoch just done, averaged over processes so every rank stops together."""
    spec = run.spec
    local = torch.tensor(_mean(stats["approx_kl"][-spec.minibatches * spec.grad_accum:]), device=run.accelerator.device)
    return float(run.accelerator.reduce(local, "mean"))


def minibatch_loss(run: Run, mb: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
    """``policy_loss + vf_coef * value_loss`` on one micro-batch, with their statistics."""
    spec = run.spec
    logprobs = token_logprobs(response_logits(run.models.policy, mb, spec.temperature), mb.response)
    values = _values(run.models.critic, mb)
    pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, mb.extra["advantages"], mb.mask, spec.clip_eps)
    vf_loss, vf_stats = value_loss(values, mb.values, mb.extra["returns"], mb.mask, spec.value_clip_eps)
    stats = {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), **pg_stats, **vf_stats}
    return pg_loss + spec.vf_coef * vf_loss, stats


def _optimizer_step(run: Run) -> None:
    acc, spec = run.accelerator, run.spec
    if spec.max_grad_norm is not None:
        acc.clip_grad_norm_(run.models.policy.parameters(), spec.max_grad_norm)
        acc.clip_grad_norm_(run.models.critic.parameters(), spec.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def _check_finite(run: Run, loss: torch.Tensor, step: int) -> None:
    """Stop before a NaN/inf update can reach the weights; earlier checkpoints stay as they are."""
    if torch.isfinite(loss):
        return
    last = ckpt.latest_checkpoint(run.out)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    raise SoupkitError(f"step {step + 1}: the PPO loss is {loss.item()} (NaN/inf); training stopped, {kept}")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _metrics(run: Run, roll: Rollout, kl: torch.Tensor, returns: torch.Tensor,
             stats: dict[str, float], seconds: float) -> dict[str, Any]:
    """Per-step metrics, averaged over processes; ``kl`` is the mean summed per-token KL."""
    mask, estimator = roll.mask, ESTIMATORS[run.spec.kl_estimator]
    local = {
        "reward": roll.scores.mean(),
        "kl": kl.sum(dim=1).mean(),
        "entropy": masked_mean(roll.entropy, mask),
        **{k: torch.tensor(v) for k, v in stats.items()},
        "explained_variance": torch.tensor(explained_variance(roll.values, returns, mask)),
        "response_length": mask.sum(dim=1).float().mean(),
        "eos_rate": (roll.response == run.models.tokenizer.eos_token_id).any(dim=1).float().mean(),
        **{name: (estimator(roll.logprobs, lp) * mask).sum(dim=1).mean()
           for name, lp in roll.extra.items() if name.startswith("kl_")},
    }
    values = run.accelerator.reduce(torch.stack([v.float().to(mask.device) for v in local.values()]), "mean")
    metrics = {"kl_coef": run.kl_ctl.value, **dict(zip(local, values.tolist()))}
    tokens = float(mask.sum()) * run.accelerator.num_processes
    metrics.update(tokens_per_s=tokens / seconds, seconds=seconds)
    return metrics


def _finish_step(run: Run, step: int, metrics: dict[str, Any]) -> None:
    """Log the step and, every ``save_every`` steps, write a checkpoint (main process only)."""
    if run.accelerator.is_main_process:
        ckpt.append_metrics(run.out / "metrics.jsonl", {"step": step, **metrics})
    if run.spec.save_every and step % run.spec.save_every == 0 and step < run.spec.steps:
        save(run, step)


def save(run: Run, step: int) -> Path | None:
    """A resumable checkpoint of everything the next step depends on."""
    acc = run.accelerator
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    state = {"step": step, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "kl_ctl": run.kl_ctl.state_dict(), "rng": ckpt.rng_state(), "spec": _resumable(run.spec)}
    critic = acc.unwrap_model(run.models.critic).seq_cls
    return ckpt.save_checkpoint(run.out, step, acc.unwrap_model(run.models.policy), critic,
                                run.models.tokenizer, state, run.spec.keep_checkpoints)


def _restore(run: Run, resume_dir: Path) -> None:
    """Continue exactly: optimiser, schedule, beta, RNG and step; later metric lines are dropped."""
    state = ckpt.load_trainer_state(resume_dir)
    changed = sorted(k for k, v in _resumable(run.spec).items() if state.get("spec", {}).get(k, v) != v)
    if changed:
        raise SoupkitError(f"--resume: {resume_dir} was made with other settings for {', '.join(changed)}; "
                           "resume with the same settings, or start a new --out")
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.kl_ctl.load_state_dict(state["kl_ctl"])
    ckpt.set_rng_state(state["rng"])
    run.start_step = int(state["step"])
    if run.accelerator.is_main_process:
        ckpt.truncate_metrics(run.out / "metrics.jsonl", run.start_step)


def _resumable(spec: AlignSpec) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues (steps may grow)."""
    free = {"steps", "save_every", "keep_checkpoints", "output", "forward_batch_size", "runs", "seeds", "kl_coefs"}
    return {k: v for k, v in spec.model_dump(mode="json").items() if k not in free}


def write_final(run: Run) -> Path:
    """``OUT/final``: the policy in HF format with its tokenizer and provenance, written atomically."""
    acc = run.accelerator
    acc.wait_for_everyone()
    final = run.out / "final"
    if acc.is_main_process:
        with atomic_output_dir(final, force=True) as tmp:
            acc.unwrap_model(run.models.policy).save_pretrained(tmp)
            run.models.tokenizer.save_pretrained(tmp)
            write_provenance(tmp, {"align": run.spec.model_dump(mode="json")}, _card(run))
    return final


def _card(run: Run) -> str:
    spec = run.spec
    last = (ckpt.read_metrics(run.out / "metrics.jsonl") or [{}])[-1]
    return (
        "# soupkit align: PPO policy\n\n"
        f"- reference: {', '.join(spec.ref)}" + (f" ({spec.ref_mode})" if len(spec.ref) > 1 else "") + "\n"
        f"- policy init: {spec.init or spec.ref[0]}\n- reward: {spec.reward}\n- prompts: {spec.prompts}\n"
        f"- steps: {spec.steps}, batch size {spec.batch_size}, kl_coef {spec.kl_coef} ({spec.kl_estimator})\n"
        f"- last step: reward {last.get('reward', float('nan')):.4f}, kl {last.get('kl', float('nan')):.4f}\n\n"
        "Per-step metrics are in ../metrics.jsonl; the full settings in soupkit_recipe.yaml.\n"
    )
