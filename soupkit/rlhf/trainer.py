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
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soupkit import adapters
from soupkit.errors import SoupkitError
from soupkit.formats import Prompt
from soupkit.hostmem import keep_freed_memory
from soupkit.launch import check_launch, deepspeed_launch, fsdp_launch, processes
from soupkit.locking import check_not_being_written, writing
from soupkit.recipe import AlignSpec
from soupkit.rlhf import checkpoints, ema
from soupkit.rlhf.advantage import explained_variance, gae, masked_mean, per_token_rewards
from soupkit.rlhf.config import lr_factor, micro_batch_size, with_precision
from soupkit.rlhf.engines import Sampling, check_engine, engine_metrics, is_corrected, make_engine
from soupkit.rlhf.global_batch import (
    gather_rows,
    my_rows,
    sum_over_processes,
    token_share,
    whiten_global,
)
from soupkit.rlhf.kl import ESTIMATORS, AdaptiveKL, FixedKL
from soupkit.rlhf.losses import policy_loss, value_loss
from soupkit.rlhf.models import Models, PolicyAndValue, Sources, load_models, preflight, visiting
from soupkit.rlhf.prompts import batch_indices
from soupkit.rlhf.reward import ModelReward, missing_eos_penalty, sequence_scores
from soupkit.rlhf.rng import keyed_generator
from soupkit.rlhf.rollout import (
    Rollout,
    Samples,
    Trajectory,
    encode_prompts,
    ended,
    entropy,
    in_chunks,
    position_ids,
    response_logits,
    samples_of,
    sampling_uniforms,
    scaled_logits,
    token_logprobs,
    truncate_at_stop,
)
from soupkit.rlhf.sharding import full_weights, sharding, zero3_loading
from soupkit.rlhf.timing import StageClock
from soupkit.stopping import GracefulStop, Stopped, defer
from soupkit.storage import check_writable, write_errors

Progress = Callable[[int, int, dict[str, Any]], None]


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
    clock: StageClock = field(default_factory=StageClock)
    """Seconds per stage of the current step (``soupkit.rlhf.timing``)."""
    engine: Any = None
    """What samples the responses (``soupkit.rlhf.engines``, ``spec.rollout_engine``)."""


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
    check_launch(spec.lora_rank)
    check_engine(spec)
    defer(0)  # a stop request left by an earlier run in this process is not this run's
    spec = with_precision(spec)
    ema.check(spec)
    spec = ema.with_init_watch(spec)
    check_not_being_written(_inputs(spec), "align: input")
    check_writable(out_dir, into=True)
    resume_dir = checkpoints.check_output(out_dir, force, resume)
    sources = preflight(spec)
    run = setup(spec, sources, out_dir, resume_dir)
    checkpoints.check_space(run)
    with GracefulStop(announce=run.accelerator.is_main_process) as stop:
        for step in range(run.start_step, spec.steps):
            metrics = ppo_step(run, step)
            _finish_step(run, step + 1, metrics)
            if progress is not None and run.accelerator.is_main_process:
                progress(step + 1, spec.steps, metrics)
            if step + 1 < spec.steps and (signum := stop.agreed(run.accelerator.device)):
                _stop(run, step + 1, signum)
        # A signal during the last step: the run finishes, and the caller (soupkit run) stops after it.
        defer(stop.agreed(run.accelerator.device))
    return checkpoints.write_final(run)


def _inputs(spec: AlignSpec) -> list[str]:
    """The models align reads (a reward given as module:function names no output, and passes)."""
    return [*spec.ref, *([spec.init] if spec.init else []), spec.reward, *spec.watch.values()]


