"""``soupkit run RECIPE``: the recipe's units of work as a graph by the data they read; what is
complete is skipped, and a change reruns exactly what lies downstream of it.

Units: each ``sft`` run, the ``reward_model``, each soup of ``merge``, each ``align`` run (named
run x seed x kl_coef) and ``eval``. A unit reads paths: models (an SFT run, a soup, the reward
model, an align run, or a directory from outside the recipe) and data files. Its fingerprint is its
own settings plus the fingerprints of the units it reads plus the content (sha256) of the external
files it reads, so a changed soup weight reaches the align runs against that soup and eval, but not
the PPO runs that never read the soup, and a data file edited in place is seen.

A unit is complete when its output holds ``.soupkit-complete``, written last, with its fingerprint,
what it read and a random id; a unit that reads an output made again since (a new id) is redone
too. A unit whose output exists without the marker was interrupted and is redone (align, SFT and
reward-model runs continue from their newest checkpoint). A unit whose inputs changed is redone;
one whose own settings changed is refused unless forced (``--force NAME``), so a changed recipe
never silently replaces results.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError, did_you_mean
from soupkit.launch import main_process, processes
from soupkit.recipe import (
    SWEEP_KEYS,
    AlignSection,
    AlignSpec,
    Recipe,
    load_recipe,
    resolve_names,
    to_plain,
)
from soupkit.stopping import Stopped, deferred
from soupkit.storage import check_writable

STAGES = ("sft", "reward_model", "merge", "align", "eval")
MARKER = ".soupkit-complete"
DISTRIBUTED = ("sft", "reward_model", "align")
"""The stages that train over all processes of a torchrun / accelerate launch."""
Log = Callable[[str], None]


@dataclass(frozen=True)
class Unit:
    """One piece of work: a stage, a name, where it writes, its settings, and the paths it reads."""

    stage: str
    name: str
    output: Path
    settings: dict[str, Any]
    run: Callable[[bool], Any]
    reads: tuple[str, ...] = ()
    legacy: dict[str, Any] | None = None
    """The settings soupkit hashed before the graph (when they differ), so old markers stay valid."""


@dataclass
class Graph:
    """Units in an order where every unit comes after the units it reads."""

    units: list[Unit]
    inputs: dict[str, list[str]] = field(default_factory=dict)
    """Unit name -> names of the units whose outputs it reads."""
    files: dict[str, list[str]] = field(default_factory=dict)
    """Unit name -> external files it reads."""
    fingerprints: dict[str, str] = field(default_factory=dict)
    digests: dict[str, dict[str, Any]] = field(default_factory=dict)
    """External file -> ``file_digest``, read once when the graph is built."""

    def by_name(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)


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


def file_digest(path: str) -> dict[str, Any]:
    """Size, mtime and sha256 of a file. The hash decides whether it changed (an edit that keeps
    size and mtime is still seen; a touch is not a change); size and mtime are kept for people."""
    p = Path(path).expanduser()
    sha = hashlib.sha256()
    try:
        stat = p.stat()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    except OSError as exc:
        raise SoupkitError(f"data file {path}: cannot be read ({exc.strerror})") from None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha.hexdigest()}


# ---------------------------------------------------------------------------------------------
# The graph


def build_graph(plain: list[Unit]) -> Graph:
    """Edges by data: a unit reads another when one of its read paths is that unit's output."""
    _check_outputs(plain)
    producers = {u.output.expanduser().resolve(): u.name for u in plain}
    graph = Graph([])
    for unit in plain:
        found = [_producer(r, producers) for r in unit.reads]
        graph.inputs[unit.name] = list(dict.fromkeys(n for n in found if n and n != unit.name))
        graph.files[unit.name] = sorted({f for r, n in zip(unit.reads, found) if not n for f in _files(r)})
    graph.units = _ordered(plain, graph.inputs)
    graph.digests = {f: file_digest(f) for files in graph.files.values() for f in files}
    for unit in graph.units:
        graph.fingerprints[unit.name] = fingerprint({
            "settings": fingerprint(unit.settings), "files": {f: graph.digests[f]["sha256"] for f in graph.files[unit.name]},
            "inputs": {n: graph.fingerprints[n] for n in graph.inputs[unit.name]}})
    return graph


