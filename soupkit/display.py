"""What the commands show in the terminal: progress bars, result tables, one-line messages (rich).

Progress goes to stderr (transient bars), results to stdout. rich is imported inside the
functions, so ``soupkit --help`` stays instant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def stderr() -> Any:
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def console() -> Any:
    from rich.console import Console

    return Console(soft_wrap=True)


def escape(text: str) -> str:
    """``text`` shown as written: rich would read ``[vllm]`` in ``soupkit[vllm]`` as markup and drop it."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def error(message: str) -> None:
    """``error: message`` on stderr, ``error:`` in bold red."""
    stderr().print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)


def plain(message: str, err: bool = False) -> None:
    """One line as given: no markup, no highlighting."""
    (stderr() if err else console()).print(message, markup=False, highlight=False)


def wrote(path: Path | str, detail: str = "") -> None:
    console().print(f"[green]wrote[/] {escape(str(path))}" + (f"  ({escape(detail)})" if detail else ""))


@contextmanager
def bytes_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A bytes bar with speed and time left; yields the ``progress(done, total)`` callback."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=stderr(), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextmanager
def count_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """An ``n of m`` bar with the time elapsed; yields the ``progress(done, total)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=stderr(), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextmanager
def stage_progress() -> Iterator[Callable[[str, int, int], None]]:
    """One bar per stage, added when the stage first reports; yields ``progress(stage, done, total)``."""
    from rich.progress import Progress

    with Progress(console=stderr(), transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            task = tasks.setdefault(stage, bar.add_task(stage, total=total))
            bar.update(task, completed=done, total=total)

        yield progress


@contextmanager
def steps_progress(total: int) -> Iterator[Callable[[int, int, dict[str, Any]], None]]:
    """The PPO bar with reward, KL, seconds per step and the slowest stage, started on the first step (so input errors print without a
    bar) and left on screen; yields ``progress(done, total, metrics)``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   "reward {task.fields[reward]:.3f}  kl {task.fields[kl]:.3f}{task.fields[slowest]}",
                   TimeElapsedColumn(), TimeRemainingColumn(), console=stderr(), transient=False)
    task = bar.add_task("align", total=total, reward=float("nan"), kl=float("nan"), slowest="")

    def progress(done: int, total: int, metrics: dict[str, Any]) -> None:
        from soupkit.rlhf.timing import slowest

        stage = slowest(metrics)  # the step's time and its slowest stage: where a run spends its time
        bar.start()
        bar.update(task, completed=done, total=total, reward=metrics["reward"], kl=metrics["kl"],
                   slowest=f"  {metrics['seconds']:.1f} s/step, {stage[0]} {stage[1]:.0%}" if stage else "")

    try:
        yield progress
    finally:
        bar.stop()


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def inspect_report(result: dict[str, Any], answer: dict[str, Any], written: list[Path]) -> None:
    """``soupkit inspect``'s tables (weight space, output space, per layer, path) and verdict."""
    out = console()
    out.print(_pair_table(result["pairs"], "Weight space", {
        "L2": "l2", "rel. L2": "relative_l2", "cosine": "cosine", "task cos": "task_cosine",
        "sign confl.": "sign_conflict"}))
    if "kl" in result["pairs"][0]:
        out.print(_pair_table(result["pairs"], "Output space (nats per predicted token)", {
            "KL(a||b)": "kl", "KL(b||a)": "kl_reverse", "JS": "js", "top-1 agree": "top1_agreement"}))
    for pair in result["pairs"]:
        out.print(_layer_table(pair))
    if "path" in result:
        out.print(_path_table(result["path"]))
    style = {"yes": "bold green", "likely": "bold yellow", "no": "bold red"}[answer["answer"]]
    out.print(f"[{style}]Can these be souped? {answer['answer']}[/]")
    for line in answer["reasons"] + answer["notes"]:
        out.print(f"  - {line}", highlight=False)
    for path in written:
        wrote(path)


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


def eval_results(results: dict[str, Any]) -> None:
    """The evaluation table (one row per method, 95% intervals) and its reading."""
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
    out = console()
    out.print(table)
    for line in reading(results):
        out.print(line, highlight=False)
    for line in front_summary(results.get("fronts") or []):
        out.print(line, highlight=False)


def front_summary(fronts: list[dict[str, Any]]) -> list[str]:
    """One line per front (its Pareto points) and per model compared with it."""
    from soupkit.evaluation.front import front_verdict

    lines = []
    for f in fronts:
        best = ", ".join(f"{p['value']:g}" for p in f["points"] if p["pareto"])
        lines.append(f"front {f['name']} ({f['axes'][0]} vs {f['axes'][1]}): Pareto at {f['axis']} = {best}")
        lines += [f"  the front {front_verdict(o['front'])} {name}" for name, o in f["others"].items()]
    return lines
