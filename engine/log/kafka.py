"""The Kafka backend: Apache Kafka, or any Kafka-compatible broker, via aiokafka.

    kafka://host:9092[,host2:9092]?namespace=myapp&partitions=12&replication_factor=3
        &security_protocol=SASL_SSL&sasl_mechanism=SCRAM-SHA-512
        &sasl_plain_username=...&sasl_plain_password=...&ssl_cafile=/etc/ca.pem

One `KafkaLog` holds:

* an admin client: topic provisioning (`ensure_topics`), topic metadata
  (`partitions`, the UnknownTopic checks) and committed offsets
  (kafka_topics.py);
* one idempotent producer (acks=all): `append` (kafka_append.py), with the
  record headers the caller gives (engine events carry theirs,
  engine/log/headers.py);
* one plain consumer for `end_offset` (ListOffsets);
* a small pool of *cursors* per partition for `read`: each is a consumer
  with that one partition assigned by hand, remembered by the offset it
  stands at. A tail (`read(p, next_offset)` again and again) always finds
  its cursor where it left it, so it never seeks and the consumer keeps
  prefetching; a second reader of the same partition at another offset
  gets a cursor of its own, up to `cursors_per_partition`, after which
  the least recently used idle one is moved (seek) (kafka_cursors.py);
* one tail consumer shared by every reader that follows a partition's end
  (a read with a timeout: worker tails, result watchers), and a window of
  each followed partition's recent records, which also takes this
  process's own appends as soon as they are acknowledged (kafka_tail.py);
  a read the window cannot answer goes to a cursor;
* for each `join_group`, one consumer in that group (kafka_group.py);
* for each partition it was asked to `fence`, one transactional producer
  (engine/log/kafka_txn.py): `append_atomic`, what `sl.emit` rides on.

`external_view()` gives a second log on the same settings that names topics
as the broker does (no namespace prefix) and only reads, joins groups and
commits: how subscriptions to topics other services write read them
(consumers/external.py).

Every consumer reads with isolation_level=read_committed, so a record of
an open or aborted transaction is never folded, and `end_offset` is the
last stable offset (where the first open transaction starts). Commit and
abort markers take offsets that no read returns (see
`KafkaCursors._fetch_soon`).

Appends: every call to one partition waits in a per-partition queue; one
flusher per partition packs everything queued into ONE closed record batch
(`create_batch` / `send_batch`), so a call's records are contiguous and
its offsets are the batch's base offset + 0, 1, 2, ... While one batch is
in flight the next calls pile up and go out together: concurrent callers
share produce requests (group commit), as in the sqlite backend.

Names: with `namespace=NS`, topic T is `NS.T` on the broker and group G is
`NS.G`, so several apps (or test runs) share a cluster; records still
report the logical topic name.

Every part is built from the log's settings (`KafkaClients`,
kafka_clients.py) and never reaches back for the `KafkaLog`; the URL's
options are checked in kafka_options.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import NoReturn

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.errors import KafkaError

from ..errors import InvalidLogUrl, LogError, UnknownTopic
from .base import (
    AssignCallback,
    Headers,
    Log,
    Membership,
    Outgoing,
    Record,
    RevokeCallback,
    TopicSpec,
)
from .kafka_append import KafkaAppends
from .kafka_clients import KafkaClients, _noop, _quietly, _valid_name
from .kafka_cursors import KafkaCursors
from .kafka_group import KafkaGroups
from .kafka_options import URL_OPTIONS, url_settings
from .kafka_tail import Tails, make_record
from .kafka_topics import KafkaTopics
from .kafka_txn import TransactionalWriters
from .redact import redact_url

__all__ = ["KafkaLog", "URL_OPTIONS", "from_url_options"]


def from_url_options(url: str, servers: list[str], options: dict[str, str]) -> KafkaLog:
    """Build a KafkaLog from a URL's checked options (see `URL_OPTIONS`)."""
    settings = url_settings(url, options)
    try:
        return KafkaLog(servers, **settings)
    except ValueError as exc:  # bad option combinations, unreadable TLS files
        if isinstance(exc, InvalidLogUrl):
            raise
        raise InvalidLogUrl(f"log URL {redact_url(url)!r}: {exc}") from exc


