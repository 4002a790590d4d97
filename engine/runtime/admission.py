"""The owner side of queue admission: grants slots of limited queues.

Every worker joins the `<ns>.queues` group; the owner of a queues partition
folds it (projections/queues.py) and, whenever a queue has room and
waiters, appends SlotGranted there (its decision, fenced by the owner's
epoch like run events). Once it reads that grant back with no newer claim
before it, so that every fold accepts it, it appends a SlotGranted request
to the run's partition of the runs topic, which is how the run's worker
learns it may start: a replaced owner's grant never reaches a run. Releases come back on the queues topic from the runs' workers.

A grant whose notice was lost (the owner died between the two appends) is
sent again by the next owner, which re-notifies every holder on claim; the
run side ignores a grant it already has.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from stepline.core import codec
from stepline.core.events import (
    Body,
    Event,
    PartitionClaimed,
    PauseChanged,
    SlotGranted,
    SlotReleased,
    SlotRequested,
)
from stepline.core.ids import new_event_id
from stepline.errors import SchemaError
from stepline.log.appender import Appender
from stepline.log.base import Assignment, Log, Membership, partition_for
from stepline.log.topics import Topics
from stepline.projections.queues import QueuePartition, QueueState, Waiter

log = structlog.get_logger("stepline.admission")

Notify = Callable[[str, str, Body], "asyncio.Future[int]"]


class Admission:
    def __init__(self, log_: Log, topics: Topics, notify: Notify, clock: Callable[[], int],
                 worker_id: str) -> None:
        self.log = log_
        self.topic = topics.queues
        self.group = topics.queues_group
        self._notify = notify
        self._clock = clock
        self.worker_id = worker_id
        self._appender = Appender(log_, self.topic)
        self._parts: dict[int, QueuePartition] = {}
        self._readers: dict[int, asyncio.Task[None]] = {}
        self._wakeups: dict[tuple[int, str], asyncio.TimerHandle | asyncio.Task[None]] = {}
        self._membership: Membership | None = None
        self._nparts = 0
        # One grant decision at a time per partition: the tail and a rate
        # limit wake-up must not both hand out the same free slot.
        self._locks: dict[int, asyncio.Lock] = {}
        # Partitions where a task or queue was resumed since the tail last granted.
        self._resumed: set[int] = set()
        # The epoch of our verified claim, per owned partition.
        self._mine: dict[int, int] = {}
        # Our grants, appended but not yet read back: told to their runs only
        # once the log shows them accepted (see _fold).
        self._unsent: dict[str, tuple[int, Event]] = {}
        self.granted = 0

    async def prepare(self) -> None:
        """Ready to take requests (the run side asks as soon as it owns runs)."""
        self._nparts = await self.log.partitions(self.topic)

    async def start(self) -> None:
        """Join the queues group: own queue partitions and grant their slots."""
        if not self._nparts:
            await self.prepare()
        self._membership = await self.log.join_group(self.group, self.topic, self._on_assign, self._on_revoke)

    async def close(self) -> None:
        if self._membership is not None:
            await self._membership.leave()
            self._membership = None
        await self._on_revoke(frozenset(self._readers))
        await self._appender.drain()

    # --- requests from the run side -------------------------------------------

    def request(self, run_id: str, task_id: str, body: SlotRequested) -> asyncio.Future[int]:
        return self._append(run_id, task_id, body, 0)

    def release(self, run_id: str, task_id: str, body: SlotReleased) -> asyncio.Future[int]:
        return self._append(run_id, task_id, body, 0)

    def _append(
        self, run_id: str, task_id: str, body: SlotRequested | SlotGranted | SlotReleased, epoch: int
    ) -> asyncio.Future[int]:
        queue: str = body.queue
        key = queue.encode()
        ev = Event(new_event_id(), body.TYPE, run_id, task_id, 0, self._clock(), epoch, body)
        return self._appender.submit(ev, key, self.partition_of(queue))

    def partition_of(self, queue: str) -> int:
        return partition_for(queue.encode(), self._nparts)

    # --- ownership ---------------------------------------------------------------

    async def _on_assign(self, assignment: Assignment) -> None:
        for p in sorted(assignment.partitions):
            part = QueuePartition(p)
            await self._catch_up(part)
            epoch = max(assignment.generation, part.epoch + 1)
            claim = Event(new_event_id(), PartitionClaimed.TYPE, "", "", 0, self._clock(), epoch,
                          PartitionClaimed(p, self.worker_id))
            await self._appender.submit(claim, b"", p)
            await self._catch_up(part)
            if part.epoch != epoch:
                log.warning("queue partition claimed by a newer owner", partition=p)
                continue
            self._parts[p] = part
            self._mine[p] = epoch
            for q in part.queues.values():
                for run_id, key in q.holders.items():
                    self._notify(run_id, "", SlotGranted(q.name, key))
                await self._grant(part, q)
            self._readers[p] = asyncio.create_task(self._tail(part), name=f"stepline-queues-{p}")

    async def _on_revoke(self, partitions: frozenset[int]) -> None:
        readers = [self._readers.pop(p) for p in partitions if p in self._readers]
        for p in partitions:
            self._parts.pop(p, None)
            self._mine.pop(p, None)
        self._unsent = {i: u for i, u in self._unsent.items() if u[0] not in partitions}
        for (p, name), handle in list(self._wakeups.items()):
            if p in partitions:
                handle.cancel()
                del self._wakeups[(p, name)]
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    async def _catch_up(self, part: QueuePartition) -> None:
        end = await self.log.end_offset(self.topic, part.partition)
        while part.next_offset < end:
            for r in await self.log.read(self.topic, part.partition, part.next_offset, 2000):
                self._fold(part, r.value, r.offset, live=False)

    def _fold(self, part: QueuePartition, value: bytes, offset: int, live: bool = True) -> QueueState | None:
        try:
            ev = codec.decode(value)
        except SchemaError as exc:
            log.error("undecodable queue event skipped", partition=part.partition, offset=offset, error=str(exc))
            part.next_offset = offset + 1
            return None
        unsent = self._unsent.pop(ev.event_id, None) if isinstance(ev.body, SlotGranted) else None
        q = part.apply(ev, offset)
        if unsent is not None and ev.epoch >= part.epoch:
            # Our grant, read back with no newer claim before it: every fold
            # accepts it, so the run may start. A grant that lands after a
            # newer owner's claim is dropped by every fold, and its run is
            # never told (the notice on the runs topic is not fenced).
            self._notify(ev.run_id, ev.task_id, ev.body)
        if live and isinstance(ev.body, PauseChanged) and not ev.body.paused:
            self._resumed.add(part.partition)  # its waiters may be granted now
        if live and q is not None and isinstance(ev.body, SlotRequested) and ev.run_id in q.holders:
            # A holder asking again lost its notice (or restarted): say it again.
            self._notify(ev.run_id, ev.task_id, SlotGranted(q.name, q.holders[ev.run_id]))
        return q

    async def _tail(self, part: QueuePartition) -> None:
        while True:
            recs = await self.log.read(self.topic, part.partition, part.next_offset, 2000, timeout=1.0)
            touched: dict[str, QueueState] = {}
            for r in recs:
                q = self._fold(part, r.value, r.offset)
                if q is not None:
                    touched[q.name] = q
            if part.partition in self._resumed:
                self._resumed.discard(part.partition)
                touched.update(part.queues)
            for q in touched.values():
                await self._grant(part, q)

    async def _grant(self, part: QueuePartition, q: QueueState) -> None:
        lock = self._locks.setdefault(part.partition, asyncio.Lock())
        async with lock:
            await self._grant_locked(part, q)

    async def _grant_locked(self, part: QueuePartition, q: QueueState) -> None:
        if part.epoch != self._mine.get(part.partition):
            return  # a newer owner claimed this partition: its decisions, not ours
        now = self._clock()
        picked, retry_at = q.next_grants(now, part.held(q.name))
        if picked:
            epoch = part.epoch
            # Stamped with the decision's time: the rate limit was judged at
            # `now`, and the next owner rebuilds it from these stamps.
            grants = [Event(new_event_id(), SlotGranted.TYPE, w.run_id, w.task_id, 0, now, epoch,
                            SlotGranted(q.name, w.key)) for w in picked]
            for ev in grants:
                self._unsent[ev.event_id] = (part.partition, ev)
            await asyncio.gather(*(self._appender.submit(ev, q.name.encode(), part.partition) for ev in grants))
            for ev in grants:
                # Folded now, not when read back, so the next decision counts
                # them; the copy read back is recognised by its id.
                part.apply(ev)
            self.granted += len(picked)
        if retry_at is not None:
            self._wake_at(part, q, retry_at)

    def _wake_at(self, part: QueuePartition, q: QueueState, at_ms: int) -> None:
        """The rate limit holds waiters back: look again when it frees up."""
        key = (part.partition, q.name)
        if key in self._wakeups:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._wakeups.pop(key, None)
            if self._parts.get(part.partition) is part:
                loop.create_task(self._grant(part, q))

        sleep_until = getattr(self._clock, "sleep_until", None)
        if sleep_until is None:
            self._wakeups[key] = loop.call_later(max(0.0, (at_ms - self._clock()) / 1000), fire)
            return

        async def on_clock() -> None:  # a virtual clock (stepline.testing) tells when
            await sleep_until(at_ms)
            fire()

        self._wakeups[key] = loop.create_task(on_clock())


__all__ = ["Admission", "Waiter"]