def setup(spec: AlignSpec, sources: Sources, out: Path, resume_dir: Path | None) -> Run:
    """Load models, build the optimiser, scheduler and KL controller; restore a checkpoint."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # per-file load/save bars would drown the run's own progress
    accelerator = _accelerator(spec)
    torch.manual_seed(spec.seed)  # the same on every rank: any random init (LoRA's A) agrees
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    models = load_models(spec, sources, accelerator.device, resume_dir)
    spec = spec.model_copy(update={"attention": models.attention})  # auto, decided: recorded as run
    if spec.ref_ema is not None:
        models.refs[0] = ema.prepare(models.refs[0])
    trained, optimizer = prepare_trained(accelerator, spec, models)
    kind = sharding(trained)
    if accelerator.num_processes > 1 and accelerator.is_main_process:  # what accelerate made of the launch
        frozen = "sharded (zero3)" if zero3_loading() else "replicated"
        print(f"align: {accelerator.num_processes} processes ({accelerator.distributed_type.value}), policy + "
              f"critic weights {'sharded (' + kind + ')' if kind else 'replicated'}, frozen models {frozen}",
              file=sys.stderr, flush=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(spec, step))
    kl_ctl = AdaptiveKL(spec.kl_coef, spec.kl_target, spec.kl_horizon) if spec.kl_target else FixedKL(spec.kl_coef)
    run = Run(spec, sources, models, trained, accelerator, optimizer, scheduler, kl_ctl, out)
    sampling = Sampling(spec.temperature, spec.top_p, spec.max_new_tokens, models.stops,
                        models.tokenizer.pad_token_id, spec.seed)
    run.engine = make_engine(spec, adapters.base_dir(sources.init), sampling, accelerator.device)
    if resume_dir is not None:
        checkpoints.restore(run, resume_dir)
    elif accelerator.is_main_process:
        checkpoints.clear_previous_run(out)
    accelerator.wait_for_everyone()
    run.clock = StageClock(accelerator.device)  # the first step's time starts here
    return run


def _accelerator(spec: AlignSpec) -> Any:
    """accelerate's ``Accelerator`` for this launch; micro-batches accumulate ``grad_accum`` times
    per optimiser step (accelerate scales the loss, or DeepSpeed does)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    kwargs: dict[str, Any] = {}
    if processes() > 1 and not torch.cuda.is_available():
        # Several processes without GPUs (torchrun): accelerate joins them (gloo) only when told
        # ``cpu`` (accelerate 1.15, checked on CPU-only machines), but ``cpu`` switches DeepSpeed off, which wants gloo named.
        kwargs = {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]} if deepspeed_launch() else {"cpu": True}
    if fsdp_launch():
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


def _optimizer(spec: AlignSpec, models: Models) -> torch.optim.Optimizer:
    """AdamW with eps 1e-5 (Huang et al. 2023, https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo); the critic may have its own learning rate (Zheng et al. 2023, arXiv 2307.04964; OpenRLHF)."""
    # Trainable only (a LoRA policy's frozen base takes no optimiser state); policy in group 0,
    # critic in group 1, which sharding._group_names relies on for DeepSpeed checkpoints.
    groups = [
        {"params": [p for p in models.policy.parameters() if p.requires_grad], "lr": spec.learning_rate},
        {"params": [p for p in models.critic.parameters() if p.requires_grad],
         "lr": spec.value_learning_rate or spec.learning_rate},
    ]
    # torch's fused kernel: one pass over each parameter instead of one per operation (on this 2-core
    # CPU 7x faster than the default for-each path on 156M parameters; the same update up to rounding).
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(groups, eps=spec.adam_eps, weight_decay=spec.weight_decay, fused=fused)


