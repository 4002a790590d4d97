"""`stepline runs ls|show`, `history`, `dlq ls|retry`, `forget` and `replay`:
reading the log, and what follows from reading it."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from stepline.cli._common import (
    CliError,
    _fail,
    _load_app,
    _parse_json,
    _print_json,
    _print_table,
    _progress,
    _registry,
    _require_log,
    _run,
    _shown,
    _time,
    out,
)
from stepline.cli.options import AppOpt, JsonOpt, LogOpt, _setting, _setting_help
from stepline.client import Client
from stepline.client.backfill import parse_time
from stepline.core.events import Event
from stepline.errors import SteplineError, UnknownRun
from stepline.history.replay import StateAt, check_runs, iso_ms, parse_point, state_at
from stepline.log import DEFAULT_LOG_URL
from stepline.projections.query import rebuild
from stepline.projections.query_store import DEFAULT_QUERY_DB
from stepline.projections.runs import FAILED, LIVE, TERMINAL, RunState
from stepline.projections.views import event_dict, state_dict
from stepline.sdk.task import Registry, load_app
from stepline.security.keystore import default_keystore, open_keystore


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
        table.add_row(r.run_id, r.task_id, status, str(r.attempt), _time(r.created_at), error[:80])
    return table


async def _list(log: str) -> list[RunState]:
    async with Client(log) as client:
        with _progress("reading runs") as progress:
            return await client.list_runs(progress)


def _statuses(given: list[str] | None) -> set[str]:
    """--status values (repeatable, or comma-separated), each one a run status."""
    wanted = {s for v in given or () for s in v.split(",") if s}
    known = LIVE | TERMINAL
    unknown = sorted(wanted - known)
    if unknown:
        # The words of `runs cancel --status` (engine/server/ops_api.py), for the same mistake.
        _fail(f"unknown status {', '.join(map(repr, unknown))}; one of {', '.join(sorted(known))}")
    return wanted


def _when(value: str | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_time(value, int(time.time() * 1000), flag)
    except ValueError as exc:
        _fail(str(exc))
        raise


def runs_ls(
    log: LogOpt = DEFAULT_LOG_URL,
    status: Annotated[list[str] | None, typer.Option(
        help="Only runs in this state (repeatable): " + ", ".join(sorted(LIVE | TERMINAL)) + ".")] = None,
    task: Annotated[str | None, typer.Option(help="Only runs of this task.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Only runs with this tag (repeatable: all of them).")] = None,
    since: Annotated[str | None, typer.Option(help="Created at or after: a duration back (24h, 7d) or an "
                                                    "ISO 8601 time.")] = None,
    until: Annotated[str | None, typer.Option(help="Created before; as --since.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first."""
    statuses = _statuses(status)
    start, end = _when(since, "--since"), _when(until, "--until")
    tags = set(tag or ())
    _require_log(log)
    runs = [r for r in _run(_list(log))
            if (not statuses or r.status in statuses) and (task is None or r.task_id == task)
            and tags <= set(r.tags) and (start is None or r.created_at >= start)
            and (end is None or r.created_at < end)]
    runs = runs[:limit]
    if as_json:
        _print_json(_shown([state_dict(r) for r in runs], log))
    else:
        _print_table(_runs_table(runs, f"{len(runs)} run(s)"))


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
    _require_log(log)
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
              f"{' (dead letter)' if state.dead_lettered else ''}  attempt {state.attempt}",
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
    _print_table(table)
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


def history(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    log: LogOpt = DEFAULT_LOG_URL,
    stacks: Annotated[bool, typer.Option("--stacks", help="Show the stack of each recorded error.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Every event of a run, in log order: offset, time (UTC), type and body."""
    _require_log(log)
    async def go() -> list[tuple[int, Event]]:
        async with Client(log) as client:
            with _progress("reading history") as progress:
                events = await client.history(run_id, progress)
            if not events:
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


def dlq_ls(log: LogOpt = DEFAULT_LOG_URL, as_json: JsonOpt = False) -> None:
    """Runs that failed for good, with their last error."""
    _require_log(log)
    runs = [r for r in _run(_list(log)) if r.dead_lettered]
    if as_json:
        _print_json(_shown([state_dict(r) for r in runs], log))
    else:
        _print_table(_runs_table(runs, f"{len(runs)} dead letter(s)"))


def dlq_retry(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    payload: Annotated[str | None, typer.Option(
        help="Replacement payload as JSON, validated against the task's model (needs --app).")] = None,
    app_module: AppOpt = None,
    log: LogOpt = DEFAULT_LOG_URL,
    as_json: JsonOpt = False,
) -> None:
    """Re-trigger a dead letter; it resumes from its last completed step."""

    async def go() -> RunState:
        # A new payload nobody validated would only fail the run again, with
        # PayloadValidationError: as `trigger`, it needs the task's model.
        if payload is not None:
            registry: Registry | None = _registry(app_module, "stepline dlq retry --payload")
        else:
            registry = load_app(app_module) if app_module else None
        new_value = _parse_json(payload, "--payload") if payload is not None else None
        async with Client(log, registry=registry) as client:
            return await client.retry(run_id, new_value, new_payload=payload is not None)

    state = _run(go())
    if as_json:
        _print_json({"run_id": run_id, "retriggered": True, "new_payload": payload is not None})
    else:
        done = state.completed_steps()
        where = f"it resumes after step {done - 1}" if done else "no step had completed: it starts from the beginning"
        out.print(f"retriggered {run_id} ({state.task_id}); {where}", highlight=False, markup=False)


def forget(
    subject: Annotated[str, typer.Argument(help="The subject id (the value of the task's subject= field).")],
    log: LogOpt = DEFAULT_LOG_URL,
    keys: Annotated[str | None, typer.Option(
        "--keys", help="Key store URL (default: STEPLINE_KEYS, else beside an embedded log).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Erase a subject (GDPR): delete its key, so its sensitive fields are unreadable everywhere."""
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
    _require_log(log)
    if projection is not None:
        _replay_projection(projection, query_db, log, as_json)
        return
    assert check is not None
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


def register(app: typer.Typer, runs_app: typer.Typer, dlq_app: typer.Typer) -> None:
    runs_app.command("ls")(runs_ls)
    runs_app.command("show")(runs_show)
    app.command()(history)
    dlq_app.command("ls")(dlq_ls)
    dlq_app.command("retry")(dlq_retry)
    app.command()(forget)
    app.command()(replay)


__all__ = ["register"]
