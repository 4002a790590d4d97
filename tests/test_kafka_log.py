"""What only the Kafka log promises: URL options that reach aiokafka, topics
provisioned with their retention and partition count, group rebalancing
between members, cursors, and bounded failure when no broker answers.

The first group of tests builds logs from URLs without connecting; the rest
use the session's broker (see `tests/kafka_broker.py`), each under a fresh
namespace.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from stepline.errors import InvalidLogUrl, LogUnavailable
from stepline.log import Assignment, Log, TopicSpec, open_log
from stepline.log.kafka import KafkaLog

CA_BUNDLE = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"

SECURE_URL = (
    "kafka://b1.example.com:9093,b2.example.com:9093"
    "?security_protocol=SASL_SSL&sasl_mechanism=SCRAM-SHA-512"
    "&sasl_plain_username=stepline&sasl_plain_password=s3cret"
    f"&ssl_cafile={CA_BUNDLE}&client_id=billing&request_timeout_ms=20000"
)


def kafka_log(url: str) -> KafkaLog:
    log = open_log(url)
    assert isinstance(log, KafkaLog)
    return log


# --- URLs and client settings (no broker) ------------------------------------------


@pytest.mark.skipif(not Path(CA_BUNDLE).exists(), reason="no CA bundle on this machine")
async def test_sasl_and_tls_options_reach_every_aiokafka_client() -> None:
    log = kafka_log(SECURE_URL)
    built = {
        "admin": log.admin_kwargs(),
        "producer": log.producer_kwargs(),
        "reader": log.consumer_kwargs(),
        "member": log.consumer_kwargs(group_id="billing.workers"),
    }
    for name, kwargs in built.items():
        assert kwargs["bootstrap_servers"] == ["b1.example.com:9093", "b2.example.com:9093"], name
        assert kwargs["security_protocol"] == "SASL_SSL", name
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512", name
        assert kwargs["sasl_plain_username"] == "stepline", name
        assert kwargs["sasl_plain_password"] == "s3cret", name
        assert kwargs["request_timeout_ms"] == 20000, name
        context = kwargs["ssl_context"]
        assert isinstance(context, ssl.SSLContext), name
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname, name

    producer = built["producer"]
    assert producer["acks"] == "all" and producer["enable_idempotence"] is True
    assert 1 <= producer["linger_ms"] <= 5
    assert producer["max_batch_size"] > 16384  # aiokafka's default
    assert built["member"]["group_id"] == "billing.workers"
    assert built["member"]["enable_auto_commit"] is False
    assert "group_id" not in built["reader"]

    # aiokafka's own constructors accept exactly these (no connection is made).
    clients = [
        AIOKafkaAdminClient(**built["admin"]),
        AIOKafkaProducer(**built["producer"]),
        AIOKafkaConsumer(**built["reader"]),
        AIOKafkaConsumer(**built["member"]),
    ]
    await clients[0].close()
    await clients[1].stop()
    await clients[2].stop()
    await clients[3].stop()

    # The password never shows in the log's URL (used in messages).
    assert "s3cret" not in log.url and "sasl_plain_password=***" in log.url


def test_producer_and_consumer_options_pass_through() -> None:
    log = kafka_log(
        "kafka://localhost:9092?linger_ms=5&max_batch_size=1048576&compression_type=LZ4"
        "&fetch_max_wait_ms=100&session_timeout_ms=30000&heartbeat_interval_ms=3000"
        "&partition_assignment_strategy=sticky&ssl_check_hostname=false"
    )
    assert log.producer_kwargs()["linger_ms"] == 5
    assert log.producer_kwargs()["max_batch_size"] == 1048576
    assert log.producer_kwargs()["compression_type"] == "lz4"
    member = log.consumer_kwargs(group_id="g")
    assert member["fetch_max_wait_ms"] == 100
    assert member["session_timeout_ms"] == 30000
    assert member["heartbeat_interval_ms"] == 3000
    assert member["partition_assignment_strategy"][0].name == "sticky"
    assert "ssl_context" not in member  # PLAINTEXT: no TLS context at all


def test_stepline_options_shape_names_and_topics() -> None:
    log = kafka_log(
        "kafka://localhost:9092?namespace=shop&partitions=12&replication_factor=3"
        "&retention_ms=604800000&min_insync_replicas=2&connect_timeout_ms=1500"
    )
    assert log.topic_name("stepline.runs") == "shop.stepline.runs"
    assert log.group_name("stepline.workers") == "shop.stepline.workers"
    assert (log.default_partitions, log.replication_factor) == (12, 3)
    assert (log.retention_ms, log.min_insync_replicas) == (604800000, 2)
    assert log.connect_timeout == 1.5
    assert kafka_log("kafka://localhost:9092").topic_name("t") == "t"


@pytest.mark.parametrize(
    ("url", "mentions"),
    [
        ("kafka://localhost:9092?acks=1", ["'acks'", "namespace", "security_protocol"]),
        ("kafka://localhost:9092?partitions=0", ["partitions", "integer >= 1"]),
        ("kafka://localhost:9092?security_protocol=TLS", ["SASL_SSL"]),
        ("kafka://localhost:9092?security_protocol=SASL_SSL&sasl_mechanism=OAUTHBEARER",
         ["OAUTHBEARER"]),
        ("kafka://localhost:9092?security_protocol=SASL_PLAINTEXT&sasl_mechanism=PLAIN",
         ["sasl_plain_username"]),
        ("kafka://localhost:9092?ssl_cafile=/x.pem", ["security_protocol=SSL"]),
        ("kafka://localhost:9092?security_protocol=SSL&ssl_cafile=/does/not/exist.pem",
         ["ssl_cafile='/does/not/exist.pem' does not exist"]),
        ("kafka://user:pw@localhost:9092", ["sasl_plain_username"]),
        ("kafka://localhost", ["host:port"]),
        ("kafka://", ["names no broker"]),
        ("kafka://localhost:9092/runs", ["path"]),
        ("kafka://localhost:9092?namespace=a/b", ["namespace"]),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, mentions: list[str]) -> None:
    with pytest.raises(InvalidLogUrl) as caught:
        open_log(url)
    for word in mentions:
        assert word in str(caught.value), (word, str(caught.value))


def test_a_bad_url_never_echoes_the_password() -> None:
    with pytest.raises(InvalidLogUrl) as caught:
        open_log("kafka://localhost:9092?sasl_plain_password=hunter2&bogus=1")
    assert "hunter2" not in str(caught.value)


async def test_an_unreachable_broker_raises_log_unavailable_in_bounded_time() -> None:
    # Nothing listens on port 1: refused at once. 10.255.255.1 is unroutable:
    # no answer at all, so the connect timeout has to end it.
    for servers in ("127.0.0.1:1", "10.255.255.1:9092"):
        log = open_log(f"kafka://{servers}?connect_timeout_ms=2000")
        started = time.monotonic()
        with pytest.raises(LogUnavailable) as caught:
            await asyncio.wait_for(log.start(), 15)
        assert time.monotonic() - started < 10
        assert servers in str(caught.value)


# --- against the broker --------------------------------------------------------------

LogFactory = Callable[..., Awaitable[KafkaLog]]


@pytest.fixture
def namespace() -> str:
    return f"kt-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def open_kafka(kafka_bootstrap: str, namespace: str) -> AsyncIterator[LogFactory]:
    opened: list[Log] = []

    async def factory(query: str = "") -> KafkaLog:
        log = kafka_log(f"kafka://{kafka_bootstrap}?namespace={namespace}{query}")
        await log.start()
        opened.append(log)
        return log

    yield factory
    for log in reversed(opened):
        await log.close()


@pytest.fixture
async def admin(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await client.start()
    yield client
    await client.close()


async def topic_configs(admin: AIOKafkaAdminClient, name: str) -> dict[str, str]:
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    resource = responses[0].to_object()["resources"][0]
    return {c["config_names"]: c["config_value"] for c in resource["config_entries"]}


async def partition_count(admin: AIOKafkaAdminClient, name: str) -> int:
    (meta,) = await admin.describe_topics([name])
    return len(meta["partitions"])


async def test_topics_are_provisioned_with_partitions_and_retention(
    open_kafka: LogFactory, admin: AIOKafkaAdminClient, namespace: str
) -> None:
    log = await open_kafka()
    await log.ensure_topics([TopicSpec("runs", 3), TopicSpec("ticks", 2, retention_ms=60_000)])

    runs = await topic_configs(admin, f"{namespace}.runs")
    assert runs["retention.ms"] == "-1"  # run history is kept...
    assert runs["cleanup.policy"] == "delete"  # ...and never compacted away
    assert await partition_count(admin, f"{namespace}.runs") == 3
    assert (await topic_configs(admin, f"{namespace}.ticks"))["retention.ms"] == "60000"
    assert await partition_count(admin, f"{namespace}.ticks") == 2


async def test_url_settings_override_what_topics_are_created_with(
    open_kafka: LogFactory, admin: AIOKafkaAdminClient, namespace: str
) -> None:
    log = await open_kafka("&partitions=5&retention_ms=86400000&replication_factor=1")
    await log.ensure_topics([TopicSpec("runs", 3)])
    assert await log.partitions("runs") == 5
    assert await partition_count(admin, f"{namespace}.runs") == 5
    assert (await topic_configs(admin, f"{namespace}.runs"))["retention.ms"] == "86400000"


async def test_namespaces_keep_logs_apart(kafka_bootstrap: str) -> None:
    a = kafka_log(f"kafka://{kafka_bootstrap}?namespace=ns-{uuid.uuid4().hex[:8]}")
    b = kafka_log(f"kafka://{kafka_bootstrap}?namespace=ns-{uuid.uuid4().hex[:8]}")
    async with a, b:
        await a.ensure_topics([TopicSpec("runs", 1)])
        await b.ensure_topics([TopicSpec("runs", 1)])
        await a.append("runs", 0, [(b"k", b"only in a")])
        assert await b.end_offset("runs", 0) == 0
        (record,) = await a.read("runs", 0, 0)
        assert record.topic == "runs" and record.value == b"only in a"


async def test_readers_at_different_offsets_of_one_partition_both_work(
    open_kafka: LogFactory,
) -> None:
    log = await open_kafka("&cursors_per_partition=2")
    await log.ensure_topics([TopicSpec("t", 1)])
    await log.append("t", 0, [(b"k", str(i).encode()) for i in range(100)])

    async def scan(start: int) -> list[int]:
        seen, offset = [], start
        while offset < 100:
            batch = await log.read("t", 0, offset, max_records=7)
            seen.extend(r.offset for r in batch)
            offset = seen[-1] + 1
            await asyncio.sleep(0)  # interleave with the other readers
        return seen

    # Three readers, two cursors: they interleave, and every one sees its range.
    results = await asyncio.wait_for(asyncio.gather(scan(0), scan(40), scan(90)), 30)
    assert results == [list(range(0, 100)), list(range(40, 100)), list(range(90, 100))]


async def test_an_append_larger_than_a_batch_is_split_and_stays_in_order(
    open_kafka: LogFactory,
) -> None:
    log = await open_kafka("&max_batch_size=2048")
    await log.ensure_topics([TopicSpec("t", 1)])
    records = [(b"k", bytes([i]) * 200) for i in range(50)]
    offsets = await log.append("t", 0, records)
    assert offsets == list(range(50))
    got = await log.read("t", 0, 0, max_records=100)
    assert [r.value for r in got] == [v for _, v in records]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    async def on_assign(self, assignment: Assignment) -> None:
        self.events.append(("assign", assignment))

    async def on_revoke(self, partitions: frozenset[int]) -> None:
        self.events.append(("revoke", partitions))

    def assigned(self) -> list[Assignment]:
        return [e for kind, e in self.events if kind == "assign"]  # type: ignore[misc]


async def until(check: Callable[[], object], timeout: float = 30.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_rebalance_revokes_from_one_member_and_assigns_to_another(
    open_kafka: LogFactory,
) -> None:
    one_log, two_log = await open_kafka(), await open_kafka()
    await one_log.ensure_topics([TopicSpec("runs", 2)])
    one, two = Recorder(), Recorder()

    first = await asyncio.wait_for(one_log.join_group("w", "runs", one.on_assign, one.on_revoke), 30)
    assert first.assignment.partitions == {0, 1}
    start_generation = first.assignment.generation

    second = await asyncio.wait_for(two_log.join_group("w", "runs", two.on_assign, two.on_revoke), 30)
    await until(lambda: len(one.assigned()) == 2, what="the first member's new assignment")
    # The first gave everything up before anything went to the second.
    assert one.events[1] == ("revoke", frozenset({0, 1}))
    kept, moved = one.assigned()[1], two.assigned()[0]
    assert len(kept.partitions) == len(moved.partitions) == 1
    assert kept.partitions | moved.partitions == {0, 1}
    assert kept.generation == moved.generation > start_generation

    # The second leaves: it is told first, then its partition goes back.
    await second.leave()
    assert two.events[-1] == ("revoke", moved.partitions)
    await until(lambda: len(one.assigned()) == 3, what="the partition to come back")
    back = one.assigned()[2]
    assert back.partitions == {0, 1} and back.generation > moved.generation
    assert first.assignment == back
    await first.leave()
    assert one.events[-1] == ("revoke", frozenset({0, 1}))


# Joins the group under an instance id, says so, and waits to be killed.
_STATIC_MEMBER = """
import asyncio, sys
from stepline.log import open_log

