"""The PPO loop: ``train(spec)`` runs ``spec.steps`` PPO steps and writes ``OUT/final``.

Each step reads as five numbered stages (rollout, score, advantages, optimise, control/log); the
maths lives in small pure functions in the sibling modules. Built on ``accelerate.Accelerator``
so the loop runs unchanged on a CPU, one GPU, or under ``torchrun`` / ``accelerate launch``
(data parallel): only the main process writes metrics and checkpoints.

Data parallelism does not change the maths: ``batch_size`` prompts per process make a global batch
whose prompts, sampling noise (keyed by seed, step and global row) and minibatch shuffles do not
depend on the process count; whitening, loss normalisation and metrics use global-batch statistics.
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soupkit.checkpoint import atomic_output_dir, check_output_free, write_provenance
from soupkit.errors import SoupkitError
from soupkit.formats import Prompt
from soupkit.launch import processes
from soupkit.locking import check_not_being_written, writing
from soupkit.recipe import AlignSpec, resume_settings
from soupkit.rlhf import checkpoints as ckpt
from soupkit.rlhf.advantage import (
    explained_variance,
    gae,
    masked_mean,
    masked_var,
    per_token_rewards,
    whiten_with,
)
from soupkit.rlhf.config import lr_factor, micro_batch_size
from soupkit.rlhf.kl import ESTIMATORS, AdaptiveKL, FixedKL
from soupkit.rlhf.losses import policy_loss, value_loss
from soupkit.rlhf.models import Models, PolicyAndValue, Sources, load_models, preflight, visiting
from soupkit.rlhf.prompts import batch_indices
from soupkit.rlhf.reward import ModelReward, missing_eos_penalty, sequence_scores
from soupkit.rlhf.rollout import (
    Rollout,
    encode_prompts,
    ended,
    entropy,
    generate,
    in_chunks,
    position_ids,
    response_logits,
    sampling_uniforms,
    token_logprobs,
    truncate_at_stop,
)
from soupkit.rlhf.sharding import (
    full_optimizer_state,
    full_state_dicts,
    full_weights,
    load_optimizer_state,
    sharding,
    zero3_loading,
)
from soupkit.stopping import GracefulStop, Stopped
from soupkit.storage import check_free_space, check_writable, write_errors

Progress = Callable[[int, int, dict[str, Any]], None]
TRAINED = ("policy", "critic.seq_cls")
"""Where policy and critic sit in ``PolicyAndValue``: the names checkpoints gather them by."""


@dataclass
class Run:
    """Everything one training run holds between steps."""

    spec: AlignSpec
    sources: Sources
    models: Models
    trained: Any
    """Policy and critic as one ``PolicyAndValue``, wrapped by ``accelerator.prepare`` (DDP, ...)."""
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
    a non-empty ``OUT``. ``OUT`` is locked for the whole run, from before its first check, so a
    second run into it fails at once instead of interleaving its metrics and checkpoints
    (``soupkit.locking``; a killed run's lock goes with its process, so ``resume`` needs no clean-up).
    On SIGTERM / SIGINT the run finishes its step, checkpoints it and raises ``Stopped``
    (``soupkit.stopping``).
    """
    target = out or spec.output
    if not target:
        raise SoupkitError("align: no output directory; pass --out or set align.output")
    with writing([Path(target)]):
        return _train(spec, Path(target), force, resume, progress)


def _train(spec: AlignSpec, out_dir: Path, force: bool, resume: bool, progress: Progress | None) -> Path:
    check_not_being_written(_inputs(spec), "align: input")
    check_writable(out_dir, into=True)
    resume_dir = _check_output(out_dir, force, resume)
    sources = preflight(spec)
    run = setup(spec, sources, out_dir, resume_dir)
    _check_space(run)
    with GracefulStop(announce=run.accelerator.is_main_process) as stop:
        for step in range(run.start_step, spec.steps):
            metrics = ppo_step(run, step)
            _finish_step(run, step + 1, metrics)
            if progress is not None and run.accelerator.is_main_process:
                progress(step + 1, spec.steps, metrics)
            if step + 1 < spec.steps and (signum := stop.agreed(run.accelerator.device)):
                _stop(run, step + 1, signum)
    return write_final(run)


