"""Read the engine's own events: the integration surface for other teams.

Analytics, billing and audit build their projections from the same topics
the engine folds, with the same decoder and the same fencing rule:

    async with stepline.events.consume("kafka://broker:9092", ["runs"], group="billing") as stream:
        async for d in stream:
            if isinstance(d.event.body, StepCompleted):
                ...
            await stream.commit()   # where to resume after a restart

Delivery is at least once: a consumer restarted from its last commit sees
what followed the commit again, so a projection that must count exactly once
keys its facts by `event.event_id` (unique per event) or commits together
with its own writes. One `consume` reads every partition of its topics in
one process; it does not share partitions with other members of `group`
(the group name only stores its position).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Literal, Self

import structlog

from stepline.core import codec
from stepline.core.events import REQUEST_TYPES, Body, Event, PartitionClaimed
from stepline.errors import SchemaError
from stepline.log import open_log
from stepline.log.base import Log
from stepline.log.topics import DEFAULT_NAMESPACE, Topics

log = structlog.get_logger("stepline.consume")

# The topics an outside consumer may read: histories, not the engine's
# internal tables (waits, snapshots) whose shapes may change between releases.
TOPIC_NAMES = ("runs", "events", "queues")
Start = Literal["earliest", "latest", "committed"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One decoded event and where it sits in the log."""

    topic: str  # "runs", "events" or "queues"
    partition: int
    offset: int
    event: Event

    @property
    def body(self) -> Body:
        return self.event.body


class EventStream:
    """An async iterator of `Delivery`, and the position to commit.

    Built by `consume`; use it as `async with`, which opens the log when
    given a URL and closes it again. A bare `async for` over the stream
    does the same around the loop (the log closes when the loop ends, or
    when the abandoned iterator is collected).
    """

    def __init__(
        self, log_: Log | str, topics: Sequence[str], *, namespace: str, start: Start,
        since: datetime | int | None, follow: bool, group: str | None,
        types: Iterable[type[Body]] | None, accepted_only: bool, poll_timeout: float,
        max_records: int,
    ) -> None:
        unknown = [t for t in topics if t not in TOPIC_NAMES]
        if unknown or not topics:
            raise ValueError(f"consume: topics must be some of {', '.join(TOPIC_NAMES)}; got {list(topics)}")
        if start == "committed" and group is None:
            raise ValueError("consume: start='committed' needs a group to read the position of")
        if start not in ("earliest", "latest", "committed"):
            raise ValueError(f"consume: start must be 'earliest', 'latest' or 'committed', got {start!r}")
        self._owns_log = isinstance(log_, str)
        self._log = open_log(log_) if isinstance(log_, str) else log_
        self._names = Topics(namespace)
        self._topics = list(dict.fromkeys(topics))
        self._start = start
        self._since = _ms(since)
        self._follow = follow
        self._group = group
        self._types = None if types is None else frozenset(t.TYPE for t in types)
        self._accepted_only = accepted_only
        self._poll_timeout = poll_timeout
        self._max_records = max_records
        # (topic, partition) -> next offset to read / the owner's epoch there
        self._next: dict[tuple[str, int], int] = {}
        self._epochs: dict[tuple[str, int], int] = {}
        self._ends: dict[tuple[str, int], int] = {}
        self.skipped = 0  # undecodable records passed over (the engine quarantines them)
        self._entered = False

    async def __aenter__(self) -> Self:
        if self._owns_log:
            await self._log.start()
        self._entered = True
        try:
            await self._position()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:
        self._entered = False
        if self._owns_log:
            await self._log.close()

    def _full(self, topic: str) -> str:
        full: str = getattr(self._names, topic)
        return full

    async def _position(self) -> None:
        for topic in self._topics:
            full = self._full(topic)
            n = await self._log.partitions(full)
            committed = await self._log.committed(self._group, full) if self._group else {}
            for p in range(n):
                end = await self._log.end_offset(full, p)
                self._ends[(topic, p)] = end
                if self._start == "latest":
                    offset = end
                elif self._start == "committed":
                    offset = committed.get(p, 0)
                else:
                    offset = 0
                self._next[(topic, p)] = offset

    async def commit(self) -> None:
        """Store the position after everything delivered so far under `group`.

        Records passed over (other types, older than `since`, fenced) count as
        handled: a resumed stream does not read them again either.
        """
        if self._group is None:
            raise ValueError("commit: this stream was opened without a group")
        per_topic: dict[str, dict[int, int]] = {}
        for (topic, p), offset in self._next.items():
            per_topic.setdefault(topic, {})[p] = offset
        for topic, offsets in per_topic.items():
            await self._log.commit(self._group, self._full(topic), offsets)

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self._iterate() if self._entered else self._opened_for_the_loop()

    async def _opened_for_the_loop(self) -> AsyncIterator[Delivery]:
        # Without `async with` nothing is positioned yet, and the loop would
        # end at once with nothing read: open (and later close) around it.
        async with self:
            async for d in self._iterate():
                yield d

    async def _iterate(self) -> AsyncIterator[Delivery]:
        while True:
            got_any = False
            for (topic, p), offset in list(self._next.items()):
                if not self._follow and offset >= self._ends[(topic, p)]:
                    continue
                records = await self._log.read(self._full(topic), p, offset, self._max_records)
                for r in records:
                    # Before the yield: a commit made while the consumer holds
                    # this delivery (after handling it) includes it.
                    self._next[(topic, p)] = r.offset + 1
                    d = self._accept(topic, p, r.offset, r.value)
                    if d is not None:
                        yield d
                got_any = got_any or bool(records)
            if got_any:
                continue
            if not self._follow:
                return
            await asyncio.sleep(min(self._poll_timeout, 0.2))

    def _accept(self, topic: str, partition: int, offset: int, value: bytes) -> Delivery | None:
        try:
            ev = codec.decode(value)
        except SchemaError as exc:
            self.skipped += 1
            log.warning("undecodable record skipped", topic=topic, partition=partition, offset=offset,
                        error=str(exc))
            return None
        if self._accepted_only and topic in ("runs", "queues"):
            # The projections' fencing rule: once an owner claims a partition,
            # outcomes from older owners are not part of the history.
            key = (topic, partition)
            if isinstance(ev.body, PartitionClaimed):
                self._epochs[key] = max(self._epochs.get(key, 0), ev.epoch)
            elif ev.type not in REQUEST_TYPES and ev.epoch < self._epochs.get(key, 0):
                return None
        if self._since is not None and ev.time < self._since:
            return None
        if self._types is not None and ev.type not in self._types:
            return None
        return Delivery(topic, partition, offset, ev)


