"""What the commands of the CLI share: the consoles, one-line errors, running a
coroutine, JSON in and out, progress bars and the run a command started.

Below every command module (running, requesting, reading, history, ops,
events) and main.py, which registers their commands on the app.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress as RichProgress

from stepline.client import Client
from stepline.core.payloads import payload_json
from stepline.errors import SteplineError
from stepline.projections.query_store import DEFAULT_QUERY_DB
from stepline.sdk.task import Registry, load_app
from stepline.security.keystore import default_keystore
from stepline.security.sensitive import shown

T = TypeVar("T")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# Above this many records a scan shows a progress bar.
PROGRESS_THRESHOLD = 20_000


class CliError(Exception):
    pass


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def serving_loop(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory of the long-running commands (worker, dev): uvloop
    when asked for or, with `auto`, when installed; None is asyncio's own.
    uvloop's loop and its socket and timer paths are C: the asyncio
    machinery (task steps, futures, call_soon) is ~30% of a worker's CPU."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise CliError("event_loop is uvloop (STEPLINE_EVENT_LOOP), but uvloop is not installed: "
                           "pip install uvloop, or set it to auto") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run(coro: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """Run a command's coroutine; `loop` is an `event_loop` setting's value."""
    try:
        with asyncio.Runner(loop_factory=serving_loop(loop)) as runner:
            return runner.run(coro)
    except (SteplineError, CliError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise AssertionError("unreachable")


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


@contextmanager
def _progress(label: str, threshold: int = PROGRESS_THRESHOLD) -> Iterator[Callable[[int, int], None]]:
    bar: RichProgress | None = None
    task_id: Any = None

    def update(done: int, total: int) -> None:
        nonlocal bar, task_id
        if bar is None:
            if total < threshold:
                return
            bar = RichProgress(console=err, transient=True)
            bar.start()
            task_id = bar.add_task(label, total=total)
        bar.update(task_id, completed=done, total=total)

    try:
        yield update
    finally:
        if bar is not None:
            bar.stop()


def _time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _registry(app_module: str | None, needed_for: str) -> Registry:
    if not app_module:
        raise CliError(
            f"{needed_for} needs the app module that declares the tasks: "
            "pass --app path/to/app.py or set STEPLINE_APP (or app in stepline.toml)"
        )
    return load_app(app_module)


def _load_app(module: str) -> Registry:
    try:
        return load_app(module)
    except SteplineError as exc:
        _fail(str(exc))
        raise


def _dev_query_db(log_url: str) -> str:
    """The query projection's file for `dev`: beside a SQLite log, so that two
    logs never share one (the projection is of one log)."""
    prefix = "sqlite:///"
    if log_url.startswith(prefix):
        path = urllib.parse.unquote(urllib.parse.urlsplit(log_url).path[1:])
        if path and path != ":memory:":
            stem, dot, _ = path.rpartition(".")
            return f"{stem if dot else path}.query.db"
    return DEFAULT_QUERY_DB


async def _await_outcome(client: Client, run_id: str, offset: int | None, timeout: float | None,
                         result: dict[str, Any]) -> None:
    """--wait: the run's end into `result` (status, output, error)."""
    state = await client.wait(run_id, timeout=timeout, from_offset=offset)
    result.update(status=state.status, output=payload_json(state.output),
                  error=None if state.error is None else f"{state.error.type}: {state.error.message}")


def _print_started(res: dict[str, Any], headline: str, wait: bool, as_json: bool) -> None:
    """A started run (and with --wait its end); exit 1 when it waited and did not complete."""
    if as_json:
        _print_json(res)
    else:
        out.print(headline, highlight=False)
        if wait:
            out.print(f"status: {res['status']}", highlight=False)
            if res.get("output") is not None:
                out.print_json(data=res["output"])
            if res.get("error"):
                # markup=False: the message is the task's, and "[...]" in it is not Rich markup.
                out.print(f"error: {res['error']}", highlight=False, markup=False)
    if wait and res.get("status") != "completed":
        raise typer.Exit(1)


def _shown(value: T, log: str) -> T:
    """Sensitive fields as "[redacted]", or "[erased]" once forgotten (never decrypted)."""
    result: T = _run(shown(value, default_keystore(log)))
    return result
