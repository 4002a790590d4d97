"""The log contract: every backend passes every test here.

To add a backend, add its name to `BACKENDS` and a branch in `backend_url`
that returns a URL naming a fresh, empty log for one test.

Kafka runs against one real broker for the whole session (see
`tests/kafka_broker.py`); each test gets a fresh namespace, so its topics
and groups are new and nothing is shared between tests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from stepline.errors import UnknownTopic
from stepline.log import Assignment, Log, TopicSpec, open_log

BACKENDS = ["memory", "sqlite", "kafka"]
# Backends whose groups seat one member at a time: it holds every partition
# and later joiners queue behind it. Kafka shares the partitions out among
# the live members instead (parallelism = partitions).
SINGLE_SEAT = {"memory", "sqlite"}

LogFactory = Callable[[], Awaitable[Log]]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "memory":
        return f"memory://contract-{uuid.uuid4().hex}"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'log.db'}"
    if backend == "kafka":
        servers = request.getfixturevalue("kafka_bootstrap")
        return f"kafka://{servers}?namespace=contract-{uuid.uuid4().hex[:12]}"
    raise AssertionError(f"no URL for backend {backend!r}")


@pytest.fixture
async def open_another(backend_url: str) -> AsyncIterator[LogFactory]:
    """Opens more handles on the same log, as a second process would."""
    opened: list[Log] = []

    async def factory() -> Log:
        log = open_log(backend_url)
        await log.start()
        opened.append(log)
        return log

    yield factory
    for log in reversed(opened):
        await log.close()


@pytest.fixture
async def log(open_another: LogFactory) -> Log:
    return await open_another()


@pytest.fixture
def topic() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


async def within(awaitable: Awaitable[object], seconds: float = 10.0) -> object:
    """Await with a deadline, so a broken wake-up fails instead of hanging."""
    return await asyncio.wait_for(awaitable, seconds)


def values(records: list) -> list[bytes]:  # type: ignore[type-arg]
    return [r.value for r in records]


# --- offsets and order ---------------------------------------------------------


async def test_offsets_start_at_zero_and_are_contiguous_per_partition(log: Log, topic: str) -> None:
    await log.ensure_topics([TopicSpec(topic, 2)])
    assert await log.append(topic, 0, [(b"k", b"a"), (b"k", b"b")]) == [0, 1]
    assert await log.append(topic, 1, [(b"k", b"x")]) == [0]
    assert await log.append(topic, 0, [(b"k", b"c")]) == [2]
    assert await log.append(topic, 1, [(b"k", b"y"), (b"k", b"z")]) == [1, 2]


async def test_order_is_kept_within_a_call_and_across_calls(log: Log, topic: str) -> None:
    await log.ensure_topics([TopicSpec(topic, 1)])
    await log.append(topic, 0, [(b"k1", b"1"), (b"k2", b"2"), (b"k3", b"3")])
    await log.append(topic, 0, [(b"k4", b"4")])
    await log.append(topic, 0, [(b"k5", b"5"), (b"k6", b"6")])
    records = await log.read(topic, 0, 0)
    assert values(records) == [b"1", b"2", b"3", b"4", b"5", b"6"]
    assert [r.key for r in records] == [b"k1", b"k2", b"k3", b"k4", b"k5", b"k6"]
    assert [r.offset for r in records] == list(range(6))
    assert all(r.topic == topic and r.partition == 0 for r in records)
    assert all(r.timestamp_ms > 0 for r in records)


async def test_an_empty_append_returns_no_offsets(log: Log, topic: str) -> None:
    await log.ensure_topics([TopicSpec(topic, 1)])
    assert await log.append(topic, 0, []) == []
    assert await log.end_offset(topic, 0) == 0


async def test_concurrent_appends_get_distinct_contiguous_offsets(log: Log, topic: str) -> None:
    await log.ensure_topics([TopicSpec(topic, 1)])

    async def one(i: int) -> list[int]:
        return await log.append(topic, 0, [(b"k", str(i).encode())])

    results = await within(asyncio.gather(*(one(i) for i in range(200))))
    offsets = sorted(o for r in results for o in r)  # type: ignore[attr-defined]
    assert offsets == list(range(200))
    # Each caller's offset holds that caller's record.
    records = await log.read(topic, 0, 0, max_records=500)
    for i, got in enumerate(results):  # type: ignore[arg-type]
        assert records[got[0]].value == str(i).encode()


async def test_concurrent_multi_record_appends_stay_contiguous_per_call(
    log: Log, topic: str
) -> None:
    await log.ensure_topics([TopicSpec(topic, 1)])
    batches = [[(b"k", f"{i}-{j}".encode()) for j in range(3)] for i in range(50)]
    results = await within(asyncio.gather(*(log.append(topic, 0, b) for b in batches)))
    for got in results:  # type: ignore[attr-defined]
        assert got == list(range(got[0], got[0] + 3))
    assert sorted(o for got in results for o in got) == list(range(150))  # type: ignore[attr-defined]


async def test_end_offset_is_the_next_offset(log: Log, topic: str) -> None:
    await log.ensure_topics([TopicSpec(topic, 2)])
    assert await log.end_offset(topic, 0) == 0
    await log.append(topic, 0, [(b"k", b"v")] * 5)
    assert await log.end_offset(topic, 0) == 5
    assert await log.end_offset(topic, 1) == 0


# --- reading -------------------------------------------------------------------


async def test_read_starts_at_the_given_offset_and_honours_max_records(
    log: Log, topic: str
) -> None:
    await log.ensure_topics([TopicSpec(topic, 1)])
    await log.append(topic, 0, [(b"k", str(i).encode()) for i in range(10)])
    assert values(await log.read(topic, 0, 4, max_records=3)) == [b"4", b"5", b"6"]
    assert [r.offset for r in await log.read(topic, 0, 8)] == [8, 9]
    assert await log.read(topic, 0, 10) == []


async def test_read_past_the_end_with_a_timeout_returns_nothing(log: Log, topic: str) -> None:
    await log.ensure_topics([TopicSpec(topic, 1)])
    await log.append(topic, 0, [(b"k", b"v")])
    assert await within(log.read(topic, 0, 1, timeout=0.2)) == []


async def test_a_waiting_read_wakes_when_another_task_appends(log: Log, topic: str) -> None:
    await log.ensure_topics([TopicSpec(topic, 1)])
    reader = asyncio.create_task(log.read(topic, 0, 0, timeout=60))
    await asyncio.sleep(0)  # let the reader start; it may or may not have parked yet
    await log.append(topic, 0, [(b"k", b"hello")])
    # Far less than the read's own timeout: the append woke it.
    assert values(await within(reader, 10)) == [b"hello"]  # type: ignore[arg-type]


async def test_a_waiting_read_wakes_for_an_append_through_another_handle(
    open_another: LogFactory, topic: str
) -> None:
    reading, writing = await open_another(), await open_another()
    await writing.ensure_topics([TopicSpec(topic, 1)])
    reader = asyncio.create_task(reading.read(topic, 0, 0, timeout=60))
    await asyncio.sleep(0)
    await writing.append(topic, 0, [(b"k", b"from the other handle")])
    assert values(await within(reader, 10)) == [b"from the other handle"]  # type: ignore[arg-type]


# --- topics --------------------------------------------------------------------


async def test_ensure_topics_is_idempotent_and_keeps_the_partition_count(
    log: Log, topic: str
) -> None:
    await log.ensure_topics([TopicSpec(topic, 4)])
    await log.append(topic, 3, [(b"k", b"v")])
    await log.ensure_topics([TopicSpec(topic, 4)])
    await log.ensure_topics([TopicSpec(topic, 8)])
    assert await log.partitions(topic) == 4
    assert await log.end_offset(topic, 3) == 1


async def test_unknown_topics_and_partitions_raise_unknown_topic(log: Log, topic: str) -> None:
    with pytest.raises(UnknownTopic):
        await log.partitions(topic)
    with pytest.raises(UnknownTopic):
        await log.append(topic, 0, [(b"k", b"v")])
    with pytest.raises(UnknownTopic):
        await log.read(topic, 0, 0)
    with pytest.raises(UnknownTopic):
        await log.end_offset(topic, 0)
    await log.ensure_topics([TopicSpec(topic, 2)])
    with pytest.raises(UnknownTopic):
        await log.append(topic, 2, [(b"k", b"v")])


async def test_a_topic_made_through_one_handle_is_seen_by_another(
    open_another: LogFactory, topic: str
) -> None:
    first, second = await open_another(), await open_another()
    await first.ensure_topics([TopicSpec(topic, 3)])
    assert await second.partitions(topic) == 3


# --- consumer groups -----------------------------------------------------------


async def test_committed_offsets_round_trip_per_group(log: Log, topic: str) -> None:
    await log.ensure_topics([TopicSpec(topic, 3)])
    assert await log.committed("g1", topic) == {}
    await log.commit("g1", topic, {0: 5, 2: 7})
    await log.commit("g1", topic, {0: 6})
    await log.commit("g2", topic, {1: 1})
    assert await log.committed("g1", topic) == {0: 6, 2: 7}
    assert await log.committed("g2", topic) == {1: 1}


class Callbacks:
    """Records what a member was told, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    async def on_assign(self, assignment: Assignment) -> None:
        self.events.append(("assign", assignment))

    async def on_revoke(self, partitions: frozenset[int]) -> None:
        self.events.append(("revoke", partitions))


