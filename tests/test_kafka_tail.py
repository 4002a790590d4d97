"""The shared tail of a Kafka log (engine/log/kafka_tail.py): readers that
follow a partition's end share one consumer and a window of recent records,
and see this process's own appends as soon as they are acknowledged. What
they read must be exactly what the broker stores, in offset order, once
each, whoever wrote it, transactions included.

Real broker, a fresh namespace per test (see tests/kafka_broker.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from aiokafka import TopicPartition

from stepline.log import Record, TopicSpec, kafka_tail, open_log
from stepline.log.base import Outgoing
from stepline.log.kafka import KafkaLog
from stepline.log.kafka_txn import TransactionalWriters

LogFactory = Callable[[], Awaitable[KafkaLog]]


@pytest.fixture
async def open_kafka(kafka_bootstrap: str) -> AsyncIterator[LogFactory]:
    namespace = f"tail-{uuid.uuid4().hex[:12]}"
    opened: list[KafkaLog] = []

    async def factory() -> KafkaLog:
        log = open_log(f"kafka://{kafka_bootstrap}?namespace={namespace}")
        assert isinstance(log, KafkaLog)
        await log.start()
        opened.append(log)
        return log

    yield factory
    for log in reversed(opened):
        await log.close()


async def follow(log: KafkaLog, topic: str, partition: int, start: int, count: int,
                 max_records: int = 1000) -> list[Record]:
    """Tail like the engine does (reads with a timeout) until `count` records."""
    got: list[Record] = []
    offset = start
    while len(got) < count:
        batch = await log.read(topic, partition, offset, max_records, timeout=1.0)
        got.extend(batch)
        if batch:
            offset = batch[-1].offset + 1
    return got


async def stored(kafka_bootstrap_log: KafkaLog, topic: str, partition: int) -> list[Record]:
    """Everything the broker has, read through a cursor of a log that never tailed."""
    end = await kafka_bootstrap_log.end_offset(topic, partition)
    out: list[Record] = []
    offset = 0
    while offset < end:
        batch = await kafka_bootstrap_log.read(topic, partition, offset, 1000)
        if not batch:
            break
        out.extend(batch)
        offset = batch[-1].offset + 1
    return out


def window_of(log: KafkaLog, topic: str, partition: int) -> list[int]:
    win = log._tails._windows.get(TopicPartition(log.topic_name(topic), partition))
    return [] if win is None else list(win.offsets)


async def test_a_tail_sees_its_own_appends_exactly_as_the_broker_stores_them(
    open_kafka: LogFactory,
) -> None:
    log = await open_kafka()
    await log.ensure_topics([TopicSpec("t", 2)])
    reader = asyncio.create_task(follow(log, "t", 1, 0, 30))
    await asyncio.sleep(0.5)  # the reader is waiting at the end
    # With the shared consumer not fetching this partition, only the appends
    # themselves can bring the records to the reader.
    consumer = log._tails._consumer
    assert consumer is not None
    tp = TopicPartition(log.topic_name("t"), 1)
    consumer.pause(tp)
    for i in range(10):
        await log.append("t", 1, [(f"k{i}".encode(), f"v{i}-{j}".encode()) for j in range(3)])
    got = await asyncio.wait_for(reader, 30)
    consumer.resume(tp)

    fresh = await open_kafka()
    assert got == await stored(fresh, "t", 1)
    assert [r.offset for r in got] == list(range(30))
    assert window_of(log, "t", 1) == list(range(30))
    # What the consumer fetches later is the same records again: skipped.
    await log.append("t", 1, [(b"k", b"after")])
    more = await follow(log, "t", 1, 30, 1)
    assert [r.offset for r in more] == [30] and window_of(log, "t", 1) == list(range(31))


async def test_tailing_readers_get_own_and_foreign_appends_once_each_in_offset_order(
    open_kafka: LogFactory,
) -> None:
    here, elsewhere = await open_kafka(), await open_kafka()
    await here.ensure_topics([TopicSpec("t", 1)])
    total = 2 * 40 * 3
    readers = [asyncio.create_task(follow(here, "t", 0, 0, total, max_records=n))
               for n in (1, 7, 1000)]
    await asyncio.sleep(0.5)

    async def write(log: KafkaLog, name: str) -> None:
        for i in range(40):
            await log.append("t", 0, [(name.encode(), f"{name}{i}.{j}".encode()) for j in range(3)])

    await asyncio.gather(write(here, "here"), write(elsewhere, "elsewhere"))
    results = await asyncio.wait_for(asyncio.gather(*readers), 60)

    broker = await stored(await open_kafka(), "t", 0)
    assert len(broker) == total
    for got in results:
        assert got == broker  # same records, same order, no gaps or repeats


async def test_readers_behind_or_outside_the_window_still_read_everything(
    open_kafka: LogFactory,
) -> None:
    log = await open_kafka()
    await log.ensure_topics([TopicSpec("t", 1)])
    await log.append("t", 0, [(b"k", str(i).encode()) for i in range(100)])
    tail = asyncio.create_task(follow(log, "t", 0, 100, 5))
    await asyncio.sleep(0.5)
    await log.append("t", 0, [(b"k", str(i).encode()) for i in range(100, 105)])
    assert [r.offset for r in await asyncio.wait_for(tail, 30)] == list(range(100, 105))

    # Older than the window: through a cursor, with or without a timeout.
    assert [r.offset for r in await log.read("t", 0, 0, 10)] == list(range(10))
    assert [r.offset for r in await log.read("t", 0, 50, 10, timeout=1.0)] == list(range(50, 60))
    # Inside it, and at its end with timeout=0 ("nothing there now").
    assert [r.value for r in await log.read("t", 0, 103, 10)] == [b"103", b"104"]
    assert await log.read("t", 0, 105, 10) == []
    assert await log.read("t", 0, 105, 10, timeout=0.2) == []


@pytest.fixture
def no_hook() -> Iterator[None]:
    yield
    TransactionalWriters.before_commit = None


async def test_a_tail_steps_over_transactions_and_never_shows_an_open_one(
    open_kafka: LogFactory, no_hook: None
) -> None:
    log, other = await open_kafka(), await open_kafka()
    await log.ensure_topics([TopicSpec("runs", 1), TopicSpec("out", 1)])
    out = log.topic_name("out")
    tail = asyncio.create_task(follow(log, "runs", 0, 0, 7))
    await asyncio.sleep(0.5)
    await log.append("runs", 0, [(b"k", b"plain-1")])
    await log.fence("runs", 0)
    await log.append_atomic("runs", 0, [(b"k", b"txn-1"), (b"k", b"txn-2")],
                            [Outgoing(out, b"k", b"emitted")])
    # After the commit marker: not contiguous with what the tail saw, so it
    # comes through the shared consumer, not from the append.
    await log.append("runs", 0, [(b"k", b"plain-2")])
    await other.append("runs", 0, [(b"k", b"foreign")])

    # A transaction held open: neither it nor what is appended after it
    # may reach a reader until it commits.
    held, release = asyncio.Event(), asyncio.Event()

    async def hold(_topic: str, _partition: int) -> None:
        held.set()
        await release.wait()

    TransactionalWriters.before_commit = hold
    open_txn = asyncio.create_task(log.append_atomic("runs", 0, [(b"k", b"txn-3")], []))
    await held.wait()
    await log.append("runs", 0, [(b"k", b"plain-3")])
    await asyncio.sleep(1.0)
    assert not tail.done()
    seen = window_of(log, "runs", 0)
    assert len(seen) == 5  # plain-1 .. foreign, nothing of or after the open transaction
    release.set()
    await open_txn
    got = await asyncio.wait_for(tail, 30)

    assert [r.value for r in got] == [b"plain-1", b"txn-1", b"txn-2", b"plain-2", b"foreign",
                                      b"txn-3", b"plain-3"]
    assert got == await stored(await open_kafka(), "runs", 0)
    offsets = [r.offset for r in got]
    assert offsets == sorted(set(offsets))
    assert offsets[-1] > len(got) - 1  # commit markers took offsets in between


async def test_a_window_keeps_recent_records_only_and_readers_left_behind_catch_up(
    open_kafka: LogFactory,
) -> None:
    log = await open_kafka()
    await log.ensure_topics([TopicSpec("t", 1)])
    keep_max = kafka_tail._KEEP_MAX
    slow = asyncio.create_task(follow(log, "t", 0, 0, 3 * keep_max, max_records=100))
    await asyncio.sleep(0.5)
    # More than a window holds, in one append: the window drops its oldest
    # records, and the reader waiting at offset 0 carries on through a cursor.
    await log.append("t", 0, [(b"k", str(i).encode()) for i in range(3 * keep_max)])
    got = await asyncio.wait_for(slow, 60)
    assert [r.value for r in got] == [str(i).encode() for i in range(3 * keep_max)]
    kept = window_of(log, "t", 0)
    assert kept == list(range(3 * keep_max - len(kept), 3 * keep_max)) and len(kept) < keep_max
