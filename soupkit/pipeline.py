"""``soupkit run RECIPE``: the recipe's stages in order, skipping the ones already complete.

Stages: ``sft`` (each ingredient run), ``reward_model``, ``merge``, ``align`` (each named run x seed
x kl_coef) and ``eval``. A unit of work is complete when its output holds ``.soupkit-complete``,
written last, with a hash of the settings that made it. A unit whose output exists without the
marker was interrupted and is redone (align, SFT and reward-model runs continue from their newest
checkpoint); one whose marker hash differs from the recipe is refused unless the stage is forced,
so a changed recipe never silently reuses stale results.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError
from soupkit.launch import main_process, processes
from soupkit.recipe import AlignSpec, Recipe, load_recipe, to_plain
from soupkit.stopping import Stopped
from soupkit.storage import check_writable

STAGES = ("sft", "reward_model", "merge", "align", "eval")
MARKER = ".soupkit-complete"
DISTRIBUTED = ("sft", "reward_model", "align")
"""The stages that train over all processes of a torchrun / accelerate launch."""
Log = Callable[[str], None]


@dataclass(frozen=True)
class Unit:
    """One piece of work: a stage, a name, where it writes, and the settings it depends on."""

    stage: str
    name: str
    output: Path
    settings: dict[str, Any]
    run: Callable[[bool], Any]


def fingerprint(settings: dict[str, Any]) -> str:
    """A hash of the settings, and of the contents of any ``.jinja`` chat template they name (an
    edited template file changes every output rendered with it)."""
    digests = template_digests(settings)
    payload = {"settings": settings, "templates": digests} if digests else settings  # old markers stay valid
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def template_digests(data: Any) -> dict[str, str]:
    """``{path: sha256}`` of every ``chat_template: PATH.jinja`` file found in nested settings."""
    if isinstance(data, list):
        return {k: v for item in data for k, v in template_digests(item).items()}
    if not isinstance(data, dict):
        return {}
    out = {k: v for item in data.values() for k, v in template_digests(item).items()}
    value = data.get("chat_template")
    if isinstance(value, str) and value.endswith(".jinja") and Path(value).expanduser().is_file():
        out[value] = hashlib.sha256(Path(value).expanduser().read_bytes()).hexdigest()
    return out


def state(unit: Unit) -> str:
    """``done``, ``stale`` (made by other settings or from other inputs), ``partial`` or ``new``."""
    marker = unit.output / MARKER
    if marker.is_file():
        try:
            made_by = json.loads(marker.read_text()).get("fingerprint")
        except (json.JSONDecodeError, AttributeError):
            return "partial"  # an unreadable marker proves nothing: redo
        return "done" if made_by == fingerprint(unit.settings) else "stale"
    return "partial" if unit.output.exists() else "new"


def mark_complete(unit: Unit) -> None:
    payload = {"stage": unit.stage, "name": unit.name, "fingerprint": fingerprint(unit.settings)}
    (unit.output / MARKER).write_text(json.dumps(payload) + "\n")


# ---------------------------------------------------------------------------------------------
# The units of each stage


def expand_align(spec: AlignSpec) -> list[tuple[str, int, float, AlignSpec, Path]]:
    """Every (method, seed, kl_coef) run of an align section, with its spec and output directory."""
    from soupkit.recipe import validate

    base = spec.model_dump(exclude={"runs", "seeds", "kl_coefs"})
    root = Path(spec.output or "runs/align")
    out = []
    for name, overrides in (spec.runs or {"align": {}}).items():
        # a run may narrow or widen the grid for itself (e.g. a kl_coef sweep for two methods only)
        overrides = dict(overrides)
        if "output" in overrides:
            raise SoupkitError(f"align.runs.{name}.output: runs write under align.output/{name}; set align.output")
        seeds = _grid(overrides, "seeds", "seed") or spec.seeds or [spec.seed]
        coefs = _grid(overrides, "kl_coefs", "kl_coef") or spec.kl_coefs or [spec.kl_coef]
        for seed in seeds:
            for coef in coefs:
                path = root / name / f"seed-{seed}" if len(coefs) == 1 else root / name / f"kl-{coef:g}" / f"seed-{seed}"
                data = {**base, **overrides, "seed": seed, "kl_coef": coef, "output": str(path)}
                out.append((name, seed, coef, validate(AlignSpec, data, f"align.runs.{name}"), path))
    return out


def _grid(overrides: dict[str, Any], many: str, one: str) -> list[Any] | None:
    """A run's own grid axis: ``kl_coefs: [..]``, or a single ``kl_coef``, taken out of its overrides."""
    if many in overrides and one in overrides:
        raise SoupkitError(f"align.runs: give {many} or {one}, not both")
    if many in overrides:
        return list(overrides.pop(many))
    return [overrides.pop(one)] if one in overrides else None


