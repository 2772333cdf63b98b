"""Command-line flags derived from a settings schema, so that a setting is declared once.

Each field of a pydantic model (``AlignSpec``) becomes ``--field-name``: its type from the
annotation, its help from the field's docstring, its default shown from the field's default. A
flag that is not given is None and leaves the recipe's value (or the default) alone; booleans get
``--x/--no-x``. A field of a type a flag cannot carry must be excluded by name, so a new setting
never silently lacks its flag.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel

SCALARS = (int, float, str, bool)


def flag_type(annotation: Any) -> tuple[Any, str | None]:
    """``(type typer parses, metavar)`` for a field annotation; None when no flag can carry it.

    ``X | None`` is ``X``; a ``Literal`` is a string whose choices the metavar lists (pydantic
    checks the value); ``list[X]`` is a repeatable flag; ``bool | Literal[...]`` is a bool flag.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if bool in rest and all(typing.get_origin(a) is Literal for a in rest if a is not bool):
            return bool, None  # ``bool | Literal["auto"]``: --x / --no-x, and not given leaves "auto"
        return flag_type(rest[0]) if len(rest) == 1 else (None, None)
    if origin is Literal:
        return str, "[" + "|".join(map(str, args)) + "]"
    if origin is list and len(args) == 1 and args[0] in SCALARS:
        return list[args[0]], None
    return (annotation, None) if annotation in SCALARS else (None, None)


def flag_help(field: Any) -> str:
    """The field's docstring as one paragraph of plain text, with its default when it has one."""
    text = " ".join((field.description or "").replace("``", "").split())
    default = field.get_default(call_default_factory=True)
    if default is None or default == [] or default == {} or field.is_required():
        return text
    return f"{text} (default: {default})"  # not [default: ...]: rich would read it as markup


def spec_options(model: type[BaseModel], exclude: Iterable[str]) -> list[inspect.Parameter]:
    """One keyword parameter (``Annotated[type | None, typer.Option(...)] = None``) per field of
    ``model`` that is not in ``exclude``, in the schema's order."""
    skip = set(exclude)
    params = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        kind, metavar = flag_type(field.annotation)
        if kind is None:
            raise TypeError(f"{model.__name__}.{name}: no command-line flag can carry {field.annotation}; "
                            "exclude it (it stays settable with --set)")
        flag = "--" + name.replace("_", "-")
        decls = (f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,)
        option = typer.Option(*decls, help=flag_help(field), metavar=metavar, show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, option]))
    return params


def with_spec_flags(model: type[BaseModel], exclude: Iterable[str], after: str) -> Callable[[Callable], Callable]:
    """Give a command (whose signature ends in ``**settings``) one flag per field of ``model``,
    listed after its parameter ``after``; the flags given arrive in ``settings`` (None: not given)."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        named = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        cut = [p.name for p in named].index(after) + 1
        params = named[:cut] + spec_options(model, exclude) + named[cut:]
        fn.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        return fn

    return decorate