async def main(url, slot):
    log = open_log(url)
    await log.start()
    async def ignore(_):
        pass
    await log.join_group("w", "runs", ignore, ignore, instance_id=slot)
    print("assigned", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_killed_static_member_is_replaced_at_once_by_its_successor(
    open_kafka: LogFactory, kafka_bootstrap: str, namespace: str,
) -> None:
    # A session far longer than the wait below: the successor can only get
    # the partitions by taking the killed member's place under its instance
    # id, never by waiting for its session to expire (a dynamic member would).
    options = "&session_timeout_ms=120000&rebalance_timeout_ms=120000"
    url = f"kafka://{kafka_bootstrap}?namespace={namespace}{options}"
    log = await open_kafka(options)
    await log.ensure_topics([TopicSpec("runs", 2)])
    slot = f"slot-{uuid.uuid4().hex[:8]}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _STATIC_MEMBER, url, slot, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.strip() == b"assigned"
    finally:
        proc.kill()  # SIGKILL: no LeaveGroup, no revoke, its session lives on at the broker
        await proc.wait()

    rec = Recorder()
    member = await asyncio.wait_for(
        log.join_group("w", "runs", rec.on_assign, rec.on_revoke, instance_id=slot), 40)
    assert member.assignment.partitions == {0, 1}
    assert rec.events == [("assign", member.assignment)]
    await member.leave()


async def test_a_member_that_only_waits_stays_in_the_group(open_kafka: LogFactory) -> None:
    # With max_poll_interval_ms=1500 aiokafka drops a member that has not
    # polled for 1.5 s; ours never consumes, yet must keep its seat.
    log = await open_kafka("&max_poll_interval_ms=1500&rebalance_timeout_ms=10000")
    await log.ensure_topics([TopicSpec("runs", 2)])
    rec = Recorder()
    member = await asyncio.wait_for(log.join_group("w", "runs", rec.on_assign, rec.on_revoke), 30)
    await asyncio.sleep(4)
    assert rec.events == [("assign", member.assignment)]
    await member.leave()


async def test_the_owner_commits_through_its_membership(open_kafka: LogFactory) -> None:
    log = await open_kafka()
    await log.ensure_topics([TopicSpec("runs", 2)])
    rec = Recorder()
    member = await asyncio.wait_for(log.join_group("w", "runs", rec.on_assign, rec.on_revoke), 30)
    # A live group only takes commits from its members; this one owns both.
    await log.commit("w", "runs", {0: 3, 1: 4})
    assert await log.committed("w", "runs") == {0: 3, 1: 4}
    await member.leave()
    await log.commit("w", "runs", {0: 5})  # empty group: a plain commit is fine
    assert await log.committed("w", "runs") == {0: 5, 1: 4}


async def test_a_failing_on_assign_fails_the_join_and_frees_the_seat(
    open_kafka: LogFactory,
) -> None:
    log = await open_kafka()
    await log.ensure_topics([TopicSpec("runs", 1)])

    async def broken(assignment: Assignment) -> None:
        raise RuntimeError("rebuild failed")

    async def ignore(partitions: frozenset[int]) -> None:
        pass

    with pytest.raises(RuntimeError, match="rebuild failed"):
        await asyncio.wait_for(log.join_group("w", "runs", broken, ignore), 30)
    rec = Recorder()
    member = await asyncio.wait_for(log.join_group("w", "runs", rec.on_assign, rec.on_revoke), 30)
    assert member.assignment.partitions == {0}
    await member.leave()