def ppo_step(run: Run, step: int) -> dict[str, Any]:
    """One PPO step on the batch of prompts for 0-based ``step``; returns its metrics."""
    spec, acc, clock = run.spec, run.accelerator, run.clock
    learning_rate = run.optimizer.param_groups[0]["lr"]
    rows = my_rows(acc, spec.batch_size)
    order = batch_indices(len(run.sources.prompts), len(rows) * acc.num_processes, step, spec.seed)
    prompts = [run.sources.prompts[order[i]] for i in rows]
    texts = [run.models.prompt_texts[order[i]] for i in rows]

    # 1. Rollout: sample responses, cut at the end of turn, read policy / reference / critic on them,
    # 2. and score them: sequence reward (+ missing-EOS penalty).
    with bf16_autocast(run):
        roll = rollout(run, texts, prompts, step, sampling_uniforms(spec.seed, step, rows, spec.max_new_tokens), rows)

    # 3. Advantages: the per-token KL penalty on the reward, then GAE over the response, whitened
    # over the global batch (Huang et al. 2023; 2024, arXiv 2403.17031).
    with clock("advantages"):
        kl = reference_kl(run, roll) * roll.mask
        rewards = per_token_rewards(roll.scores, kl, roll.mask, run.kl_ctl.value)
        if spec.whiten_rewards:
            rewards = whiten_global(acc, rewards, roll.mask, shift_mean=False)
        advantages, returns = gae(rewards, roll.values, roll.mask, spec.gamma, spec.gae_lambda)
        if spec.whiten_advantages:
            advantages = whiten_global(acc, advantages, roll.mask)
        advantages = is_corrected(advantages, roll.logprobs, roll.engine_logprobs, spec.rollout_is_cap)
        batch = Trajectory(**samples_of(roll), logprobs=roll.logprobs, values=roll.values,
                           advantages=advantages, returns=returns)

    # 4. Optimise: epochs x minibatches of clipped policy + value loss.
    with clock("optimise"):
        stats = optimise(run, batch, step)

    # 5. Control and log: adapt beta to the global batch's sequence KL (Ziegler et al. 2019).
    metrics = _metrics(run, roll, kl, returns, stats)
    metrics["learning_rate"] = learning_rate
    run.kl_ctl.update(metrics["kl"], spec.batch_size * acc.num_processes)
    return metrics


def bf16_autocast(run: Run) -> Any:
    """bf16 autocast for forward passes with ``spec.bf16`` (set here, not as accelerate's
    ``mixed_precision``, which is fixed once per process). Trained weights stay fp32."""
    return torch.autocast(run.accelerator.device.type, dtype=torch.bfloat16, enabled=run.spec.bf16 is True)


@torch.no_grad()
def rollout(run: Run, texts: list[str], prompts: list[Prompt], step: int, uniforms: torch.Tensor,
            rows: list[int]) -> Rollout:
    """Sample one response per rendered prompt with ``run.engine`` (the hf engine driven by
    ``uniforms``, (b, max_new_tokens); vLLM seeded per global row of ``rows``), read
    the policy's log-probs and entropy, the references', the critic's values and the watch
    models' log-probs on it, and score it.

    Sharded weights (FSDP2, ZeRO-3) are gathered one model at a time: the policy for sampling and
    its log-probs, then each frozen model (``visiting``), then the critic.
    """
    spec, models, tok, device, clock = run.spec, run.models, run.models.tokenizer, run.accelerator.device, run.clock
    enc = encode_prompts(tok, texts, spec.max_prompt_tokens).to(device)
    policy = models.policy
    with full_weights(run.trained, policy):
        with clock("generate"):
            sampled = run.engine.sample(policy, enc["input_ids"], enc["attention_mask"], step=step, rows=rows,
                                        uniforms=uniforms)
            response, mask = truncate_at_stop(sampled.response, models.stops, tok.pad_token_id)
        samples = Samples(enc["input_ids"], enc["attention_mask"].bool(), response, mask)
        with clock("logprobs"):
            both = in_chunks(lambda mb: _logprobs_and_entropy(policy, mb, spec.temperature), samples,
                             spec.forward_batch_size)
    logprobs, entropies = both.unbind(dim=-1)
    with clock("reference"):
        ref_logprobs = torch.stack([_frozen_logprobs(run, m, samples) for m in models.refs], dim=1)
    with clock("values"), full_weights(run.trained, models.critic):
        values = in_chunks(lambda mb: _values(models.critic, mb), samples, spec.forward_batch_size)
    with clock("watch"):
        watch = {name: _frozen_logprobs(run, m, samples) for name, m in models.watch.items()}
    with clock("reward"):
        scores = score(run, samples, prompts, step)
    return Rollout(**samples_of(samples), logprobs=logprobs, entropy=entropies, ref_logprobs=ref_logprobs,
                   values=values, scores=scores, watch_logprobs=watch,
                   engine_logprobs=None if sampled.logprobs is None else sampled.logprobs * mask)


