"""The tails of a `KafkaLog`: one consumer shared by every reader that
follows the end of a partition, and the recent records it has read.

Without it each tailing reader (a worker's tail and a client's watcher per
partition) had a consumer of its own: one fetch stream per reader and
partition, every record fetched, decoded and wrapped once per reader. On
one broker that was most of the Kafka client's CPU (bench/PROFILE.md).
Here one consumer fetches every tailed partition (one fetch request covers
them all), and readers are served from a short window of recent records
per partition.

A partition's window covers offsets [start, end): every readable record in
that range is in it, in offset order. It grows two ways:

* the shared consumer (read_committed, like every reader) returns the next
  records; those below `end` are already there and skipped;
* this process's own appends, once acknowledged (acks=all: durable, final
  offsets), when their first offset is `end`. Everything below `end` is
  settled, so the records that follow it are exactly these; the consumer
  brings them again later and they are skipped. Readers in this process
  thus see its own appends without waiting for a fetch.

A read at an offset the window covers is served from it; a tailing read
(timeout > 0) at `end` waits for the window to grow. Anything else (older
offsets, reads with timeout=0 at the end, which must ask the broker) goes
to the per-partition cursors (kafka_cursors.py) as before, and so does every
reader once the window has been dropped (a fetch error, an idle partition).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import ConsumerStoppedError, OffsetOutOfRangeError

from .base import Record
from .kafka_clients import KafkaClients

log = structlog.get_logger("stepline.log.kafka")

# Records kept per partition: a reader further behind than this reads
# through a cursor. When the window reaches _KEEP_MAX it drops to _KEEP.
# Readers of one process's tail (a worker and a client's watchers) are
# rarely more than a batch apart; the bound is on memory: under 1 MB per
# partition with records of a few hundred bytes.
_KEEP = 1024
_KEEP_MAX = 2 * _KEEP
# A partition nobody has read for this long stops being fetched. Tailing
# readers come back at least once a second (their reads time out after 1 s);
# a worker that lost a partition stops reading it, and should not go on
# fetching and decoding what its new owner writes there.
_IDLE_S = 5.0
_FETCH_TIMEOUT_MS = 1000
_FETCH_MAX_WAIT_MS = 50


def _record_maker() -> Callable[[str, int, int, bytes, bytes, int], Record]:
    """Record(...) without the frozen dataclass __init__ (one
    object.__setattr__ per field): the slots' own setters, about 2x
    faster, on a path taken once per record read."""
    setters = [getattr(Record, name).__set__ for name in Record.__slots__]
    t, p, o, k, v, ts = setters
    new = object.__new__

    def make(topic: str, partition: int, offset: int, key: bytes, value: bytes,
             timestamp_ms: int) -> Record:
        r = new(Record)
        t(r, topic)
        p(r, partition)
        o(r, offset)
        k(r, key)
        v(r, value)
        ts(r, timestamp_ms)
        return r

    return make


make_record = _record_maker()


@dataclass(eq=False, slots=True)
class _Window:
    topic: str  # the logical name, as records report it
    tp: TopicPartition
    start: int
    end: int
    records: list[Record] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    used: float = 0.0
    dropped: bool = False

    def add(self, recs: Sequence[Record]) -> None:
        self.records.extend(recs)
        self.offsets.extend(r.offset for r in recs)
        self.end = recs[-1].offset + 1
        if len(self.records) >= _KEEP_MAX:
            cut = len(self.records) - _KEEP
            self.start = self.offsets[cut - 1] + 1
            del self.records[:cut], self.offsets[:cut]
        self.wake()

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)


class Tails:
    """The shared tail consumer of one KafkaLog and its windows."""

    def __init__(self, log_: KafkaClients) -> None:
        self._log = log_
        self._windows: dict[TopicPartition, _Window] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._starting: asyncio.Task[AIOKafkaConsumer] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._last_reap = time.monotonic()

    # --- reads ---

    async def read(self, topic: str, tp: TopicPartition, offset: int, max_records: int,
                   timeout: float) -> list[Record] | None:
        """Records from the window, or None: read through a cursor instead."""
        win = self._windows.get(tp)
        if win is None:
            if timeout <= 0 or self._closed:
                return None
            win = await self._follow(topic, tp, offset)
            if win is None:
                return None
        if not win.start <= offset <= win.end:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            win.used = time.monotonic()
            i = bisect.bisect_left(win.offsets, offset)
            if i < len(win.records):
                return win.records[i:i + max_records]
            # Nothing at or after `offset` yet (offsets between the last
            # record and `end` hold no readable record).
            if timeout <= 0:
                return None  # "what is there now" is the broker's to say
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            waiter: asyncio.Future[None] = loop.create_future()
            win.waiters.append(waiter)
            timer = loop.call_later(remaining, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                if waiter in win.waiters:  # timed out or cancelled: not woken
                    win.waiters.remove(waiter)
            if win.dropped:
                return None
            if offset < win.start:
                return None  # the window moved past this reader

    def appended(self, tp: TopicPartition, base: int, records: Sequence[tuple[bytes, bytes]],
                 timestamps: Sequence[int]) -> None:
        """This process's records at `base`, `base + 1`, ..., acknowledged."""
        win = self._windows.get(tp)
        if win is None or win.end != base or win.dropped:
            return
        topic, p = win.topic, tp.partition
        win.add([make_record(topic, p, base + i, k, v, ts)
                 for i, ((k, v), ts) in enumerate(zip(records, timestamps, strict=True))])

    # --- the shared consumer ---

    async def _follow(self, topic: str, tp: TopicPartition, offset: int) -> _Window | None:
        """Start tailing `tp` at `offset` (its first tailing read)."""
        consumer = await self._started()
        if consumer is None:
            return None
        win = self._windows.get(tp)
        if win is not None:  # another reader started it meanwhile
            return win
        win = _Window(topic, tp, offset, offset, used=time.monotonic())
        self._windows[tp] = win
        self._reassign(consumer)
        return win

    async def _started(self) -> AIOKafkaConsumer | None:
        if self._consumer is not None:
            return self._consumer
        if self._starting is None:
            self._starting = asyncio.create_task(self._start())
        try:
            return await asyncio.shield(self._starting)
        except Exception as exc:  # noqa: BLE001 - readers fall back to cursors
            log.warning("kafka tail consumer did not start; reading through cursors",
                        error=f"{type(exc).__name__}: {exc}")
            self._starting = None
            return None

    async def _start(self) -> AIOKafkaConsumer:
        kwargs = self._log.consumer_kwargs()
        kwargs["client_id"] = f"{kwargs['client_id']}-tail"
        # A broker answers the requests of one connection in order, so a
        # partition added to the assignment is fetched only once the fetch
        # in flight returns: at the latest after fetch_max_wait_ms, when no
        # record arrives meanwhile. Short waits keep that delay small; idle,
        # they cost a few empty fetches a second.
        kwargs.setdefault("fetch_max_wait_ms", _FETCH_MAX_WAIT_MS)
        consumer = AIOKafkaConsumer(**kwargs)
        try:
            await self._log._bounded(consumer.start())
        except BaseException:
            await asyncio.gather(consumer.stop(), return_exceptions=True)
            raise
        if self._closed:
            await consumer.stop()
            raise ConsumerStoppedError()
        self._consumer = consumer
        self._loop_task = asyncio.create_task(self._fetch_loop(consumer),
                                              name="stepline-kafka-tail")
        return consumer

    def _reassign(self, consumer: AIOKafkaConsumer) -> None:
        # assign() replaces the assignment and forgets every position, so
        # each partition is sought back to where its window ends.
        consumer.assign(list(self._windows))
        for tp, win in self._windows.items():
            consumer.seek(tp, win.end)

    async def _fetch_loop(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while not self._closed:
                if not self._windows:
                    await asyncio.sleep(0.05)
                    continue
                try:
                    batches = await consumer.getmany(timeout_ms=_FETCH_TIMEOUT_MS,
                                                     max_records=_KEEP)
                except (ConsumerStoppedError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001 - readers fall back to cursors
                    # Out of range (retention, a window opened past the end) or
                    # a broken fetch: forget the windows concerned; the cursors
                    # handle these cases as they always did.
                    hit = exc.args[0] if isinstance(exc, OffsetOutOfRangeError) and exc.args else None
                    tps = [tp for tp in hit if tp in self._windows] if isinstance(hit, dict) else []
                    log.info("kafka tail dropped windows", error=f"{type(exc).__name__}: {exc}",
                             partitions=len(tps) or len(self._windows))
                    self._drop(consumer, tps or list(self._windows))
                    continue
                for tp, recs in batches.items():
                    win = self._windows.get(tp)
                    if win is None or not recs:
                        continue
                    end, topic, p = win.end, win.topic, tp.partition
                    fresh = [make_record(topic, p, r.offset, r.key or b"", r.value or b"",
                                         r.timestamp)
                             for r in recs if r.offset >= end]
                    if fresh:
                        win.add(fresh)
                self._maybe_reap(consumer)
        except ConsumerStoppedError:
            return
        finally:
            for win in self._windows.values():
                win.dropped = True
                win.wake()
            self._windows.clear()

    def _maybe_reap(self, consumer: AIOKafkaConsumer) -> None:
        now = time.monotonic()
        if now - self._last_reap < _IDLE_S / 4:
            return
        self._last_reap = now
        idle = [tp for tp, w in self._windows.items() if now - w.used > _IDLE_S and not w.waiters]
        if idle:
            self._drop(consumer, idle)

    def _drop(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        for tp in tps:
            win = self._windows.pop(tp, None)
            if win is not None:
                win.dropped = True
                win.wake()
        self._reassign(consumer)

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for win in self._windows.values():
            win.dropped = True
            win.wake()
        self._windows.clear()
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await asyncio.gather(consumer.stop(), return_exceptions=True)


def _wake(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(None)
