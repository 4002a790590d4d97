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

import structlog
import typer
from rich.console import Console
from rich.measure import Measurement
from rich.progress import Progress as RichProgress
from rich.table import Table
from rich.text import Text

from stepline.client import Client
from stepline.core.payloads import payload_json
from stepline.errors import SteplineError
from stepline.log import absent_file, redact_url
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


def _fail(message: str, json_logs: bool = False) -> None:
    """One error line on stderr, and exit 1; under --json-logs a JSON log line
    like every other line of the process."""
    if json_logs:
        structlog.get_logger("stepline.cli").error(message)
    else:
        # markup=False: messages quote paths, values and URLs, and "[...]" in them is not Rich markup.
        err.print(Text.assemble(("error:", "bold red"), f" {message}"), highlight=False)
    raise typer.Exit(1)


def _say(text: str, json_logs: bool, **fields: Any) -> None:
    """What a long-running command tells its operator on stderr (its banner,
    that it is stopping): a line for people, or under --json-logs one JSON log
    line among the others (the same text as its event, and its parts as
    fields)."""
    if json_logs:
        structlog.get_logger("stepline.cli").info(text, **fields)
    else:
        err.print(text, highlight=False, markup=False)


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


def _run(coro: Coroutine[Any, Any, T], json_logs: bool = False, loop: str = "asyncio") -> T:
    """Run a command's coroutine; `loop` is an `event_loop` setting's value."""
    try:
        with asyncio.Runner(loop_factory=serving_loop(loop)) as runner:
            return runner.run(coro)
    except (SteplineError, CliError) as exc:
        _fail(str(exc), json_logs)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise AssertionError("unreachable")


def _print_table(table: Table) -> None:
    """A table on stdout; whole when stdout is a pipe or a file.

    Rich fits a table into the terminal's width, and takes 80 columns for
    anything else, squeezing columns down to one letter ("c…"). Without a
    terminal there is nothing to fit: the table gets the width it needs.
    """
    if out.is_terminal:
        out.print(table)
        return
    width = Measurement.get(out, out.options.update_width(_UNBOUNDED), table).maximum
    Console(file=out.file, width=width, soft_wrap=True).print(table)


# Wider than any table: the width a table is measured in when nothing bounds it.
_UNBOUNDED = 1_000_000


def _require_log(url: str) -> None:
    """For commands that only read: a log that does not exist is an error, not
    an empty list, and reading it must not create it (opening an embedded
    log creates its file and folders)."""
    try:
        missing = absent_file(url)
    except SteplineError as exc:
        _fail(str(exc))
        return
    if missing is not None:
        _fail(f"no log at {redact_url(url)}: {missing} does not exist (check --log or STEPLINE_LOG; "
              "commands that write, such as trigger, worker and dev, create it)")


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


def _load_app(module: str, json_logs: bool = False) -> Registry:
    try:
        return load_app(module)
    except SteplineError as exc:
        _fail(str(exc), json_logs)
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


# The exit status of `--wait --timeout` when the run had not ended in time (the
# run goes on; GNU timeout(1) uses the same number). 1 means the run ended
# other than completed.
EXIT_STILL_PENDING = 124
WAIT_HELP = (f"Wait for the run to end: exit 0 when it completed, 1 when it failed or was cancelled, "
             f"{EXIT_STILL_PENDING} when --timeout ran out first (the run goes on).")
TIMEOUT_HELP = f"Seconds to wait with --wait; past them, exit {EXIT_STILL_PENDING}."


async def _await_outcome(client: Client, run_id: str, offset: int | None, timeout: float | None,
                         result: dict[str, Any]) -> None:
    """--wait: the run's end into `result` (status, output, error), or its
    status now and `timed_out` when it did not end within `timeout`."""
    try:
        state = await client.wait(run_id, timeout=timeout, from_offset=offset)
    except TimeoutError:
        state = await client.get_run(run_id)
        result.update(status=state.status, timed_out=True, timeout=timeout)
        return
    result.update(status=state.status, output=payload_json(state.output),
                  error=None if state.error is None else f"{state.error.type}: {state.error.message}")


def _print_started(res: dict[str, Any], headline: str, wait: bool, as_json: bool) -> None:
    """A started run (and with --wait its end); exit 1 when it waited and did
    not complete, EXIT_STILL_PENDING when the wait ran out first."""
    if as_json:
        _print_json(res)
    elif res.get("timed_out"):
        out.print(headline, highlight=False)
        out.print(f"run {res['run_id']} is still {res['status']} after {res['timeout']:g} s; it goes on "
                  f"(see `stepline runs show {res['run_id']}`)", highlight=False, markup=False)
    else:
        out.print(headline, highlight=False)
        if wait:
            out.print(f"status: {res['status']}", highlight=False)
            if res.get("output") is not None:
                out.print_json(data=res["output"])
            if res.get("error"):
                # markup=False: the message is the task's, and "[...]" in it is not Rich markup.
                out.print(f"error: {res['error']}", highlight=False, markup=False)
    if res.get("timed_out"):
        raise typer.Exit(EXIT_STILL_PENDING)
    if wait and res.get("status") != "completed":
        raise typer.Exit(1)


def _shown(value: T, log: str) -> T:
    """Sensitive fields as "[redacted]", or "[erased]" once forgotten (never decrypted)."""
    result: T = _run(shown(value, default_keystore(log)))
    return result