def _frozen_logprobs(run: Run, model: Any, samples: Samples) -> torch.Tensor:
    """Log-probs from a frozen model, brought to the device for this pass if it is offloaded."""
    with visiting(model, run.accelerator.device):
        return _logprobs(model, samples, run.spec)


def _logprobs_and_entropy(model: Any, mb: Samples, temperature: float) -> torch.Tensor:
    logits = response_logits(model, mb, temperature)
    return torch.stack([token_logprobs(logits, mb.response), entropy(logits)], dim=-1)


def _logprobs(model: Any, samples: Samples, spec: AlignSpec) -> torch.Tensor:
    fn = lambda mb: token_logprobs(response_logits(model, mb, spec.temperature), mb.response)  # noqa: E731
    return in_chunks(fn, samples, spec.forward_batch_size)


def _values(critic: Any, mb: Samples) -> torch.Tensor:
    """Critic output at the positions that predict each response token. Shape: (b, t)."""
    mask = mb.attention_mask
    values = critic(input_ids=mb.sequences, attention_mask=mask.long(), position_ids=position_ids(mask))
    return values[:, -mb.response.shape[1] - 1:-1]


def score(run: Run, samples: Samples, prompts: list[Prompt], step: int) -> torch.Tensor:
    """Sequence scores (b,), with the missing-EOS penalty applied when configured; a reward that
    fails says at which (1-based) PPO step, chained to the user's exception if there is one."""
    models = run.models
    reward = models.reward
    with visiting(reward.model if isinstance(reward, ModelReward) else None, run.accelerator.device):
        try:
            scores = sequence_scores(reward, samples, prompts, models.tokenizer, models.stops,
                                     models.template is not None)
        except SoupkitError as exc:
            raise SoupkitError(f"PPO step {step + 1}: {exc}") from exc.__cause__
    if run.spec.missing_eos_penalty is not None:
        scores = missing_eos_penalty(scores, ended(samples.response, samples.mask, models.stops),
                                     run.spec.missing_eos_penalty)
    return scores


def reference_kl(run: Run, roll: Rollout) -> torch.Tensor:
    """Per-token KL estimate against the reference; with several refs in ``mean_kl`` mode, the
    mean of the estimates against each. Shape: (b, t)."""
    estimator = ESTIMATORS[run.spec.kl_estimator]
    return estimator(roll.logprobs.unsqueeze(1), roll.ref_logprobs).mean(dim=1)