def _inputs(spec: AlignSpec) -> list[str]:
    """The models align reads (a reward given as module:function names no output, and passes)."""
    return [*spec.ref, *([spec.init] if spec.init else []), spec.reward, *spec.watch.values()]


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
    from transformers.utils import logging

    logging.disable_progress_bar()  # per-file load/save bars would drown the run's own progress
    accelerator = _accelerator(spec)
    torch.manual_seed(spec.seed)  # the same on every rank: any random init (LoRA's A) agrees
    models = load_models(spec, sources, accelerator.device, resume_dir)
    trained, optimizer = prepare_trained(accelerator, spec, models)
    kind = sharding(trained)  # on every process: FSDP version 1 is refused here
    if spec.lora_rank and kind:
        raise SoupkitError("lora_rank under FSDP or DeepSpeed ZeRO-3 is not supported: a LoRA policy's "
                           "gradients and optimiser state are small, use DDP (configs/accelerate/ddp.yaml)")
    if accelerator.num_processes > 1 and accelerator.is_main_process:  # what accelerate made of the launch
        frozen = "sharded (zero3)" if zero3_loading() else "replicated"
        print(f"align: {accelerator.num_processes} processes ({accelerator.distributed_type.value}), policy + "
              f"critic weights {'sharded (' + kind + ')' if kind else 'replicated'}, frozen models {frozen}",
              file=sys.stderr, flush=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(spec, step))
    kl_ctl = AdaptiveKL(spec.kl_coef, spec.kl_target, spec.kl_horizon) if spec.kl_target else FixedKL(spec.kl_coef)
    run = Run(spec, sources, models, trained, accelerator, optimizer, scheduler, kl_ctl, out)
    if resume_dir is not None:
        _restore(run, resume_dir)
    elif accelerator.is_main_process:
        _clear_previous_run(out)
    accelerator.wait_for_everyone()
    return run


def _accelerator(spec: AlignSpec) -> Any:
    """accelerate's ``Accelerator`` for this launch; micro-batches accumulate ``grad_accum`` times
    per optimiser step (accelerate scales the loss, or DeepSpeed does)."""
    import os

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    kwargs: dict[str, Any] = {}
    if processes() > 1 and not torch.cuda.is_available():
        # Several processes without GPUs (torchrun): accelerate joins them (gloo) only when told
        # ``cpu`` (accelerate 1.15, checked on CPU-only machines), but ``cpu`` switches DeepSpeed off, which wants gloo named.
        kwargs = {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]} if deepspeed else {"cpu": True}
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        from accelerate.utils import GradientAccumulationPlugin

        # Reduce-scatter every micro-batch: skipping the sync would hold whole, unsharded gradients.
        kwargs["gradient_accumulation_plugin"] = GradientAccumulationPlugin(num_steps=spec.grad_accum,
                                                                            sync_each_batch=True)
    accelerator = Accelerator(**kwargs)
    accelerator.gradient_accumulation_steps = spec.grad_accum
    return accelerator


def prepare_trained(accelerator: Any, spec: AlignSpec, models: Models) -> tuple[Any, Any]:
    """Policy + critic as one module and their optimiser, wrapped by accelerate (DDP, FSDP2 or
    DeepSpeed as the launch config says; nothing on one process)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # DeepSpeed takes batch, accumulation and clipping from its own config
        micro = micro_batch_size(spec)
        plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=spec.grad_accum,
            train_batch_size=micro * spec.grad_accum * accelerator.num_processes,
            gradient_clipping=spec.max_grad_norm or 0.0)
    return accelerator.prepare(PolicyAndValue(models.policy, models.critic), _optimizer(spec, models))


def _clear_previous_run(out: Path) -> None:
    """With --force over an old run, drop only what align writes, so a later --resume cannot pick
    up a stale checkpoint (other files in OUT are left alone)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(ckpt.checkpoints_root(out), ignore_errors=True)


def _optimizer(spec: AlignSpec, models: Models) -> torch.optim.Optimizer:
    """AdamW with eps 1e-5 (Huang et al. 2023, https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo); the critic may have its own learning rate (Zheng et al. 2023, arXiv 2307.04964; OpenRLHF)."""
    # Trainable only (a LoRA policy's frozen base takes no optimiser state); policy in group 0,
    # critic in group 1, which sharding._group_names relies on for DeepSpeed checkpoints.
    groups = [
        {"params": [p for p in models.policy.parameters() if p.requires_grad], "lr": spec.learning_rate},
        {"params": [p for p in models.critic.parameters() if p.requires_grad],
         "lr": spec.value_learning_rate or spec.learning_rate},
    ]
    return torch.optim.AdamW(groups, eps=spec.adam_eps, weight_decay=spec.weight_decay)


