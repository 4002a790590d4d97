"""`stepline archive` and `stepline prune`: retention of ended runs.

Registered on the CLI's app by `engine/cli/main.py` (`register(app)`), over
the helpers of engine/cli/_common.py. What may go, and why that is safe, is
engine/runtime/retention.py; the file format is engine/runtime/archive.py.

Both take `--ended-before` as a duration back from now (30d, 12h) or an
ISO 8601 time. `archive` prints the time it resolved to, so a `prune`
given that same time removes exactly the runs the archive holds. Like the
bulk commands, `prune` without `--yes` counts first and asks, and refuses
when nobody can answer.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, TypeVar

import typer

from stepline.cli._common import CliError, _dev_query_db, _fail, _print_json, _progress, _run, err, out
from stepline.cli.options import JsonOpt, LogOpt, _setting, _setting_help
from stepline.errors import SteplineError, UnknownTopic
from stepline.log import DEFAULT_LOG_URL, open_log
from stepline.log.base import Log
from stepline.log.topics import Topics
from stepline.projections.query import QueryProjector, log_identity
from stepline.projections.query_store import QueryStore
from stepline.runtime.archive import ArchiveReport, check_writable, write_archive
from stepline.runtime.retention import Plan, PruneReport, plan, prune

T = TypeVar("T")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^(\d+)([smhdw])$")

EndedBeforeOpt = Annotated[str, typer.Option(
    "--ended-before", metavar="AGE|TIME",
    help="Runs that ended before this: a duration back from now (30d, 12h, 2w) or an ISO 8601 time "
         "with a zone (2025-01-31T00:00:00Z).")]


def parse_ended_before(text: str, now_ms: int) -> int:
    """ms since the epoch; CliError naming the value when it is neither form."""
    found = _DURATION.match(text.strip())
    if found:
        return now_ms - int(found.group(1)) * _UNITS[found.group(2)] * 1000
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise CliError(f"--ended-before {text!r} is neither a duration (30d, 12h, 45m, 2w) nor an ISO 8601 "
                       "time with a zone (2025-01-31T00:00:00Z)")
    return int(when.timestamp() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _existing_log(url: str) -> Log:
    """The log at `url`, refused when it is not there: opening a sqlite path
    would create an empty file, and there is nothing to archive or prune."""
    if url.startswith("sqlite:///"):
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path[1:])
        if path != ":memory:" and not os.path.isfile(path):
            raise CliError(f"there is no log at {url}: the file {path} does not exist")
    return open_log(url)


async def _plan(log: Log, topics: Topics, cutoff_ms: int) -> Plan:
    try:
        await log.partitions(topics.runs)
    except UnknownTopic as exc:
        raise CliError(f"there is no log at {log.url}: {exc}") from None
    with _progress("reading the runs topic", threshold=8) as update:
        return await plan(log, topics, cutoff_ms, progress=update)


def _held(p: Plan) -> str:
    if not p.held:
        return ""
    return "; kept " + ", ".join(f"{n} because {why}" for why, n in sorted(p.held.items()))


def _describe(p: Plan, verb: str) -> str:
    return (f"{verb} {p.runs} run(s), {p.events} event(s) that ended before {_iso(p.cutoff_ms)}; "
            f"{p.live} live run(s) untouched{_held(p)}")


def archive_command(
    ended_before: EndedBeforeOpt,
    to: Annotated[str, typer.Option("--to", metavar="FILE", help="The Avro file to write (replaced if it exists).")],
    log: LogOpt = DEFAULT_LOG_URL,
    as_json: JsonOpt = False,
) -> None:
    """Write ended runs' histories to an Avro Object Container File (schema: the log's event schema)."""
    cutoff = _checked(lambda: parse_ended_before(ended_before, int(time.time() * 1000)))
    _checked(lambda: check_writable(to))

    async def go() -> tuple[Plan, ArchiveReport]:
        async with _existing_log(log) as log_:
            topics = Topics()
            found = await _plan(log_, topics, cutoff)
            return found, await write_archive(log_, topics, found, to)

    found, report = _run(go())
    if as_json:
        _print_json({**report.as_dict(), "ended_before": _iso(cutoff), "ended_before_ms": cutoff,
                     "held": dict(found.held)})
        return
    note = " (replaced the file that was there)" if report.replaced else ""
    out.print(f"archived {report.runs} run(s), {report.events} event(s) that ended before {_iso(cutoff)} "
              f"to {report.path}{note}{_held(found)}", highlight=False, markup=False)
    out.print(f"prune exactly these with: stepline prune --ended-before {_iso(cutoff)}", highlight=False,
              markup=False)


def prune_command(
    ended_before: EndedBeforeOpt,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be removed.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
    query_db: Annotated[str | None, typer.Option(
        "--query-db", callback=_setting("query_db"), show_default=False,
        help=_setting_help("Query projection file to prune too (default: the one `stepline dev` keeps "
                           "beside a SQLite log, when it exists).", "query_db"))] = None,
    log: LogOpt = DEFAULT_LOG_URL,
    as_json: JsonOpt = False,
) -> None:
    """Remove ended runs from the log and the read model (count first with --dry-run)."""
    cutoff = _checked(lambda: parse_ended_before(ended_before, int(time.time() * 1000)))
    db = query_db or _dev_query_db(log)

    async def count() -> Plan:
        async with _existing_log(log) as log_:
            if not dry_run:
                _refuse_unsupported(log_)
            return await _plan(log_, Topics(), cutoff)

    preview = _run(count())
    if dry_run or preview.runs == 0:
        if as_json:
            _print_json({**preview.as_dict(), "dry_run": True, "ended_before": _iso(cutoff)})
        else:
            out.print(_describe(preview, "would prune"), highlight=False, markup=False)
        return
    if not yes:
        err.print(_describe(preview, "would prune"), highlight=False, markup=False)
        if not typer.confirm(f"prune {preview.runs} run(s)?", err=True):
            raise typer.Exit(1)

    async def act() -> tuple[Plan, PruneReport, int | None]:
        async with _existing_log(log) as log_:
            topics = Topics()
            store_path = db if os.path.isfile(db) else None
            if store_path is None:
                found = await _plan(log_, topics, cutoff)
                return found, await prune(log_, topics, found), None
            async with QueryStore(store_path) as store:
                # Up to the log's end first, so no batch read before the prune
                # brings a pruned run back after it is deleted below.
                await QueryProjector(log_, store, topics=topics).catch_up()
                found = await _plan(log_, topics, cutoff)
                report = await prune(log_, topics, found)
                gone = await store.delete_runs(report.run_ids)
                identity = await log_identity(log_, topics.runs, await log_.partitions(topics.runs))
                if identity is not None:
                    await store.set_meta("log_identity", identity)
                return found, report, gone

    found, report, gone = _run(act())
    if as_json:
        _print_json({**found.as_dict(), "dry_run": False, "ended_before": _iso(cutoff), "pruned_runs": report.runs,
                     "pruned_events": report.events, "moved_on": report.moved_on, "read_model_runs": gone,
                     "starts": report.starts or None})
        return
    line = (f"pruned {report.runs} run(s), {report.events} event(s) that ended before {_iso(cutoff)}; "
            f"{found.live} live run(s) untouched{_held(found)}")
    if report.moved_on:
        line += f"; {report.moved_on} run(s) got new events during the prune and were kept"
    line += f"; read model: {gone} run(s) removed" if gone is not None else "; no read model pruned"
    out.print(line, highlight=False, markup=False)


def _refuse_unsupported(log_: Log) -> None:
    # Planning works on any log; removing needs sqlite or Kafka. Asked before
    # the question, so nobody confirms a prune that cannot happen.
    if not log_.removes_records and type(log_).delete_before is Log.delete_before:
        raise CliError(f"{log_.url} cannot remove records; prune works on sqlite:// and kafka://")


def _checked(fn: Callable[[], T]) -> T:
    """A check before anything is opened: its error is the one line `_run` prints too."""
    try:
        return fn()
    except (CliError, SteplineError) as exc:
        _fail(str(exc))
        raise


def register(app: typer.Typer) -> None:
    app.command("archive")(archive_command)
    app.command("prune")(prune_command)
