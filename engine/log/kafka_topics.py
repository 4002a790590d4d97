"""Topics of a `KafkaLog` on the broker, through its admin client:
provisioning (`ensure_topics`), metadata (partition counts, the
UnknownTopic checks) and committed offsets."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest

from ..errors import LogError, UnknownTopic
from .base import TopicSpec
from .kafka_clients import KafkaClients

T = TypeVar("T")

# Kafka protocol error codes we handle by number.
_UNKNOWN_TOPIC_OR_PARTITION = 3
_TOPIC_ALREADY_EXISTS = 36


def _ready(meta: dict[str, Any] | None) -> bool:
    """A topic's metadata shows it, with a leader for every partition."""
    return bool(
        meta is not None
        and meta["error_code"] == 0
        and meta["partitions"]
        and all(p["error_code"] == 0 and p["leader"] >= 0 for p in meta["partitions"])
    )


async def _topic_metadata(admin: AIOKafkaAdminClient, topics: list[str],
                          node: int | None = None) -> dict[str, Any]:
    """Metadata of `topics` without creating them.

    `AIOKafkaAdminClient.describe_topics` sends a MetadataRequest that lets a
    broker with auto.create.topics.enable=true create every topic it is asked
    about, so we send our own with allow_auto_topic_creation=False through
    the admin's `_send_request` (aiokafka 0.14), to `node` or a random broker.
    """
    response = await admin._send_request(MetadataRequest(topics, allow_auto_topic_creation=False), node)
    return {t["topic"]: t for t in response.to_object()["topics"]}


