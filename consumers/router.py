"""The subscription router: domain events -> runs of subscribed tasks.

The router is a consumer group of its own on the events topic. For each
event, in order per partition, it appends one RunTriggered per matching
subscription, then commits the partition's offset (durable first, then
acknowledge). The run id of a fan-out derives from the event id and the
subscribing task, so an event delivered again (a crash before the commit,
a rebalance) maps to the same runs, and the projection ignores the
repeated triggers: never a second run.

The router also resolves event waits (`wait_for_event`): every routed event
is offered to the table of open waits (consumers/waits.py), and a match
appends WaitCompleted to the waiting run before the offset is committed.

One subscriber cannot block the others or the partition: a `where`
callable that raises counts as no match for that subscription and is
logged; data that does not fit a task's payload type still starts its run,
which then fails on its own with the validation error.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

import structlog

from stepline.consumers.patterns import Matcher, compile_name, compile_where
from stepline.consumers.waits import SeenEvent, WaitEntry, WaitsTable, unregister
from stepline.core import codec
from stepline.core.causes import Cause, under_cause
from stepline.core.events import DomainEvent, Payload
from stepline.core.ids import fanout_key
from stepline.errors import SchemaError, TaskDefinitionError
from stepline.log.base import Assignment, Log
from stepline.log.quarantine import quarantine
from stepline.log.topics import Topics

log = structlog.get_logger("stepline.router")


@dataclass(frozen=True)
class Subscription:
    """Start a task for every domain event named `event` whose data matches `where`.

    `event` may use `*` segments (`user.*`); `where` is a pattern (see
    `stepline.consumers.patterns`) or a callable `(data) -> bool`. Both are
    checked here, at definition. `since=timedelta(days=30)` makes it
    retroactive: the first worker started with it also starts the task for
    the matching events of that past window (`stepline.backfill`), once.
    """

    event: str
    where: Any = None
    since: timedelta | None = None
    _name: Any = field(init=False, repr=False, compare=False)
    _data: Matcher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.since is not None and (not isinstance(self.since, timedelta) or self.since <= timedelta(0)):
            raise TaskDefinitionError(
                f"Subscription({self.event!r}, since={self.since!r}): since must be a positive timedelta")
        object.__setattr__(self, "_name", compile_name(self.event))
        object.__setattr__(self, "_data", compile_where(self.where))

    def matches(self, name: str, data: Any) -> bool:
        if not self._name(name):
            return False
        return bool(self._data(data if isinstance(data, dict) else {}))


class Subscriber(Protocol):
    """A task as the router sees it (`stepline.Task` is one)."""

    @property
    def id(self) -> str: ...

    @property
    def subscriptions(self) -> Sequence[Subscription]: ...


class RouterClient(Protocol):
    """What the router asks of a client (`stepline.Client` is one): the log and its
    topics, the clock, and two requests. The client layer is above this one."""

    log: Log
    topics: Topics
    clock: Callable[[], int]

    async def trigger(self, task: str, payload: Any = None, *, idempotency_key: str | None = None,
                      tags: Sequence[str] = (), validate: bool = True) -> object: ...

    async def resolve_wait(self, run_id: str, task_id: str, step: int, reason: str, source: str,
                           output: Payload | None = None, *, pool: str | None = None) -> object: ...


S = TypeVar("S", bound=Subscriber)


class Router(Generic[S]):
    """Routes the events topic to the subscriptions of a registry.

    `retroactive` starts the runs of subscriptions with `since=` for their past
    window (the client layer's `backfill_new_subscriptions`, which the worker
    passes in); without it such subscriptions only see new events.
    """

    def __init__(self, registry: Iterable[S], client: RouterClient, read_batch: int = 500,
                 retroactive: Callable[[list[S]], Awaitable[object]] | None = None) -> None:
        self.registry = registry
        self.client = client
        self._retroactive = retroactive
        self.topic = client.topics.events
        # One router group per worker pool: each pool's workers route every
        # domain event to their own pool's subscribed tasks and open waits.
        self.group = client.topics.router_group
        self._read_batch = read_batch
        self._readers: dict[int, asyncio.Task[None]] = {}
        self._membership: Any = None
        self._retro: asyncio.Task[None] | None = None
        self.routed = 0
        self.triggered = 0
        self.waits = WaitsTable(client.log, client.topics.waits, self._resolve_wait)

    def subscribers(self) -> list[tuple[str, Sequence[Subscription]]]:
        return [(t.id, t.subscriptions) for t in self.registry if t.subscriptions]

    async def start(self) -> None:
        # The whole table first: an event routed before it is loaded could
        # miss a wait registered long ago.
        await self.waits.start()
        self._membership = await self.client.log.join_group(
            self.group, self.topic, self._on_assign, self._on_revoke
        )
        if self._retroactive is not None and any(s.since is not None for _, subs in self.subscribers()
                                                  for s in subs):
            self._retro = asyncio.create_task(self._backfill_retroactive(), name="stepline-backfill")

    async def _backfill_retroactive(self) -> None:
        assert self._retroactive is not None
        try:
            await self._retroactive([t for t in self.registry if t.subscriptions])
        except Exception as exc:  # the next worker start tries again; routing goes on meanwhile
            log.error("retroactive subscription backfill failed", error=f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        if self._retro is not None:
            self._retro.cancel()
            await asyncio.gather(self._retro, return_exceptions=True)
            self._retro = None
        if self._membership is not None:
            await self._membership.leave()
            self._membership = None
        await self._on_revoke(frozenset(self._readers))
        await self.waits.close()

    async def _on_assign(self, assignment: Assignment) -> None:
        committed = await self.client.log.committed(self.group, self.topic)
        for p in assignment.partitions:
            start = committed.get(p, 0)
            self._readers[p] = asyncio.create_task(self._route(p, start), name=f"stepline-router-{p}")

    async def _on_revoke(self, partitions: frozenset[int]) -> None:
        tasks = [self._readers.pop(p) for p in partitions if p in self._readers]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _route(self, p: int, offset: int) -> None:
        subscribers = self.subscribers()
        while True:
            recs = await self.client.log.read(self.topic, p, offset, self._read_batch, timeout=1.0)
            if not recs:
                continue
            triggers = []
            seen: list[SeenEvent] = []
            for r in recs:
                try:
                    triggers.extend(self._fan_out(r.value, p, r.offset, subscribers, seen))
                except SchemaError as exc:
                    # Never block the partition on one bad record; keep it aside.
                    log.error("undecodable event quarantined", partition=p, offset=r.offset, error=str(exc))
                    triggers.append(quarantine(self.client.log, self.client.topics.quarantine,
                                               self.topic, p, r.offset, r.value, str(exc), "router"))
            # Durable first, then acknowledge: the runs, then the offset.
            await asyncio.gather(*triggers)
            now = self.client.clock()
            for event in seen:
                await self.waits.offer(event, now)
            offset = recs[-1].offset + 1
            await self.client.log.commit(self.group, self.topic, {p: offset})

    async def _resolve_wait(self, entry: WaitEntry, event: SeenEvent) -> None:
        # The waits table is this pool's (topics.waits), so is the run.
        await self.client.resolve_wait(entry.run_id, entry.task_id, entry.step, "event",
                                       event.event_id, output=event.raw, pool=self.client.topics.pool)
        await unregister(self.client.log, self.client.topics.waits, entry.run_id, entry.step)

    def _fan_out(
        self, value: bytes, p: int, offset: int, subscribers: list[tuple[str, Sequence[Subscription]]],
        seen: list[SeenEvent],
    ) -> list[Awaitable[object]]:
        ev = codec.decode(value)
        body = ev.body
        if not isinstance(body, DomainEvent):
            return []
        self.routed += 1
        try:
            data = codec_json(body)
        except ValueError as exc:
            log.error("event data is not JSON; skipped", event_id=ev.event_id, error=str(exc))
            return []
        seen.append(SeenEvent(ev.event_id, body.name, ev.time, data, body.data))
        # The runs link to the span that published the event (a trace each).
        cause = None if ev.traceparent is None else Cause(
            ev.traceparent, ev.extra.get("tracestate"), ev.event_id, self.topic, p, offset)
        out: list[Awaitable[object]] = []
        for task_id, subs in subscribers:
            if not any(safe_match(s, task_id, body.name, data) for s in subs):
                continue
            self.triggered += 1
            # A backfill (stepline.backfill.fanout_trigger) triggers exactly
            # like this, so the two never start an event's run twice.
            out.append(under_cause(cause, functools.partial(
                self.client.trigger, task_id, data, idempotency_key=fanout_key(ev.event_id), validate=False,
                tags=(f"event:{body.name}",),
            )))
        return out


def codec_json(body: DomainEvent) -> Any:
    return json.loads(body.data.data) if body.data.data else None


def safe_match(sub: Subscription, task_id: str, name: str, data: Any) -> bool:
    """Whether `sub` matches; a predicate that raises is logged and counts as no match."""
    try:
        return sub.matches(name, data)
    except Exception as exc:  # a broken predicate: no match for this one only
        log.error("subscription predicate raised; treated as no match",
                  task=task_id, subscription=sub.event, error=f"{type(exc).__name__}: {exc}")
        return False


__all__ = ["Router", "RouterClient", "Subscriber", "Subscription", "codec_json", "fanout_key", "safe_match"]
