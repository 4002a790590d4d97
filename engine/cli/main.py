"""`stepline` on the command line.

Every command that prints data takes `--json`. Errors are one line on
stderr and a non-zero exit code; a command that fails appends nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress as RichProgress
from rich.table import Table

from stepline.cli.options import (
    AppOpt,
    ConcurrencyOpt,
    JsonLogsOpt,
    JsonOpt,
    LogOpt,
    _setting,
    _setting_help,
)
from stepline.cli.options import (
    option_setting as option_setting,
)
from stepline.client import Client
from stepline.core.events import Event
from stepline.core.payloads import payload_json
from stepline.errors import SteplineError
from stepline.log import DEFAULT_LOG_URL
from stepline.projections.query_store import DEFAULT_QUERY_DB
from stepline.projections.runs import FAILED, RunState
from stepline.projections.views import event_dict, state_dict
from stepline.runtime.worker import Worker
from stepline.sdk.logs import configure_logging
from stepline.sdk.task import Registry, load_app
from stepline.security.sensitive import redact_text
from stepline.settings import DEFAULT_MAX_BODY_BYTES

if TYPE_CHECKING:
    from stepline.server import ServeConfig, WebhookSource

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Durable background tasks on an event log.")
runs_app = typer.Typer(no_args_is_help=True, help="List and inspect runs.")
dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: runs that exhausted their retries.")
app.add_typer(runs_app, name="runs")
app.add_typer(dlq_app, name="dlq")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)



# Options that take their default from a setting live in engine/cli/options.py,
# shared with the commands registered from other modules.


# Above this many records a scan shows a progress bar.
PROGRESS_THRESHOLD = 20_000


class CliError(Exception):
    pass


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
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


# --- running -------------------------------------------------------------


async def _serve_worker(registry: Registry, log_url: str, concurrency: int) -> None:
    # The log's writer and reader threads hand results back to the event
    # loop; with CPython's default 5 ms switch interval each hand-off can
    # wait that long for the GIL while the loop is busy. This process is
    # ours, so shorten it (a library embedded in an app leaves it alone).
    sys.setswitchinterval(0.0005)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Client(log_url, registry=registry) as client:
        async with Worker(registry, client.log, concurrency=concurrency, topics=client.topics,
                          client=client) as worker:
            err.print(
                f"stepline worker [bold]{worker.worker_id}[/] on {redact_text(log_url)}: "
                f"{len(registry)} task(s): {', '.join(registry.ids())}; partitions {sorted(worker.owned)}",
                highlight=False,
            )
            await stop.wait()


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


async def _serve_until(stop: asyncio.Event, serving: Coroutine[Any, Any, None], where: str,
                       hint: str = "") -> None:
    """Run `serving` until `stop` is set (SIGINT/SIGTERM); a port that cannot
    be bound is one clear error."""
    server = asyncio.create_task(serving)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({server, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.cancel()
    stopping.cancel()
    try:
        await server
    except asyncio.CancelledError:
        pass  # stopped by a signal
    except OSError as exc:  # the port is taken, the host is not ours
        raise CliError(f"cannot listen on {where}: {exc.strerror or exc}{hint}") from None


async def _serve_dev(registry: Registry, log_url: str, concurrency: int, port: int, query_db: str) -> None:
    """A worker and the HTTP API with the dashboard (auth off, loopback only), in one process."""
    from stepline.server import ServeConfig, serve_api

    sys.setswitchinterval(0.0005)  # as in _serve_worker: this process is ours
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    config = ServeConfig(api_token=None, webhooks={}, auth_required=False)

    def announce(addresses: list[str]) -> None:
        base = addresses[0]
        err.print(f"dashboard: {base}/   API: {base}/v1/ (no auth: local development only)", highlight=False)

    async with Client(log_url, registry=registry) as client:
        async with Worker(registry, client.log, concurrency=concurrency, topics=client.topics,
                          client=client) as worker:
            err.print(
                f"stepline dev: worker [bold]{worker.worker_id}[/] on {redact_text(log_url)}: "
                f"{len(registry)} task(s): {', '.join(registry.ids())}",
                highlight=False,
            )
            await _serve_until(stop, serve_api(client, config, registry, "127.0.0.1", port,
                                               query_db=query_db, on_listening=announce),
                               f"127.0.0.1:{port}", " (pick another with --port, or --port 0 for a free one)")


@app.command()
def dev(
    module: Annotated[str, typer.Argument(help="File or module declaring the tasks.")],
    log: LogOpt = DEFAULT_LOG_URL,
    concurrency: ConcurrencyOpt = 256,
    port: Annotated[int, typer.Option(callback=_setting("port"), help=_setting_help(
        "Port of the API and dashboard on 127.0.0.1; 0 picks a free one.", "port"))] = 8080,
    query_db: Annotated[str | None, typer.Option(
        "--query-db", show_default=False, callback=_setting("query_db"),
        help=_setting_help("SQLite file of the query projection behind the dashboard's lists "
                           "(default: beside a SQLite log, else " + DEFAULT_QUERY_DB + ").", "query_db"),
    )] = None,
) -> None:
    """Embedded log, a worker, and the HTTP API with the dashboard (no auth), in one process."""
    configure_logging(json_logs=False)
    registry = _load_app(module)
    _run(_serve_dev(registry, log, concurrency, port, query_db or _dev_query_db(log)))


@app.command()
def worker(
    module: Annotated[str, typer.Argument(help="File or module declaring the tasks.")],
    log: LogOpt = DEFAULT_LOG_URL,
    concurrency: ConcurrencyOpt = 256,
    json_logs: JsonLogsOpt = True,
) -> None:
    """Run a worker: owns partitions of the runs topic and executes their runs."""
    configure_logging(json_logs=json_logs)
    registry = _load_app(module)
    _run(_serve_worker(registry, log, concurrency))


def _source_pairs(entries: list[str], flag: str, shape: str, echo: bool) -> dict[str, str]:
    """`SOURCE=VALUE` entries as a dict; `echo=False` keeps secrets out of error messages."""
    pairs: dict[str, str] = {}
    for n, entry in enumerate(entries, 1):
        source, sep, value = entry.partition("=")
        if not sep or not source or not value:
            shown = repr(entry) if echo else f"#{n}"
            raise CliError(f"{flag} {shown} is not {shape}")
        if source in pairs:
            raise CliError(f"{flag} names source {source!r} twice")
        pairs[source] = value
    return pairs


def _webhook_sources(webhook: list[str] | None, webhook_event: list[str] | None) -> dict[str, WebhookSource]:
    from stepline.server import WebhookSource

    # Without --webhook flags, the option's callback filled in the setting.
    secrets = _source_pairs(webhook or [], "--webhook", "SOURCE=SECRET", echo=False)
    events = _source_pairs(webhook_event or [], "--webhook-event", "SOURCE=EVENT.NAME", echo=True)
    unknown = sorted(set(events) - set(secrets))
    if unknown:
        raise CliError(f"--webhook-event for source(s) without a --webhook secret: {', '.join(unknown)}")
    return {name: WebhookSource(name, secret, events.get(name)) for name, secret in secrets.items()}


async def _serve_http(
    config: ServeConfig, registry: Registry | None, log_url: str, host: str, port: int,
    query_db: str | None = None,
) -> None:
    from stepline.server import serve_api

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def announce(addresses: list[str]) -> None:
        sources = ", ".join(f"{s.name} -> {s.event}" for s in config.webhooks.values()) or "none"
        auth = "bearer token" if config.auth_required else "OFF (--no-auth)"
        err.print(f"stepline serve on {', '.join(addresses)} for {redact_text(log_url)}: auth {auth}; "
                  f"webhook sources: {sources}", highlight=False)

    async with Client(log_url, registry=registry) as client:
        await _serve_until(stop, serve_api(client, config, registry, host, port, query_db=query_db,
                                           on_listening=announce), f"{host}:{port}")


@app.command()
def serve(
    app_module: AppOpt = None,
    log: LogOpt = DEFAULT_LOG_URL,
    host: Annotated[str, typer.Option(callback=_setting("host"),
                                      help=_setting_help("Interface to listen on.", "host"))] = "127.0.0.1",
    port: Annotated[int, typer.Option(callback=_setting("port"),
                                      help=_setting_help("TCP port; 0 picks a free one.", "port"))] = 8080,
    api_token: Annotated[str | None, typer.Option(
        "--api-token", show_default=False, callback=_setting("api_token"),
        help=_setting_help("Bearer token the /v1/ API requires. Prefer the variable: other users can read argv.",
                           "api_token"),
    )] = None,
    webhook: Annotated[list[str] | None, typer.Option(
        "--webhook", show_default=False, callback=_setting("webhooks"),
        help=_setting_help("SOURCE=SECRET: accept deliveries signed with SECRET at /v1/webhooks/SOURCE "
                           "(repeatable; the variable is comma-separated SOURCE=SECRET).", "webhooks"),
    )] = None,
    webhook_event: Annotated[list[str] | None, typer.Option(
        "--webhook-event", show_default=False,
        help="SOURCE=EVENT.NAME: publish SOURCE's deliveries as EVENT.NAME, not webhook.SOURCE (repeatable).",
    )] = None,
    max_body_bytes: Annotated[int, typer.Option(min=1, callback=_setting("max_body_bytes"), help=_setting_help(
        "Largest request body accepted.", "max_body_bytes"))] = DEFAULT_MAX_BODY_BYTES,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve the API without a token (local use only).")] = False,
    query_db: Annotated[str, typer.Option(
        "--query-db", callback=_setting("query_db"),
        help=_setting_help("SQLite file of the query projection behind the run and event lists, kept up "
                           "to date by this process; '' serves without lists (they answer 503).", "query_db"),
    )] = DEFAULT_QUERY_DB,
    shadow_path: Annotated[str | None, typer.Option(
        "--shadow-path", envvar="STEPLINE_SHADOW_PATH", show_default=False,
        help="Folder whose modules GET /v1/runs/{id}/shadow?module=NAME may import and run "
             "(needs the token; default: none, only the --app code)."),
    ] = None,
    json_logs: JsonLogsOpt = True,
) -> None:
    """Serve the HTTP API: trigger runs, publish events, read and list runs, receive signed webhooks."""
    from stepline.server import ServeConfig

    configure_logging(json_logs=json_logs)
    if not api_token and not no_auth:
        _fail("stepline serve needs an API token: set STEPLINE_API_TOKEN (or api_token in stepline.toml, "
              "or pass --api-token), or pass --no-auth for local development")
    registry = _load_app(app_module) if app_module else None
    try:
        config = ServeConfig(api_token, _webhook_sources(webhook, webhook_event),
                             max_body_bytes=max_body_bytes, auth_required=not no_auth,
                             shadow_path=shadow_path)
        if shadow_path is not None and not os.path.isdir(shadow_path):
            raise CliError(f"--shadow-path {shadow_path!r} is not a folder")
    except (SteplineError, CliError) as exc:
        _fail(str(exc))
        raise
    _run(_serve_http(config, registry, log, host, port, query_db or None))


# --- requests ------------------------------------------------------------


@app.command()
def trigger(
    task: Annotated[str, typer.Argument(help="Task id.")],
    payload: Annotated[str, typer.Option(help="Payload as JSON.")] = "null",
    app_module: AppOpt = None,
    log: LogOpt = DEFAULT_LOG_URL,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    delay: Annotated[float | None, typer.Option(help="Seconds before the run may start.")] = None,
    priority: Annotated[int, typer.Option()] = 0,
    tag: Annotated[list[str] | None, typer.Option(help="Tag (repeatable).")] = None,
    concurrency_key: Annotated[str | None, typer.Option(help="Key the queue's key_limit applies to.")] = None,
    ttl: Annotated[float | None, typer.Option(help="Seconds the run may wait to start before it expires.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the run to end.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait with --wait.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Trigger a run of TASK."""

    async def go() -> dict[str, Any]:
        registry = _registry(app_module, "stepline trigger")
        t = registry.get(task)
        value = _parse_json(payload, "--payload")
        async with Client(log, registry=registry) as client:
            handle = await client.trigger(
                t, value, idempotency_key=idempotency_key, delay=delay,
                priority=priority, tags=tag or (), concurrency_key=concurrency_key, ttl=ttl,
            )
            result: dict[str, Any] = {"run_id": handle.run_id, "task_id": t.id}
            if wait:
                await _await_outcome(client, handle.run_id, handle.offset, timeout, result)
            return result

    res = _run(go())
    _print_started(res, f"triggered [bold]{res['task_id']}[/]: {res['run_id']}", wait, as_json)


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