def optimise(run: Run, batch: Trajectory, step: int) -> dict[str, float]:
    """``ppo_epochs`` passes of ``minibatches`` optimiser steps, each accumulating ``grad_accum``
    micro-batches; stops early when the epoch's approx KL exceeds ``target_kl``."""
    spec, acc = run.spec, run.accelerator
    b, micro = batch.query.shape[0], micro_batch_size(spec)
    split = one_model_at_a_time(run)
    stats: dict[str, list[float]] = defaultdict(list)
    for epoch in range(spec.ppo_epochs):
        # The same shuffle on every rank, keyed by (seed, step, epoch): no hidden RNG state.
        order = torch.randperm(b, generator=keyed_generator(spec.seed, step, epoch))
        epoch_stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for minibatch in order.split(b // spec.minibatches):
            for rows in minibatch.split(micro):
                mb = batch.select(rows.to(batch.query.device))
                share = token_share(acc, mb.mask)
                scale = share * acc.num_processes  # accelerate divides by grad_accum
                if split:
                    mb_stats = update_one_model_at_a_time(run, mb, scale, step)
                else:
                    with acc.accumulate(run.trained):  # gradients sync on the last micro-batch only
                        losses, mb_stats = minibatch_loss(run, mb, ("policy", "critic"))
                        loss = losses["policy"] + losses["critic"]
                        _check_finite(run, loss, step)
                        acc.backward(loss * scale)
                for key, value in mb_stats.items():
                    epoch_stats[key].append(value * share)
            assert acc.sync_gradients, "a minibatch must end on a gradient-accumulation boundary"
            if not split:
                _optimizer_step(run, run.models.policy, run.models.critic)
            if spec.ref_ema is not None:  # WARP's moving anchor follows every update (arXiv 2406.16768)
                ema.update(run.models.refs[0], run.models.policy, spec.ref_ema)
        for key, values in sum_over_processes(acc, epoch_stats).items():
            stats[key].extend(values)
        if spec.target_kl is not None and _mean(stats["approx_kl"][-spec.minibatches * spec.grad_accum:]) > spec.target_kl:
            break
    run.scheduler.step()
    return {key: _mean(values) for key, values in stats.items()}


def one_model_at_a_time(run: Run) -> bool:
    """Whether policy and critic can be updated one after the other (``update_one_model_at_a_time``).
    Needs one micro-batch per minibatch on one process with whole weights (accumulation and
    DDP/FSDP/DeepSpeed hook one joint backward pass) and no parameter shared between the two."""
    spec, acc = run.spec, run.accelerator
    if spec.grad_accum != 1 or acc.num_processes != 1 or acc.state.deepspeed_plugin is not None:
        return False
    policy = {id(p) for p in run.models.policy.parameters() if p.requires_grad}
    return not any(id(p) in policy for p in run.models.critic.parameters())


def update_one_model_at_a_time(run: Run, mb: Trajectory, scale: float, step: int) -> dict[str, torch.Tensor]:
    """The policy's forward, backward, clipping and AdamW step, then the critic's: only one model's
    activations and fp32 gradients exist at a time, which takes the other's off the peak memory (on
    SmolLM2-135M about a model's gradients, 0.5 GB, and its activations). The same numbers as the joint
    update: the two graphs share no tensor, clipping is per model, and AdamW leaves the parameters
    without a gradient alone. A non-finite critic loss stops the run after the policy's update, which
    no checkpoint then saves."""
    stats: dict[str, torch.Tensor] = {}
    for part, model in (("policy", run.models.policy), ("critic", run.models.critic)):
        losses, part_stats = minibatch_loss(run, mb, (part,))
        _check_finite(run, losses[part], step)
        run.accelerator.backward(losses[part] * scale)
        _optimizer_step(run, model)
        stats.update(part_stats)
    return _ordered(stats)


def minibatch_loss(run: Run, mb: Trajectory, parts: tuple[str, ...]) -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, torch.Tensor]]:
    """``{"policy": policy_loss, "critic": vf_coef * value_loss}`` (the ``parts`` asked for) on one
    micro-batch, with their statistics (detached 0-d tensors, read back once per epoch). Both parts
    come from one forward pass of the wrapped module (which DDP/FSDP/DeepSpeed see); one part from
    that model's forward pass alone."""
    spec = run.spec
    mask, t = mb.attention_mask, mb.response.shape[1]
    args = (mb.sequences, mask.long(), position_ids(mask))
    with bf16_autocast(run):
        if len(parts) == 2:
            logits, values = run.trained(*args, t + 1)
        elif parts == ("policy",):
            logits, values = run.accelerator.unwrap_model(run.trained).logits(*args, t + 1), None
        else:
            logits, values = None, run.models.critic(*args)
    losses: dict[str, torch.Tensor] = {}
    pg_stats: dict[str, torch.Tensor] = {}
    vf_stats: dict[str, torch.Tensor] = {}
    if logits is not None:
        logprobs = token_logprobs(scaled_logits(logits[:, :-1], spec.temperature), mb.response)
        losses["policy"], pg_stats = policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, spec.clip_eps)
        pg_stats = {"policy_loss": losses["policy"].detach(), **pg_stats}
    if values is not None:
        values = values[:, -t - 1:-1]
        vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mb.mask, spec.value_clip_eps)
        losses["critic"] = spec.vf_coef * vf_loss
        vf_stats = {"value_loss": vf_loss.detach(), **vf_stats}
    return losses, _ordered({k: v.float() for k, v in {**pg_stats, **vf_stats}.items()})


