"""`stepline.emit`: a step's records reach a Kafka topic in the same
transaction as its checkpoint, so read_committed consumers see them if and
only if the step completed, exactly once.

Records are read back with plain aiokafka consumers, as a downstream team
would: read_committed for what consumers see, read_uncommitted to show
what was really written to the broker (and aborted).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import stepline as sl
from stepline.core import codec
from stepline.core.events import JSON, Event, Payload, RunTriggered
from stepline.core.ids import new_event_id, new_run_id
from stepline.errors import EmitUnsupported, UnknownTopic
from stepline.log.base import Outgoing, partition_for, skip_unreadable
from stepline.log.kafka import KafkaLog
from stepline.log.kafka_txn import TransactionalWriters, WriterFenced
from stepline.log.topics import Topics
from stepline.projections.query import QueryProjector, QueryStore, rebuild
from stepline.sdk.context import now_ms

from .conftest import eventually

APP = Path(__file__).parent / "apps" / "emit_app.py"


# --- helpers ------------------------------------------------------------------------


async def create_topic(bootstrap: str, partitions: int = 2) -> str:
    name = f"emit-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    return name


async def read_all(bootstrap: str, topic: str, isolation: str) -> list[Any]:
    """Every record of `topic` a consumer with this isolation level can read now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level=isolation,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        for _ in range(100):  # a just-created topic may not be in metadata yet
            parts = consumer.partitions_for_topic(topic)
            if parts:
                break
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.05)
        tps = [TopicPartition(topic, p) for p in sorted(parts or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        # read_committed: the last stable offset; read_uncommitted: the high watermark.
        ends = await consumer.end_offsets(tps)
        out: list[Any] = []
        while True:
            behind = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
            if not behind:
                return out
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(recs)
    finally:
        await consumer.stop()


def values(records: list[Any]) -> list[dict[str, Any]]:
    return sorted((json.loads(r.value) for r in records), key=lambda v: (v["order"], v["i"]))


@pytest.fixture
def kafka_url(kafka_bootstrap: str) -> str:
    return (f"kafka://{kafka_bootstrap}?namespace=emit-{uuid.uuid4().hex[:10]}"
            "&session_timeout_ms=6000&heartbeat_interval_ms=500")


class Stack:
    """A client and a worker on one Kafka log, in this process."""

    def __init__(self, url: str, registry: sl.Registry) -> None:
        self.topics = Topics(partitions=2)
        self.client = sl.Client(url, registry=registry, topics=self.topics)
        self.log = sl.open_log(url)
        self.worker = sl.Worker(registry, self.log, topics=self.topics, client=self.client)

    async def __aenter__(self) -> Stack:
        await self.client.__aenter__()
        await self.log.start()
        await self.worker.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.worker.close()
        await self.log.close()
        await self.client.__aexit__(None, None, None)


@pytest.fixture
def no_hook() -> Iterator[None]:
    yield
    TransactionalWriters.before_commit = None


# --- in one process -------------------------------------------------------------------


async def test_a_completed_step_s_records_are_seen_exactly_once_by_read_committed(
    kafka_bootstrap: str, kafka_url: str
) -> None:
    topic = await create_topic(kafka_bootstrap)
    registry = sl.Registry()

    @sl.step
    async def ship(order: str) -> str:
        for i in range(5):
            await sl.emit(topic, {"order": order, "i": i}, key=order, headers={"source": "ship"})
        return "shipped"

    @sl.task(id="ship", registry=registry)
    async def ship_task(payload: dict) -> str:
        return await ship(payload["order"])

    async with Stack(kafka_url, registry) as stack:
        handles = [await stack.client.trigger("ship", {"order": f"o{n}"}) for n in range(3)]
        assert [await h.result(timeout=60) for h in handles] == ["shipped"] * 3

    committed = await read_all(kafka_bootstrap, topic, "read_committed")
    assert values(committed) == [{"order": f"o{n}", "i": i} for n in range(3) for i in range(5)]
    assert all(r.key == json.loads(r.value)["order"].encode() for r in committed)
    assert all(r.headers == (("source", b"ship"),) for r in committed)
    # One order's records share a key, hence a partition, in emit order.
    by_order: dict[str, list[int]] = {}
    for r in sorted(committed, key=lambda r: (r.partition, r.offset)):
        by_order.setdefault(json.loads(r.value)["order"], []).append(json.loads(r.value)["i"])
    assert all(seq == list(range(5)) for seq in by_order.values())
    assert len(await read_all(kafka_bootstrap, topic, "read_uncommitted")) == 15


async def test_a_step_that_emits_then_raises_emits_nothing_and_its_retry_emits_once(
    kafka_bootstrap: str, kafka_url: str
) -> None:
    topic = await create_topic(kafka_bootstrap)
    registry = sl.Registry()
    calls: list[int] = []

    @sl.step
    async def flaky(order: str) -> int:
        calls.append(1)
        for i in range(3):
            await sl.emit(topic, {"order": order, "i": i})
        if len(calls) == 1:
            raise ConnectionError("the card network hung up")
        return 3

    @sl.task(id="flaky", registry=registry, retry=sl.Retry(max_attempts=3, min_timeout=0.05))
    async def flaky_task(payload: dict) -> int:
        return await flaky(payload["order"])

    async with Stack(kafka_url, registry) as stack:
        handle = await stack.client.trigger("flaky", {"order": "a"})
        assert await handle.result(timeout=60) == 3

    assert len(calls) == 2
    expected = [{"order": "a", "i": i} for i in range(3)]
    assert values(await read_all(kafka_bootstrap, topic, "read_committed")) == expected
    # The failed attempt's records never left the process: nothing to abort.
    assert values(await read_all(kafka_bootstrap, topic, "read_uncommitted")) == expected


async def test_a_transaction_that_fails_before_commit_is_aborted_and_the_step_runs_again(
    kafka_bootstrap: str, kafka_url: str, no_hook: None
) -> None:
    topic = await create_topic(kafka_bootstrap)
    registry = sl.Registry()
    calls: list[int] = []
    failures: list[str] = []

    async def fail_first(_topic: str, _partition: int) -> None:
        if not failures:
            failures.append(_topic)
            raise OSError("the network went away before the commit")

    TransactionalWriters.before_commit = fail_first

    @sl.step
    async def notify(order: str) -> int:
        calls.append(1)
        for i in range(2):
            await sl.emit(topic, {"order": order, "i": i})
        return 2

    @sl.task(id="notify", registry=registry)
    async def notify_task(payload: dict) -> int:
        return await notify(payload["order"])

    async with Stack(kafka_url, registry) as stack:
        handle = await stack.client.trigger("notify", {"order": "b"})
        assert await handle.result(timeout=60) == 2

    assert failures and len(calls) == 2  # the checkpoint failed, so the step ran again
    expected = [{"order": "b", "i": i} for i in range(2)]
    assert values(await read_all(kafka_bootstrap, topic, "read_committed")) == expected
    # The aborted transaction's records are on the broker, invisible to read_committed.
    assert values(await read_all(kafka_bootstrap, topic, "read_uncommitted")) == sorted(
        expected * 2, key=lambda v: (v["order"], v["i"]))


async def test_a_completed_step_is_replayed_from_the_journal_and_never_emits_again(
    kafka_bootstrap: str, kafka_url: str
) -> None:
    topic = await create_topic(kafka_bootstrap)
    registry = sl.Registry()
    emitted: list[int] = []
    attempts: list[int] = []

    @sl.step
    async def first(order: str) -> str:
        emitted.append(1)
        await sl.emit(topic, {"order": order, "i": 0})
        return order

    @sl.step
    async def second(order: str) -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise TimeoutError("downstream is slow")
        return order

    @sl.task(id="two-steps", registry=registry, retry=sl.Retry(max_attempts=5, min_timeout=0.05))
    async def two_steps(payload: dict) -> str:
        return await second(await first(payload["order"]))

    async with Stack(kafka_url, registry) as stack:
        handle = await stack.client.trigger("two-steps", {"order": "c"})
        assert await handle.result(timeout=60) == "c"

    assert len(attempts) == 3 and len(emitted) == 1
    assert values(await read_all(kafka_bootstrap, topic, "read_committed")) == [{"order": "c", "i": 0}]


async def test_emitting_to_a_missing_topic_fails_the_step_and_names_the_topic(kafka_url: str) -> None:
    registry = sl.Registry()

    @sl.step
    async def lost() -> None:
        await sl.emit("no-such-topic-" + uuid.uuid4().hex[:8], b"x")

    @sl.task(id="lost", registry=registry, retry=sl.Retry(max_attempts=1))
    async def lost_task(payload: dict) -> None:
        await lost()

    async with Stack(kafka_url, registry) as stack:
        handle = await stack.client.trigger("lost", {})
        with pytest.raises(sl.RunFailedError):
            await handle.result(timeout=60)
        state = await stack.client.get_run(handle.run_id)
    assert state.error is not None and state.error.type == UnknownTopic.__qualname__
    assert "no-such-topic-" in state.error.message and "does not exist" in state.error.message


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_emit_on_a_log_without_transactions_fails_the_run_at_once_naming_the_log(
    kind: str, tmp_path: Path
) -> None:
    url = f"memory://emit-{uuid.uuid4().hex}" if kind == "memory" else f"sqlite:///{tmp_path}/s.db"
    registry = sl.Registry()
    calls: list[int] = []

    @sl.step
    async def tell() -> None:
        calls.append(1)
        await sl.emit("orders", {"x": 1})

    @sl.task(id="tell", registry=registry, retry=sl.Retry(max_attempts=3, min_timeout=0.05))
    async def tell_task(payload: dict) -> None:
        await tell()

    async with Stack(url, registry) as stack:
        handle = await stack.client.trigger("tell", {})
        with pytest.raises(sl.RunFailedError):
            await handle.result(timeout=30)
        state = await stack.client.get_run(handle.run_id)
    assert calls == [1]  # EmitUnsupported is fatal: retrying on the same log cannot help
    assert state.error is not None and state.error.type == "EmitUnsupported"
    assert "kafka://" in state.error.message and kind in state.error.message


async def test_emit_outside_a_step_is_refused() -> None:
    registry = sl.Registry()

    @sl.task(id="bare", registry=registry, retry=sl.Retry(max_attempts=1))
    async def bare(payload: dict) -> None:
        await sl.emit("orders", {"x": 1})

    async with Stack(f"memory://emit-{uuid.uuid4().hex}", registry) as stack:
        handle = await stack.client.trigger("bare", {})
        with pytest.raises(sl.RunFailedError, match="inside a @stepline.step"):
            await handle.result(timeout=30)
    with pytest.raises(sl.NotInRunContext):
        await sl.emit("orders", {"x": 1})


async def test_a_kafka_log_with_transactions_off_refuses_emits_and_fences_nothing(
    kafka_bootstrap: str,
) -> None:
    log_ = sl.open_log(f"kafka://{kafka_bootstrap}?namespace=emitoff-{uuid.uuid4().hex[:8]}&transactions=false")
    async with log_:
        await log_.ensure_topics(Topics(partitions=1).specs())
        await log_.fence(Topics().runs, 0)  # a no-op: no producer, no transaction state
        assert not log_.transactional
        with pytest.raises(EmitUnsupported, match="transactions=false"):
            await log_.check_outgoing("orders")
        with pytest.raises(EmitUnsupported):
            await log_.append_atomic(Topics().runs, 0, [(b"k", b"v")], [])
    with pytest.raises(sl.LogError, match="transactions=maybe"):
        sl.open_log(f"kafka://{kafka_bootstrap}?transactions=maybe")


def test_emit_unsupported_is_a_fatal_public_error() -> None:
    assert issubclass(EmitUnsupported, sl.FatalError)
    assert sl.EmitUnsupported is EmitUnsupported


# --- the log: fencing and the offsets transactions leave ---------------------------------


@pytest.fixture
async def two_logs(kafka_bootstrap: str) -> AsyncIterator[tuple[KafkaLog, KafkaLog, str]]:
    ns = f"emitfence-{uuid.uuid4().hex[:10]}"
    a = sl.open_log(f"kafka://{kafka_bootstrap}?namespace={ns}")
    b = sl.open_log(f"kafka://{kafka_bootstrap}?namespace={ns}")
    assert isinstance(a, KafkaLog) and isinstance(b, KafkaLog)
    await a.start()
    await b.start()
    runs = Topics(partitions=1).runs
    await a.ensure_topics(Topics(partitions=1).specs())
    try:
        yield a, b, runs
    finally:
        await a.close()
        await b.close()


async def test_an_old_owner_cannot_commit_after_a_new_owner_fenced_the_partition(
    kafka_bootstrap: str, two_logs: tuple[KafkaLog, KafkaLog, str], no_hook: None
) -> None:
    old, new, runs = two_logs
    topic = await create_topic(kafka_bootstrap, partitions=1)
    held, release = asyncio.Event(), asyncio.Event()

    async def hold_first(_topic: str, _partition: int) -> None:
        if not held.is_set():
            held.set()
            await release.wait()

    TransactionalWriters.before_commit = hold_first
    await old.fence(runs, 0)
    zombie = asyncio.create_task(old.append_atomic(
        runs, 0, [(b"r1", b"old-checkpoint")], [Outgoing(topic, b"k", b"from-old-owner")]))
    await held.wait()  # the old owner's records are on the broker, uncommitted

    await new.fence(runs, 0)  # the claim: aborts the old owner's open transaction
    release.set()
    with pytest.raises(WriterFenced, match="newer owner"):
        await zombie
    offsets = await new.append_atomic(runs, 0, [(b"r1", b"new-checkpoint")],
                                      [Outgoing(topic, b"k", b"from-new-owner")])

    committed = await read_all(kafka_bootstrap, topic, "read_committed")
    assert [r.value for r in committed] == [b"from-new-owner"]
    uncommitted = await read_all(kafka_bootstrap, topic, "read_uncommitted")
    assert sorted(r.value for r in uncommitted) == [b"from-new-owner", b"from-old-owner"]
    # The engine's own reader of the runs topic sees only the new owner's checkpoint.
    runs_records = await new.read(runs, 0, 0, 100)
    assert [r.value for r in runs_records] == [b"new-checkpoint"]
    assert [r.offset for r in runs_records] == offsets
    # And the old owner stays fenced: no later commit of its gets through.
    with pytest.raises(WriterFenced):
        await old.append_atomic(runs, 0, [(b"r1", b"late")], [])


async def test_reads_step_over_transaction_markers_at_the_end_of_a_partition(
    two_logs: tuple[KafkaLog, KafkaLog, str],
) -> None:
    log_, _, runs = two_logs
    await log_.fence(runs, 0)
    offsets = await log_.append_atomic(runs, 0, [(b"k", b"one"), (b"k", b"two")], [])
    end = await log_.end_offset(runs, 0)

    assert offsets == [0, 1] and end == 3  # offset 2 holds the commit marker
    assert await log_.read(runs, 0, 2, 10) == []  # promptly: nothing readable is there
    assert await skip_unreadable(log_, runs, 0, 2) == 3
    assert await skip_unreadable(log_, runs, 0, 1) == 1  # a record is there
    assert [r.value for r in await log_.read(runs, 0, 0, 10)] == [b"one", b"two"]
    assert await log_.append(runs, 0, [(b"k", b"three")]) == [3]
    assert [r.offset for r in await log_.read(runs, 0, 2, 10)] == [3]


async def test_a_partition_that_ends_in_a_commit_marker_is_rebuilt_projected_and_run(
    kafka_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = await create_topic(kafka_bootstrap, partitions=1)
    registry = sl.Registry()

    @sl.step
    async def last_word(order: str) -> str:
        await sl.emit(topic, {"order": order, "i": 0})
        return order

    @sl.task(id="last-word", registry=registry)
    async def last_word_task(payload: dict) -> str:
        return await last_word(payload["order"])

    async with Stack(kafka_url, registry) as stack:
        first = await stack.client.trigger("last-word", {"order": "d"})
        assert await first.result(timeout=60) == "d"
    # With no worker up, trigger a run in a transaction of our own: its
    # partition then ends in a commit marker, which the next worker's
    # rebuild must step over.
    log_ = sl.open_log(kafka_url)
    async with log_:
        runs, run_id = Topics(partitions=2).runs, new_run_id()
        p = partition_for(run_id.encode(), 2)
        body = RunTriggered(Payload(JSON, b'{"order": "e"}'))
        event = Event(new_event_id(), body.TYPE, run_id, "last-word", 1, now_ms(), 0, body)
        await log_.fence(runs, p)
        await log_.append_atomic(runs, p, [(run_id.encode(), codec.encode(event))], [])
        await log_.unfence(runs, p)
        assert await log_.read(runs, p, await log_.end_offset(runs, p) - 1, 1) == []
        # The query projection's stored offsets reach the end offsets, past the marker.
        async with QueryStore(tmp_path / "query.db") as store, QueryProjector(
            log_, store, topics=Topics(partitions=2)
        ) as projector:
            await projector.wait_caught_up(60)
    assert await rebuild(kafka_url, str(tmp_path / "rebuilt.db")) > 0
    async with Stack(kafka_url, registry) as stack:  # a fresh worker rebuilds and claims
        assert (await stack.client.get_run(first.run_id)).status == "completed"
        assert (await stack.client.wait(run_id, timeout=60)).status == "completed"
    assert values(await read_all(kafka_bootstrap, topic, "read_committed")) == [
        {"order": "d", "i": 0}, {"order": "e", "i": 0}]


# --- a worker process killed inside the transaction -----------------------------------


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(15)


def start_worker(url: str, state: Path, topic: str, procs: list[subprocess.Popen[bytes]],
                 hold: bool) -> subprocess.Popen[bytes]:
    env = dict(os.environ, EMIT_TOPIC=topic, EMIT_COUNT="4", EMIT_STATE_DIR=str(state))
    if hold:
        env["EMIT_HOLD_DIR"] = str(state)
    else:
        env.pop("EMIT_HOLD_DIR", None)
    err = open(state / f"worker-{len(procs)}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "stepline.cli", "worker", str(APP), "--log", url],
                            env=env, stdout=subprocess.DEVNULL, stderr=err)
    procs.append(proc)
    return proc


@pytest.mark.slow
async def test_a_worker_killed_between_emit_and_commit_leaves_exactly_one_copy(
    kafka_url: str, kafka_bootstrap: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    topic = await create_topic(kafka_bootstrap)
    # The broker itself would abort the dead worker's transaction only after
    # 15 minutes: what aborts it in time is the next owner's fence.
    kafka_url += "&transaction_timeout_ms=900000"
    victim = start_worker(kafka_url, tmp_path, topic, procs, hold=True)
    async with sl.Client(kafka_url) as client:
        handle = await client.trigger("announce", {"order": "o-1"})
        await eventually(lambda: (tmp_path / "held").exists(), timeout=60,
                         what="the worker to stop inside the transaction")
        # Produced, not committed: on the broker, invisible to read_committed.
        assert len(await read_all(kafka_bootstrap, topic, "read_uncommitted")) == 4
        assert await read_all(kafka_bootstrap, topic, "read_committed") == []
        victim.send_signal(signal.SIGKILL)
        victim.wait(15)

        start_worker(kafka_url, tmp_path, topic, procs, hold=False)
        assert await handle.result(timeout=90) == {"emitted": 4}

    executions = (tmp_path / "calls.log").read_text().splitlines()
    assert len(executions) == 2  # the step ran again under the new owner
    expected = [{"order": "o-1", "i": i} for i in range(4)]
    assert values(await read_all(kafka_bootstrap, topic, "read_committed")) == expected
    assert len(await read_all(kafka_bootstrap, topic, "read_uncommitted")) == 8
