"""`stepline pause|resume` and `stepline runs cancel|retry|replay`: operations at fleet scale.

Registered on the CLI's app by `engine/cli/main.py` (`register(app)`), over the
helpers of engine/cli/_common.py.

The bulk commands select runs from a query projection (the file `stepline
dev` keeps beside a SQLite log, else `--query-db`), brought up to the log's
end first, so they act on exactly what `GET /v1/runs` with the same filter
lists. Without `--yes` they count first and ask.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from stepline.cli._common import _dev_query_db, _print_json, _require_log, _run, err, out
from stepline.cli._help import App
from stepline.cli.options import AppOpt, JsonOpt, LogOpt, _setting, _setting_help
from stepline.client import Client
from stepline.client.bulk import BulkReport, bulk_action
from stepline.client.pause import set_paused
from stepline.log import DEFAULT_LOG_URL
from stepline.projections.query import QueryProjector
from stepline.projections.query_store import QueryStore
from stepline.sdk.task import load_app

pause_app = App(no_args_is_help=True, help="Hold a task's or a queue's runs: they stay queued until resumed.")
resume_app = App(no_args_is_help=True, help="Resume a paused task or queue.")


def _set(scope: str, name: str, paused: bool, reason: str, app_module: str | None, log: str,
         as_json: bool) -> None:
    async def go() -> None:
        registry = load_app(app_module) if app_module else None
        async with Client(log, registry=registry) as client:
            await set_paused(client, scope, name, paused, reason=reason, requested_by="cli")

    _run(go())
    if as_json:
        _print_json({"scope": scope, "name": name, "paused": paused, "reason": reason})
    elif paused:
        out.print(f"paused {scope} {name}: its runs stay queued until `stepline resume {scope} {name}`",
                  highlight=False)
    else:
        out.print(f"resumed {scope} {name}", highlight=False)


@pause_app.command("task")
def pause_task(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    reason: Annotated[str, typer.Option(help="Why, shown with the pause.")] = "",
    app_module: AppOpt = None, log: LogOpt = DEFAULT_LOG_URL, as_json: JsonOpt = False,
) -> None:
    """Pause a task: new and retrying runs stay queued; attempts under way finish."""
    _set("task", task_id, True, reason, app_module, log, as_json)


@pause_app.command("queue")
def pause_queue(
    name: Annotated[str, typer.Argument(help="Queue name.")],
    reason: Annotated[str, typer.Option(help="Why, shown with the pause.")] = "",
    app_module: AppOpt = None, log: LogOpt = DEFAULT_LOG_URL, as_json: JsonOpt = False,
) -> None:
    """Pause a queue: no run of any task on it starts an attempt until resumed."""
    _set("queue", name, True, reason, app_module, log, as_json)


@pause_app.command("ls")
def pause_ls(log: LogOpt = DEFAULT_LOG_URL, as_json: JsonOpt = False) -> None:
    """What is paused."""
    _require_log(log)
    async def go() -> dict[tuple[str, str], str]:
        async with Client(log) as client:
            return await client.paused()

    found = _run(go())
    if as_json:
        _print_json([{"scope": s, "name": n, "reason": r} for (s, n), r in sorted(found.items())])
        return
    if not found:
        out.print("nothing is paused", highlight=False)
    for (scope, name), reason in sorted(found.items()):
        out.print(f"{scope} {name}" + (f": {reason}" if reason else ""), highlight=False, markup=False)


@resume_app.command("task")
def resume_task(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    app_module: AppOpt = None, log: LogOpt = DEFAULT_LOG_URL, as_json: JsonOpt = False,
) -> None:
    """Resume a paused task: its held runs start in their usual order."""
    _set("task", task_id, False, "", app_module, log, as_json)


@resume_app.command("queue")
def resume_queue(
    name: Annotated[str, typer.Argument(help="Queue name.")],
    app_module: AppOpt = None, log: LogOpt = DEFAULT_LOG_URL, as_json: JsonOpt = False,
) -> None:
    """Resume a paused queue."""
    _set("queue", name, False, "", app_module, log, as_json)


# --- bulk ----------------------------------------------------------------------------


async def _bulk(client: Client, query_db: str, action: str, filt: dict[str, Any], dry_run: bool,
                request_id: str | None) -> BulkReport:
    # Imported when the command runs: the server's package imports aiohttp, slow to import (start-up).
    from stepline.server.ops_api import parse_filter

    async with QueryStore(query_db) as store:
        await QueryProjector(client.log, store, topics=client.topics).catch_up()
        where = parse_filter(filt, client.clock())
        return await bulk_action(client, store, action, where, dry_run=dry_run, request_id=request_id,
                                 requested_by="cli")


def _describe(report: BulkReport) -> str:
    verb = {"cancel": "cancel", "retry": "retry", "replay": "replay"}[report.action]
    head = f"{report.matched} run(s) match; "
    head += f"would {verb} {report.acted}" if report.dry_run else f"{verb}: {report.acted} requested"
    if report.skipped:
        head += "; skipped " + ", ".join(f"{n} {why}" for why, n in sorted(report.skipped.items()))
    return head


def _bulk_command(action: str) -> Any:
    def command(
        task: Annotated[str | None, typer.Option(help="Only runs of this task.")] = None,
        status: Annotated[list[str] | None, typer.Option(help="Only runs in this state (repeatable).")] = None,
        tag: Annotated[list[str] | None, typer.Option(help="Only runs with this tag (repeatable: all of them).")] = None,
        since: Annotated[str | None, typer.Option(help="Created at or after: a duration back (24h, 7d) or an "
                                                        "ISO 8601 time.")] = None,
        until: Annotated[str | None, typer.Option(help="Created before (default: now); as --since.")] = None,
        error_type: Annotated[str | None, typer.Option("--error-type", help="Only runs whose last error has this "
                                                                            "type, e.g. TimeoutError.")] = None,
        text: Annotated[str | None, typer.Option("--text", help="Only runs with this text in payload or output.")] = None,
        # The name before --text, kept for scripts that use it (the API's query parameter is `q`).
        text_q: Annotated[str | None, typer.Option("--q", hidden=True)] = None,
        dead_letter: Annotated[bool | None, typer.Option("--dead-letter/--not-dead-letter", show_default=False,
                                                         help="Only dead letters, or only other runs.")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be done.")] = False,
        yes: Annotated[bool, typer.Option("--yes", "-y", help="Act without asking.")] = False,
        request_id: Annotated[str | None, typer.Option(
            "--request-id", help="Repeat a request with its id: no run is acted on twice.")] = None,
        query_db: Annotated[str | None, typer.Option(
            "--query-db", callback=_setting("query_db"), show_default=False,
            help=_setting_help("Query projection file to select runs from (default: the one `stepline dev` "
                               "keeps for the log); brought up to date first.", "query_db"))] = None,
        log: LogOpt = DEFAULT_LOG_URL,
        as_json: JsonOpt = False,
    ) -> None:
        _require_log(log)
        filt: dict[str, Any] = {"task": task, "status": status or None, "tag": tag or None, "since": since,
                                "until": until, "error_type": error_type, "q": text if text is not None else text_q,
                                "dead_letter": dead_letter}
        db = query_db or _dev_query_db(log)

        async def go(dry: bool, rid: str | None) -> BulkReport:
            async with Client(log) as client:
                return await _bulk(client, db, action, filt, dry, rid)

        if dry_run or not yes:
            preview = _run(go(True, request_id))
            if dry_run:
                if as_json:
                    _print_json(preview.as_dict())
                else:
                    out.print(_describe(preview), highlight=False)
                return
            err.print(_describe(preview), highlight=False)
            if preview.acted == 0:
                if as_json:
                    _print_json(preview.as_dict())
                return
            if not typer.confirm(f"{action} {preview.acted} run(s)?", err=True):
                raise typer.Exit(1)
            # The window the count covered, so the action is about the same runs.
            filt["to"] = preview.where.created_to
            request_id = preview.request_id
        report = _run(go(False, request_id))
        if as_json:
            _print_json(report.as_dict())
        else:
            out.print(_describe(report) + f" (request {report.request_id})", highlight=False)

    command.__doc__ = {
        "cancel": "Cancel every live run the filter selects (count first with --dry-run).",
        "retry": "Retry every failed or cancelled run the filter selects, from its last completed step.",
        "replay": "Run again, from scratch as new runs, every ended run the filter selects (same payload).",
    }[action]
    return command


def register(app: typer.Typer) -> None:
    app.add_typer(pause_app, name="pause")
    app.add_typer(resume_app, name="resume")
    runs = next(g.typer_instance for g in app.registered_groups if g.name == "runs")
    assert runs is not None
    for action in ("cancel", "retry", "replay"):
        runs.command(action)(_bulk_command(action))


__all__ = ["register"]