def consume(
    log_: Log | str,
    topics: Sequence[str] = ("runs",),
    *,
    namespace: str = DEFAULT_NAMESPACE,
    start: Start = "earliest",
    since: datetime | int | None = None,
    follow: bool = False,
    group: str | None = None,
    types: Iterable[type[Body]] | None = None,
    accepted_only: bool = True,
    poll_timeout: float = 1.0,
    max_records: int = 2000,
) -> EventStream:
    """Stream the engine's events from `log_` (a URL or an open `Log`).

    topics: any of "runs", "events" (domain events), "queues" (admission).
    start: "earliest" (offset 0: rebuild a projection from the beginning),
        "latest" (only what arrives from now on) or "committed" (the
        position last committed under `group`, offset 0 when none).
    since: skip events older than this (a datetime or epoch milliseconds);
        the log is still read from `start`.
    follow: keep waiting for new events (a live projection) instead of
        stopping at the end offsets seen when the stream opened.
    types: only these event bodies, e.g. `[RunTriggered, StepCompleted]`.
    accepted_only: drop outcomes recorded by an owner that had already been
        replaced (what the engine's own projections drop); False shows the
        raw log, zombies included.
    """
    return EventStream(
        log_, topics, namespace=namespace, start=start, since=since, follow=follow, group=group,
        types=types, accepted_only=accepted_only, poll_timeout=poll_timeout, max_records=max_records,
    )


def _ms(when: datetime | int | None) -> int | None:
    if when is None or isinstance(when, int):
        return when
    if when.tzinfo is None:
        raise ValueError("consume: since must be timezone-aware (or epoch milliseconds)")
    return int(when.timestamp() * 1000)


__all__ = ["Delivery", "EventStream", "TOPIC_NAMES", "consume"]
