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

app = typer.Typer(
    name="soupkit",
    help="Model soups for LLMs, soup diagnostics, and PPO against any reference (SALSA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Print a ``SoupkitError`` as one line on stderr and exit with code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SoupkitError as exc:
            _stderr().print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


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

    from soupkit.merge import run_merge
    from soupkit.recipe import load_recipe

    loaded = load_recipe(recipe, set_ or [])
    if loaded.merge is None:
        raise SoupkitError(f"{recipe}: no merge: section")
    start = time.perf_counter()
    with _bytes_progress("merging") as bar:
        task = bar.add_task("merging", total=None)
        output = run_merge(loaded, out=out, force=force, allow_pickle=allow_pickle,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))
    spec = loaded.merge
    _console().print(f"[green]wrote[/] {output}  ({spec.method} of {len(spec.models)} models, "
                     f"{time.perf_counter() - start:.1f} s)")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes everything.")] = Path("soupkit-demo"),
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
) -> None:
    """The embedded default: build tiny models in-process and make a soup of them (CPU, seconds)."""
    from soupkit.demo.merge_demo import run_demo

    summary = run_demo(out, force=force, log=_console().print)
    _render_demo(summary)


def _render_demo(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="soupkit demo: uniform soup of two fine-tunes")
    for column in ("model", "loss on held-out text", "distance to soup (L2)"):
        table.add_column(column)
    for row in summary["rows"]:
        table.add_row(row["model"], f"{row['loss']:.4f}", f"{row['l2_to_soup']:.4f}")
    _console().print(table)
    _console().print(f"soup written to [bold]{summary['soup']}[/]; recipe: {summary['recipe']}")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="soupkit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
