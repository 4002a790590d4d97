"""`stepline events`: the engine's events as JSON lines, for jq, scripts and audits.

The command-line face of `stepline.events.consume` (docs/events.md):
registered on the CLI's app by engine/cli/main.py.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Annotated, Any

import typer

from stepline.cli._common import _fail, _require_log, _run
from stepline.cli.options import LogOpt
from stepline.core import events as ev_mod
from stepline.log import DEFAULT_LOG_URL
from stepline.log.consume import consume
from stepline.projections.views import event_dict
from stepline.security.keystore import default_keystore
from stepline.security.sensitive import shown

TopicOpt = Annotated[list[str] | None, typer.Option(
    "--topic", "-t", help="runs, events or queues; repeat for several (default: runs).")]
TypeOpt = Annotated[list[str] | None, typer.Option(
    "--type", help="Only these event types, e.g. --type StepCompleted; repeat for several.")]


def events(
    log: LogOpt = DEFAULT_LOG_URL,
    topic: TopicOpt = None,
    start: Annotated[str, typer.Option(
        "--from", help="earliest (offset 0), latest (only new events) or committed (after --group's commit).")]
    = "earliest",
    group: Annotated[str | None, typer.Option(
        "--group", help="Store the position reached under this name when the command ends.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events until interrupted.")]
    = False,
    types: TypeOpt = None,
    run_id: Annotated[str | None, typer.Option("--run", help="Only this run's events.")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", help="Skip events older than this: a duration (30m, 24h, 7d) or an ISO time.")] = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Show the raw log, outcomes of replaced owners included.")] = False,
) -> None:
    """Print the engine's events as JSON lines: topic, partition, offset and the event.

    Sensitive payload fields print as "\\[redacted]" (or "\\[erased]"), as everywhere else.
    """
    _require_log(log)
    known = {name: cls for name, cls in vars(ev_mod).items()
             if isinstance(cls, type) and isinstance(getattr(cls, "TYPE", None), str)}
    unknown = sorted(set(types or ()) - set(known))
    if unknown:
        _fail(f"unknown event type(s) {', '.join(unknown)}; the types are {', '.join(sorted(known))}")
    if start not in ("earliest", "latest", "committed"):
        _fail(f"--from must be earliest, latest or committed, got {start!r}")
    since_ms = _since_ms(since) if since else None
    if since and since_ms is None:
        _fail(f"--since {since!r} is neither a duration (30m, 24h, 7d) nor an ISO time with a zone")

    async def go() -> None:
        selected = [known[t] for t in types] if types else None
        keys = default_keystore(log)
        stream = consume(log, topic or ["runs"], start=start, group=group, follow=follow,  # type: ignore[arg-type]
                         types=selected, since=since_ms, accepted_only=not raw)
        async with stream:
            try:
                async for d in stream:
                    if run_id is not None and d.event.run_id != run_id:
                        continue
                    row: dict[str, Any] = {"topic": d.topic, "partition": d.partition,
                                           **event_dict(d.offset, d.event)}
                    row["event_id"] = d.event.event_id
                    sys.stdout.write(json.dumps(await shown(row, keys), default=str) + "\n")
                    sys.stdout.flush()
            finally:
                if group is not None:
                    await stream.commit()

    try:
        _run(go())
    except ValueError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        pass


def _since_ms(text: str) -> int | None:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdecimal():
        return int((time.time() - int(text[:-1]) * units[text[-1]]) * 1000)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return int(when.timestamp() * 1000)


def register(app: typer.Typer) -> None:
    app.command("events")(events)
