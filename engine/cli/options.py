"""Command-line options backed by settings (engine/settings.py).

A flag on the command line wins; else the setting when STEPLINE_<NAME> or
stepline.toml sets it; else the option's own default. Shared by the command
modules (running, requesting, reading, history, ops, events), which
engine/cli/main.py imports to register their commands on its app.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from pydantic import SecretStr
from rich.console import Console
from rich.markup import escape

from stepline.settings import Settings, SettingsError, env_var, load_settings

err = Console(stderr=True, soft_wrap=True)


def _setting(name: str) -> Callable[[typer.Context, typer.CallbackParam, Any], Any]:
    """An option's callback: a flag on the command line wins; else the setting
    when STEPLINE_<NAME> or stepline.toml sets it (stepline/settings.py); else
    the option's own default, which can differ by command (`dev` keeps its
    query projection beside a SQLite log)."""

    def resolve(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        source = ctx.get_parameter_source(param.name) if param.name else None
        # By name: newer Typers vendor click, so its enum has no stable import.
        if source is not None and source.name == "COMMANDLINE":
            return value
        settings = _cli_settings(ctx)
        if name not in settings.model_fields_set:
            return value
        found = getattr(settings, name)
        if isinstance(found, SecretStr):
            return found.get_secret_value()
        if name == "webhooks":  # the --webhook flag's shape
            return [f"{src}={secret.get_secret_value()}" for src, secret in found.items()]
        if name == "webhook_schemes":  # the --webhook-scheme flag's shape
            return [f"{src}={scheme}" for src, scheme in found.items()]
        return found

    _SETTING_CALLBACKS[resolve] = name
    return resolve


# Callback -> setting name, so that tests can tell which settings a command reads.
_SETTING_CALLBACKS: dict[Callable[..., Any], str] = {}


def _cli_settings(ctx: typer.Context) -> Settings:
    """Settings loaded once per command line; a bad value is one error line."""
    found = ctx.meta.get("stepline.settings")
    if isinstance(found, Settings):
        return found
    try:
        settings = ctx.meta["stepline.settings"] = load_settings()
    except SettingsError as exc:
        # Escaped: the message quotes values, and "[...]" in them is not Rich markup.
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    return settings


def option_setting(param: Any) -> str | None:
    """The setting (stepline/settings.py) behind a click parameter of this CLI, if any."""
    callback: Any = getattr(param, "callback", None)
    # Typer wraps callbacks (functools.update_wrapper): the original is __wrapped__.
    return _SETTING_CALLBACKS.get(getattr(callback, "__wrapped__", callback))


def _setting_help(text: str, name: str) -> str:
    # Parentheses, not brackets: Typer's help is Rich markup.
    return f"{text} (or {env_var(name)}, or {name} in stepline.toml)"


LogOpt = Annotated[str, typer.Option("--log", callback=_setting("log"), help=_setting_help("Log URL.", "log"))]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
AppOpt = Annotated[
    str | None,
    typer.Option("--app", callback=_setting("app"),
                 help=_setting_help("Module (file or dotted name) declaring the tasks.", "app")),
]
ConcurrencyOpt = Annotated[int, typer.Option(callback=_setting("concurrency"),
                                             help=_setting_help("Runs executing at once.", "concurrency"))]
JsonLogsOpt = Annotated[bool, typer.Option("--json-logs/--console-logs", callback=_setting("json_logs"),
                                           help=_setting_help("Log format.", "json_logs"))]
GraceOpt = Annotated[str, typer.Option(
    "--grace", metavar="SECONDS", callback=_setting("shutdown_grace"),
    help=_setting_help("On SIGTERM/SIGINT, how long running steps get to finish and checkpoint before "
                       "what is left is cancelled and the partitions are given up; a second signal "
                       "cancels at once.", "shutdown_grace"))]
ProcessesOpt = Annotated[str, typer.Option(
    "--processes", metavar="N", callback=_setting("processes"),
    help=_setting_help("Worker processes, each on its own core, sharing the log and splitting its "
                       "partitions (this process supervises them); auto: one per usable core.",
                       "processes"))]