def _producer(read: str, producers: dict[Path, str]) -> str | None:
    """The unit whose output holds ``read``: the output itself, or a path inside it (an align run's
    ``final``, which a merge of WARP's next round reads)."""
    path = Path(read).expanduser()
    if not str(path):
        return None
    full = path.resolve()
    return next((producers[p] for p in (full, *full.parents) if p in producers), None)


def _files(read: str) -> list[str]:
    """External files behind a read: the file itself, or the ``file.py`` of ``file.py:function``."""
    candidates = [read] + ([read.rsplit(":", 1)[0]] if ":" in read else [])
    return [c for c in candidates if Path(c).expanduser().is_file()]


def _ordered(plain: list[Unit], inputs: dict[str, list[str]]) -> list[Unit]:
    """Depth first from the recipe's order, each unit after what it reads; a cycle is an error."""
    by_name = {u.name: u for u in plain}
    order: list[Unit] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if any(u.name == name for u in order):
            return
        if name in visiting:
            raise SoupkitError(f"{by_name[name].stage} {name} reads its own output (through {', '.join(sorted(visiting))})")
        visiting.add(name)
        for dep in inputs[name]:
            visit(dep)
        visiting.discard(name)
        order.append(by_name[name])

    for unit in plain:
        visit(unit.name)
    return order


def _check_outputs(plain: list[Unit]) -> None:
    seen: dict[Path, str] = {}
    names: dict[str, str] = {}
    for unit in plain:
        if not str(unit.output) or unit.output == Path():
            raise SoupkitError(f"{unit.stage} {unit.name}: no output directory")
        key = unit.output.expanduser().resolve()
        if key in seen:
            raise SoupkitError(f"{unit.stage} {unit.name} and {seen[key]} write to the same directory {unit.output}")
        if unit.name in names or (unit.name in STAGES and unit.name != unit.stage):
            raise SoupkitError(f"{unit.stage} {unit.name}: the name is taken by {names.get(unit.name, 'a stage')}; "
                               "give each run, soup and reward model its own name")
        seen[key], names[unit.name] = f"{unit.stage} {unit.name}", unit.stage


# ---------------------------------------------------------------------------------------------
# Markers: what made an output


