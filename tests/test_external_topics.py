"""Subscriptions to Kafka topics Stepline does not own (`sl.KafkaTopic`).

The records come from outside Stepline, as a service in another language
would write them: JSON lines through Kafka's own `kafka-console-producer`
(its main class, run from the jars scripts/kafka.sh resolves), Avro values
through a plain aiokafka producer and fastavro's `schemaless_writer`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import pytest
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import stepline as sl
from stepline.consumers.external import TopicReader, topic_group
from stepline.consumers.patterns import PatternError
from stepline.consumers.topic_subscription import MalformedRecord
from stepline.core.ids import idempotent_run_id, record_key
from stepline.errors import UnknownTopic
from stepline.log.base import TopicSpec
from stepline.log.quarantine import read_quarantine

from .conftest import IN_CI, Engine, eventually

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_PRODUCER = "org.apache.kafka.tools.ConsoleProducer"

ORDER_SCHEMA = {
    "type": "record", "name": "Order", "namespace": "shop",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID"]}},
        {"name": "total", "type": "double"},
        {"name": "token", "type": "bytes"},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}


# --- the declaration: checked when the task is defined --------------------------------


def test_bad_declarations_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(sl.TaskDefinitionError, match="not a Kafka topic name"):
        sl.KafkaTopic("orders/eu")
    with pytest.raises(sl.TaskDefinitionError, match="since must be a positive timedelta"):
        sl.KafkaTopic("orders", since=timedelta(0))
    with pytest.raises(sl.TaskDefinitionError, match="give the writer schema with avro="):
        sl.KafkaTopic("orders", confluent=True)
    with pytest.raises(sl.TaskDefinitionError, match="cannot read .*missing.avsc"):
        sl.KafkaTopic("orders", avro=tmp_path / "missing.avsc")
    bad = tmp_path / "bad.avsc"
    bad.write_text('{"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]}')
    with pytest.raises(sl.TaskDefinitionError, match="bad.avsc is not an Avro schema"):
        sl.KafkaTopic("orders", avro=bad)
    with pytest.raises(PatternError, match=r"where\.total"):
        sl.KafkaTopic("orders", where={"total": {"numeric": [">>", 1]}})
    with pytest.raises(sl.TaskDefinitionError, match="on= takes sl.Subscription"):
        @sl.task(registry=sl.Registry(), on="orders")  # type: ignore[arg-type]
        async def typo(data: dict) -> None: ...
    with pytest.raises(sl.TaskDefinitionError, match=r"KafkaTopic\('orders'\) subscriptions differ in avro="):
        @sl.task(registry=sl.Registry(), on=[sl.KafkaTopic("orders"), sl.KafkaTopic("orders", avro=ORDER_SCHEMA)])
        async def mixed(data: dict) -> None: ...


def test_a_task_keeps_event_and_topic_subscriptions_apart() -> None:
    @sl.task(registry=sl.Registry(), on=[sl.Subscription("user.created"), sl.KafkaTopic("orders"),
                                         sl.KafkaTopic("orders", where={"vip": True})])
    async def both(data: dict) -> None: ...

    assert [s.event for s in both.subscriptions] == ["user.created"]
    assert [s.topic for s in both.topic_subscriptions] == ["orders", "orders"]


def avro_bytes(record: dict[str, Any], schema: dict[str, Any] = ORDER_SCHEMA) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


def an_order(id_: str, status: str, total: float) -> dict[str, Any]:
    return {"id": id_, "status": status, "total": total, "token": b"\xff\x00\x10",
            "at": datetime(2024, 5, 1, 12, 0, tzinfo=UTC), "note": None}


def test_decoding_json_avro_and_confluent_frames() -> None:
    sub = sl.KafkaTopic("orders")
    assert sub.decode(b'{"id": 1, "tags": ["a"]}') == {"id": 1, "tags": ["a"]}
    for bad in (b"not json", b"\xff\xfe", b'{"id": '):
        with pytest.raises(MalformedRecord, match="not JSON"):
            sub.decode(bad)

    avro = sl.KafkaTopic("orders", avro=ORDER_SCHEMA, where={"status": "PAID"})
    value = avro_bytes(an_order("o1", "PAID", 12.5))
    data = avro.decode(value)
    # As JSON carries it: bytes as standard base64, timestamps as ISO-8601.
    assert data == {"id": "o1", "status": "PAID", "total": 12.5, "token": base64.b64encode(b"\xff\x00\x10").decode(),
                    "at": "2024-05-01T12:00:00Z", "note": None}
    assert avro.matches(data) and not avro.matches({**data, "status": "NEW"})
    for bad, why in ((value[:7], "not Avro of the given writer schema"), (value + b"xx", "2 bytes left after"),
                     (b"definitely not avro", "not Avro of the given writer schema")):
        with pytest.raises(MalformedRecord, match=why):
            avro.decode(bad)

    framed = sl.KafkaTopic("orders", avro=ORDER_SCHEMA, confluent=True)
    assert framed.decode(b"\x00\x00\x00\x00\x07" + value) == data
    with pytest.raises(MalformedRecord, match="not in Confluent's wire format"):
        framed.decode(value)


def test_run_ids_and_groups_are_frozen_formats() -> None:
    # NEVER change: logs hold runs under these ids, groups hold the offsets.
    assert record_key("orders", 2, 41) == "stepline/record/orders/2/41"
    assert idempotent_run_id("ship", record_key("orders", 2, 41)) == "run_17HHRYGKGEZ9RQXGSKE47QKBNR"
    assert topic_group("stepline", "orders", "ship") == "stepline.topic.orders:ship"


async def test_other_backends_leave_topic_subscriptions_inert_with_a_warning() -> None:
    reg = sl.Registry()
    ran: list[str] = []

    @sl.task(id="ship", registry=reg, on=sl.KafkaTopic("orders"))
    async def ship(data: dict) -> None:
        ran.append("ship")

    @sl.task(id="hello", registry=reg)
    async def hello(data: dict) -> str:
        return "hi"

    with structlog.testing.capture_logs() as logs:
        e = await Engine(f"memory://test-{uuid.uuid4().hex}", reg).start()
    try:
        warned = [x for x in logs if "inert" in x["event"]]
        assert warned and warned[0]["subscriptions"] == ["ship: orders"], logs
        handle = await e.client.trigger("hello", {})
        assert (await e.client.wait(handle.run_id, timeout=10)).status == "completed"
        assert ran == []
    finally:
        await e.close()


async def test_the_reader_sets_aside_what_it_cannot_start_and_moves_on() -> None:
    """The reader over the memory log as a stand-in view (a real adapter): a
    payload over the size limit and an undecodable record near the broker's
    size limit are quarantined (the latter cut, so the copy always fits), a
    tombstone is skipped, and the record after them still starts its run."""
    reg = sl.Registry()

    @sl.task(id="ship", registry=reg, on=sl.KafkaTopic("orders"))
    async def ship(data: dict) -> None: ...

    async with sl.Client(f"memory://test-{uuid.uuid4().hex}", registry=reg, max_payload_bytes=1000) as client:
        await client.log.ensure_topics([*client.topics.specs(), TopicSpec("orders", 1)])
        reader = TopicReader("ship", ship.topic_subscriptions, client, client.log)
        await reader.start()
        try:
            big = json.dumps({"pad": "x" * 2000}).encode()
            huge = b"\xff" * (600 * 1024)
            await client.log.append("orders", 0, [(b"k", big), (b"k", huge), (b"k", b""), (b"k", b'{"id": 4}')])
            await eventually(lambda: reader.triggered == 1 and reader.quarantined == 2, timeout=10,
                             what="one run and two records set aside")

            async def acknowledged() -> bool:  # the offset is committed after the batch's runs
                return await client.log.committed(reader.group, "orders") == {0: 4}

            await eventually(acknowledged, timeout=10, what="the batch's offset committed")
        finally:
            await reader.close()
        found = {q.offset: q for q in await read_quarantine(client.log, client.topics.quarantine)}
        assert sorted(found) == [0, 1]
        assert "not started as a run" in found[0].reason and "1,000-byte limit" in found[0].reason
        assert found[0].value == big
        assert found[1].reason.startswith("not JSON") and "keeps the first 262144 of 614400 bytes" in found[1].reason
        assert found[1].value == huge[:262144]
        runs = await client.list_runs()
        assert [(r.task_id, r.run_id) for r in runs] == [("ship", idempotent_run_id("ship", record_key("orders", 0, 3)))]
        assert await client.log.committed(reader.group, "orders") == {0: 4}  # and kept after close


# --- against a real broker ------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_tools() -> str:
    """The directory of Kafka's jars, the tools included (scripts/kafka.sh jars)."""
    why = None
    if shutil.which("java") is None:
        why = "no java on PATH"
    else:
        done = subprocess.run(["bash", str(ROOT / "scripts" / "kafka.sh"), "jars"], capture_output=True,
                              text=True, timeout=900, check=False, stdin=subprocess.DEVNULL)
        lib = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        if done.returncode == 0 and any(p.name.startswith("kafka-tools-") for p in Path(lib).glob("*.jar")):
            return lib
        why = f"scripts/kafka.sh jars exited {done.returncode}: {done.stderr.strip()[-2000:]}"
    if IN_CI:
        pytest.fail(f"CI=true and Kafka's tools cannot be had: {why}")
    pytest.skip(f"Kafka's tools cannot be had (a failure under CI=true): {why}")


