"""Stepline's topics as other Kafka clients see them (docs/events.md, "From
other languages"; docs/operations.md, "Kafka's own tools").

* Domain events are placed by Kafka's default partitioner (murmur2), so a
  Java producer and `Client.publish` put a key in the same partition, on
  every backend; the runs topic keeps CRC-32.
* Every engine event carries record headers (type, run id, schema
  fingerprint, traceparent), and a Java consumer built with javac from the
  kafka-clients and Avro jars decodes `stepline.runs` with the published
  self-contained schema (`schemas/Event.current.avsc`, Avro's classic
  `Schema.Parser`, `BinaryMessageDecoder`) to exactly what Stepline wrote.
* Kafka's own `kafka-console-consumer` prints the keys and headers, and
  `kafka-consumer-groups --describe` shows the router's committed offsets
  and lag and the workers' group with none.
* `durability=production` gives created topics the production replication
  (3 replicas, 2 in sync); the URL refuses settings that cannot work.

The Java programs are in tests/java/; scripts/java_deps.sh resolves the
jars from Maven Central (cached) and compiles them. Under CI=true a
missing Java, Maven or broker is a failure; elsewhere a skip that says why.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
import uuid
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from opentelemetry.sdk.trace import TracerProvider

import stepline as sl
from stepline import schemas
from stepline.core import codec
from stepline.core.events import DomainEvent
from stepline.errors import InvalidLogUrl
from stepline.log import open_log
from stepline.log.base import TopicSpec, kafka_partition_for, partition_for
from stepline.log.headers import event_headers
from stepline.log.kafka import KafkaLog
from stepline.log.topics import Topics
from stepline.observability import tracing

from .conftest import IN_CI, eventually

ROOT = Path(__file__).resolve().parent.parent
JAVA_DEPS = ROOT / "scripts" / "java_deps.sh"
CONSOLE_CONSUMER = "org.apache.kafka.tools.consumer.ConsoleConsumer"
CONSUMER_GROUPS = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"


@pytest.fixture(scope="module")
def java_cp() -> str:
    """The classpath of tests/java and the Kafka/Avro jars (scripts/java_deps.sh)."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        why = f"{' and '.join(missing)} not on PATH: the Java interop tests need Java 17+ and Maven"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why + " (a failure under CI=true)")
    done = subprocess.run(["bash", str(JAVA_DEPS)], capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        why = f"scripts/java_deps.sh failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why + " (a failure under CI=true)")
    return done.stdout.strip().splitlines()[-1]


def java(cp: str, *args: str, stdin: str = "", timeout: float = 120) -> str:
    done = subprocess.run(["java", "-Xmx256m", "-cp", cp, *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"java {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def kafka_url(bootstrap: str, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"namespace": f"interop-{uuid.uuid4().hex[:10]}",
                                             **options}.items())
    return f"kafka://{bootstrap}?{query}"


# --- partitioning -------------------------------------------------------------------


def test_event_keys_are_placed_by_kafkas_default_partitioner_and_runs_by_crc32() -> None:
    rng = random.Random(15)
    keys = [f"user-{i}".encode() for i in range(1, 201)]
    keys += [rng.randbytes(rng.randrange(0, 40)) for _ in range(500)]  # every tail length
    for n in (1, 2, 3, 4, 7, 12, 64):
        parts = list(range(n))
        for key in keys:
            assert kafka_partition_for(key, n) == DefaultPartitioner()(key, parts, parts), (key, n)
    # The runs topic's rule is unchanged: existing logs place runs by it.
    assert [partition_for(f"run-{i}".encode(), 4) for i in range(8)] == [1, 3, 1, 3, 0, 2, 0, 2]
    assert all(partition_for(key, 12) == zlib.crc32(key) % 12 for key in keys)


async def _published_partitions(url: str, keys: list[str], topics: Topics) -> dict[str, int]:
    """Where `Client.publish` put each key, read back from the events topic."""
    async with sl.Client(url, registry=sl.Registry(), topics=topics) as client:
        for key in keys:
            await client.publish("user.created", {"key": key}, key=key)
        found: dict[str, int] = {}
        for p in range(await client.log.partitions(topics.events)):
            for rec in await client.log.read(topics.events, p, 0, 10_000):
                body = codec.decode(rec.value).body
                assert isinstance(body, DomainEvent) and body.key is not None
                found[body.key] = p
        return found


async def test_a_java_producer_and_stepline_put_every_key_in_the_same_partition(
    java_cp: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    keys = [f"user-{i}" for i in range(1, 201)]
    topics = Topics(partitions=4)
    url = kafka_url(kafka_bootstrap)
    stepline_kafka = await _published_partitions(url, keys, topics)
    # A service in Java publishes the same keys to the same topic.
    log_ = open_log(url)
    assert isinstance(log_, KafkaLog)
    out = await asyncio.to_thread(java, java_cp, "KeyProducer", kafka_bootstrap,
                                  log_.topic_name(topics.events), stdin="\n".join(keys))
    by_java = {key: int(p) for key, p in (line.split("\t") for line in out.splitlines())}
    assert set(by_java) == set(keys)
    assert len(set(by_java.values())) == 4  # the keys spread over every partition
    assert stepline_kafka == by_java
    # The embedded backends place them the same way (one rule for all three).
    assert await _published_partitions(f"memory://interop-{uuid.uuid4().hex}", keys, topics) == by_java
    sqlite = await _published_partitions(f"sqlite:///{tmp_path}/events.db", keys, topics)
    assert sqlite == by_java


# --- headers ------------------------------------------------------------------------


async def test_headers_cross_the_port_and_leave_keys_and_values_alone(backend_url: str) -> None:
    records = [(b"k1", b"v1"), (b"", b"v2"), (b"k3", b"")]
    headers = [(("a", b"1"),), (), (("a", b"3"), ("b", "é".encode()))]
    async with open_log(backend_url) as log_:
        await log_.ensure_topics([TopicSpec("t", 1)])
        assert await log_.append("t", 0, records, headers) == [0, 1, 2]
        assert await log_.append("t", 0, [(b"k4", b"v4")]) == [3]  # headers stay optional
        found = await log_.read("t", 0, 0, 10)
        assert [(r.key, r.value) for r in found] == [*records, (b"k4", b"v4")]
        assert log_.record_headers == backend_url.startswith("kafka://")
        if isinstance(log_, KafkaLog):
            assert await raw_headers(log_, "t") == [list(h) for h in headers] + [[]]
            with pytest.raises(ValueError, match="2 headers for 1 records"):
                await log_.append("t", 0, [(b"k", b"v")], headers[:2])


async def raw_headers(log_: KafkaLog, topic: str) -> list[list[tuple[str, bytes]]]:
    """Each record's headers in partition order, read with a plain aiokafka consumer."""
    consumer = AIOKafkaConsumer(bootstrap_servers=log_.bootstrap_servers,
                                isolation_level="read_committed", enable_auto_commit=False)
    await consumer.start()
    try:
        out: list[list[tuple[str, bytes]]] = []
        for p in range(await log_.partitions(topic)):
            tp = TopicPartition(log_.topic_name(topic), p)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = await log_.end_offset(topic, p)
            while await consumer.position(tp) < end:
                for msg in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    out.append(list(msg.headers))
        return out
    finally:
        await consumer.stop()


async def test_every_engine_event_on_kafka_carries_its_headers(
    kafka_bootstrap: str, tracer_provider: Any
) -> None:
    reg = shipping_app()
    topics = Topics(partitions=2)
    async with sl.Client(kafka_url(kafka_bootstrap), registry=reg, topics=topics) as client:
        log_ = client.log
        assert isinstance(log_, KafkaLog)
        await client.publish("order.placed", {"order": 1}, key="c-1")  # Client.publish
        await client.trigger("ship", {"order": 2})  # the client's Appender
        await client.pause(task="ship", reason="interop")  # PauseChanged on every partition
        seen = Counter()
        for topic in (topics.events, topics.runs, topics.queues):
            got = await raw_headers(log_, topic)
            wrote = [codec.decode(r.value) for p in range(await log_.partitions(topic))
                     for r in await log_.read(topic, p, 0, 100)]
            assert len(got) == len(wrote)
            for headers, ev in zip(got, wrote):
                assert headers == list(event_headers(ev)), ev
                seen[ev.type] += 1
                if ev.type == "RunTriggered":  # traced: the trigger span's context
                    assert ev.traceparent and ("traceparent", ev.traceparent.encode()) in headers
                    assert ("stepline.run_id", ev.run_id.encode()) in headers
        assert seen == {"DomainEvent": 1, "RunTriggered": 1, "PauseChanged": 4}
        fp = codec.fingerprint().hex().encode()
        assert event_headers(wrote[0]) == (("stepline.type", b"PauseChanged"), ("stepline.schema", fp))


# --- a Java consumer, Kafka's tools -------------------------------------------------------


def shipping_app() -> sl.Registry:
    reg = sl.Registry()

    @sl.step(name="pack")
    async def pack(order: int) -> int:
        return order

    @sl.step(name="label")
    async def label(order: int) -> str:
        return f"label-{order}"

    @sl.task(id="ship", registry=reg, on=sl.Subscription("order.placed"))
    async def ship(event: dict[str, Any]) -> str:
        return await label(await pack(event["order"]))

    return reg


@pytest.fixture
def tracer_provider() -> Any:
    provider = TracerProvider()
    tracing.use_tracer_provider(provider)
    yield provider
    tracing.use_tracer_provider(None)
    provider.shutdown()


async def test_other_kafka_clients_read_the_topics_stepline_wrote(
    java_cp: str, kafka_bootstrap: str, tracer_provider: Any
) -> None:
    topics = Topics(partitions=3)
    url = kafka_url(kafka_bootstrap)
    reg = shipping_app()
    # The worker on a connection of its own, as in its own process.
    async with sl.Client(url, registry=reg, topics=topics) as client, open_log(url) as worker_log, \
            sl.Worker(reg, worker_log, topics=topics, client=client):
        for order in range(3):
            await client.publish("order.placed", {"order": order}, key=f"customer-{order % 2}")
        await client.trigger("ship", {"order": 99})

        async def all_done() -> bool:
            runs = await client.list_runs()
            return len(runs) == 4 and all(r.status == "completed" for r in runs)

        await eventually(all_done, timeout=60, what="four runs to complete")
        log_ = client.log
        assert isinstance(log_, KafkaLog)
        runs_topic = log_.topic_name(topics.runs)
        wrote = []
        for p in range(await log_.partitions(topics.runs)):
            for rec in await log_.read(topics.runs, p, 0, 10_000):
                ev = codec.decode(rec.value)
                wrote.append((p, rec.offset, rec.key, ev.type, ev.run_id, ev.traceparent))

        # A Java consumer decodes every record with the published schema file.
        out = await asyncio.to_thread(java, java_cp, "RunsReader", kafka_bootstrap, runs_topic,
                                      str(schemas.CURRENT_FILE))
        lines = out.splitlines()
        assert lines[0] == f"SCHEMA\t{codec.fingerprint().hex()}"
        read = []
        for line in lines[1:]:
            kind, p, offset, type_, run_id, traceparent, *headers = line.split("\t")
            assert kind == "EVENT"
            hdrs = dict(h.split("=", 1) for h in headers)
            tp = None if traceparent == "-" else traceparent
            read.append((int(p), int(offset), type_, run_id, tp))
            # The headers say what the body says, without decoding it.
            expected = {"stepline.type": type_, "stepline.schema": codec.fingerprint().hex()}
            if run_id:
                expected["stepline.run_id"] = run_id
            if tp is not None:
                expected["traceparent"] = tp
            assert hdrs == expected, line
        # Every record, in each partition's order (partitions interleave as they arrive).
        assert sorted(read) == [(p, o, t, r, tp) for p, o, _, t, r, tp in wrote]
        types = Counter(t for _, _, _, t, _, _ in wrote)
        assert types["RunCompleted"] == 4 and types["StepCompleted"] == 8
        assert sum(1 for *_, tp in wrote if tp) >= 4 * 4  # traced: triggers and attempts' events

        # kafka-console-consumer prints each record's key and headers.
        console = await asyncio.to_thread(
            java, java_cp, CONSOLE_CONSUMER, "--bootstrap-server", kafka_bootstrap,
            "--topic", runs_topic, "--from-beginning", "--isolation-level", "read_committed",
            "--formatter-property", "print.key=true", "--formatter-property", "print.headers=true",
            "--formatter-property", "print.value=false", "--max-messages", str(len(wrote)),
            "--timeout-ms", "30000",
        )
        printed = Counter()
        for line in console.splitlines():
            headers, key = line.split("\t")
            fields = dict(h.split(":", 1) for h in headers.split(","))
            printed[(key, fields["stepline.type"])] += 1
        assert printed == Counter((k.decode(), t) for _, _, k, t, _, _ in wrote)

        # kafka-consumer-groups: the router commits (lag 0 once routed), the workers do not.
        router = log_.group_name("stepline.router")
        events_end = sum([await log_.end_offset(topics.events, p)
                          for p in range(await log_.partitions(topics.events))])
        assert events_end == 3

        async def router_caught_up() -> bool:
            rows = await describe(java_cp, kafka_bootstrap, router)
            # A partition that never had an event has no commit ("-") and nothing to lag.
            committed = [r for r in rows if r["CURRENT-OFFSET"] != "-"]
            return (len(rows) == 3 and sum(int(r["CURRENT-OFFSET"]) for r in committed) == events_end
                    and all(r["LAG"] == "0" for r in committed)
                    and all(r["LOG-END-OFFSET"] == "0" for r in rows if r not in committed))

        await eventually(router_caught_up, timeout=30, what="the router group to show lag 0")
        assert {r["TOPIC"] for r in await describe(java_cp, kafka_bootstrap, router)} == {
            log_.topic_name(topics.events)}
        workers = await describe(java_cp, kafka_bootstrap, log_.group_name(topics.worker_group))
        assert {r["TOPIC"] for r in workers} == {runs_topic}
        assert {r["CURRENT-OFFSET"] for r in workers} == {"-"}  # no commits: no lag to show
        # What to watch instead: every partition has an owner.
        members = await asyncio.to_thread(
            java, java_cp, CONSUMER_GROUPS, "--bootstrap-server", kafka_bootstrap, "--describe",
            "--group", log_.group_name(topics.worker_group), "--members", "--verbose")
        assert f"{runs_topic}:0,1,2" in members, members  # CURRENT-ASSIGNMENT


async def describe(cp: str, bootstrap: str, group: str) -> list[dict[str, str]]:
    """The rows of `kafka-consumer-groups --describe --group GROUP`."""
    out = await asyncio.to_thread(java, cp, CONSUMER_GROUPS, "--bootstrap-server", bootstrap,
                                  "--describe", "--group", group)
    lines = [line.split() for line in out.splitlines() if line.strip()]
    header = next(i for i, cols in enumerate(lines) if cols[:2] == ["GROUP", "TOPIC"])
    return [dict(zip(lines[header], cols)) for cols in lines[header + 1:] if cols[0] == group]


# --- production replication settings -------------------------------------------------


def test_durability_production_sets_three_replicas_and_two_in_sync() -> None:
    def settings(query: str) -> tuple[int, int | None]:
        log_ = open_log(f"kafka://b1:9092,b2:9092,b3:9092?{query}")
        assert isinstance(log_, KafkaLog)
        return log_.replication_factor, log_.min_insync_replicas

    assert settings("namespace=x") == (-1, None)  # the broker's defaults
    assert settings("durability=production") == (3, 2)
    assert settings("durability=PRODUCTION&replication_factor=5") == (5, 2)
    assert settings("durability=production&min_insync_replicas=3") == (3, 3)
    assert settings("replication_factor=3&min_insync_replicas=2") == (3, 2)
    with pytest.raises(InvalidLogUrl, match=r"durability='safe'.*must be one of broker, production"):
        settings("durability=safe")
    with pytest.raises(InvalidLogUrl, match=r"min_insync_replicas=3 .* more than replication_factor=2"):
        settings("replication_factor=2&min_insync_replicas=3")
    with pytest.raises(InvalidLogUrl, match=r"min_insync_replicas=4 .* more than replication_factor=3"):
        settings("durability=production&min_insync_replicas=4")
