"""The in-memory log: a broker stand-in for fast tests (like dramatiq's StubBroker).

All `MemoryLog`s opened on the same name in one process share one
`MemoryStore`, so a client and a worker in one test see the same records, the
way two processes would share a broker. Give each test its own name (or its
own `MemoryStore`) to keep tests apart; `forget_store(name)` drops a store.

Nothing is durable beyond the process. Retention is recorded but not enforced.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import UnknownTopic
from .base import (
    AssignCallback,
    Assignment,
    Headers,
    Log,
    Membership,
    Record,
    RevokeCallback,
    TopicSpec,
)
from .membership import SoleMembership

__all__ = ["MemoryLog", "MemoryStore", "forget_store"]


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    """Resolve waiting futures, each on its own loop (stores may be shared)."""
    for fut in waiters:
        loop = fut.get_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is running:
            if not fut.done():
                fut.set_result(None)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(_set_if_pending, fut)


def _set_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass
class _Partition:
    records: list[Record] = field(default_factory=list)
    # Readers parked until the next append; a list of futures rather than an
    # asyncio.Condition because a shared store may be used from several loops.
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


@dataclass
class _Topic:
    spec: TopicSpec
    partitions: list[_Partition]


@dataclass
class _Seat:
    """Who sits in a (group, topic) and who queues for it, first come first served."""

    holder: object | None = None
    queue: list[asyncio.Future[None]] = field(default_factory=list)
    generation: int = 0


class MemoryStore:
    """The records, offsets and group seats behind one `memory://` name."""

    def __init__(self) -> None:
        # Guards every field below; a store may be used from several threads.
        self.lock = threading.Lock()
        self.topics: dict[str, _Topic] = {}
        self.committed: dict[tuple[str, str], dict[int, int]] = {}
        self.seats: dict[tuple[str, str], _Seat] = {}

    def topic(self, name: str) -> _Topic:
        try:
            return self.topics[name]
        except KeyError:
            raise UnknownTopic(
                f"topic {name!r} does not exist; create it with ensure_topics()"
            ) from None

    def partition(self, name: str, partition: int) -> _Partition:
        topic = self.topic(name)
        if not 0 <= partition < len(topic.partitions):
            raise UnknownTopic(
                f"topic {name!r} has {len(topic.partitions)} partitions; "
                f"partition {partition} does not exist"
            )
        return topic.partitions[partition]


_STORES: dict[str, MemoryStore] = {}
_STORES_LOCK = threading.Lock()


def _shared_store(name: str) -> MemoryStore:
    with _STORES_LOCK:
        return _STORES.setdefault(name, MemoryStore())


def forget_store(name: str) -> None:
    """Drop the shared store behind `memory://name`; later opens start empty."""
    with _STORES_LOCK:
        _STORES.pop(name, None)


def _release_seat(store: MemoryStore, key: tuple[str, str], holder: object) -> None:
    with store.lock:
        seat = store.seats[key]
        if seat.holder is not holder:
            return
        seat.holder = None
        # Hand the seat to the first queued joiner still waiting for it.
        while seat.queue:
            nxt = seat.queue.pop(0)
            if not nxt.done():
                seat.holder = nxt
                _wake([nxt])
                return


class MemoryLog(Log):
    """A `Log` kept in process memory; see the module docstring for sharing."""

    def __init__(self, name: str = "default", *, store: MemoryStore | None = None) -> None:
        self.url = f"memory://{name}"
        self._name = name
        self._explicit_store = store
        self._store: MemoryStore | None = None

    @property
    def store(self) -> MemoryStore:
        if self._store is None:
            raise RuntimeError(f"{self.url} is not started; use `async with` or start()")
        return self._store

    async def start(self) -> None:
        self._store = self._explicit_store or _shared_store(self._name)

    async def close(self) -> None:
        # The store outlives the handle on purpose: it plays the broker.
        self._store = None

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        store = self.store
        for spec in specs:
            if spec.partitions < 1:
                raise ValueError(f"topic {spec.name!r} needs at least one partition")
        with store.lock:
            for spec in specs:
                if spec.name not in store.topics:
                    parts = [_Partition() for _ in range(spec.partitions)]
                    store.topics[spec.name] = _Topic(spec, parts)

    async def partitions(self, topic: str) -> int:
        with self.store.lock:
            return len(self.store.topic(topic).partitions)

    async def topic_names(self, prefix: str = "") -> list[str]:
        with self.store.lock:
            return sorted(name for name in self.store.topics if name.startswith(prefix))

    async def append(
        self,
        topic: str,
        partition: int,
        records: Sequence[tuple[bytes, bytes]],
        headers: Sequence[Headers] | None = None,  # not kept: record_headers is False
    ) -> list[int]:
        store = self.store
        now_ms = time.time_ns() // 1_000_000
        with store.lock:
            part = store.partition(topic, partition)
            start = len(part.records)
            part.records.extend(
                Record(topic, partition, start + i, bytes(k), bytes(v), now_ms)
                for i, (k, v) in enumerate(records)
            )
            waiters, part.waiters = part.waiters, []
        _wake(waiters)
        return list(range(start, start + len(records)))

    async def read(
        self,
        topic: str,
        partition: int,
        offset: int,
        max_records: int = 1000,
        timeout: float = 0.0,
    ) -> list[Record]:
        store = self.store
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with store.lock:
                part = store.partition(topic, partition)
                found = part.records[max(offset, 0) : max(offset, 0) + max_records]
                remaining = deadline - loop.time()
                if found or remaining <= 0:
                    return found
                # Registered under the lock, so an append cannot slip between
                # the empty read above and the wait below.
                waiter: asyncio.Future[None] = loop.create_future()
                part.waiters.append(waiter)
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for returns the
                # result when the waiter completes as the reader is cancelled,
                # swallowing the cancel (a tail loop then never stops).
                async with asyncio.timeout(remaining):
                    await waiter
            except TimeoutError:
                return []
            finally:
                with store.lock:
                    if waiter in part.waiters:
                        part.waiters.remove(waiter)

    async def end_offset(self, topic: str, partition: int) -> int:
        with self.store.lock:
            return len(self.store.partition(topic, partition).records)

    async def join_group(
        self,
        group: str,
        topic: str,
        on_assign: AssignCallback,
        on_revoke: RevokeCallback,
        *,
        instance_id: str | None = None,
    ) -> Membership:
        store = self.store
        key = (group, topic)
        loop = asyncio.get_running_loop()
        ticket: asyncio.Future[None] = loop.create_future()
        with store.lock:
            count = len(store.topic(topic).partitions)
            seat = store.seats.setdefault(key, _Seat())
            if seat.holder is None:
                seat.holder = ticket
                ticket.set_result(None)
            else:
                seat.queue.append(ticket)
        try:
            await ticket
        except asyncio.CancelledError:
            # If the seat was handed to us as we were cancelled, pass it on.
            _release_seat(store, key, ticket)
            raise
        with store.lock:
            seat.generation += 1
            assignment = Assignment(frozenset(range(count)), seat.generation)
        membership = SoleMembership(key, assignment, on_revoke,
                                    lambda m: _release_seat(store, key, m))
        with store.lock:
            seat.holder = membership
        try:
            await on_assign(assignment)
        except BaseException:
            _release_seat(store, key, membership)
            raise
        return membership

    async def group_alive(self, group: str) -> bool | None:
        store = self.store
        with store.lock:
            return any(key[0] == group and seat.holder is not None for key, seat in store.seats.items())

    async def commit(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        store = self.store
        with store.lock:
            for partition in offsets:
                store.partition(topic, partition)
            store.committed.setdefault((group, topic), {}).update(offsets)

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        store = self.store
        with store.lock:
            store.topic(topic)
            return dict(store.committed.get((group, topic), {}))