async def console_produce(lib: str, bootstrap: str, topic: str, lines: list[str]) -> None:
    """`kafka-console-producer --property parse.key=true --property key.separator=:`."""
    proc = await asyncio.create_subprocess_exec(
        "java", "-Xmx128m", "-cp", f"{lib}/*", CONSOLE_PRODUCER, "--bootstrap-server", bootstrap,
        "--topic", topic, "--property", "parse.key=true", "--property", "key.separator=:",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate("\n".join(lines).encode() + b"\n"), 120)
    assert proc.returncode == 0, f"kafka-console-producer exited {proc.returncode}:\n{out.decode()[-3000:]}"


async def create_topic(bootstrap: str, partitions: int) -> str:
    name = f"orders-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    return name


@pytest.fixture
def kafka_url(kafka_bootstrap: str) -> str:
    return f"kafka://{kafka_bootstrap}?namespace=ext-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def engines() -> AsyncIterator[list[Engine]]:
    started: list[Engine] = []
    yield started
    for e in started:
        await e.close()


def place(run: sl.RunState) -> tuple[str, int, int]:
    """(topic, partition, offset) of the record that started a run, from its tag."""
    tag = next(t for t in run.tags if t.startswith("record:"))
    topic, p, offset = tag.removeprefix("record:").split("/")
    return topic, int(p), int(offset)