def read_marker(unit: Unit) -> dict[str, Any] | None:
    """The unit's marker, or None when it has none or it cannot be read."""
    try:
        data = json.loads((unit.output / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def mark_complete(unit: Unit, graph: Graph) -> None:
    inputs = graph.inputs.get(unit.name, [])
    payload = {"stage": unit.stage, "name": unit.name, "fingerprint": graph.fingerprints[unit.name],
               "settings": fingerprint(unit.settings), "id": uuid.uuid4().hex,
               "inputs": {n: graph.fingerprints[n] for n in inputs},
               "made": {n: (read_marker(graph.by_name(n)) or {}).get("id") for n in inputs},
               "files": {f: graph.digests[f] for f in graph.files.get(unit.name, [])}}
    (unit.output / MARKER).write_text(json.dumps(payload) + "\n")


def state(unit: Unit, graph: Graph) -> tuple[str, str]:
    """``(state, why)``: ``done``; ``stale`` (an input changed or was made again); ``changed`` (its
    own settings changed); ``partial`` (interrupted, or an unreadable marker); or ``new``."""
    if not (unit.output / MARKER).is_file():
        return ("partial", "unfinished") if unit.output.exists() else ("new", "not made yet")
    marker = read_marker(unit)
    if marker is None:
        return "partial", "its completion marker cannot be read"
    if marker.get("fingerprint") == graph.fingerprints[unit.name]:
        return ("done", "complete") if not _remade(unit, graph, marker) else ("stale", _remade(unit, graph, marker))
    if "settings" not in marker:  # written before the graph: its fingerprint chained every earlier stage
        if marker.get("fingerprint") == _legacy_fingerprint(unit, graph):
            return "done", "complete"
        return "changed", "or inputs, by an earlier soupkit"
    if marker["settings"] != fingerprint(unit.settings):
        return "changed", "the recipe changed them"
    return "stale", _changed_inputs(unit, graph, marker) or "its inputs changed"


def _changed_inputs(unit: Unit, graph: Graph, marker: dict[str, Any]) -> str:
    files = marker.get("files", {})
    changed = [f"input {n} changed" for n in graph.inputs[unit.name] if marker.get("inputs", {}).get(n) != graph.fingerprints[n]]
    changed += [f"data file {f} changed" for f in graph.files[unit.name]
                if (files.get(f) or {}).get("sha256") != graph.digests[f]["sha256"]]
    return _listed(changed)


def _listed(reasons: list[str]) -> str:
    """The first two reasons, and how many more."""
    return "; ".join(reasons[:2]) + (f"; and {len(reasons) - 2} more" if len(reasons) > 2 else "")


def _remade(unit: Unit, graph: Graph, marker: dict[str, Any]) -> str:
    """Why the inputs' outputs are not the ones this unit read: ``input X was made again``."""
    made = marker.get("made", {})
    again = [n for n in graph.inputs[unit.name] if n in made and made[n] != (read_marker(graph.by_name(n)) or {}).get("id")]
    return _listed([f"input {n} was made again" for n in again])


def _legacy_fingerprint(unit: Unit, graph: Graph) -> str:
    """The fingerprint soupkit wrote before the graph: the settings and the fingerprints of every
    unit of every earlier stage."""
    legacy: list[str] = []
    for stage in STAGES[:STAGES.index(unit.stage)]:
        upstream = list(legacy)
        legacy += [fingerprint({**(u.legacy or u.settings), "upstream": upstream}) for u in graph.units if u.stage == stage]
    return fingerprint({**(unit.legacy or unit.settings), "upstream": legacy})


# ---------------------------------------------------------------------------------------------
# The units of each stage


def expand_align(spec: AlignSection) -> list[tuple[str, int, float, AlignSpec, Path]]:
    """Every (run, seed, kl_coef) of an align section, with its one-run spec and output directory."""
    from soupkit.recipe import validate

    base = spec.model_dump(exclude=set(SWEEP_KEYS))
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


def units(recipe: Recipe, log: Log) -> list[Unit]:
    """The work ``recipe`` describes, in the recipe's order, each with the paths it reads."""
    from soupkit.merge import greedy, run_merge
    from soupkit.train import train_reward_model, train_sft

    work = [Unit("sft", spec.name, Path(spec.output), to_plain(spec),
                 lambda force, s=spec: train_sft(s, force=force, log=log), (spec.base, spec.data))
            for spec in recipe.sft or []]
    if recipe.reward_model:
        work += [Unit("reward_model", rm.name, Path(rm.output), to_plain(rm),
                      lambda force, rm=rm: train_reward_model(rm, force=force, log=log), (rm.base, rm.data))
                 for rm in recipe.reward_model.members()]
        if (warm := recipe.reward_model.average()) is not None:
            rm = recipe.reward_model
            work.append(Unit("reward_model", rm.name, Path(rm.output), to_plain(warm),
                             lambda force: _warm_average(warm, force), tuple(i.model for i in warm.models)))
    for soup in recipe.soups():
        m = soup.spec
        held_out = tuple(greedy.reads(m.parameters)) if m.method == "greedy" else ()  # its texts or prompts and reward
        work.append(Unit("merge", soup.name, Path(m.output or ""), to_plain(m), lambda force, m=m: run_merge(m, force=force),
                         tuple(i.model for i in m.models) + ((m.base,) if m.base else ()) + held_out))
    runs = expand_align(recipe.align) if recipe.align else []
    work += [_align_unit(name, seed, coef, spec, path, log) for name, seed, coef, spec, path in runs]
    if recipe.eval:
        e = recipe.eval
        reward = e.reward or (recipe.align.reward if recipe.align else "")
        reads = ([str(path) for *_, path in runs] + [e.prompts, reward]
                 + ([e.gold_reward] if e.gold_reward else []) + list(e.references.values())
                 + ([e.path.a, e.path.b] if e.path else []) + _judge_reads(e)
                 + [m for f in e.fronts for m in (f.a, f.b, *f.others.values(), *f.rewards.values())])
        work.append(Unit("eval", "eval", Path(e.output), to_plain(e), lambda force: run_eval(recipe, force=force),
                         tuple(r for r in reads if r), {"eval": to_plain(e), "align": to_plain(recipe.align) if recipe.align else None}))
    return work


def _warm_average(spec: Any, force: bool) -> Any:
    """WARM's reward model: the uniform soup of the members, written by one process."""
    from soupkit.merge import run_merge

    if processes() > 1:
        raise SoupkitError("reward_model.seeds: the WARM average is a merge and runs in one process; rerun "
                           "soupkit run without the launcher (the trained members are kept)")
    return run_merge(spec, force=force)


def _judge_reads(e: Any) -> list[str]:
    """What a judged eval reads besides the runs: its question sets, template file and local judge."""
    if e.judge is None:
        return []
    sets = [s if isinstance(s, str) else s.source for s in e.sets.values()]
    return sets + ([e.judge.template] if e.judge.template else []) + ([] if e.judge.endpoint else [e.judge.model])


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

    reads = (*spec.ref, spec.init or spec.ref[0], spec.reward, spec.prompts, *spec.watch.values())
    return Unit("align", f"{name}/seed-{seed}/kl-{coef:g}", path, to_plain(spec), run, reads)


# ---------------------------------------------------------------------------------------------
# Deciding and running


@dataclass(frozen=True)
class Step:
    """What ``soupkit run`` does with one unit, and why."""

    unit: Unit
    action: str
    """``run``, ``skip`` or ``refuse``."""
    why: str
    state: str
    replace: bool = False
    """Clear the output first (else an interrupted align run resumes from its checkpoint)."""


def decide(unit: Unit, graph: Graph, forced: bool, running: set[str]) -> Step:
    """Run, skip or refuse ``unit``, given the units that run (or ran) before it in this launch."""
    status, why = state(unit, graph)
    again = [n for n in graph.inputs[unit.name] if n in running]
    replace = forced or status in ("stale", "changed", "done") or (status == "partial" and unit.stage != "align")
    if forced:
        return Step(unit, "run", f"forced; {why}", status, replace)
    if status == "done":
        return Step(unit, "run", f"input {again[0]} runs again", status, True) if again else Step(unit, "skip", why, status)
    if status == "changed":
        return Step(unit, "refuse", why, status)
    return Step(unit, "run", why, status, replace)


def plan(recipe: str | Path | Recipe, *, only: Iterable[str] = (), force: Iterable[str] = (),
         overrides: Iterable[str] = (), log: Log = print) -> list[Step]:
    """What ``soupkit run`` would do with each unit it selects, and why (``--dry-run``)."""
    graph = build_graph(units(_loaded(recipe, overrides), log))
    chosen, forced = select(graph, only, "--only"), select(graph, force, "--force")
    steps: list[Step] = []
    for unit in graph.units:
        if unit.name in chosen:
            steps.append(decide(unit, graph, unit.name in forced, {s.unit.name for s in steps if s.action == "run"}))
    return steps


def select(graph: Graph, names: Iterable[str], flag: str) -> set[str]:
    """Unit names chosen by stage names, unit names, or an align run's leading parts (``ppo``,
    ``ppo/seed-0``); nothing given chooses every unit for ``--only`` and none for ``--force``."""
    names = list(names)
    if not names:
        return {u.name for u in graph.units} if flag == "--only" else set()
    chosen: set[str] = set()
    for name in names:
        hits = {u.name for u in graph.units if name == u.stage or name == u.name or u.name.startswith(name + "/")}
        if not hits and name not in STAGES:
            known = list(STAGES) + [u.name for u in graph.units if u.stage != "align" and u.name not in STAGES] + sorted(
                {u.name.split("/")[0] for u in graph.units if u.stage == "align"})
            raise SoupkitError(f"{flag} {name!r}: unknown stage or unit{did_you_mean(name, known)}; "
                               f"stages are {', '.join(STAGES)}; units: {', '.join(known[len(STAGES):]) or 'none'}")
        chosen |= hits
    return chosen


def _loaded(recipe: str | Path | Recipe, overrides: Iterable[str]) -> Recipe:
    return resolve_names(recipe) if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)


def run_pipeline(recipe: str | Path | Recipe, *, only: Iterable[str] = (), force: Iterable[str] = (),
                 overrides: Iterable[str] = (), log: Log = print) -> dict[str, list[str]]:
    """Run the units of ``recipe`` in graph order; returns what happened to each unit, per stage
    (the stages of the units chosen by ``only``, or every stage)."""
    deferred()  # a stop request left by earlier work in this process is not this run's
    only, force = list(only), list(force)
    graph = build_graph(units(_loaded(recipe, overrides), log))
    chosen, forced = select(graph, only, "--only"), select(graph, force, "--force")
    if processes() > 1:
        if not only or any(graph.by_name(n).stage not in DISTRIBUTED for n in chosen):
            raise SoupkitError("under a multi-process launch (torchrun, accelerate launch) soupkit run runs the "
                               f"{', '.join(DISTRIBUTED)} stages only: pick them with --only, and run merge and eval "
                               "in one process")
        if not main_process():
            log = _silent  # one log, from the process that writes the markers
    todo = [u for u in graph.units if u.name in chosen]
    _check_writable(todo, graph)
    report: dict[str, list[str]] = {s: [] for s in STAGES if not only or s in only or any(u.stage == s for u in todo)}
    ran: set[str] = set()
    with _lock_outputs(todo, graph, forced) as held:
        for unit in todo:
            report[unit.stage].append(_run_unit(decide(unit, graph, unit.name in forced, ran), graph, chosen, log))
            if report[unit.stage][-1] == "ran":
                ran.add(unit.name)
            held.release(unit.output)  # written and marked: open to readers again
    return report


def _lock_outputs(todo: list[Unit], graph: Graph, forced: set[str]) -> Any:
    """Lock, before any work, the output of every unit this run may write, so two launches of one
    recipe cannot interleave (issue #16). Each is locked before its marker is read; a complete unit
    that will be skipped is let go at once, so readers of finished outputs are never blocked."""
    from soupkit.locking import writing

    by_output = {u.output: u for u in todo}
    kept: set[str] = set()

    def keep(out: Path) -> bool:
        unit = by_output[out]
        if decide(unit, graph, unit.name in forced, kept).action != "skip":
            kept.add(unit.name)
        return unit.name in kept

    return writing(by_output, keep=keep)


def _check_writable(todo: list[Unit], graph: Graph) -> None:
    """Every output this run will write can be written: an unwritable eval output is refused
    before hours of training, not after them."""
    for unit in todo:
        if state(unit, graph)[0] != "done":
            check_writable(unit.output, into=unit.stage == "align")


def _run_unit(step: Step, graph: Graph, chosen: set[str], log: Log) -> str:
    unit = step.unit
    if step.action == "skip":
        log(f"[{unit.stage}] {unit.name}: complete, skipped")
        return "skipped"
    if step.action == "refuse":
        raise SoupkitError(f"[{unit.stage}] {unit.name}: {unit.output} was made with different settings ({step.why}); "
                           f"pass --force {unit.name} (or --force {unit.stage}) to redo it")
    _check_inputs_complete(unit, graph, chosen)
    doing = "running" if step.state == "new" and step.why == "not made yet" else f"redoing ({step.why})"
    log(f"[{unit.stage}] {unit.name}: {doing} -> {unit.output}")
    # a stale or unfinished output is replaced; an interrupted align run resumes from its checkpoint
    unit.run(step.replace)
    if main_process():
        mark_complete(unit, graph)
    if signum := deferred():  # a stop request during an align run's last step: that run is complete
        raise Stopped.after(unit.name, unit.output, signum)
    return "ran"


def _check_inputs_complete(unit: Unit, graph: Graph, chosen: set[str]) -> None:
    """A unit never runs on an input that is missing or out of date (left out by ``--only``)."""
    for name in graph.inputs[unit.name]:
        status, why = state(graph.by_name(name), graph)
        if status != "done":
            hint = "add it to --only" if name not in chosen else "run it first"
            raise SoupkitError(f"[{unit.stage}] {unit.name}: its input {name} is not up to date ({why}); {hint}")


def _silent(*_: Any) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# eval


def run_eval(recipe: str | Path | Recipe, *, force: bool = False,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate every align run of ``recipe`` as its ``eval:`` section says (``soupkit eval``).
    The eval output is locked throughout; an align run another process is still writing is refused."""
    from soupkit.locking import writing

    recipe = _loaded(recipe, ())
    spec, align = recipe.eval, recipe.align
    if spec is None or align is None:
        raise SoupkitError("eval needs both an align: and an eval: section")
    with writing([Path(spec.output)]):
        return _run_eval(spec, align, sweep_points(recipe), force, progress)


def sweep_points(recipe: Recipe) -> dict[Path, list[tuple[str, str, float]]]:
    """``{model path: [(sweep, axis, value)]}``: where each soup of a sweep sits on it, and the
    sweep's first model as its origin (alpha 0, n = 1: the reference of plain PPO)."""
    points: dict[Path, list[tuple[str, str, float]]] = {}
    for soup in recipe.soups():
        if soup.sweep and soup.axis:
            points.setdefault(_key(soup.spec.output or ""), []).append((soup.sweep, soup.axis, soup.value or 0.0))
            origin = (soup.sweep, soup.axis, 0.0 if soup.axis == "alpha" else 1.0)
            entries = points.setdefault(_key(soup.spec.models[0].model), [])
            entries += [origin] if origin not in entries else []
    return points


def _key(path: str) -> Path:
    return Path(path).expanduser().resolve()


def _run_eval(spec: Any, align: AlignSection, points: dict[Path, list[tuple[str, str, float]]], force: bool,
              progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    from soupkit.evaluation.report import RunResult, evaluate
    from soupkit.locking import check_not_being_written
    from soupkit.rlhf.prompts import load_prompts
    from soupkit.storage import atomic_output_dir

    runs = [RunResult(name, seed, coef, path / "final", _sampling(spec, run_spec),
                      tuple(points.get(_key(run_spec.ref[0]), [])) if len(run_spec.ref) == 1 else ())
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
    axes = _front_axes(spec)
    judge = _judge_job(spec)
    with atomic_output_dir(Path(spec.output), force) as tmp:
        path = _path_report(spec, align) if spec.path else None
        results = evaluate(runs, prompts, tmp, reward=spec.reward or align.reward, gold=spec.gold_reward,
                           references=spec.references, baseline=baseline, n_boot=spec.bootstrap, path=path,
                           progress=progress, judge=judge)
        if spec.fronts:
            from soupkit.evaluation.front import write_fronts

            results["fronts"] = write_fronts(spec, axes, prompts, _sampling(spec, align), spec.reward or align.reward, tmp)
        return results


def _judge_job(spec: Any) -> Any:
    """The judged evaluation ``eval.judge`` asks for (None without one), its inputs checked now."""
    if spec.judge is None:
        return None
    from soupkit.evaluation.judging import prepare

    return prepare(spec)


def _front_axes(spec: Any) -> list[list[str]]:
    """Each front's two axes, checked against the metrics it will have, and its models' presence,
    before any model loads."""
    primary = "gold" if spec.gold_reward else "reward"
    out = []
    for front in spec.fronts:
        if not front.axes and not spec.references:
            raise SoupkitError(f"eval.fronts.{front.name}.axes: give two metrics (no eval.references for a KL axis)")
        known = ["reward", *(["gold"] if spec.gold_reward else []), *front.rewards, *(f"kl_{r}" for r in spec.references)]
        out.append(front.axes or [f"kl_{next(iter(spec.references))}", primary])
        if unknown := [a for a in out[-1] if a not in known]:
            raise SoupkitError(f"eval.fronts.{front.name}.axes: {unknown[0]!r} is not measured; known: {', '.join(known)}")
        _check_front_models(front)
    return out


def _check_front_models(front: Any) -> None:
    models = {"a": front.a, "b": front.b, **{f"others.{n}": p for n, p in front.others.items()}}
    for key, path in models.items():
        if not Path(path).expanduser().exists():
            raise SoupkitError(f"eval.fronts.{front.name}.{key}: {path} not found; make it first (an align "
                               "run's final policy, a soup)")


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
