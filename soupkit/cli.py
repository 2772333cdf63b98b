"""The command line: parse, call one library function, render with rich. No maths here.

Heavy libraries are imported inside the commands, so ``soupkit --help`` stays instant.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from soupkit.errors import SoupkitError
from soupkit.stopping import Stopped

app = typer.Typer(
    name="soupkit",
    help="Model soups for LLMs, soup diagnostics, and PPO against any reference (SALSA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
F = TypeVar("F", bound=Callable[..., Any])
DEBUG = {"on": False}
"""``--debug`` / ``SOUPKIT_DEBUG=1`` for this invocation (set by ``options``, read by ``user_errors``)."""


@app.callback()
def options(
    debug: Annotated[bool, typer.Option("--debug", envvar="SOUPKIT_DEBUG",
                                        help="On an error, also print its traceback (yours too, from a reward function).")] = False,
) -> None:
    """Model soups for LLMs, soup diagnostics, and PPO against any reference (SALSA)."""
    from soupkit.launch import quiet_deepspeed_detection

    DEBUG["on"] = debug
    quiet_deepspeed_detection()


def user_errors(fn: F) -> F:
    """Print a ``SoupkitError`` as one line on stderr and exit with code 2 (no traceback; with
    ``--debug`` the traceback, with the exception it was raised from, comes first); a run
    stopped by a signal prints where it stopped and exits with 128 + the signal number."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SoupkitError as exc:
            if DEBUG["on"]:
                import traceback

                traceback.print_exception(exc, file=sys.stderr)
            _stderr().print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(2) from None
        except Stopped as exc:
            _stopped(exc)

    return wrapper  # type: ignore[return-value]


def _stopped(exc: Stopped) -> None:
    from soupkit.launch import main_process

    if main_process():  # every process stopped at the same step; one line says so
        _stderr().print(str(exc), highlight=False, markup=False)
    _end_processes(exc.exit_code)
    raise typer.Exit(exc.exit_code) from None


def _stderr() -> Any:
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def _console() -> Any:
    from rich.console import Console

    return Console(soft_wrap=True)


def _bytes_progress(description: str) -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=_stderr(), transient=True)


CHAT_HELP = "Chat template: auto (the tokenizer's, if any), always, never, chatml, or a .jinja file."


@app.command()
@user_errors
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with a merge: section.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (overrides merge.output).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (.bin) checkpoints; they can run code.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: merge.dtype=float32.")] = None,
) -> None:
    """Merge the models of RECIPE's merge: section into one checkpoint."""
    import time

    from soupkit.merge import load_merge_spec, run_merge
    from soupkit.recipe import load_recipe

    loaded = load_recipe(recipe, set_ or [])
    if loaded.merge is None:
        raise SoupkitError(f"{recipe}: no merge: section")
    start = time.perf_counter()
    with _bytes_progress("merging") as bar:
        task = bar.add_task("merging", total=None)
        output = run_merge(loaded, out=out, force=force, allow_pickle=allow_pickle,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))
    spec = load_merge_spec(loaded)
    _console().print(f"[green]wrote[/] {output}  ({spec.method} of {len(spec.models)} models, "
                     f"{time.perf_counter() - start:.1f} s)")