class KafkaTopics:
    """The broker's topics as one log sees them; partition counts are
    cached (a topic's count never shrinks) for the append hot path."""

    def __init__(self, clients: KafkaClients) -> None:
        self._clients = clients
        self.admin: AIOKafkaAdminClient | None = None
        self.counts: dict[str, int] = {}

    def _admin(self) -> AIOKafkaAdminClient:
        if self.admin is None:
            raise RuntimeError(f"{self._clients.url} is not started; use `async with` or start()")
        return self.admin

    async def retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run an admin request again while the broker says "not yet".

        The admin client does not retry by itself; a fresh cluster, for one,
        answers COORDINATOR_NOT_AVAILABLE until it has made the offsets topic.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._clients._client_options["request_timeout_ms"] / 1000
        backoff = self._clients._client_options.get("retry_backoff_ms", 100) / 1000
        while True:
            try:
                return await op()
            except KafkaError as exc:
                if not exc.retriable or loop.time() + backoff > deadline:
                    raise
            await asyncio.sleep(backoff)

    async def describe(self, names: list[str]) -> dict[str, int | None]:
        """Partition counts of broker topics; None for those that do not exist."""
        admin = self._admin()
        try:
            found = await self.retrying(lambda: _topic_metadata(admin, names))
        except KafkaError as exc:
            raise LogError(f"cannot read topic metadata from Kafka: {exc}") from exc
        counts: dict[str, int | None] = {}
        for name in names:
            meta = found.get(name)
            if meta is None or meta["error_code"] == _UNKNOWN_TOPIC_OR_PARTITION:
                counts[name] = None
            elif meta["partitions"]:
                counts[name] = len(meta["partitions"])
                self.counts[name] = len(meta["partitions"])
            else:  # being created: exists, partitions not reported yet
                counts[name] = None
        return counts

    async def names(self, prefix: str) -> list[str]:
        """This log's topics whose (log-side) names start with `prefix`."""
        admin = self._admin()
        try:
            found = await self.retrying(admin.list_topics)
        except KafkaError as exc:
            raise LogError(f"cannot list topics on Kafka: {exc}") from exc
        own = self._clients.topic_name("")
        return sorted(name[len(own):] for name in found
                      if name.startswith(own) and name[len(own):].startswith(prefix))

    async def count(self, topic: str) -> int:
        name = self._clients.topic_name(topic)
        count = self.counts.get(name)
        if count is None:
            count = (await self.describe([name]))[name]
        if count is None:
            raise UnknownTopic(f"topic {topic!r} ({name!r} on Kafka at "
                               f"{','.join(self._clients.bootstrap_servers)}) does not exist; "
                               "create it with ensure_topics()")
        return count

    async def where(self, topic: str, partition: int) -> TopicPartition:
        name = self._clients.topic_name(topic)
        count = self.counts.get(name)
        if count is None or not 0 <= partition < count:
            count = await self.count(topic)
        if not 0 <= partition < count:
            raise UnknownTopic(
                f"topic {topic!r} has {count} partitions; partition {partition} does not exist"
            )
        return TopicPartition(name, partition)

    async def ensure(self, specs: Sequence[TopicSpec]) -> None:
        for spec in specs:
            if spec.partitions < 1:
                raise ValueError(f"topic {spec.name!r} needs at least one partition")
        admin = self._admin()
        names = {self._clients.topic_name(s.name): s for s in specs}
        existing = await self.describe(list(names))
        missing = [(name, spec) for name, spec in names.items() if existing[name] is None]
        if not missing:
            return
        new = []
        for name, spec in missing:
            retention = spec.retention_ms if spec.retention_ms is not None else -1
            if self._clients.retention_ms is not None:
                retention = self._clients.retention_ms
            configs = {"retention.ms": str(retention), "cleanup.policy": "compact" if spec.compact else "delete"}
            if self._clients.min_insync_replicas is not None:
                configs["min.insync.replicas"] = str(self._clients.min_insync_replicas)
            new.append(NewTopic(
                name,
                num_partitions=self._clients.default_partitions or spec.partitions,
                replication_factor=self._clients.replication_factor,
                # NewTopic insists on replica assignments when the factor is
                # -1; an empty map means "broker's default.replication.factor".
                replica_assignments={} if self._clients.replication_factor == -1 else None,
                topic_configs=configs,
            ))
        try:
            response = await self.retrying(lambda: admin.create_topics(new))
        except KafkaError as exc:
            raise LogError(f"cannot create topics on Kafka: {exc}") from exc
        for err in response.to_object()["topic_errors"]:
            if err["error_code"] not in (0, _TOPIC_ALREADY_EXISTS):
                raise LogError(
                    f"Kafka refused to create topic {err['topic']!r}: error "
                    f"{err['error_code']} {err['error_message'] or ''}".rstrip()
                )
        # Wait until the metadata shows every new topic with a leader for each
        # partition, so the next call through any handle finds it writable:
        # on every broker that answers, since each serves metadata from its
        # own cache, updated by the controller a moment apart (a client that
        # asked another broker next was told the topic did not exist).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self._clients.connect_timeout, 10.0)
        nodes: list[int | None] = [b.nodeId for b in admin._client.cluster.brokers()] or [None]
        for node in nodes:
            waiting = [name for name, _ in missing]
            while waiting:
                try:
                    found = await _topic_metadata(admin, waiting, node)
                except KafkaError as exc:
                    if node is not None:
                        break  # that broker does not answer: nobody reads its cache now
                    raise LogError(f"cannot read topic metadata from Kafka: {exc}") from exc
                for name in waiting:
                    if _ready(found.get(name)):
                        self.counts[name] = len(found[name]["partitions"])
                waiting = [n for n in waiting if not _ready(found.get(n))]
                if waiting:
                    if loop.time() > deadline:
                        raise LogError(f"topics {waiting} were created but do not show up in metadata")
                    await asyncio.sleep(0.05)

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        admin = self._admin()
        await self.count(topic)
        name = self._clients.topic_name(topic)
        try:
            found = await self.retrying(
                lambda: admin.list_consumer_group_offsets(self._clients.group_name(group))
            )
        except KafkaError as exc:
            raise LogError(f"cannot read committed offsets of group {group!r}: {exc}") from exc
        return {
            tp.partition: int(meta.offset)
            for tp, meta in found.items()
            if tp.topic == name and meta.offset >= 0
        }
