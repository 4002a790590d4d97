"""Retroactive subscriptions: start a subscribed task for events already on the log.

    report = await sl.backfill("welcome", since=timedelta(days=30), dry_run=True)
    report.matched            # past user.created events the subscription matches
    await sl.backfill("welcome", since=timedelta(days=30))

`stepline backfill TASK --since 30d [--dry-run]` and
`POST /v1/subscriptions/{task}/backfill` do the same, and
`Subscription(..., since=timedelta(days=30))` does it once by itself when a
worker first starts with the subscription.

A backfill is idempotent because it starts runs exactly as the router does:
the run id of event E for task T is the idempotent run id of
`fanout_key(E)`, so an event the router already routed to T (or a second
backfill, or one overlapping live routing) maps to the run that exists and
the fold ignores the repeated trigger. It also reads which of those runs
already exist first, and triggers only the others, so a repeat appends
nothing at all. The steps:

1. per partition of the events topic, find the offset of `since` (Kafka's
   time index; a bisection on sqlite and memory), starting a clock-skew
   margin earlier, and note the end offset as of now;
2. read up to that end, keeping DomainEvents whose own time is in
   [since, until) and that match any of the task's subscriptions;
3. read the runs topic's partitions for those events' run ids (stopping at
   a partition once all of its are found): the ones found already exist;
4. unless it is a dry run, trigger the rest.

Events appended after step 1 are the live router's.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from stepline.consumers.lookback import CLOCK_SKEW_MS
from stepline.consumers.router import Subscription, codec_json, fanout_key, safe_match
from stepline.core import codec
from stepline.core.events import DomainEvent
from stepline.core.ids import idempotent_run_id
from stepline.errors import SchemaError, TaskDefinitionError

if TYPE_CHECKING:
    from stepline.client._client import Client
    from stepline.sdk.task import Task

log = structlog.get_logger("stepline.backfill")

_BATCH = 2000
# Triggers in flight at once: enough to keep a group-committing log busy.
_TRIGGER_WINDOW = 256
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")

Since = timedelta | datetime | str | int


def parse_time(value: Since, now_ms: int, what: str = "since") -> int:
    """A point in time as ms: a duration back from now (timedelta, "30d",
    "12h", "15m", "90s", "2w"), an aware datetime or ISO 8601 text, or ms."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a duration or a time, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, timedelta):
        return now_ms - int(value.total_seconds() * 1000)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{what}={value!r} needs a timezone")
        return int(value.timestamp() * 1000)
    m = _DURATION.match(value)
    if m:
        return now_ms - int(float(m.group(1)) * _UNITS[m.group(2)] * 1000)
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"{what} must be a duration like 30d, 12h, 15m, 90s or an ISO 8601 time, got {value!r}"
        ) from None
    return int((dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp() * 1000)


@dataclass(frozen=True)
class BackfillReport:
    task_id: str
    since: int  # ms
    until: int  # ms
    dry_run: bool
    scanned: int  # events read in the window
    matched: int  # of those, events a subscription of the task matches
    existing: int  # of those, events whose run already exists
    started: int  # runs triggered now (0 on a dry run)
    # Per partition of the events topic, the offset the backfill read up to.
    ends: dict[int, int] = field(default_factory=dict)
    run_ids: tuple[str, ...] = ()  # runs started now

    @property
    def to_start(self) -> int:
        return self.matched - self.existing

    def as_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id, "since": self.since, "until": self.until, "dry_run": self.dry_run,
            "scanned": self.scanned, "matched": self.matched, "existing": self.existing,
            "to_start": self.to_start, "started": self.started, "run_ids": list(self.run_ids),
        }


@dataclass(frozen=True, slots=True)
class _Match:
    event_id: str
    name: str
    data: Any
    run_id: str