async def test_a_member_gets_every_partition_and_a_second_waits_its_turn(
    backend: str, open_another: LogFactory, topic: str
) -> None:
    first_log, second_log = await open_another(), await open_another()
    await first_log.ensure_topics([TopicSpec(topic, 4)])
    first, second = Callbacks(), Callbacks()
    everything = frozenset(range(4))

    member = await within(first_log.join_group("workers", topic, first.on_assign, first.on_revoke))
    assert member.assignment.partitions == everything  # type: ignore[attr-defined]
    assert first.events == [("assign", member.assignment)]  # type: ignore[attr-defined]
    generation = member.assignment.generation  # type: ignore[attr-defined]

    joining = asyncio.create_task(
        second_log.join_group("workers", topic, second.on_assign, second.on_revoke)
    )
    if backend in SINGLE_SEAT:
        done, _ = await asyncio.wait({joining}, timeout=0.3)
        assert not done, "a second member joined while the first still held the group"
        assert second.events == []
    else:
        # The second member gets a share: the first gives everything up first,
        # then each partition has exactly one member, in a newer generation.
        other = await within(joining, 30)
        await eventually(
            lambda: member.assignment.generation  # type: ignore[attr-defined]
            == other.assignment.generation  # type: ignore[attr-defined]
            and member.assignment.partitions | other.assignment.partitions == everything  # type: ignore[attr-defined]
            and not member.assignment.partitions & other.assignment.partitions,  # type: ignore[attr-defined]
            what="the partitions to be shared by both members",
        )
        assert ("revoke", everything) in first.events
        assert other.assignment.generation > generation  # type: ignore[attr-defined]
        assert other.assignment.partitions  # type: ignore[attr-defined]

    held = member.assignment.partitions  # type: ignore[attr-defined]
    await member.leave()  # type: ignore[attr-defined]
    assert first.events[-1] == ("revoke", held)
    successor = await within(joining)
    await eventually(
        lambda: successor.assignment.partitions == everything,  # type: ignore[attr-defined]
        what="the remaining member to get every partition",
    )
    assert (
        successor.assignment.generation  # type: ignore[attr-defined]
        > member.assignment.generation  # type: ignore[attr-defined]
    )
    assert second.events[-1] == ("assign", successor.assignment)  # type: ignore[attr-defined]
    await successor.leave()  # type: ignore[attr-defined]