@app.command()
@user_errors
def align(
    recipe: Annotated[Path | None, typer.Argument(help="Optional recipe YAML with an align: section.")] = None,
    ref: Annotated[list[str] | None, typer.Option("--ref", help="Frozen KL reference (dir or Hub id); repeat for several.")] = None,
    reward: Annotated[str | None, typer.Option("--reward", help="Reward model dir, or module:function / file.py:function.")] = None,
    prompts: Annotated[str | None, typer.Option("--prompts", help="Prompts: .jsonl or a dataset (any TRL format), or .txt.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (overrides align.output).")] = None,
    init: Annotated[str | None, typer.Option("--init", help="Policy start (default: the reference).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="PPO steps.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Prompts per step.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Longest response.")] = None,
    learning_rate: Annotated[float | None, typer.Option("--learning-rate", help="Policy learning rate.")] = None,
    kl_coef: Annotated[float | None, typer.Option("--kl-coef", help="KL penalty coefficient (beta).")] = None,
    ppo_epochs: Annotated[int | None, typer.Option("--ppo-epochs", help="Passes over each batch.")] = None,
    minibatches: Annotated[int | None, typer.Option("--minibatches", help="Minibatches per pass.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    watch: Annotated[list[str] | None, typer.Option("--watch", help="Also log kl_NAME against model PATH: NAME=PATH.")] = None,
    save_every: Annotated[int | None, typer.Option("--save-every", help="Checkpoint every N steps (0 = never).")] = None,
    lora_rank: Annotated[int | None, typer.Option("--lora-rank", help="Train a LoRA adapter of this rank (0 = full).")] = None,
    bf16: Annotated[bool, typer.Option("--bf16", help="Frozen models in bf16, forwards under bf16 autocast.")] = False,
    offload_frozen: Annotated[bool, typer.Option("--offload-frozen", help="Keep ref/reward/watch models on the CPU between passes.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in backward.")] = False,
    chat_template: Annotated[str | None, typer.Option("--chat-template", help=CHAT_HELP)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a setting: align.kl_estimator=k3.")] = None,
) -> None:
    """PPO on a policy with a per-token KL penalty against a frozen reference (a soup, an SFT model).

    Data parallel: torchrun --nproc_per_node N -m soupkit align ... (or accelerate launch -m soupkit align ...).
    """
    from soupkit.launch import main_process
    from soupkit.rlhf import build_spec, train
    from soupkit.rlhf.config import parse_watch

    flags = dict(ref=ref, reward=reward, prompts=prompts, init=init, steps=steps, batch_size=batch_size,
                 max_new_tokens=max_new_tokens, learning_rate=learning_rate, kl_coef=kl_coef,
                 ppo_epochs=ppo_epochs, minibatches=minibatches, seed=seed, save_every=save_every,
                 watch=parse_watch(watch or []), output=str(out) if out else None, lora_rank=lora_rank,
                 bf16=bf16 or None, offload_frozen=offload_frozen or None,
                 gradient_checkpointing=gradient_checkpointing or None, chat_template=chat_template)
    spec = build_spec(recipe, flags, set_ or [])
    bar = _steps_progress()  # started on the first step, so input errors print without a bar
    task = bar.add_task("align", total=spec.steps, reward=float("nan"), kl=float("nan"))

    def progress(done: int, total: int, metrics: dict[str, Any]) -> None:
        bar.start()
        bar.update(task, completed=done, total=total, reward=metrics["reward"], kl=metrics["kl"])

    try:
        final = train(spec, resume=resume, force=force, progress=progress)
    finally:
        bar.stop()
    if main_process():  # one line per run, not per process
        _console().print(f"[green]wrote[/] {final}  (metrics: {final.parent / 'metrics.jsonl'})")
    _end_processes()


def _count_progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=_stderr(), transient=True)


def _steps_progress() -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    "reward {task.fields[reward]:.3f}  kl {task.fields[kl]:.3f}", TimeElapsedColumn(),
                    TimeRemainingColumn(), console=_stderr(), transient=False)


@app.command()
@user_errors
def inspect(
    models: Annotated[list[str], typer.Argument(help="Two or more checkpoints (directories or Hub ids).")],
    base: Annotated[str | None, typer.Option("--base", help="Common base model: task-vector cosine and sign conflicts.")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="Probe texts: .jsonl (any TRL format, or text) or .txt.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    plots: Annotated[Path | None, typer.Option("--plots", help="Write PNG plots into this directory.")] = None,
    path: Annotated[bool, typer.Option("--path", help="Loss along the line between A and B (plane for three models).")] = False,
    reward: Annotated[str | None, typer.Option("--reward", help="Reward model directory or module:function, scored along the path.")] = None,
    points: Annotated[int, typer.Option("--points", help="Points on the path in [-0.5, 1.5] (per axis on the plane).")] = 9,
    soup: Annotated[str | None, typer.Option("--soup", help="Which model is the soup of the others (default: from soupkit_recipe.yaml).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --json file or --plots directory.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (.bin) checkpoints; they can run code.")] = False,
    chat_template: Annotated[str, typer.Option("--chat-template", help=CHAT_HELP)] = "auto",
) -> None:
    """Weight distances, output KL, interpolation path, and a verdict: can these be souped?"""
    from rich.progress import Progress

    from soupkit.diagnostics import run_inspect, verdict

    if prompts is not None:
        _quiet_libraries()
    with Progress(console=_stderr(), transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            task = tasks.setdefault(stage, bar.add_task(stage, total=total))
            bar.update(task, completed=done, total=total)

        result = run_inspect(models, json_out=json_out, plots=plots, force=force, base=base, prompts=prompts,
                             path=path, reward=reward, points=points, soup=soup, allow_pickle=allow_pickle,
                             chat_template=chat_template, progress=progress)
    _render_inspect(result, verdict(result), [p for p in (json_out, plots) if p is not None])


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _render_inspect(result: dict[str, Any], answer: dict[str, Any], written: list[Path]) -> None:
    console = _console()
    console.print(_pair_table(result["pairs"], "Weight space", {
        "L2": "l2", "rel. L2": "relative_l2", "cosine": "cosine", "task cos": "task_cosine",
        "sign confl.": "sign_conflict"}))
    if "kl" in result["pairs"][0]:
        console.print(_pair_table(result["pairs"], "Output space (nats per predicted token)", {
            "KL(a||b)": "kl", "KL(b||a)": "kl_reverse", "JS": "js", "top-1 agree": "top1_agreement"}))
    for pair in result["pairs"]:
        console.print(_layer_table(pair))
    if "path" in result:
        console.print(_path_table(result["path"]))
    style = {"yes": "bold green", "likely": "bold yellow", "no": "bold red"}[answer["answer"]]
    console.print(f"[{style}]Can these be souped? {answer['answer']}[/]")
    for line in answer["reasons"] + answer["notes"]:
        console.print(f"  - {line}", highlight=False)
    for out in written:
        console.print(f"[green]wrote[/] {out}")


def _pair_table(pairs: list[dict[str, Any]], title: str, columns: dict[str, str]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ("a", "b", *columns):
        table.add_column(column, overflow="fold")
    for pair in pairs:
        table.add_row(pair["a"], pair["b"], *(_fmt(pair.get(key)) for key in columns.values()))
    return table


def _layer_table(pair: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{pair['a']} vs {pair['b']}: per layer and module kind")
    for column in ("layer / module", "L2", "rel. L2", "cosine", "task cos", "sign confl."):
        table.add_column(column)
    rows = [(str(r["layer"]), r) for r in pair["layers"]] + [(r["module"], r) for r in pair["modules"]]
    for label, row in rows:
        table.add_row(label, *(_fmt(row.get(k)) for k in ("l2", "relative_l2", "cosine", "task_cosine", "sign_conflict")))
    return table


def _path_table(path: dict[str, Any]) -> Any:
    from rich.table import Table

    barrier = f"; barrier {path['barrier']:.4f} (chord {path['barrier_chord']:.4f})" if "barrier" in path else ""
    table = Table(title=f"Path (1-alpha) {path['a']} + alpha {path['b']}{barrier}")
    table.add_column("alpha")
    table.add_column("loss")
    if "reward" in path:
        table.add_column("reward")
    for i, alpha in enumerate(path["alpha"]):
        table.add_row(f"{alpha:g}", _fmt(path["loss"][i], ".4f"), *([_fmt(path["reward"][i], ".4f")] if "reward" in path else []))
    return table


@app.command("run")
@user_errors
def run_recipe(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with any of: sft, reward_model, merge, align, eval.")],
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only this stage or unit (a soup, an SFT run, ppo, ppo/seed-0; repeatable).")] = None,
    force: Annotated[list[str] | None, typer.Option("--force", help="Redo this stage or unit even if complete (repeatable).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: align.steps=10.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would run and why; run nothing.")] = False,
) -> None:
    """Run a recipe's units in the order of the data they read, skipping the ones already complete."""
    from soupkit.launch import main_process
    from soupkit.pipeline import plan, run_pipeline

    if dry_run:
        for step in plan(recipe, only=only or [], force=force or [], overrides=set_ or [], log=_log):
            _console().print(f"{step.action:6} [{step.unit.stage}] {step.unit.name}: {step.why}", markup=False)
        return
    _quiet_libraries()
    report = run_pipeline(recipe, only=only or [], force=force or [], overrides=set_ or [], log=_log)
    ran = sum(v.count("ran") for v in report.values())
    if main_process():  # once under torchrun / accelerate launch
        _console().print(f"[green]done[/]: {ran} unit(s) run, {sum(len(v) for v in report.values()) - ran} skipped")
    _end_processes()


@app.command("eval")
@user_errors
def eval_recipe(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with align: and eval: sections.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing eval output.")] = False,
    chat_template: Annotated[str | None, typer.Option("--chat-template", help=CHAT_HELP + " Default: each run's own.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: eval.bootstrap=500.")] = None,
) -> None:
    """Evaluate every align run of RECIPE on held-out prompts: rewards, win rates, KL, with 95% CIs."""
    from soupkit.pipeline import run_eval
    from soupkit.recipe import load_recipe

    _quiet_libraries()
    overrides = (set_ or []) + ([f"eval.chat_template={chat_template}"] if chat_template else [])
    loaded = load_recipe(recipe, overrides)
    with _count_progress() as bar:
        task = bar.add_task("evaluating policies", total=None)
        results = run_eval(loaded, force=force, progress=lambda d, t: bar.update(task, completed=d, total=t))
    _render_eval(results)
    _console().print(f"report: {Path(loaded.eval.output) / 'report.md'}")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes everything.")] = Path("soupkit-demo"),
    force: Annotated[bool, typer.Option("--force", help="Start again from nothing.")] = False,
    small: Annotated[bool, typer.Option("--small", help="Reduced sizes and one seed (seconds).")] = False,
    model: Annotated[str, typer.Option("--model", help="toy (a tiny world, the default) or smollm2 (SmolLM2-135M-Instruct, about 7 minutes).")] = "toy",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: align.steps=10.")] = None,
) -> None:
    """The embedded default: the whole SALSA experiment at toy scale on a CPU (about a minute)."""
    from soupkit.demo.run import run_demo

    _quiet_libraries()
    results = run_demo(out, force=force, small=small, overrides=set_ or [], log=_log, model=model)
    _render_eval(results)
    _console().print(f"report: {out / 'eval' / 'report.md'}   recipe: {out / 'recipe.yaml'}")


def _log(message: str) -> None:
    _console().print(message, markup=False, highlight=False)


def _quiet_libraries() -> None:
    """Silence per-file progress bars and load reports of transformers/datasets under our own bar."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from datasets.utils.logging import disable_progress_bar as datasets_quiet
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets_quiet()


def _render_eval(results: dict[str, Any]) -> None:
    from rich.table import Table

    from soupkit.evaluation.writing import format_ci, kl_keys, reading

    first = next(iter(results["methods"].values()))
    kls = kl_keys(first)
    table = Table(title=f"{results['prompts']} held-out prompts, 95% bootstrap intervals")
    columns = ["method", "kl_coef", "seeds", "reward (RM)"] + (["gold"] if "gold" in first else []) + kls
    for column in columns + [f"win vs {results['baseline']}"]:
        table.add_column(column)
    for m in results["methods"].values():
        cells = [format_ci(m["reward"])] + ([format_ci(m["gold"])] if "gold" in m else []) + [format_ci(m[k]) for k in kls]
        table.add_row(m["method"], f"{m['kl_coef']:g}", str(len(m["seeds"])), *cells, format_ci(m["win_rate"]))
    _console().print(table)
    for line in reading(results):
        _console().print(line, highlight=False)


def _end_processes(code: int = 0) -> None:
    """Under torchrun / accelerate launch, once the command's work is done and written: wait for
    every process, close the process group, and leave without running interpreter teardown.

    Two CPU processes (gloo) that had finished and closed the group still aborted now and then
    while the interpreter tore down ("terminate called without an active exception", rank 1, 2 of
    about 8 full test runs, never reproduced alone), failing a run whose outputs were complete.
    Outputs are flushed first; nothing is left to run.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    import logging
    import os

    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="soupkit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
