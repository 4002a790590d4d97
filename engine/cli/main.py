"""`stepline` on the command line.

Every command that prints data takes `--json`. Errors are one line on
stderr and a non-zero exit code; a command that fails appends nothing.

The commands live in modules of their own (running, requesting, reading,
why, history, ops, events), over the helpers of `_common`; this module makes the
app and registers them, in the order `stepline --help` lists them.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from stepline.cli import events as cli_events
from stepline.cli import history as cli_history
from stepline.cli import ops as cli_ops
from stepline.cli import reading, requesting, retention, running
from stepline.cli import why as cli_why
from stepline.cli._help import App
from stepline.cli.options import option_setting as option_setting
from stepline.version import __version__

# add_completion: --install-completion and --show-completion (bash, zsh, fish, PowerShell).
app = App(no_args_is_help=True, add_completion=True, help="Durable background tasks on an event log.")
runs_app = App(no_args_is_help=True, help="List and inspect runs.")
dlq_app = App(no_args_is_help=True, help="Dead letters: runs that exhausted their retries.")
app.add_typer(runs_app, name="runs")
app.add_typer(dlq_app, name="dlq")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"stepline {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version, help="Print the version and exit.")] = False,
) -> None:
    """Durable background tasks on an event log."""

# Options that take their default from a setting live in engine/cli/options.py,
# shared with the commands registered from other modules.

# dev, worker, serve (engine/cli/running.py).
running.register(app)
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


def main() -> None:
    # Python prints other libraries' log records on stderr when no handler is
    # set (aiokafka: a line per failed connection attempt, before the
    # command's own error). A command reports its failures itself, in one
    # line; dev, worker and serve render those records as log lines of their
    # own (configure_logging). A handler that drops them stops the rest.
    logging.getLogger().addHandler(logging.NullHandler())
    app()


if __name__ == "__main__":
    main()