async def eventually(check: Callable[[], object], timeout: float = 30.0,
                     what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_the_generation_grows_with_every_join(log: Log, topic: str) -> None:
    await log.ensure_topics([TopicSpec(topic, 1)])
    cb = Callbacks()
    generations = []
    for _ in range(3):
        member = await within(log.join_group("g", topic, cb.on_assign, cb.on_revoke))
        generations.append(member.assignment.generation)  # type: ignore[attr-defined]
        await member.leave()  # type: ignore[attr-defined]
    assert generations == sorted(set(generations))


async def test_a_cancelled_joiner_does_not_keep_the_group(
    open_another: LogFactory, topic: str
) -> None:
    first_log, second_log = await open_another(), await open_another()
    await first_log.ensure_topics([TopicSpec(topic, 1)])
    cb = Callbacks()
    member = await within(first_log.join_group("g", topic, cb.on_assign, cb.on_revoke))
    waiting = asyncio.create_task(second_log.join_group("g", topic, cb.on_assign, cb.on_revoke))
    await asyncio.wait({waiting}, timeout=0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await member.leave()  # type: ignore[attr-defined]
    again = await within(second_log.join_group("g", topic, cb.on_assign, cb.on_revoke))
    await again.leave()  # type: ignore[attr-defined]


async def test_groups_are_independent(log: Log, topic: str) -> None:
    await log.ensure_topics([TopicSpec(topic, 2)])
    cb = Callbacks()
    a = await within(log.join_group("a", topic, cb.on_assign, cb.on_revoke))
    b = await within(log.join_group("b", topic, cb.on_assign, cb.on_revoke))
    assert a.assignment.partitions == b.assignment.partitions == {0, 1}  # type: ignore[attr-defined]
    await a.leave()  # type: ignore[attr-defined]
    await b.leave()  # type: ignore[attr-defined]


# --- durability ----------------------------------------------------------------


async def test_records_survive_close_and_reopen(backend_url: str, topic: str) -> None:
    async with open_log(backend_url) as log:
        await log.ensure_topics([TopicSpec(topic, 2)])
        await log.append(topic, 1, [(b"k", b"a"), (b"k", b"b")])
        await log.commit("g", topic, {1: 2})
    async with open_log(backend_url) as log:
        assert await log.partitions(topic) == 2
        assert values(await log.read(topic, 1, 0)) == [b"a", b"b"]
        assert await log.committed("g", topic) == {1: 2}
        assert await log.append(topic, 1, [(b"k", b"c")]) == [2]