async def completed(e: Engine, task_id: str, n: int) -> list[sl.RunState]:
    runs = [r for r in await e.client.list_runs() if r.task_id == task_id]
    return runs if len(runs) >= n and all(r.status == "completed" for r in runs) else []


async def test_console_producer_records_run_the_matching_tasks_and_a_malformed_one_is_quarantined(
        kafka_bootstrap: str, kafka_tools: str, kafka_url: str, engines: list[Engine]) -> None:
    topic = await create_topic(kafka_bootstrap, partitions=2)
    reg = sl.Registry()
    seen: dict[str, list[Any]] = {"ship-paid": [], "big-orders": []}

    @sl.task(id="ship-paid", registry=reg, on=sl.KafkaTopic(topic, where={"status": "paid"}))
    async def ship_paid(order: dict) -> None:
        seen["ship-paid"].append(order["id"])

    # Two subscriptions of one task to one topic: a record matching either starts one run.
    @sl.task(id="big-orders", registry=reg, on=[sl.KafkaTopic(topic, where={"total": {"numeric": [">=", 100]}}),
                                                sl.KafkaTopic(topic, where={"vip": True})])
    async def big_orders(order: dict) -> None:
        seen["big-orders"].append(order["id"])

    e = await Engine(kafka_url, reg).start()
    engines.append(e)
    # Keys pick partitions; the bad record shares "c1" with records after it.
    await console_produce(kafka_tools, kafka_bootstrap, topic, [
        'c1:{"id": 1, "status": "paid", "total": 50}',
        'c2:{"id": 2, "status": "new", "total": 150}',
        "c1:this is not JSON",
        'c1:{"id": 4, "status": "paid", "total": 500}',
        'c2:{"id": 5, "status": "new", "total": 5, "vip": true}',
        "c1:[1, 2, 3]",
        'c1:{"id": 7, "status": "paid", "total": 1}',
    ])
    ship = await eventually(lambda: completed(e, "ship-paid", 3), timeout=60, what="three paid orders shipped")
    await eventually(lambda: completed(e, "big-orders", 3), timeout=60, what="three big orders")
    await asyncio.sleep(1.0)  # nothing else arrives
    assert sorted(seen["ship-paid"]) == [1, 4, 7] and sorted(seen["big-orders"]) == [2, 4, 5]
    runs = await e.client.list_runs()
    assert len(runs) == 6
    for r in runs:  # once per record: the id derives from the task and the record's place
        t, p, offset = place(r)
        assert t == topic and r.run_id == idempotent_run_id(r.task_id, record_key(topic, p, offset))
        assert f"topic:{topic}" in r.tags

    quarantined = [q for q in await read_quarantine(e.client.log, e.client.topics.quarantine) if q.topic == topic]
    # Set aside (by either task that read it: one entry per place) with where it was and why.
    assert len(quarantined) == 1 and quarantined[0].reader in {"topic:ship-paid", "topic:big-orders"}
    bad = quarantined[0]
    assert bad.value == b"this is not JSON" and bad.reason.startswith("not JSON")
    # The partition kept flowing: records after the bad one, in its partition, ran.
    later = [place(r) for r in ship if place(r)[1] == bad.partition and place(r)[2] > bad.offset]
    assert len(later) == 2, (bad, [place(r) for r in ship])


