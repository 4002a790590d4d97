"""`stepline` on the command line.

Every command that prints data takes `--json`. Errors are one line on
stderr and a non-zero exit code; a command that fails appends nothing.

The commands live in modules of their own (running, requesting, reading,
why, history, ops, events), over the helpers of `_common`; this module makes the
app and registers them, in the order `stepline --help` lists them.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer

from stepline.cli import running
from stepline.cli._help import App
from stepline.cli.options import option_setting as option_setting
from stepline.version import __version__

# The long-running processes: restarted after a crash, they should be up fast,
# so they import only their own commands' modules (engine/cli/running.py),
# not those of every other command (history, diff, events, ...).
_RUNNING = frozenset({"dev", "worker", "serve"})


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"stepline {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version, help="Print the version and exit.")] = False,
) -> None:
    """Durable background tasks on an event log."""


def build_app(only_running: bool = False) -> App:
    """The command line: every command, or only dev, worker and serve."""
    # add_completion: --install-completion and --show-completion (bash, zsh, fish, PowerShell).
    app = App(no_args_is_help=True, add_completion=True, help="Durable background tasks on an event log.")
    app.callback()(_root)
    # Options that take their default from a setting live in engine/cli/options.py,
    # shared with the commands registered from other modules.
    # dev, worker, serve (engine/cli/running.py).
    running.register(app)
    if only_running:
        return app
    from stepline.cli import events as cli_events
    from stepline.cli import history as cli_history
    from stepline.cli import ops as cli_ops
    from stepline.cli import reading, requesting, retention
    from stepline.cli import why as cli_why

    runs_app = App(no_args_is_help=True, help="List and inspect runs.")
    dlq_app = App(no_args_is_help=True, help="Dead letters: runs that exhausted their retries.")
    app.add_typer(runs_app, name="runs")
    app.add_typer(dlq_app, name="dlq")
    # trigger, publish, cancel, complete-token, backfill (engine/cli/requesting.py).
    requesting.register(app)
    # runs ls|show, history, dlq ls|retry, forget, replay (engine/cli/reading.py).
    reading.register(app, runs_app, dlq_app)
    # runs why (engine/cli/why.py).
    cli_why.register(runs_app)
    # fork, shadow, diff and debug (engine/cli/history.py).
    cli_history.register(app)
    # pause, resume and the bulk runs commands (engine/cli/ops.py).
    cli_ops.register(app)
    # events: the engine's events as JSON lines (engine/cli/events.py).
    cli_events.register(app)
    # archive and prune: retention of ended runs (engine/cli/retention.py).
    retention.register(app)
    return app


_full: App | None = None


def __getattr__(name: str) -> Any:
    # `app`, every command, is built on first use (PEP 562), so that
    # importing this module costs no more than the running commands need.
    global _full
    if name == "app":
        if _full is None:
            _full = build_app()
        return _full
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    # Python prints other libraries' log records on stderr when no handler is
    # set (aiokafka: a line per failed connection attempt, before the
    # command's own error). A command reports its failures itself, in one
    # line; dev, worker and serve render those records as log lines of their
    # own (configure_logging). A handler that drops them stops the rest.
    logging.getLogger().addHandler(logging.NullHandler())
    command = sys.argv[1] if len(sys.argv) > 1 else None
    (build_app(only_running=True) if command in _RUNNING else __getattr__("app"))()


if __name__ == "__main__":
    main()
