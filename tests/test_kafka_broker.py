"""A real Kafka broker is there for the tests, and a record round-trips it.

The broker comes from tests/kafka_broker.py (env, else scripts/kafka.sh, or
a container testcontainers starts under STEPLINE_TEST_BROKER=testcontainers).
Locally a missing broker skips with the reason; under CI=true it fails the test.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.kafka_broker import BrokerUnavailable, ensure_broker, started_container

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def broker_or_skip() -> str:
    """The broker's bootstrap servers; no broker skips locally, FAILS under CI."""
    try:
        return ensure_broker()
    except BrokerUnavailable as exc:
        reason = str(exc)
    if not IN_CI:
        pytest.skip(f"no Kafka broker (under CI=true this fails): {reason}")
    pytest.fail(f"CI=true needs a Kafka broker: {reason}", pytrace=False)


async def test_record_round_trips_through_broker() -> None:
    # Called in the test body (not a fixture) so that under CI a missing
    # broker is a test failure, not a setup error.
    bootstrap = broker_or_skip()
    if os.environ.get("STEPLINE_TEST_BROKER") == "testcontainers" and not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        # The Kafka suite's run on a container (tests/test_testcontainers.py): the broker really is one.
        container = started_container()
        assert container is not None and container.bootstrap_servers == bootstrap
        assert "Kafka Server started" in container.logs()
    topic = f"stepline-broker-check-{uuid.uuid4().hex}"
    key, value = b"order-1", f"hello {uuid.uuid4().hex}".encode()

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name=topic, num_partitions=1, replication_factor=1)], timeout_ms=30_000
        )

        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=30_000,
        )
        await producer.start()
        try:
            sent = await asyncio.wait_for(producer.send_and_wait(topic, value, key=key), 60)
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=f"stepline-broker-check-{uuid.uuid4().hex}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            got = await asyncio.wait_for(consumer.getone(), 60)
        finally:
            await consumer.stop()

        assert (got.topic, got.partition, got.offset) == (sent.topic, sent.partition, sent.offset)
        assert got.key == key
        assert got.value == value
    finally:
        try:
            await admin.delete_topics([topic], timeout_ms=30_000)
        finally:
            await admin.close()
