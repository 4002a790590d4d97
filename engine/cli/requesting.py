"""`stepline trigger`, `publish`, `cancel`, `complete-token` and `backfill`: requests
appended to the log."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from stepline.cli._common import (
    TIMEOUT_HELP,
    WAIT_HELP,
    CliError,
    _await_outcome,
    _parse_json,
    _print_json,
    _print_started,
    _progress,
    _registry,
    _run,
    _time,
    out,
)
from stepline.cli.options import AppOpt, JsonOpt, LogOpt
from stepline.client import Client
from stepline.client.backfill import BackfillReport
from stepline.client.backfill import backfill as run_backfill
from stepline.log import DEFAULT_LOG_URL
from stepline.projections.runs import RunState


def trigger(
    task: Annotated[str, typer.Argument(help="Task id.")],
    payload: Annotated[str, typer.Option(help="Payload as JSON.")] = "null",
    app_module: AppOpt = None,
    log: LogOpt = DEFAULT_LOG_URL,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Trigger at most once per key: a repeat returns the run the key started.")] = None,
    delay: Annotated[float | None, typer.Option(help="Seconds before the run may start.")] = None,
    priority: Annotated[int, typer.Option(help="Ready runs with a higher priority start first.")] = 0,
    tag: Annotated[list[str] | None, typer.Option(help="Tag (repeatable).")] = None,
    concurrency_key: Annotated[str | None, typer.Option(help="Key the queue's key_limit applies to.")] = None,
    ttl: Annotated[float | None, typer.Option(help="Seconds the run may wait to start before it expires.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help=WAIT_HELP)] = False,
    timeout: Annotated[float | None, typer.Option(help=TIMEOUT_HELP)] = None,
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


def register(app: typer.Typer) -> None:
    app.command()(trigger)
    app.command()(publish)
    app.command()(cancel)
    app.command("complete-token")(complete_token)
    app.command()(backfill)


__all__ = ["register"]
