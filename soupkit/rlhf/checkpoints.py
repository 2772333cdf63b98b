"""What a PPO run keeps on disk: resumable checkpoints under ``OUT/checkpoints/step-N``, the
metrics log ``OUT/metrics.jsonl`` and the final policy ``OUT/final``.

A checkpoint holds the policy and critic (HF format), and ``trainer_state.pt``: optimiser,
scheduler, RNG states, KL controller and the step (the prompt order is a function of the step,
see ``prompts.batch_indices``). Each is written to a temporary sibling and renamed, so a run
killed mid-save leaves the previous checkpoint intact. The first half of this module reads and
writes the files; the second (``save``, ``restore``, ``write_final``) does it for a running
``trainer.Run``, gathering sharded weights and optimiser state on every process first.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from soupkit.errors import SoupkitError
from soupkit.provenance import write_provenance
from soupkit.recipe import AlignSpec, resume_settings
from soupkit.rlhf import ema
from soupkit.rlhf.global_batch import global_batch_size
from soupkit.rlhf.sharding import full_optimizer_state, full_state_dicts, load_optimizer_state
from soupkit.storage import atomic_output_dir, check_free_space, check_output_free, write_errors

if TYPE_CHECKING:
    from soupkit.rlhf.trainer import Run

TRAINED = ("policy", "critic.seq_cls")
"""Where policy and critic sit in ``PolicyAndValue``: the names checkpoints gather them by."""

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_root(out: Path) -> Path:
    return out / "checkpoints"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, path)``, oldest first."""
    root = checkpoints_root(out)
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if match and (path / "trainer_state.pt").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def save_checkpoint(out: Path, step: int, policy: Any, critic: Any, tokenizer: Any,
                    state: dict[str, Any], keep: int, weights: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``step-N`` atomically, then drop all but the newest ``keep`` (0 = keep all).
    ``weights``: whole state dicts ``{"policy": ..., "critic.seq_cls": ...}`` when the modules
    themselves hold shards (``sharding.full_state_dicts``)."""
    final = checkpoints_root(out) / f"step-{step}"
    weights = weights or {}
    with atomic_output_dir(final, force=True) as tmp:
        policy.save_pretrained(tmp / "policy", state_dict=weights.get("policy"))
        tokenizer.save_pretrained(tmp / "policy")
        critic.save_pretrained(tmp / "critic", state_dict=weights.get("critic.seq_cls"))
        with open(tmp / "trainer_state.pt", "wb") as f:  # through Python's file: a full disk is an OSError
            torch.save(state, f)
    if keep:
        for _, old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Our own file, read with ``weights_only=True`` all the same (tensors and plain data only)."""
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from: sampling, minibatch shuffles."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def append_metrics(path: Path, metrics: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Complete lines of ``metrics.jsonl`` (a line cut by a kill is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps <= ``step``: later ones are redone after a resume."""
    rows = [row for row in read_metrics(path) if row.get("step", 0) <= step]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# A running trainer's checkpoints.


def check_output(out: Path, force: bool, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuse to clobber a previous run."""
    if resume:
        found = latest_checkpoint(out)
        if found is None:
            raise SoupkitError(f"--resume: no checkpoint under {checkpoints_root(out)}")
        return found
    check_output_free(out, force)
    return None


def clear_previous_run(out: Path) -> None:
    """With --force over an old run, drop only what align writes, so a later --resume cannot pick
    up a stale checkpoint (other files in OUT are left alone)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(checkpoints_root(out), ignore_errors=True)


def saves_at(spec: AlignSpec, step: int) -> bool:
    """Whether a checkpoint is written after ``step`` (the last step writes ``final/`` instead)."""
    return bool(spec.save_every) and step % spec.save_every == 0 and step < spec.steps


def kept(run: Run) -> str:
    """What survives a failed write: the newest checkpoint, which --resume would continue from."""
    last = latest_checkpoint(run.out)
    if last is None:
        return "no checkpoint was written yet, so --resume has nothing to continue from"
    return f"the previous checkpoint {last} is intact and --resume will use it"


def checkpoint_bytes(run: Run) -> int:
    """Bytes one checkpoint takes: policy (only its adapter with LoRA) and critic weights, AdamW's
    two moments per trained parameter, and the moving reference of ``ref_ema``. Sharded parameters
    count whole (checkpoints hold whole tensors); tokenizer and RNG files are left out (kilobytes to
    a few MB)."""
    def size(p: torch.Tensor) -> int:
        return (getattr(p, "ds_numel", None) or p.numel()) * p.element_size()

    policy, critic = run.models.policy, run.models.critic
    trained = [p for p in (*policy.parameters(), *critic.parameters()) if p.requires_grad]
    saved = [p for p in policy.parameters() if p.requires_grad or not run.spec.lora_rank]
    moving = sum(map(size, run.models.refs[0].parameters())) if run.spec.ref_ema is not None else 0  # align.ref_ema
    return sum(map(size, saved)) + sum(map(size, critic.parameters())) + 2 * sum(map(size, trained)) + moving


def check_space(run: Run) -> None:
    """Refuse to start a run that will checkpoint when ``OUT``'s filesystem cannot hold one
    (each save checks again: the disk may fill while the run goes on)."""
    saves = any(saves_at(run.spec, s) for s in range(run.start_step + 1, run.spec.steps))
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
    target = checkpoints_root(run.out) / f"step-{step}"
    check_free_space(run.out, checkpoint_bytes(run), f"checkpoint {target}", kept(run))
    state = {"step": step, "optimizer": optimizer, "scheduler": run.scheduler.state_dict(),
             "kl_ctl": run.kl_ctl.state_dict(), "rng": rng_state(), "spec": resume_settings(run.spec),
             "global_batch_size": global_batch_size(acc, run.spec.batch_size)}
    if run.spec.ref_ema is not None:  # the moving reference is state: a resumed run continues its average
        state["ema_ref"] = ema.state(run.models.refs[0])
    # A LoRA policy saves its adapter only; resuming rebuilds it on the init's weights.
    with write_errors(target, kept(run)):
        return save_checkpoint(run.out, step, run.models.policy, run.models.critic.seq_cls,
                               run.models.tokenizer, state, run.spec.keep_checkpoints, weights)


def restore(run: Run, resume_dir: Path) -> None:
    """Continue exactly: optimiser, schedule, beta, RNG and step; later metric lines are dropped."""
    state = load_trainer_state(resume_dir)
    changed = sorted(k for k, v in resume_settings(run.spec).items() if state.get("spec", {}).get(k, v) != v)
    now = global_batch_size(run.accelerator, run.spec.batch_size)
    if state.get("global_batch_size", now) != now:
        changed.append(f"the global batch ({state['global_batch_size']} = batch_size x processes, now {now})")
    if changed:
        raise SoupkitError(f"--resume: {resume_dir} was made with other settings for {', '.join(changed)}; "
                           "resume with the same settings, or start a new --out")
    if any(isinstance(key, int) for key in state["optimizer"].get("state", {})):
        raise SoupkitError(f"--resume: {resume_dir} was written by an earlier soupkit whose optimiser state is "
                           "keyed by position; it cannot be resumed, start a new --out")
    if run.spec.ref_ema is not None:
        ema.load(run.models.refs[0], state.get("ema_ref"), str(resume_dir))
    load_optimizer_state(run.trained, run.optimizer, state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.kl_ctl.load_state_dict(state["kl_ctl"])
    set_rng_state(state["rng"])
    run.start_step = int(state["step"])
    if run.accelerator.is_main_process:
        truncate_metrics(run.out / "metrics.jsonl", run.start_step)


def write_final(run: Run) -> Path:
    """``OUT/final``: the policy in HF format with its tokenizer and provenance, written atomically."""
    acc = run.accelerator
    acc.wait_for_everyone()
    final = run.out / "final"
    weights = full_state_dicts(run.trained, TRAINED)  # a collective when sharded
    if acc.is_main_process:
        with write_errors(final, kept(run)), atomic_output_dir(final, force=True) as tmp:
            plain_policy(run.models.policy).save_pretrained(tmp, state_dict=weights and weights[TRAINED[0]])
            run.models.tokenizer.save_pretrained(tmp)
            write_provenance(tmp, {"align": run.spec.model_dump(mode="json")}, _card(run))
    return final


def plain_policy(policy: Any) -> Any:
    """The policy as a plain transformers model: a LoRA adapter is merged into its base (the last
    use of the policy, so merging in place is fine)."""
    return policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy


def _card(run: Run) -> str:
    spec = run.spec
    last = (read_metrics(run.out / "metrics.jsonl") or [{}])[-1]
    return (
        "# soupkit align: PPO policy\n\n"
        f"- reference: {', '.join(spec.ref)}" + (f" ({spec.ref_mode})" if len(spec.ref) > 1 else "") + "\n"
        f"- policy init: {spec.init or spec.ref[0]}\n- reward: {spec.reward}\n- prompts: {spec.prompts}\n"
        f"- steps: {spec.steps}, batch size {spec.batch_size}, kl_coef {spec.kl_coef} ({spec.kl_estimator})\n"
        f"- last step: reward {last.get('reward', float('nan')):.4f}, kl {last.get('kl', float('nan')):.4f}\n\n"
        "Per-step metrics are in ../metrics.jsonl; the full settings in soupkit_recipe.yaml.\n"
    )