def units(recipe: Recipe, log: Log) -> dict[str, list[Unit]]:
    """The work each stage of ``recipe`` describes, in order."""
    from soupkit.merge import run_merge
    from soupkit.train import train_reward_model, train_sft

    work: dict[str, list[Unit]] = {stage: [] for stage in STAGES}
    for spec in recipe.sft or []:
        work["sft"].append(Unit("sft", spec.name, Path(spec.output), to_plain(spec),
                                lambda force, s=spec: train_sft(s, force=force, log=log)))
    if recipe.reward_model:
        rm = recipe.reward_model
        work["reward_model"].append(Unit("reward_model", "reward_model", Path(rm.output), to_plain(rm),
                                         lambda force: train_reward_model(rm, force=force, log=log)))
    if recipe.merge:
        m = recipe.merge
        work["merge"].append(Unit("merge", "soup", Path(m.output or ""), to_plain(m),
                                  lambda force: run_merge(m, force=force)))
    if recipe.align:
        work["align"] = [_align_unit(name, seed, coef, spec, path, log)
                         for name, seed, coef, spec, path in expand_align(recipe.align)]
    if recipe.eval:
        work["eval"].append(Unit("eval", "eval", Path(recipe.eval.output),
                                 {"eval": to_plain(recipe.eval), "align": to_plain(recipe.align) if recipe.align else None},
                                 lambda force: run_eval(recipe, force=force)))
    return work


def _align_unit(name: str, seed: int, coef: float, spec: AlignSpec, path: Path, log: Log) -> Unit:
    from soupkit.rlhf import train
    from soupkit.rlhf.checkpoints import latest_checkpoint

    def run(force: bool) -> Any:
        resume = not force and latest_checkpoint(path) is not None
        if resume:
            log(f"  resuming {name} seed {seed} from {latest_checkpoint(path).name}")
        # An interrupted run with no checkpoint yet starts again: ``force`` lets align clear what it
        # wrote (on the main process only, so several processes never race to delete it).
        try:
            return train(spec, out=path, force=force or (not resume and path.exists()), resume=resume)
        except Stopped as exc:  # soupkit run resumes by itself
            raise Stopped(exc.step, exc.checkpoint, exc.signum, "rerun soupkit run to continue") from None

    return Unit("align", f"{name}/seed-{seed}/kl-{coef:g}", path, to_plain(spec), run)


# ---------------------------------------------------------------------------------------------
# Running


def run_pipeline(recipe: str | Path | Recipe, *, only: Iterable[str] = (), force: Iterable[str] = (),
                 overrides: Iterable[str] = (), log: Log = print) -> dict[str, list[str]]:
    """Run the stages of ``recipe`` in order; returns what happened to each unit, per stage."""
    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    only, force = _check_stages(only, "--only"), _check_stages(force, "--force")
    if processes() > 1:
        if not only or not only <= set(DISTRIBUTED):
            raise SoupkitError("under a multi-process launch (torchrun, accelerate launch) soupkit run runs the "
                               f"{', '.join(DISTRIBUTED)} stages only: pick them with --only, and run merge and eval "
                               "in one process")
        if not main_process():
            log = _silent  # one log, from the process that writes the markers
    plan = chain_upstream(units(loaded, log))
    _check_outputs(plan)
    _check_writable(plan, only)
    report: dict[str, list[str]] = {}
    upstream_ran = False
    with _lock_outputs(plan, only, force) as held:
        for stage in STAGES:
            if only and stage not in only:
                continue
            report[stage] = [_run_unit(u, stage in force, upstream_ran, log) for u in plan[stage]]
            upstream_ran = upstream_ran or "ran" in report[stage]
            for unit in plan[stage]:
                held.release(unit.output)  # written and marked: open to readers again
    return report


def _lock_outputs(plan: dict[str, list[Unit]], only: set[str], force: set[str]) -> Any:
    """Lock, before any work, the output of every unit this run may write, so two launches of one
    recipe cannot interleave (issue #16). Each is locked before its marker is read; a complete unit
    that will be skipped is let go at once, so readers of finished stages are never blocked."""
    from soupkit.locking import writing

    chosen = {u.output: u for stage in STAGES if not only or stage in only for u in plan[stage]}
    return writing(chosen, keep=lambda out: state(chosen[out]) != "done" or chosen[out].stage in force)


def chain_upstream(plan: dict[str, list[Unit]]) -> dict[str, list[Unit]]:
    """Each unit's settings also hold the fingerprints of every earlier stage's units, so a changed
    SFT, reward model or soup makes the align runs and eval built on it stale, not silently reused."""
    chained: dict[str, list[Unit]] = {}
    upstream: list[str] = []
    for stage in STAGES:
        chained[stage] = [Unit(u.stage, u.name, u.output, {**u.settings, "upstream": list(upstream)}, u.run)
                          for u in plan[stage]]
        upstream += [fingerprint(u.settings) for u in chained[stage]]
    return chained