@app.command()
def publish(
    name: Annotated[str, typer.Argument(help="Event name, e.g. user.created.")],
    data: Annotated[str, typer.Option(help="Event data as JSON.")] = "null",
    key: Annotated[str | None, typer.Option(help="Partitioning key (keeps order per key).")] = None,
    log: LogOpt = DEFAULT_LOG_URL,
    as_json: JsonOpt = False,
) -> None:
    """Publish a domain event on the events topic."""

    async def go() -> str:
        value = _parse_json(data, "--data")
        async with Client(log) as client:
            return await client.publish(name, value, key=key, source="cli")

    event_id = _run(go())
    if as_json:
        _print_json({"event_id": event_id, "name": name, "key": key})
    else:
        out.print(f"published {name}: {event_id}", highlight=False)


@app.command()
def cancel(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    log: LogOpt = DEFAULT_LOG_URL,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a pending, running, sleeping or retrying run."""

    async def go() -> RunState:
        async with Client(log) as client:
            return await client.cancel(run_id)

    state = _run(go())
    if as_json:
        _print_json({"run_id": run_id, "cancelled": True, "was": state.status})
    else:
        out.print(f"cancel requested for {run_id} (was {state.status})", highlight=False)


@app.command("complete-token")
def complete_token(
    token: Annotated[str, typer.Argument(help="The token a run waits on (tok_...).")],
    data: Annotated[str, typer.Option(help="What wait_for_token returns, as JSON.")] = "null",
    log: LogOpt = DEFAULT_LOG_URL,
    as_json: JsonOpt = False,
) -> None:
    """Resume a run waiting in wait_for_token (a human approval, a callback)."""
    value = _parse_json(data, "--data")

    async def go() -> RunState:
        async with Client(log) as client:
            return await client.complete_token(token, value)

    state = _run(go())
    if as_json:
        _print_json({"token": token, "run_id": state.run_id, "completed": True})
    else:
        out.print(f"token completed; run {state.run_id} resumes", highlight=False)


@app.command()
def backfill(
    task: Annotated[str, typer.Argument(help="Id of a task with a subscription (on=sl.Subscription(...)).")],
    since: Annotated[str, typer.Option(help="How far back: a duration (30d, 12h, 15m) or an ISO 8601 time.")],
    until: Annotated[str | None, typer.Option(help="Up to (default: now); same forms as --since.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count the events and the runs to start.")] = False,
    app_module: AppOpt = None,
    log: LogOpt = DEFAULT_LOG_URL,
    as_json: JsonOpt = False,
) -> None:
    """Start TASK for the past events its subscriptions match (idempotent:
    events whose run exists, routed live or backfilled before, start nothing)."""
    from stepline.client.backfill import BackfillReport
    from stepline.client.backfill import backfill as run_backfill

    async def go() -> BackfillReport:
        registry = _registry(app_module, "stepline backfill")
        async with Client(log, registry=registry) as client:
            with _progress("reading the events topic") as progress:
                try:
                    return await run_backfill(task, since=since, until=until, dry_run=dry_run,
                                              client=client, progress=progress)
                except ValueError as exc:
                    raise CliError(str(exc)) from None

    report = _run(go())
    if as_json:
        _print_json(report.as_dict())
        return
    window = f"{_time(report.since)} to {_time(report.until)} UTC"
    out.print(f"{report.matched} matching event(s) of {report.scanned} from {window}; "
              f"{report.existing} already have a run", highlight=False)
    if dry_run:
        out.print(f"dry run: {report.to_start} run(s) of {task} would start", highlight=False)
    else:
        out.print(f"started {report.started} run(s) of {task}", highlight=False)


# --- reading -------------------------------------------------------------


def _runs_table(runs: list[RunState], title: str) -> Table:
    table = Table(title=title)
    table.add_column("run", no_wrap=True)
    for col in ("task", "status", "attempt"):
        table.add_column(col)
    table.add_column("created", no_wrap=True)
    table.add_column("error")
    for r in runs:
        status = r.status + (" (dead letter)" if r.dead_lettered else "")
        error = f"{r.error.type}: {r.error.message}" if r.error and r.status == FAILED else ""
        table.add_row(r.run_id, r.task_id, status, str(r.attempt_in_trigger), _time(r.created_at), error[:80])
    return table


async def _list(log: str) -> list[RunState]:
    async with Client(log) as client:
        with _progress("reading runs") as progress:
            return await client.list_runs(progress)


@runs_app.command("ls")
def runs_ls(
    log: LogOpt = DEFAULT_LOG_URL,
    status: Annotated[str | None, typer.Option(help="Only runs with this status.")] = None,
    task: Annotated[str | None, typer.Option(help="Only runs of this task.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first."""
    runs = _run(_list(log))
    runs = [r for r in runs if (status is None or r.status == status) and (task is None or r.task_id == task)]
    runs = runs[:limit]
    if as_json:
        _print_json(_shown([state_dict(r) for r in runs], log))
    else:
        out.print(_runs_table(runs, f"{len(runs)} run(s)"))


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    log: LogOpt = DEFAULT_LOG_URL,
    as_of: Annotated[str | None, typer.Option(
        "--as-of", show_default=False,
        help="The state at a past point: a log offset (inclusive), an ISO-8601 time (UTC unless it "
             "names a zone) or a relative time such as -5m.",
    )] = None,
    as_json: JsonOpt = False,
) -> None:
    """A run's state: status, steps with inputs and outputs, retries, errors."""
    from stepline.history.replay import StateAt, iso_ms, parse_point, state_at

    async def go() -> RunState | StateAt:
        async with Client(log) as client:
            if as_of is None:
                return await client.get_run(run_id)
            try:
                point = parse_point(as_of, client.clock())
            except ValueError as exc:
                raise CliError(str(exc)) from None
            events = await client.history(run_id)
            if not events:
                from stepline.errors import UnknownRun

                raise UnknownRun(run_id)
            try:
                return state_at(run_id, events, point)
            except ValueError as exc:
                raise CliError(str(exc)) from None

    found = _run(go())
    at = found if isinstance(found, StateAt) else None
    state = found.state if isinstance(found, StateAt) else found
    d = _shown(state_dict(state), log)
    if as_json:
        _print_json(d if at is None else {**d, "as_of": {**at.header(), "requested": as_of}})
        return
    if at is not None:
        out.print(f"as of offset {at.offset} ({iso_ms(at.time)}): event {at.events} of {at.total}, "
                  f"{at.type}", highlight=False, markup=False)
    out.print(f"[bold]{state.run_id}[/]  task {state.task_id}  [bold]{state.status}[/]"
              f"{' (dead letter)' if state.dead_lettered else ''}  attempt {state.attempt_in_trigger}",
              highlight=False)
    if state.status == "suspended" and state.wake_at is not None:
        out.print(f"wakes at {iso_ms(state.wake_at)}", highlight=False, markup=False)
    elif state.status == "retrying" and state.retry_at is not None:
        out.print(f"retries at {iso_ms(state.retry_at)}", highlight=False, markup=False)
    if state.forked_from is not None:
        out.print(f"forked from {state.forked_from} at step {state.forked_at_step} (attempt 0: copied steps)",
                  highlight=False, markup=False)
    if state.task_version is not None or state.patches:
        patches = ", ".join(f"{x.patch}={'on' if x.applied else 'off'}" for x in state.patches)
        out.print(f"task version {state.task_version or '-'}" + (f"; patches: {patches}" if patches else ""),
                  highlight=False, markup=False)
    out.print(f"payload: {json.dumps(d['payload'])}", highlight=False)
    table = Table(title="steps")
    for col in ("#", "name", "status", "attempt", "ms", "output / error"):
        table.add_column(col)
    for st in d["steps"]:
        ms = "" if st["ended_at"] is None or st["started_at"] is None else str(st["ended_at"] - st["started_at"])
        table.add_row(str(st["step"]), st["name"], st["status"], str(st["attempt"]), ms,
                      (st["error"] or json.dumps(st["output"]))[:100])
    out.print(table)
    for r in d["retries"]:
        out.print(f"retry → attempt {r['attempt']} after {r['delay_ms']} ms: {r['reason']}", highlight=False)
    if state.output is not None:
        out.print(f"output: {json.dumps(d['output'])}", highlight=False)
    if state.error is not None and state.status == FAILED:
        out.print(f"error: {state.error.type}: {state.error.message}", highlight=False)
        out.print(state.error.stack, highlight=False)


