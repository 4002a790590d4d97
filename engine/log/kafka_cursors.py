"""Reads of a `KafkaLog` that its shared tail (kafka_tail.py) cannot
serve: a small pool of *cursors* per partition, each a consumer with that
one partition assigned by hand, remembered by the offset it stands at (see
the module docstring of engine/log/kafka.py)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError

from ..errors import LogError
from .kafka_clients import KafkaClients, _quietly


@dataclass(eq=False, slots=True)
class _Cursor:
    consumer: AIOKafkaConsumer
    tp: TopicPartition
    position: int
    busy: bool = False
    used: float = 0.0


@dataclass(slots=True)
class _Pool:
    cursors: list[_Cursor] = field(default_factory=list)
    opening: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


_CURSOR_IDLE_S = 60.0
_REAP_EVERY_S = 10.0


class KafkaCursors:
    """The cursors of one log, by partition."""

    def __init__(self, clients: KafkaClients) -> None:
        self._clients = clients
        self._pools: dict[tuple[str, int], _Pool] = {}
        self._last_reap = 0.0
        self._closing: set[asyncio.Task[None]] = set()

    async def read(self, tp: TopicPartition, offset: int, max_records: int,
                   timeout: float) -> list[Any]:
        """The consumer records at `offset` and after, through a cursor."""
        cursor = await self._acquire(tp, offset)
        try:
            return await self._read_at(cursor, max_records, timeout)
        except asyncio.CancelledError:
            # Nothing is consumed until getmany returns, so the cursor still
            # stands where it did (tails are cancelled on every revoke).
            raise
        except BaseException:
            # A failed read may leave the consumer anywhere: drop the cursor.
            cursor.position = -1
            raise
        finally:
            self._release(cursor)

    async def _read_at(self, cursor: _Cursor, max_records: int, timeout: float) -> list[Any]:
        consumer, tp = cursor.consumer, cursor.tp
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        start = cursor.position
        while True:
            try:
                got = (await consumer.getmany(tp, timeout_ms=0, max_records=max_records)).get(tp)
                if not got:
                    remaining = deadline - loop.time()
                    if remaining > 0:
                        got = (await consumer.getmany(
                            tp, timeout_ms=int(remaining * 1000) + 1, max_records=max_records
                        )).get(tp)
                    else:
                        # timeout=0 promises what is there now, but this
                        # cursor may not have fetched it yet: ask the broker.
                        end = int((await consumer.end_offsets([tp]))[tp])
                        if end <= start:
                            return []
                        got = await self._fetch_soon(consumer, tp, max_records, end)
            except OffsetOutOfRangeError:
                got = await self._out_of_range(cursor, deadline)
                if got is None:
                    return []
                continue
            except KafkaError as exc:
                raise LogError(f"cannot read {tp.topic}[{tp.partition}]: {exc}") from exc
            got = [r for r in got or () if r.offset >= start]
            if got:
                cursor.position = got[-1].offset + 1
                return got
            if loop.time() >= deadline:
                return []

    async def _fetch_soon(self, consumer: AIOKafkaConsumer, tp: TopicPartition,
                          max_records: int, end: int) -> list[Any]:
        """Offsets below `end` exist: wait for the fetch that brings their records.

        They may hold none: transaction markers and aborted records take
        offsets that a read_committed consumer skips, moving its position
        on without returning anything. Once the position passes `end`
        with nothing returned, there was nothing to read.
        """
        loop = asyncio.get_running_loop()
        limit = self._clients._client_options.get("request_timeout_ms", 30000) / 1000
        deadline = loop.time() + limit
        while True:
            if await consumer.position(tp) >= end:
                return []
            got = (await consumer.getmany(tp, timeout_ms=50, max_records=max_records)).get(tp)
            if got:
                return got
            if loop.time() > deadline:
                raise LogError(
                    f"records of {tp.topic}[{tp.partition}] did not arrive within {limit:g} s"
                )

    async def _out_of_range(self, cursor: _Cursor, deadline: float) -> list[Any] | None:
        """The cursor's offset is not in the log: past its end, or retention
        removed it. Returns None for "nothing yet"; repositions otherwise."""
        consumer, tp = cursor.consumer, cursor.tp
        first = int((await consumer.beginning_offsets([tp]))[tp])
        if cursor.position < first:
            # Deleted by retention: the oldest record left is the next one.
            consumer.seek(tp, first)
            cursor.position = first
            return []
        # Past the end: wait until the log grows that far or time runs out.
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
            if int((await consumer.end_offsets([tp]))[tp]) > cursor.position:
                consumer.seek(tp, cursor.position)
                return []
        consumer.seek(tp, cursor.position)
        return None

    async def _acquire(self, tp: TopicPartition, offset: int) -> _Cursor:
        """A cursor on `tp` standing at `offset`, reserved for one read."""
        self._maybe_reap()
        pool = self._pools.setdefault((tp.topic, tp.partition), _Pool())
        loop = asyncio.get_running_loop()
        while True:
            free = [c for c in pool.cursors if not c.busy]
            for c in free:
                if c.position == offset:
                    c.busy = True
                    return c
            if len(pool.cursors) + pool.opening < self._clients.cursors_per_partition:
                pool.opening += 1
                try:
                    cursor = await self._open_cursor(tp, offset)
                finally:
                    pool.opening -= 1
                cursor.busy = True
                pool.cursors.append(cursor)
                return cursor
            if free:
                cursor = min(free, key=lambda c: c.used)
                cursor.consumer.seek(tp, offset)
                cursor.position = offset
                cursor.busy = True
                return cursor
            waiter: asyncio.Future[None] = loop.create_future()
            pool.waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in pool.waiters:
                    pool.waiters.remove(waiter)

    def _release(self, cursor: _Cursor) -> None:
        cursor.busy = False
        cursor.used = time.monotonic()
        pool = self._pools.get((cursor.tp.topic, cursor.tp.partition))
        if pool is None:  # the log closed meanwhile
            self._stop_later(cursor.consumer)
            return
        if cursor.position < 0:
            pool.cursors.remove(cursor)
            self._stop_later(cursor.consumer)
        for waiter in pool.waiters:
            if not waiter.done():
                waiter.set_result(None)
                break

    async def _open_cursor(self, tp: TopicPartition, offset: int) -> _Cursor:
        consumer = AIOKafkaConsumer(**self._clients.consumer_kwargs())
        try:
            await self._clients._bounded(consumer.start())
            consumer.assign([tp])
            consumer.seek(tp, offset)
        except BaseException:
            await _quietly(consumer.stop())
            raise
        return _Cursor(consumer, tp, offset, used=time.monotonic())

    def _maybe_reap(self) -> None:
        """Close cursors nobody has used for a while (they keep fetching)."""
        now = time.monotonic()
        if now - self._last_reap < _REAP_EVERY_S:
            return
        self._last_reap = now
        for pool in self._pools.values():
            idle = [c for c in pool.cursors if not c.busy and now - c.used > _CURSOR_IDLE_S]
            for c in idle:
                pool.cursors.remove(c)
                self._stop_later(c.consumer)

    def _stop_later(self, consumer: AIOKafkaConsumer) -> None:
        task = asyncio.get_running_loop().create_task(_quietly(consumer.stop()))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        cursors = [c for pool in self._pools.values() for c in pool.cursors]
        self._pools.clear()
        await _quietly(*(c.consumer.stop() for c in cursors), *self._closing)
