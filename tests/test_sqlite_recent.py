"""The sqlite log's cache of the records this process committed last: it
stays bounded however much a process appends, and a read it cannot serve is
answered from the file, the same records."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stepline.log import TopicSpec
from stepline.log.sqlite import SqliteLog
from stepline.log.sqlite_readers import _Recent

TOPIC = "events"


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[SqliteLog]:
    async with SqliteLog(tmp_path / "log.db") as log:
        await log.ensure_topics([TopicSpec(TOPIC, 1)])
        yield log


def cached(log: SqliteLog) -> _Recent:
    (recent,) = log._recent.values()
    return recent


async def test_the_cache_keeps_at_most_its_record_bound_however_many_are_appended(log: SqliteLog) -> None:
    for i in range(60):
        await log.append(TOPIC, 0, [(b"k", b"v%d" % (i * 100 + j)) for j in range(100)])
    recent = cached(log)
    assert 0 < len(recent.rows) <= _Recent.KEEP_RECORDS
    assert recent.end == 6000  # still knows where our last commit ended


async def test_the_cache_keeps_at_most_its_byte_bound_of_large_records(log: SqliteLog) -> None:
    big = 100 * 1024
    for i in range(30):
        await log.append(TOPIC, 0, [(b"k", bytes([i]) * big)])
    recent = cached(log)
    assert recent.size <= _Recent.KEEP_BYTES
    assert sum(len(v) for _, _, v, _ in recent.rows) <= _Recent.KEEP_BYTES
    assert len(recent.rows) < 30


async def test_reads_below_the_cache_and_across_its_start_return_what_the_file_holds(log: SqliteLog) -> None:
    for i in range(30):
        await log.append(TOPIC, 0, [(b"k%d" % (i * 100 + j), b"v%d" % (i * 100 + j)) for j in range(100)])
    start = cached(log).start
    assert start > 100
    for offset, n in ((0, 1000), (start - 7, 50), (start, 20), (2990, 100)):
        records = await log.read(TOPIC, 0, offset, n)
        assert [r.offset for r in records] == list(range(offset, min(offset + n, 3000)))
        assert [r.value for r in records] == [b"v%d" % o for o in range(offset, min(offset + n, 3000))]
        assert all(r.key == b"k%d" % r.offset for r in records)


async def test_a_reader_that_fell_behind_the_cache_reads_every_record_once_in_order(log: SqliteLog) -> None:
    seen: list[int] = []
    for i in range(25):
        await log.append(TOPIC, 0, [(b"k", b"%d" % (i * 100 + j)) for j in range(100)])
        if i % 10 == 9:  # a slow tail: reads only now and then
            while len(seen) < (i + 1) * 100:
                seen += [int(r.value) for r in await log.read(TOPIC, 0, len(seen), 333)]
    while len(seen) < 2500:
        seen += [int(r.value) for r in await log.read(TOPIC, 0, len(seen), 333)]
    assert seen == list(range(2500))