async def backfill(
    task: Task[Any, Any] | str,
    *,
    since: Since,
    until: Since | None = None,
    dry_run: bool = False,
    client: Client | None = None,
    subscriptions: Sequence[Subscription] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BackfillReport:
    """Start `task` for every past event its subscriptions match since `since`.

    `dry_run=True` only counts. Returns what was found and started.
    """
    from stepline.client._client import current_client

    client = client or current_client()
    t = _task(client, task)
    subs = tuple(subscriptions if subscriptions is not None else t.subscriptions)
    if not subs:
        raise TaskDefinitionError(f"task {t.id!r} has no subscription (on=sl.Subscription(...)) to backfill")
    now = client.clock()
    start = parse_time(since, now)
    end = parse_time(until, now, "until") if until is not None else now + 1
    if start >= end:
        raise ValueError(f"since ({start} ms) must be before until ({end} ms)")
    matches, scanned, ends = await _scan(client, t.id, subs, start, end, progress)
    existing = await _existing(client, {m.run_id for m in matches})
    todo = [m for m in matches if m.run_id not in existing]
    started: list[str] = []
    if not dry_run:
        for i in range(0, len(todo), _TRIGGER_WINDOW):
            chunk = todo[i:i + _TRIGGER_WINDOW]
            await asyncio.gather(*(fanout_trigger(client, t.id, m.event_id, m.name, m.data) for m in chunk))
            started.extend(m.run_id for m in chunk)
    return BackfillReport(t.id, start, end, dry_run, scanned, len(matches), len(matches) - len(todo),
                          len(started), ends, tuple(started))


def fanout_trigger(client: Client, task_id: str, event_id: str, name: str, data: Any) -> Any:
    """The router's trigger, verbatim: the same run id, payload and tag."""
    return client.trigger(task_id, data, idempotency_key=fanout_key(event_id), validate=False,
                          tags=(f"event:{name}",))


def _task(client: Client, task: Task[Any, Any] | str) -> Task[Any, Any]:
    if not isinstance(task, str):
        return task
    if client.registry is None:
        raise TaskDefinitionError(
            f"backfilling {task!r} needs its subscriptions: open the client with registry=, "
            "or pass the task object")
    return client.registry.get(task)


async def _scan(
    client: Client, task_id: str, subs: Sequence[Subscription], start: int, end: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[list[_Match], int, dict[int, int]]:
    topic = client.topics.events
    lg = client.log
    ranges = {}
    for p in range(await lg.partitions(topic)):
        ranges[p] = (await lg.offset_for_time(topic, p, start - CLOCK_SKEW_MS), await lg.end_offset(topic, p))
    total = sum(max(0, e - s) for s, e in ranges.values())
    done = scanned = 0
    out: list[_Match] = []
    for p, (offset, stop) in ranges.items():
        while offset < stop:
            recs = await lg.read(topic, p, offset, min(_BATCH, stop - offset))
            if not recs:
                break
            for r in recs:
                if r.offset >= stop:
                    break
                m = _match(r.value, task_id, subs, start, end)
                scanned += m is not False
                if isinstance(m, _Match):
                    out.append(m)
            done += recs[-1].offset + 1 - offset
            offset = recs[-1].offset + 1
            if progress:
                progress(min(done, total), total)
    return out, scanned, {p: stop for p, (_, stop) in ranges.items()}


def _match(value: bytes, task_id: str, subs: Sequence[Subscription], start: int, end: int) -> _Match | bool | None:
    """A match; None for an event in the window that matches nothing; False
    for a record outside the window or unreadable (not counted as scanned)."""
    try:
        ev = codec.decode(value)
    except SchemaError:
        return False  # quarantined by the router; nothing to start
    body = ev.body
    if not isinstance(body, DomainEvent) or not start <= ev.time < end:
        return False
    try:
        data = codec_json(body)
    except ValueError:
        return None
    if not any(safe_match(s, task_id, body.name, data) for s in subs):
        return None
    return _Match(ev.event_id, body.name, data, idempotent_run_id(task_id, fanout_key(ev.event_id)))


async def _existing(client: Client, run_ids: set[str]) -> set[str]:
    """Which of these runs have records on the runs topic (keyed by run id)."""
    wanted: dict[int, set[bytes]] = {}
    for rid in run_ids:
        wanted.setdefault(client.partition_of(rid), set()).add(rid.encode())
    found: set[str] = set()
    topic = client.topics.runs
    for p, keys in wanted.items():
        offset, stop = 0, await client.log.end_offset(topic, p)
        while keys and offset < stop:
            recs = await client.log.read(topic, p, offset, 5000)
            if not recs:
                break
            for r in recs:
                if r.key in keys:
                    keys.discard(r.key)
                    found.add(r.key.decode())
            offset = recs[-1].offset + 1
    return found


def retro_group(namespace: str, task_id: str, sub: Subscription) -> str:
    """The consumer group whose commits mark a `Subscription(since=)` backfill
    as done: one per task, event pattern and `since`, so changing `since`
    backfills again (idempotently)."""
    assert sub.since is not None
    digest = hashlib.sha256(f"{sub.event}\x00{sub.since.total_seconds()}".encode()).hexdigest()[:12]
    return f"{namespace}.backfill.{task_id}.{digest}"


async def backfill_new_subscriptions(client: Client, tasks: Sequence[Task[Any, Any]]) -> list[BackfillReport]:
    """Run each `Subscription(since=)` backfill not yet marked done.

    1. skip it if its group has committed offsets (a worker finished it);
    2. backfill from `now - since`;
    3. commit the offsets it read up to, marking it done.

    Two workers starting at once may both run it: the second starts
    nothing, as every backfill is idempotent.
    """
    reports = []
    topic = client.topics.events
    for t in tasks:
        for sub in t.subscriptions:
            if sub.since is None:
                continue
            group = retro_group(client.topics.namespace, t.id, sub)
            if await client.log.committed(group, topic):
                continue
            report = await backfill(t, since=sub.since, client=client, subscriptions=[sub])
            await client.log.commit(group, topic, report.ends)
            log.info("retroactive subscription backfilled", task=t.id, subscription=sub.event,
                     matched=report.matched, started=report.started)
            reports.append(report)
    return reports