# Body fields holding times (ms): shown as ISO times by `history`.
_TIME_FIELDS = frozenset({"retry_at", "wake_at", "not_before", "expires_at"})
# Body fields holding JSON text: shown parsed.
_JSON_TEXT_FIELDS = frozenset({"condition", "fields"})


def _is_error(v: Any) -> bool:
    return isinstance(v, dict) and "type" in v and "message" in v and "retriable" in v


def _body_text(body: dict[str, Any]) -> str:
    """`name=value` pairs, values as JSON: readable, and still greppable."""
    from stepline.history.replay import iso_ms

    parts = []
    for name, v in body.items():
        if v is None or v == []:
            continue
        if name in _TIME_FIELDS and isinstance(v, int):
            v = iso_ms(v)
        elif name in _JSON_TEXT_FIELDS and isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                pass
        elif _is_error(v):
            v = f"{v['type']}: {v['message']}" + ("" if v["retriable"] else " (not retriable)")
        parts.append(f"{name}={json.dumps(v, default=str, ensure_ascii=False)}")
    return " ".join(parts)


@app.command()
def history(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    log: LogOpt = DEFAULT_LOG_URL,
    stacks: Annotated[bool, typer.Option("--stacks", help="Show the stack of each recorded error.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Every event of a run, in log order: offset, time (UTC), type and body."""
    from stepline.history.replay import iso_ms

    async def go() -> list[tuple[int, Event]]:
        async with Client(log) as client:
            with _progress("reading history") as progress:
                events = await client.history(run_id, progress)
            if not events:
                from stepline.errors import UnknownRun

                raise UnknownRun(run_id)
            return events

    events = _run(go())
    rows = _shown([event_dict(off, ev, stacks=stacks) for off, ev in events], log)
    if as_json:
        _print_json(rows)
        return
    out.print(f"history of [bold]{run_id}[/] ({rows[0]['task_id']}): {len(rows)} event(s)", highlight=False)
    offset_w = max(len(str(r["offset"])) for r in rows)
    type_w = max(len(r["type"]) for r in rows)
    for row in rows:
        # markup=False: bodies are user data, and "[...]" in them is not Rich markup.
        out.print(f"{row['offset']:>{offset_w}}  {iso_ms(row['time'])}  {row['type']:<{type_w}}  "
                  f"{_body_text(row['body'])}", highlight=False, markup=False)
        for v in row["body"].values():
            if stacks and _is_error(v) and v.get("stack"):
                out.print("    " + v["stack"].rstrip().replace("\n", "\n    "), highlight=False, markup=False)


@dlq_app.command("ls")
def dlq_ls(log: LogOpt = DEFAULT_LOG_URL, as_json: JsonOpt = False) -> None:
    """Runs that failed for good, with their last error."""
    runs = [r for r in _run(_list(log)) if r.dead_lettered]
    if as_json:
        _print_json(_shown([state_dict(r) for r in runs], log))
    else:
        out.print(_runs_table(runs, f"{len(runs)} dead letter(s)"))


@dlq_app.command("retry")
def dlq_retry(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    payload: Annotated[str | None, typer.Option(help="Replacement payload as JSON.")] = None,
    app_module: AppOpt = None,
    log: LogOpt = DEFAULT_LOG_URL,
    as_json: JsonOpt = False,
) -> None:
    """Re-trigger a dead letter; it resumes from its last completed step."""

    async def go() -> RunState:
        registry = load_app(app_module) if app_module else None
        new_value = _parse_json(payload, "--payload") if payload is not None else None
        async with Client(log, registry=registry) as client:
            return await client.retry(run_id, new_value, new_payload=payload is not None)

    state = _run(go())
    if as_json:
        _print_json({"run_id": run_id, "retriggered": True, "new_payload": payload is not None})
    else:
        out.print(f"retriggered {run_id} ({state.task_id}); it resumes after step "
                  f"{state.completed_steps() - 1 if state.completed_steps() else '-'}", highlight=False)


def _shown(value: T, log: str) -> T:
    """Sensitive fields as "[redacted]", or "[erased]" once forgotten (never decrypted)."""
    from stepline.security.keystore import default_keystore
    from stepline.security.sensitive import shown

    result: T = _run(shown(value, default_keystore(log)))
    return result


@app.command()
def forget(
    subject: Annotated[str, typer.Argument(help="The subject id (the value of the task's subject= field).")],
    log: LogOpt = DEFAULT_LOG_URL,
    keys: Annotated[str | None, typer.Option(
        "--keys", help="Key store URL (default: STEPLINE_KEYS, else beside an embedded log).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Erase a subject (GDPR): delete its key, so its sensitive fields are unreadable everywhere."""
    from stepline.security.keystore import default_keystore, open_keystore

    try:
        store = open_keystore(keys) if keys else default_keystore(log)
    except SteplineError as exc:
        store = None
        _fail(str(exc))
    if store is None:
        _fail("no key store is configured for this log: pass --keys sqlite:///path/keys.db or set STEPLINE_KEYS")
        return

    async def go() -> list[str]:
        try:
            return await store.forget(subject)
        finally:
            await store.close()

    kids = _run(go())
    if as_json:
        _print_json({"subject": subject, "erased": bool(kids), "keys_deleted": len(kids)})
    elif kids:
        out.print(f"forgot {subject}: {len(kids)} key(s) deleted; its sensitive fields now read [erased]",
                  highlight=False, markup=False)
    else:
        out.print(f"{subject} has no key in {store.url}: nothing to erase", highlight=False, markup=False)


@app.command()
def replay(
    check: Annotated[str | None, typer.Option(
        "--check", help="MODULE: re-execute recorded runs against this code, without side effects, "
                        "and report non-determinism.")] = None,
    projection: Annotated[str | None, typer.Option(
        "--projection", help="Rebuild a projection from offset 0: 'query' (the API's read model).")] = None,
    run: Annotated[list[str] | None, typer.Option("--run", help="Only this run (repeatable).")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", help="Only runs of this task (repeatable).")] = None,
    query_db: Annotated[str, typer.Option(callback=_setting("query_db"), help=_setting_help(
        "The query projection's database.", "query_db"))] = DEFAULT_QUERY_DB,
    log: LogOpt = DEFAULT_LOG_URL,
    as_json: JsonOpt = False,
) -> None:
    """Replay the log: check recorded runs against new code, or rebuild a projection."""
    if (check is None) == (projection is None):
        _fail("pass exactly one of --check MODULE or --projection query")
    if projection is not None:
        _replay_projection(projection, query_db, log, as_json)
        return
    assert check is not None
    from stepline.history.replay import check_runs

    registry = _load_app(check)

    async def go() -> Any:
        with _progress("replaying runs", threshold=1) as progress:
            return await check_runs(log, registry, run_ids=run or None, task_ids=task or None,
                                    progress=progress)

    report = _run(go())
    if as_json:
        _print_json(report.to_dict())
    else:
        for p in report.problems:
            where = f" at step {p.position}" if p.position is not None else ""
            out.print(f"[bold red]{p.kind}[/] {p.run_id} ({p.task_id}, {p.status}){where}: {p.message}",
                      highlight=False)
        out.print(f"checked {report.checked} run(s): {report.ok} ok, {len(report.problems)} problem(s), "
                  f"{report.skipped} skipped (task not in {check})", highlight=False)
    if report.problems:
        raise typer.Exit(1)


def _replay_projection(name: str, db: str, log_url: str, as_json: bool) -> None:
    if name != "query":
        _fail(f"unknown projection {name!r}; the one rebuildable projection is 'query'")
    from stepline.projections.query import rebuild

    async def go() -> int:
        with _progress("rebuilding the query projection", threshold=1) as progress:
            return await rebuild(log_url, db, progress)

    started = time.monotonic()
    applied = _run(go())
    elapsed = time.monotonic() - started
    if as_json:
        _print_json({"projection": name, "db": db, "events": applied, "seconds": round(elapsed, 3)})
    else:
        out.print(f"rebuilt the query projection {db}: {applied:,} events in {elapsed:.1f} s", highlight=False)


def _register_more() -> None:
    # fork and shadow live in a module of their own (engine/cli/history.py).
    from stepline.cli.history import register

    register(app)
    # pause, resume and the bulk runs commands (engine/cli/ops.py).
    from stepline.cli import ops as cli_ops

    cli_ops.register(app)
    # events: the engine's events as JSON lines (engine/cli/events.py).
    from stepline.cli import events as cli_events

    cli_events.register(app)


_register_more()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