async def test_a_restart_midway_and_a_redelivery_start_no_second_run(
        kafka_bootstrap: str, kafka_tools: str, kafka_url: str, engines: list[Engine]) -> None:
    topic = await create_topic(kafka_bootstrap, partitions=3)
    reg = sl.Registry()
    executed: Counter[int] = Counter()

    @sl.task(id="count", registry=reg, on=sl.KafkaTopic(topic))
    async def count(data: dict) -> None:
        executed[data["n"]] += 1

    def lines(ns: range) -> list[str]:
        return [f'k{n % 7}:{{"n": {n}}}' for n in ns]

    e = await Engine(kafka_url, reg).start()
    engines.append(e)
    await console_produce(kafka_tools, kafka_bootstrap, topic, lines(range(0, 40)))
    await eventually(lambda: len(executed) >= 10, timeout=60, what="the first runs")
    # The worker goes away mid-way; records keep coming meanwhile.
    await e.stop_worker()
    await console_produce(kafka_tools, kafka_bootstrap, topic, lines(range(40, 80)))
    await e.start_worker()
    await eventually(lambda: completed(e, "count", 80), timeout=90, what="eighty runs")

    # A crash before any commit: forget every acknowledged offset, so the
    # whole topic is delivered again, and restart.
    await e.stop_worker()
    view = e.client.log.external_view()  # type: ignore[attr-defined]
    await view.start()
    try:
        group = topic_group(e.topics.namespace, topic, "count")
        ends = {p: await view.end_offset(topic, p) for p in range(3)}
        assert sum(ends.values()) == 80
        await view.commit(group, topic, {p: 0 for p in range(3)})
        await e.start_worker()

        async def read_again() -> bool:
            return await view.committed(group, topic) == ends

        await eventually(read_again, timeout=60, what="the topic delivered again")
    finally:
        await view.close()
    runs = await completed(e, "count", 80)
    assert len(runs) == 80, "one run per record, never a second"
    assert sorted(place(r)[1:] for r in runs) == sorted((p, o) for p, end in ends.items() for o in range(end))
    assert set(executed) == set(range(80))