class KafkaLog(KafkaClients, Log):
    """A `Log` on Apache Kafka; see the module docstring."""

    record_headers = True

    def _build(self) -> None:
        # Called by KafkaClients.__init__ once the settings are checked, so
        # KafkaLog takes exactly its constructor (one signature, not two).
        self._admin: AIOKafkaAdminClient | None = None
        self._producer: AIOKafkaProducer | None = None
        self._meta: AIOKafkaConsumer | None = None
        self._writers = TransactionalWriters(self)
        self._tails = Tails(self)
        self._topics = KafkaTopics(self)
        self._appends = KafkaAppends(self, self._tails)
        self._cursors = KafkaCursors(self)
        self._groups = KafkaGroups(self)

    def __repr__(self) -> str:
        # The URL as given to open_log, with secret options shown as ***.
        return f"KafkaLog({self.url!r})"

    def external_view(self) -> KafkaLog:
        """A log on the same cluster and settings that names topics as the
        broker does, with no namespace prefix: how subscriptions to topics
        Stepline does not own read them (consumers/external.py). Group names
        keep the namespace, so those groups stay this app's. The view has
        clients of its own (start and close it like a log) and only reads,
        joins groups and commits: it refuses to create or append."""
        view = _BrokerNamed.__new__(_BrokerNamed)
        view.__dict__.update(self.__dict__)
        view._build()  # fresh clients and parts, built on the copied settings
        return view

    # --- lifecycle ---

    async def start(self) -> None:
        if self._producer is not None:
            return
        admin = AIOKafkaAdminClient(**self.admin_kwargs())
        producer = AIOKafkaProducer(**self.producer_kwargs())
        meta = AIOKafkaConsumer(**self.consumer_kwargs())
        try:
            await self._bounded(asyncio.gather(admin.start(), producer.start(), meta.start()))
        except BaseException:
            await _quietly(admin.close(), producer.stop(), meta.stop())
            raise
        self._admin, self._producer, self._meta = admin, producer, meta
        self._topics.admin, self._appends.producer = admin, producer

    async def close(self) -> None:
        if self._producer is None:
            return
        await self._groups.leave_all()
        await self._writers.close()
        await self._tails.close()
        await self._appends.close()
        await self._cursors.close()
        await self._groups.close()
        admin, producer, meta = self._admin, self._producer, self._meta
        self._admin = self._producer = self._meta = None
        self._topics.admin = self._appends.producer = None
        await _quietly(producer.stop(), meta.stop() if meta else _noop(),
                       admin.close() if admin else _noop())

    def _started(self) -> tuple[AIOKafkaAdminClient, AIOKafkaProducer, AIOKafkaConsumer]:
        if self._admin is None or self._producer is None or self._meta is None:
            raise RuntimeError(f"{self.url} is not started; use `async with` or start()")
        return self._admin, self._producer, self._meta

    # --- topics ---

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        await self._topics.ensure(specs)

    async def topic_names(self, prefix: str = "") -> list[str]:
        self._started()
        return await self._topics.names(prefix)

    async def partitions(self, topic: str) -> int:
        self._started()
        return await self._topics.count(topic)

    # --- appends ---

    async def append(
        self,
        topic: str,
        partition: int,
        records: Sequence[tuple[bytes, bytes]],
        headers: Sequence[Headers] | None = None,
    ) -> list[int]:
        if self._producer is None:
            self._started()
        # The hot path: dict lookups only, for a known topic.
        name = f"{self.namespace}.{topic}" if self.namespace else topic
        count = self._topics.counts.get(name)
        if count is None or not 0 <= partition < count:
            await self._topics.where(topic, partition)
        if not records:
            return []
        return await self._appends.submit(name, partition, records, headers)

    # --- transactions (sl.emit) ---

    async def fence(self, topic: str, partition: int) -> None:
        if not self.transactional:
            return
        self._started()
        tp = await self._topics.where(topic, partition)
        await self._writers.fence(tp)

    async def unfence(self, topic: str, partition: int) -> None:
        await self._writers.unfence(TopicPartition(self.topic_name(topic), partition))

    async def check_outgoing(self, topic: str) -> None:
        if not self.transactional:
            await super().check_outgoing(topic)
        self._started()
        if not _valid_name(topic):
            raise ValueError(f"stepline.emit: {topic!r} is not a Kafka topic name "
                             "(letters, digits, '.', '_' and '-')")
        # The user's own topic, by its broker name: no namespace prefix.
        if self._topics.counts.get(topic) is None and (await self._topics.describe([topic]))[topic] is None:
            raise UnknownTopic(
                f"stepline.emit: topic {topic!r} does not exist on Kafka at "
                f"{','.join(self.bootstrap_servers)}; create it first (Stepline does not "
                "create the topics it emits to)"
            )

    async def append_atomic(
        self,
        topic: str,
        partition: int,
        records: Sequence[tuple[bytes, bytes]],
        outgoing: Sequence[Outgoing],
        headers: Sequence[Headers] | None = None,
    ) -> list[int]:
        if not self.transactional:
            return await super().append_atomic(topic, partition, records, outgoing, headers)
        self._started()
        tp = await self._topics.where(topic, partition)
        return await self._writers.append(tp, records, outgoing, headers)

    # --- reads ---

    async def end_offset(self, topic: str, partition: int) -> int:
        _, _, meta = self._started()
        tp = await self._topics.where(topic, partition)
        try:
            return int((await meta.end_offsets([tp]))[tp])
        except KafkaError as exc:
            raise LogError(f"cannot read the end offset of {tp.topic}[{partition}]: {exc}") from exc

    async def offset_for_time(self, topic: str, partition: int, time_ms: int) -> int:
        _, _, meta = self._started()
        tp = await self._topics.where(topic, partition)
        try:
            found = await meta.offsets_for_times({tp: max(time_ms, 0)})
        except KafkaError as exc:
            raise LogError(f"cannot look up the offset of time {time_ms} in {tp.topic}[{partition}]: {exc}") from exc
        hit = found.get(tp)
        return int(hit.offset) if hit is not None else await self.end_offset(topic, partition)

    async def read(
        self,
        topic: str,
        partition: int,
        offset: int,
        max_records: int = 1000,
        timeout: float = 0.0,
    ) -> list[Record]:
        self._started()
        tp = await self._topics.where(topic, partition)
        if max_records <= 0:
            return []
        # A tailing reader, or one inside the recent window, reads from the
        # shared tail (engine/log/kafka_tail.py); the rest through a cursor.
        served = await self._tails.read(topic, tp, max(offset, 0), max_records, timeout)
        if served is not None:
            return served
        found = await self._cursors.read(tp, max(offset, 0), max_records, timeout)
        return [
            make_record(topic, partition, r.offset, r.key or b"", r.value or b"", r.timestamp)
            for r in found
        ]

    # --- retention ---

    async def start_offset(self, topic: str, partition: int) -> int:
        _, _, meta = self._started()
        tp = await self._topics.where(topic, partition)
        try:
            return int((await meta.beginning_offsets([tp]))[tp])
        except KafkaError as exc:
            raise LogError(f"cannot read the start offset of {tp.topic}[{partition}]: {exc}") from exc

    async def delete_before(self, topic: str, partition: int, offset: int) -> None:
        """DeleteRecords: the broker moves the partition's log start offset up
        to `offset`; readers below it are moved up to it (`kafka_cursors`)."""
        admin, _, _ = self._started()
        tp = await self._topics.where(topic, partition)
        try:
            await self._topics.retrying(lambda: admin.delete_records({tp: RecordsToDelete(offset)}))
        except KafkaError as exc:
            raise LogError(f"cannot delete the records of {tp.topic}[{partition}] below offset {offset}: "
                           f"{exc}") from exc

    # --- groups ---

    async def group_alive(self, group: str) -> bool | None:
        """From the group coordinator (DescribeGroups): a member is alive
        while its session lasts, so a worker killed a moment ago still counts
        until the broker expires it; None when the broker cannot be asked."""
        admin, _, _ = self._started()
        name = self.group_name(group)
        try:
            responses = await asyncio.wait_for(admin.describe_consumer_groups([name]), self.connect_timeout)
        except Exception:  # the broker's own error is for operators, not for a "why" line
            return None
        for response in responses:
            for described in getattr(response, "groups", ()):
                # DescribeGroups v0+: (error_code, group_id, state, protocol_type, protocol, members, ...)
                if described[1] == name:
                    return bool(described[5])
        return False

    async def join_group(
        self,
        group: str,
        topic: str,
        on_assign: AssignCallback,
        on_revoke: RevokeCallback,
        *,
        instance_id: str | None = None,
    ) -> Membership:
        self._started()
        await self._topics.count(topic)
        return await self._groups.join(group, self.topic_name(topic), on_assign, on_revoke, instance_id)

    async def commit(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        self._started()
        tps = {await self._topics.where(topic, p): int(o) for p, o in offsets.items()}
        if not tps:
            return
        await self._groups.commit(group, tps)

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        self._started()
        return await self._topics.committed(group, topic)


class _BrokerNamed(KafkaLog):
    """`KafkaLog.external_view()`: topics by their broker names, read-only."""

    def topic_name(self, topic: str) -> str:
        return topic

    def _read_only(self, what: str) -> NoReturn:
        raise LogError(f"{what}: the view of topics Stepline does not own only reads")

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        self._read_only("ensure_topics")

    async def append(self, topic: str, partition: int, records: Sequence[tuple[bytes, bytes]],
                     headers: Sequence[Headers] | None = None) -> list[int]:
        self._read_only(f"append to {topic!r}")

    async def append_atomic(self, topic: str, partition: int, records: Sequence[tuple[bytes, bytes]],
                            outgoing: Sequence[Outgoing], headers: Sequence[Headers] | None = None) -> list[int]:
        self._read_only(f"append to {topic!r}")
