"""The command line, as a map: each command parses its flags, calls one library function and hands
the result to ``soupkit.display``. No maths and no rendering here.

``align``'s settings flags come from the ``AlignSpec`` schema (``soupkit.flags``). Heavy libraries
are imported inside the commands, so ``soupkit --help`` stays instant.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from soupkit import display
from soupkit.errors import SoupkitError
from soupkit.flags import with_spec_flags
from soupkit.recipe import AlignSpec
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
            display.error(str(exc))
            raise typer.Exit(2) from None
        except Stopped as exc:
            _stopped(exc)

    return wrapper  # type: ignore[return-value]


def _stopped(exc: Stopped) -> None:
    from soupkit.launch import main_process

    if main_process():  # every process stopped at the same step; one line says so
        display.plain(str(exc), err=True)
    _end_processes(exc.exit_code)
    raise typer.Exit(exc.exit_code) from None


CHAT_HELP = "Chat template: auto (the tokenizer's, if any), always, never, chatml, or a .jinja file."


@app.command()
@user_errors
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with a merge: section, or a mergekit YAML (read as is).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (overrides merge.output).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (.bin) checkpoints; they can run code.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: merge.dtype=float32.")] = None,
) -> None:
    """Merge the models of RECIPE's merge: section (or of a mergekit configuration) into one checkpoint."""
    import time

    from soupkit.merge import load_merge_spec, run_merge
    from soupkit.recipe import load_recipe

    loaded = load_recipe(recipe, set_ or [])
    if loaded.merge is None:
        raise SoupkitError(f"{recipe}: no merge: section")
    start = time.perf_counter()
    with display.bytes_progress("merging") as progress:
        output = run_merge(loaded, out=out, force=force, allow_pickle=allow_pickle, progress=progress)
    spec = load_merge_spec(loaded)
    display.wrote(output, f"{spec.method} of {len(spec.models)} models, {time.perf_counter() - start:.1f} s")


ALIGN_NOT_FLAGS = ("output", "watch", "lora_target_modules")
"""Settings without a flag of their own: ``output`` is ``--out``, ``watch`` is ``--watch NAME=PATH``,
``lora_target_modules`` (a list or peft's ``all-linear``) is set with ``--set``."""


@app.command()
@user_errors
@with_spec_flags(AlignSpec, exclude=ALIGN_NOT_FLAGS, after="out")
def align(
    recipe: Annotated[Path | None, typer.Argument(help="Optional recipe YAML with an align: section.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (overrides align.output).")] = None,
    watch: Annotated[list[str] | None, typer.Option("--watch", help="Also log kl_NAME against model PATH: NAME=PATH.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a setting: align.kl_estimator=k3.")] = None,
    **settings: Any,
) -> None:
    """PPO on a policy with a per-token KL penalty against a frozen reference (a soup, an SFT model).

    Data parallel: torchrun --nproc_per_node N -m soupkit align ... (or accelerate launch -m soupkit align ...).
    """
    from soupkit.launch import main_process
    from soupkit.rlhf import build_spec, train
    from soupkit.rlhf.config import parse_watch

    flags = dict(settings, watch=parse_watch(watch or []), output=str(out) if out else None)
    spec = build_spec(recipe, flags, set_ or [])
    with display.steps_progress(spec.steps) as progress:
        final = train(spec, resume=resume, force=force, progress=progress)
    if main_process():  # one line per run, not per process
        display.wrote(final, f"metrics: {final.parent / 'metrics.jsonl'}")
    _end_processes()


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
    from soupkit.diagnostics import run_inspect, verdict

    if prompts is not None:
        _quiet_libraries()
    with display.stage_progress() as progress:
        result = run_inspect(models, json_out=json_out, plots=plots, force=force, base=base, prompts=prompts,
                             path=path, reward=reward, points=points, soup=soup, allow_pickle=allow_pickle,
                             chat_template=chat_template, progress=progress)
    display.inspect_report(result, verdict(result), [p for p in (json_out, plots) if p is not None])


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
        for step in plan(recipe, only=only or [], force=force or [], overrides=set_ or [], log=display.plain):
            display.plain(f"{step.action:6} [{step.unit.stage}] {step.unit.name}: {step.why}")
        return
    _quiet_libraries()
    report = run_pipeline(recipe, only=only or [], force=force or [], overrides=set_ or [], log=display.plain)
    ran = sum(v.count("ran") for v in report.values())
    if main_process():  # once under torchrun / accelerate launch
        display.console().print(f"[green]done[/]: {ran} unit(s) run, {sum(len(v) for v in report.values()) - ran} skipped")
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
    with display.count_progress("evaluating policies") as progress:
        results = run_eval(loaded, force=force, progress=progress)
    display.eval_results(results)
    display.console().print(f"report: {Path(loaded.eval.output) / 'report.md'}")


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
    results = run_demo(out, force=force, small=small, overrides=set_ or [], log=display.plain, model=model)
    display.eval_results(results)
    display.console().print(f"report: {out / 'eval' / 'report.md'}   recipe: {out / 'recipe.yaml'}")


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