def _check_stages(stages: Iterable[str], flag: str) -> set[str]:
    chosen = set(stages)
    unknown = chosen - set(STAGES)
    if unknown:
        raise SoupkitError(f"{flag} {sorted(unknown)[0]!r}: unknown stage; stages are {', '.join(STAGES)}")
    return chosen


def _check_outputs(plan: dict[str, list[Unit]]) -> None:
    seen: dict[Path, str] = {}
    for stage in STAGES:
        for unit in plan[stage]:
            if not str(unit.output) or unit.output == Path():
                raise SoupkitError(f"{stage} {unit.name}: no output directory")
            key = unit.output.resolve()
            if key in seen:
                raise SoupkitError(f"{stage} {unit.name} and {seen[key]} write to the same directory {unit.output}")
            seen[key] = f"{stage} {unit.name}"


def _check_writable(plan: dict[str, list[Unit]], only: set[str]) -> None:
    """Every output this run will write can be written: an unwritable eval output is refused
    before hours of training, not after them."""
    for stage in STAGES:
        for unit in plan[stage] if not only or stage in only else []:
            if state(unit) != "done":
                check_writable(unit.output, into=stage == "align")


def _run_unit(unit: Unit, forced: bool, upstream_ran: bool, log: Log) -> str:
    status = state(unit)
    if status == "done" and not forced:
        log(f"[{unit.stage}] {unit.name}: complete, skipped")
        return "skipped"
    if status == "stale" and not (forced or upstream_ran):
        raise SoupkitError(f"[{unit.stage}] {unit.name}: {unit.output} was made with different settings or "
                           f"inputs; pass --force {unit.stage} to redo it")
    log(f"[{unit.stage}] {unit.name}: {'redoing' if status != 'new' else 'running'} -> {unit.output}")
    # a stale or unfinished output is replaced; an interrupted align run resumes from its checkpoint
    unit.run(forced or status == "stale" or (status == "partial" and unit.stage != "align"))
    if main_process():
        mark_complete(unit)
    return "ran"


def _silent(*_: Any) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# eval


def run_eval(recipe: str | Path | Recipe, *, force: bool = False,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate every align run of ``recipe`` as its ``eval:`` section says (``soupkit eval``).
    The eval output is locked throughout; an align run another process is still writing is refused."""
    from soupkit.locking import writing

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    spec, align = recipe.eval, recipe.align
    if spec is None or align is None:
        raise SoupkitError("eval needs both an align: and an eval: section")
    with writing([Path(spec.output)]):
        return _run_eval(spec, align, force, progress)


def _run_eval(spec: Any, align: AlignSpec, force: bool, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    from soupkit.evaluation.report import RunResult, evaluate
    from soupkit.locking import check_not_being_written
    from soupkit.rlhf.prompts import load_prompts
    from soupkit.storage import atomic_output_dir

    runs = [RunResult(name, seed, coef, path / "final", _sampling(spec, run_spec))
            for name, seed, coef, run_spec, path in expand_align(align)]
    check_not_being_written([r.path.parent for r in runs], "eval: align run")  # not a run half done
    check_writable(Path(spec.output))
    missing = [str(r.path) for r in runs if not (r.path / "config.json").is_file()]
    if missing:
        raise SoupkitError(f"eval: align run output {missing[0]} is missing; run the align stage first")
    prompts = load_prompts(spec.prompts, spec.prompt_field, spec.prompt_split)
    baseline = spec.baseline or runs[0].method
    if baseline not in {r.method for r in runs}:
        raise SoupkitError(f"eval.baseline: {baseline!r} is not an align run ({', '.join(sorted({r.method for r in runs}))})")
    with atomic_output_dir(Path(spec.output), force) as tmp:
        path = _path_report(spec, align) if spec.path else None
        return evaluate(runs, prompts, tmp, reward=spec.reward or align.reward, gold=spec.gold_reward,
                        references=spec.references, baseline=baseline, n_boot=spec.bootstrap, path=path,
                        progress=progress)


def _sampling(spec: Any, run: AlignSpec) -> Any:
    """The run's own sampling settings, with eval's overrides where given."""
    from soupkit.evaluation.sampling import Sampling

    return Sampling(spec.max_new_tokens or run.max_new_tokens, spec.temperature or run.temperature,
                    run.top_p, spec.seed, run.max_prompt_tokens, spec.chat_template or run.chat_template)


def _path_report(spec: Any, align: AlignSpec) -> dict[str, Any]:
    """Loss and reward along alpha between ``path.a`` and ``path.b`` (soupkit inspect's path),
    the reward sampled and scored as the eval rows beside it (the align section's settings)."""
    from soupkit.diagnostics.report import report

    how = _sampling(spec, align)
    result = report([spec.path.a, spec.path.b], prompts=spec.prompts, path=True, reward=spec.reward or align.reward,
                    points=spec.path.points, prompt_split=spec.prompt_split, chat_template=how.chat_template,
                    sampling=how)
    return result["path"]