def ppo_step(run: Run, step: int) -> dict[str, Any]:
    """One PPO step on the batch of prompts for 0-based ``step``; returns its metrics."""
    spec, started = run.spec, time.perf_counter()
    learning_rate = run.optimizer.param_groups[0]["lr"]
    positions = _my_positions(run)
    order = batch_indices(len(run.sources.prompts), len(positions) * run.accelerator.num_processes, step, spec.seed)
    prompts = [run.sources.prompts[order[i]] for i in positions]
    texts = [run.models.prompt_texts[order[i]] for i in positions]

    # 1. Rollout: sample responses, cut at the end of turn, and read policy / reference / critic on them.
    with bf16_autocast(run):
        roll = rollout(run, texts, sampling_uniforms(spec.seed, step, positions, spec.max_new_tokens))

    # 2. Score: sequence reward (+ missing-EOS penalty), then the per-token KL penalty.
    with bf16_autocast(run):
        roll.scores = score(run, roll, prompts, step)
    kl = reference_kl(run, roll) * roll.mask
    rewards = per_token_rewards(roll.scores, kl, roll.mask, run.kl_ctl.value)
    if spec.whiten_rewards:
        rewards = whiten_global(run, rewards, roll.mask, shift_mean=False)

    # 3. Advantages: GAE over the response, whitened over the global batch (Huang et al. 2023; 2024, arXiv 2403.17031).
    advantages, returns = gae(rewards, roll.values, roll.mask, spec.gamma, spec.gae_lambda)
    if spec.whiten_advantages:
        advantages = whiten_global(run, advantages, roll.mask)

    # 4. Optimise: epochs x minibatches of clipped policy + value loss.
    stats = optimise(run, roll, advantages, returns, step)

    # 5. Control and log: adapt beta to the global batch's sequence KL (Ziegler et al. 2019).
    metrics = _metrics(run, roll, kl, returns, stats, time.perf_counter() - started)
    metrics["learning_rate"] = learning_rate
    run.kl_ctl.update(metrics["kl"], spec.batch_size * run.accelerator.num_processes)
    return metrics


def bf16_autocast(run: Run) -> Any:
    """bf16 autocast for forward passes with ``spec.bf16`` (set here, not as accelerate's
    ``mixed_precision``, which is fixed once per process). Trained weights stay fp32."""
    return torch.autocast(run.accelerator.device.type, dtype=torch.bfloat16, enabled=run.spec.bf16)


def _my_positions(run: Run) -> list[int]:
    """This rank's rows of the global batch (rank r of P holds rows r, r + P, ...)."""
    acc = run.accelerator
    return list(range(run.spec.batch_size * acc.num_processes))[acc.process_index::acc.num_processes]