def _ordered(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The two losses first, then the rest: one order of ``metrics.jsonl``'s keys whichever update ran."""
    first = [k for k in ("policy_loss", "value_loss") if k in stats]
    return {**{k: stats[k] for k in first}, **{k: v for k, v in stats.items() if k not in first}}


def _optimizer_step(run: Run, *models: Any) -> None:
    """Clip each model's gradient norm on its own, step AdamW (parameters without a gradient are
    left alone) and free the gradients."""
    acc, spec = run.accelerator, run.spec
    if spec.max_grad_norm is not None:
        for model in models:
            acc.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def _check_finite(run: Run, loss: torch.Tensor, step: int) -> None:
    """Stop before a NaN/inf update can reach the weights; earlier checkpoints stay as they are."""
    if torch.isfinite(loss):
        return
    last = checkpoints.latest_checkpoint(run.out)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    raise SoupkitError(f"step {step + 1}: the PPO loss is {loss.item()} (NaN/inf); training stopped, {kept}")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _metrics(run: Run, roll: Rollout, kl: torch.Tensor, returns: torch.Tensor,
             stats: dict[str, float]) -> dict[str, Any]:
    """Per-step metrics of the global batch (every process's rows); ``kl`` is the mean summed
    per-token KL. ``stats`` (the losses') are global token means already. Closes the step's
    clock: ``seconds`` and ``time_<stage>`` are this process's wall time."""
    every = lambda x: gather_rows(run.accelerator, x)  # noqa: E731
    mask, estimator = every(roll.mask) > 0, ESTIMATORS[run.spec.kl_estimator]
    finished = every(ended(roll.response, roll.mask, run.models.stops))
    values = {
        "reward": every(roll.scores).mean(),
        "kl": every(kl).sum(dim=1).mean(),
        "entropy": masked_mean(every(roll.entropy), mask),
        "explained_variance": explained_variance(every(roll.values), every(returns), mask),
        "response_length": mask.sum(dim=1).float().mean(),
        "eos_rate": finished.float().mean(),
        **{f"kl_{name}": every(estimator(roll.logprobs, lp) * roll.mask).sum(dim=1).mean()
           for name, lp in roll.watch_logprobs.items()},
        **engine_metrics(every, roll, run.spec.rollout_is_cap),
    }
    metrics = {"kl_coef": run.kl_ctl.value, **{k: float(v) for k, v in values.items()}, **stats}
    metrics.update(run.clock.lap())
    metrics["tokens_per_s"] = float(mask.sum()) / metrics["seconds"]
    return metrics


def _finish_step(run: Run, step: int, metrics: dict[str, Any]) -> None:
    """Log the step and, every ``save_every`` steps, write a checkpoint (main process only)."""
    if run.accelerator.is_main_process:
        with write_errors(run.out / "metrics.jsonl", lambda: checkpoints.kept(run)):  # listed only on failure
            checkpoints.append_metrics(run.out / "metrics.jsonl", {"step": step, **metrics})
    if checkpoints.saves_at(run.spec, step):
        with run.clock("checkpoint"):
            checkpoints.save(run, step)


def _stop(run: Run, step: int, signum: int) -> None:
    """Stop after ``step`` on a signal: checkpoint it (unless that just happened), raise ``Stopped``.
    Resuming then redoes no step and records none twice."""
    if not checkpoints.saves_at(run.spec, step):
        checkpoints.save(run, step)
    raise Stopped(step, checkpoints.checkpoints_root(run.out) / f"step-{step}", signum)
