"""The CLI's Typer app and command classes: help that names every parameter
plainly and stays whole when it goes to a pipe or a file.

Typer labels each parameter by its Python type (`--wait <bool>`,
`--log <str>`) and wraps a required argument in braces (`{task}`); click
and argparse name a value after what it is (`--log LOG`, `TASK`), and a
flag takes none. And Typer's Rich panels fit the help into 80 columns when
stdout is not a terminal, cutting words ("STEPLINE_API_TOKE…"): a pipe or
a file gets click's plain help instead, which wraps between words.

`App` is a `typer.Typer` whose commands and groups are built from these
classes; main.py and the command modules make their apps with it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

# Typer's commands are built on its own copy of click, so contexts and
# formatters are typed loosely here rather than against the `click` package.


def _to_terminal() -> bool:
    # Help is written to stdout.
    return sys.stdout.isatty()


class _Argument(TyperArgument):
    """An argument shown by its name in capitals: no type label, no braces."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = self.metavar or (self.name or "").upper()
        if not self.required:
            name = f"[{name}]"
        return [name + ("..." if self.nargs != 1 else "")]


def _plain_params(params: list[Any]) -> None:
    for param in params:
        if type(param) is TyperArgument:
            # Typer builds its parameters itself, with no hook for their class;
            # the subclass only changes how the argument is shown.
            param.__class__ = _Argument
            param.metavar = param.metavar or (param.name or "").upper()
        elif isinstance(param, TyperOption) and param.metavar is None:
            if param.is_flag or param.count:
                param.metavar = ""  # a flag takes no value: nothing to name
            else:
                param.metavar = param.opts[0].lstrip("-").replace("-", "_").upper()


def _whole_short_help(command: Any) -> None:
    # A command list shows each command's first paragraph; click would cut it
    # at the screen's width with "...", so it is given whole (and wrapped).
    if command.short_help is None and command.help:
        command.short_help = " ".join(command.help.strip().split("\n\n")[0].split())


def _plain_format(formatter: Any) -> None:
    # No width to fit: each option's help on one line, so nothing is cut or
    # broken at a hyphen ("--dry-" / "run"), and grep finds it.
    formatter.width = _PIPE_WIDTH


# Wide enough that no help text wraps.
_PIPE_WIDTH = 100_000


class PlainCommand(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        # Here rather than in __init__: click adds --help, and Typer the
        # completion options, after the command is made.
        params: list[Any] = super().get_params(ctx)
        _plain_params(params)
        _whole_short_help(self)
        return params

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if _to_terminal():
            super().format_help(ctx, formatter)
        else:  # click's own help, below Typer's Rich panels
            _plain_format(formatter)
            super(TyperCommand, self).format_help(ctx, formatter)


class PlainGroup(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)
        _plain_params(params)
        _whole_short_help(self)
        return params

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if _to_terminal():
            super().format_help(ctx, formatter)
        else:
            _plain_format(formatter)
            super(TyperGroup, self).format_help(ctx, formatter)


class App(typer.Typer):
    """A Typer app whose groups and commands show their help as described above."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cls=PlainGroup, **kwargs)

    def command(self, name: str | None = None, *, cls: type[TyperCommand] | None = None,
                **kwargs: Any) -> Callable[[Any], Any]:
        return super().command(name, cls=cls or PlainCommand, **kwargs)


__all__ = ["App", "PlainCommand", "PlainGroup"]