def gather_rows(run: Run, x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every process, padded with 0 to the longest response. (b, ...) -> (P b, ...)."""
    acc = run.accelerator
    if acc.num_processes == 1:
        return x
    return acc.gather(acc.pad_across_processes(x.float(), dim=1) if x.dim() > 1 else x.float())


def whiten_global(run: Run, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``whiten`` with the mean and variance of the global batch. Shapes: (b, t), (b, t) -> (b, t)."""
    every, every_mask = gather_rows(run, x), gather_rows(run, mask)
    return whiten_with(x, mask, masked_mean(every, every_mask), masked_var(every, every_mask), shift_mean)


@torch.no_grad()
def rollout(run: Run, prompts: list[str], uniforms: torch.Tensor) -> Rollout:
    """Sample one response per rendered prompt (driven by ``uniforms``, (b, max_new_tokens)) and fill
    log-probs, entropy, reference log-probs, values.

    Sharded weights (FSDP2, ZeRO-3) are gathered one model at a time: the policy for sampling and
    its log-probs, then each frozen model (``visiting``), then the critic.
    """
    spec, models, tok, device = run.spec, run.models, run.models.tokenizer, run.accelerator.device
    enc = encode_prompts(tok, prompts, spec.max_prompt_tokens).to(device)
    policy = models.policy
    with full_weights(run.trained, policy):
        response = generate(policy, enc["input_ids"], enc["attention_mask"], max_new_tokens=spec.max_new_tokens,
                            temperature=spec.temperature, top_p=spec.top_p, stop_ids=models.stops,
                            pad_id=tok.pad_token_id, uniforms=uniforms.to(device))
        response, mask = truncate_at_stop(response, models.stops, tok.pad_token_id)
        roll = Rollout(enc["input_ids"], enc["attention_mask"].bool(), response, mask)
        both = in_chunks(lambda mb: _logprobs_and_entropy(policy, mb, spec.temperature), roll,
                         spec.forward_batch_size)
    roll.logprobs, roll.entropy = both.unbind(dim=-1)
    roll.ref_logprobs = torch.stack([_frozen_logprobs(run, m, roll) for m in models.refs], dim=1)  # (b, refs, t)
    with full_weights(run.trained, models.critic):
        roll.values = in_chunks(lambda mb: _values(models.critic, mb), roll, spec.forward_batch_size)
    roll.extra = {f"kl_{name}": _frozen_logprobs(run, m, roll) for name, m in models.watch.items()}
    return roll


def _frozen_logprobs(run: Run, model: Any, roll: Rollout) -> torch.Tensor:
    """Log-probs from a frozen model, brought to the device for this pass if it is offloaded."""
    with visiting(model, run.accelerator.device):
        return _logprobs(model, roll, run.spec)


def _logprobs_and_entropy(model: Any, mb: Rollout, temperature: float) -> torch.Tensor:
    logits = response_logits(model, mb, temperature)
    return torch.stack([token_logprobs(logits, mb.response), entropy(logits)], dim=-1)


def _logprobs(model: Any, roll: Rollout, spec: AlignSpec) -> torch.Tensor:
    fn = lambda mb: token_logprobs(response_logits(model, mb, spec.temperature), mb.response)  # noqa: E731
    return in_chunks(fn, roll, spec.forward_batch_size)


def _values(critic: Any, mb: Rollout) -> torch.Tensor:
    """Critic output at the positions that predict each response token. Shape: (b, t)."""
    mask = mb.attention_mask
    values = critic(input_ids=mb.sequences, attention_mask=mask.long(), position_ids=position_ids(mask))
    return values[:, -mb.response.shape[1] - 1:-1]


def score(run: Run, roll: Rollout, prompts: list[Prompt], step: int) -> torch.Tensor:
    """Sequence scores (b,), with the missing-EOS penalty applied when configured; a reward that
    fails says at which (1-based) PPO step, chained to the user's exception if there is one."""
    models = run.models
    reward = models.reward
    with visiting(reward.model if isinstance(reward, ModelReward) else None, run.accelerator.device):
        try:
            scores = sequence_scores(reward, roll, prompts, models.tokenizer, models.stops, models.template is not None)
        except SoupkitError as exc:
            raise SoupkitError(f"PPO step {step + 1}: {exc}") from exc.__cause__
    if run.spec.missing_eos_penalty is not None:
        scores = missing_eos_penalty(scores, ended(roll.response, roll.mask, models.stops),
                                     run.spec.missing_eos_penalty)
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
    for epoch in range(spec.ppo_epochs):
        # The same shuffle on every rank, keyed by (seed, step, epoch): no hidden RNG state.
        order = torch.randperm(b, generator=torch.Generator().manual_seed(hash((spec.seed, step, epoch)) % 2**63))
        epoch_stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for minibatch in order.split(b // spec.minibatches):
            for rows in minibatch.split(micro):
                mb = roll.select(rows.to(roll.query.device))
                share = token_share(run, mb.mask)
                with acc.accumulate(run.trained):  # gradients sync on the last micro-batch only
                    loss, mb_stats = minibatch_loss(run, mb)
                    _check_finite(run, loss, step)
                    acc.backward(loss * (share * acc.num_processes))  # accelerate divides by grad_accum
                for key, value in mb_stats.items():
                    epoch_stats[key].append(value * share)
            assert acc.sync_gradients, "a minibatch must end on a gradient-accumulation boundary"
            _optimizer_step(run)
        for key, values in _sum_over_processes(run, epoch_stats).items():
            stats[key].extend(values)
        if spec.target_kl is not None and _mean(stats["approx_kl"][-spec.minibatches * spec.grad_accum:]) > spec.target_kl:
            break
    run.scheduler.step()
    return {key: _mean(values) for key, values in stats.items()}


def token_share(run: Run, mask: torch.Tensor) -> torch.Tensor:
    """This rank's share of the micro-batch's valid tokens across processes (1 on one process).

    DDP averages gradients over P processes, so scaling each rank's token-mean loss by
    ``P * share`` makes the update that of the token mean over the global micro-batch.
    """
    local = mask.sum().float()
    return local / run.accelerator.reduce(local.clone(), "sum").clamp(min=1)


def _sum_over_processes(run: Run, stats: dict[str, list[torch.Tensor]]) -> dict[str, list[float]]:
    """Token-share-weighted statistics summed over ranks: global token means, per micro-batch."""
    if not stats:
        return {}
    keys = list(stats)
    summed = run.accelerator.reduce(torch.stack([torch.stack(stats[k]) for k in keys]), "sum")
    return {k: row.tolist() for k, row in zip(keys, summed)}


def minibatch_loss(run: Run, mb: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``policy_loss + vf_coef * value_loss`` on one micro-batch, with their statistics."""
    spec = run.spec
    mask, t = mb.attention_mask, mb.response.shape[1]
    with bf16_autocast(run):
        logits, values = run.trained(mb.sequences, mask.long(), position_ids(mask), t + 1)
    logprobs = token_logprobs(logits[:, :-1].float() / spec.temperature, mb.response)
    values = values[:, -t - 1:-1]
    pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, mb.extra["advantages"], mb.mask, spec.clip_eps)
    vf_loss, vf_stats = value_loss(values, mb.values, mb.extra["returns"], mb.mask, spec.value_clip_eps)
    stats = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), **pg_stats, **vf_stats}
    stats = {k: torch.as_tensor(v, dtype=torch.float32, device=mask.device) for k, v in stats.items()}
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
    """Per-step metrics of the global batch (every process's rows); ``kl`` is the mean summed
    per-token KL. ``stats`` (the losses') are global token means already."""
    every = lambda x: gather_rows(run, x)  # noqa: E731
    mask, estimator = every(roll.mask) > 0, ESTIMATORS[run.spec.kl_estimator]
    finished = every(ended(roll.response, roll.mask, run.models.stops))
    values = {
        "reward": every(roll.scores).mean(),
        "kl": every(kl).sum(dim=1).mean(),
        "entropy": masked_mean(every(roll.entropy), mask),
        "explained_variance": explained_variance(every(roll.values), every(returns), mask),
        "response_length": mask.sum(dim=1).float().mean(),
        "eos_rate": finished.float().mean(),
        **{name: every(estimator(roll.logprobs, lp) * roll.mask).sum(dim=1).mean()
           for name, lp in roll.extra.items() if name.startswith("kl_")},
    }
    metrics = {"kl_coef": run.kl_ctl.value, **{k: float(v) for k, v in values.items()}, **stats}
    metrics.update(tokens_per_s=float(mask.sum()) / seconds, seconds=seconds)
    return metrics


def _finish_step(run: Run, step: int, metrics: dict[str, Any]) -> None:
    """Log the step and, every ``save_every`` steps, write a checkpoint (main process only)."""
    if run.accelerator.is_main_process:
        with write_errors(run.out / "metrics.jsonl", _kept(run)):
            ckpt.append_metrics(run.out / "metrics.jsonl", {"step": step, **metrics})
    if _saves_at(run.spec, step):
        save(run, step)


def _saves_at(spec: AlignSpec, step: int) -> bool:
    """Whether a checkpoint is written after ``step`` (the last step writes ``final/`` instead)."""
    return bool(spec.save_every) and step % spec.save_every == 0 and step < spec.steps


def _stop(run: Run, step: int, signum: int) -> None:
    """Stop after ``step`` on a signal: checkpoint it (unless that just happened), raise ``Stopped``.
    Resuming then redoes no step and records none twice."""
    if not _saves_at(run.spec, step):
        save(run, step)
    raise Stopped(step, ckpt.checkpoints_root(run.out) / f"step-{step}", signum)


def _kept(run: Run) -> str:
    """What survives a failed write: the newest checkpoint, which --resume would continue from."""
    last = ckpt.latest_checkpoint(run.out)
    if last is None:
        return "no checkpoint was written yet, so --resume has nothing to continue from"
    return f"the previous checkpoint {last} is intact and --resume will use it"


def checkpoint_bytes(run: Run) -> int:
    """Bytes one checkpoint takes: policy (only its adapter with LoRA) and critic weights, and
    AdamW's two moments per trained parameter. Sharded parameters count whole (checkpoints hold
    whole tensors); tokenizer and RNG files are left out (kilobytes to a few MB)."""
    def size(p: torch.Tensor) -> int:
        return (getattr(p, "ds_numel", None) or p.numel()) * p.element_size()

    policy, critic = run.models.policy, run.models.critic
    trained = [p for p in (*policy.parameters(), *critic.parameters()) if p.requires_grad]
    saved = [p for p in policy.parameters() if p.requires_grad or not run.spec.lora_rank]
    return sum(map(size, saved)) + sum(map(size, critic.parameters())) + 2 * sum(map(size, trained))


def _check_space(run: Run) -> None:
    """Refuse to start a run that will checkpoint when ``OUT``'s filesystem cannot hold one
    (each save checks again: the disk may fill while the run goes on)."""
    saves = any(_saves_at(run.spec, s) for s in range(run.start_step + 1, run.spec.steps))
    if saves and run.accelerator.is_main_process:
        check_free_space(run.out, checkpoint_bytes(run), "a checkpoint of this run")


def save(run: Run, step: int) -> Path | None:
    """A resumable checkpoint of everything the next step depends on."""
    acc = run.accelerator
    acc.wait_for_everyone()
    # Every process takes part: gathering sharded weights and optimiser state is a collective.
    optimizer = full_optimizer_state(run.trained, run.optimizer)
    weights = full_state_dicts(run.trained, TRAINED)
    if not acc.is_main_process:
        return None
    target = ckpt.checkpoints_root(run.out) / f"step-{step}"
    check_free_space(run.out, checkpoint_bytes(run), f"checkpoint {target}", _kept(run))
    state = {"step": step, "optimizer": optimizer, "scheduler": run.scheduler.state_dict(),
             "kl_ctl": run.kl_ctl.state_dict(), "rng": ckpt.rng_state(), "spec": _resumable(run.spec),
             "global_batch_size": _global_batch(run)}
    # A LoRA policy saves its adapter only; resuming rebuilds it on the init's weights.
    with write_errors(target, _kept(run)):
        return ckpt.save_checkpoint(run.out, step, run.models.policy, run.models.critic.seq_cls,
                                    run.models.tokenizer, state, run.spec.keep_checkpoints, weights)


def _global_batch(run: Run) -> int:
    return run.spec.batch_size * run.accelerator.num_processes


def _restore(run: Run, resume_dir: Path) -> None:
    """Continue exactly: optimiser, schedule, beta, RNG and step; later metric lines are dropped."""
    state = ckpt.load_trainer_state(resume_dir)
    changed = sorted(k for k, v in _resumable(run.spec).items() if state.get("spec", {}).get(k, v) != v)
    if state.get("global_batch_size", _global_batch(run)) != _global_batch(run):
        changed.append(f"the global batch ({state['global_batch_size']} = batch_size x processes, "
                       f"now {_global_batch(run)})")
    if changed:
        raise SoupkitError(f"--resume: {resume_dir} was made with other settings for {', '.join(changed)}; "
                           "resume with the same settings, or start a new --out")
    if any(isinstance(key, int) for key in state["optimizer"].get("state", {})):
        raise SoupkitError(f"--resume: {resume_dir} was written by an earlier soupkit whose optimiser state is "
                           "keyed by position; it cannot be resumed, start a new --out")
    load_optimizer_state(run.trained, run.optimizer, state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.kl_ctl.load_state_dict(state["kl_ctl"])
    ckpt.set_rng_state(state["rng"])
    run.start_step = int(state["step"])
    if run.accelerator.is_main_process:
        ckpt.truncate_metrics(run.out / "metrics.jsonl", run.start_step)


def _resumable(spec: AlignSpec) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues (the process count may
    change if the global batch does not, so batch_size is checked as that)."""
    return resume_settings(spec)


def write_final(run: Run) -> Path:
    """``OUT/final``: the policy in HF format with its tokenizer and provenance, written atomically."""
    acc = run.accelerator
    acc.wait_for_everyone()
    final = run.out / "final"
    weights = full_state_dicts(run.trained, TRAINED)  # a collective when sharded
    if acc.is_main_process:
        with write_errors(final, _kept(run)), atomic_output_dir(final, force=True) as tmp:
            _plain_policy(run.models.policy).save_pretrained(tmp, state_dict=weights and weights[TRAINED[0]])
            run.models.tokenizer.save_pretrained(tmp)
            write_provenance(tmp, {"align": run.spec.model_dump(mode="json")}, _card(run))
    return final


def _plain_policy(policy: Any) -> Any:
    """The policy as a plain transformers model: a LoRA adapter is merged into its base (the last
    use of the policy, so merging in place is fine)."""
    return policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy


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