async def test_avro_values_from_a_foreign_producer(
        kafka_bootstrap: str, kafka_url: str, engines: list[Engine], tmp_path: Path) -> None:
    topic = await create_topic(kafka_bootstrap, partitions=1)
    framed_topic = await create_topic(kafka_bootstrap, partitions=1)
    schema_file = tmp_path / "order.avsc"
    schema_file.write_text(json.dumps(ORDER_SCHEMA))
    reg = sl.Registry()
    paid: list[dict[str, Any]] = []
    framed: list[str] = []

    @sl.task(id="paid", registry=reg, on=sl.KafkaTopic(topic, avro=schema_file, where={"status": "PAID"}))
    async def on_paid(order: dict) -> None:
        paid.append(order)

    @sl.task(id="framed", registry=reg, on=sl.KafkaTopic(framed_topic, avro=ORDER_SCHEMA, confluent=True))
    async def on_framed(order: dict) -> None:
        framed.append(order["id"])

    e = await Engine(kafka_url, reg).start()
    engines.append(e)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        good = avro_bytes(an_order("a1", "PAID", 10.0))
        for value in (good, avro_bytes(an_order("a2", "NEW", 20.0)), b"definitely not avro", good + b"!!",
                      None, avro_bytes(an_order("a3", "PAID", 30.0))):
            await producer.send_and_wait(topic, value, key=b"shop-1")
        for value in (b"\x00\x00\x00\x00\x2a" + avro_bytes(an_order("f1", "NEW", 1.0)), good):
            await producer.send_and_wait(framed_topic, value, key=b"shop-1")
    finally:
        await producer.stop()

    await eventually(lambda: completed(e, "paid", 2), timeout=60, what="two paid orders")
    await eventually(lambda: completed(e, "framed", 1), timeout=60, what="the framed order")
    await asyncio.sleep(1.0)
    assert [o["id"] for o in paid] == ["a1", "a3"] and framed == ["f1"]
    assert paid[0]["token"] == base64.b64encode(b"\xff\x00\x10").decode() and paid[0]["at"] == "2024-05-01T12:00:00Z"
    reasons = {(q.topic, q.offset): q.reason for q in await read_quarantine(e.client.log, e.client.topics.quarantine)}
    assert reasons[(topic, 2)].startswith("not Avro of the given writer schema")
    assert "2 bytes left after the record" in reasons[(topic, 3)]
    assert (topic, 4) not in reasons  # a tombstone starts nothing and is no error
    assert reasons[(framed_topic, 1)].startswith("not in Confluent's wire format")


async def test_a_missing_topic_fails_the_worker_start_by_name(kafka_url: str) -> None:
    reg = sl.Registry()

    @sl.task(id="ship", registry=reg, on=sl.KafkaTopic("no-such-topic-" + uuid.uuid4().hex[:8]))
    async def ship(data: dict) -> None: ...

    async with sl.Client(kafka_url, registry=reg) as client:
        worker = sl.Worker(reg, client.log, topics=client.topics, client=client)
        with pytest.raises(UnknownTopic, match=r"task 'ship' subscribes to the Kafka topic 'no-such-topic-\w+' "
                                               r"\(stepline.KafkaTopic\), which does not exist"):
            await worker.start()
        assert not worker.started.is_set()

