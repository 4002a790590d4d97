"""The Kafka backend: Apache Kafka, or any Kafka-compatible broker, via aiokafka.

    kafka://host:9092[,host2:9092]?namespace=myapp&partitions=12&replication_factor=3
        &security_protocol=SASL_SSL&sasl_mechanism=SCRAM-SHA-512
        &sasl_plain_username=...&sasl_plain_password=...&ssl_cafile=/etc/ca.pem

One `KafkaLog` holds:

* an admin client: topic provisioning (`ensure_topics`), topic metadata
  (`partitions`, the UnknownTopic checks) and committed offsets;
* one idempotent producer (acks=all): `append`;
* one plain consumer for `end_offset` (ListOffsets);
* a small pool of *cursors* per partition for `read`: each is a consumer
  with that one partition assigned by hand, remembered by the offset it
  stands at. A tail (`read(p, next_offset)` again and again) always finds
  its cursor where it left it, so it never seeks and the consumer keeps
  prefetching; a second reader of the same partition at another offset
  gets a cursor of its own, up to `cursors_per_partition`, after which
  the least recently used idle one is moved (seek);
* one tail consumer shared by every reader that follows a partition's end
  (a read with a timeout: worker tails, result watchers), and a window of
  each followed partition's recent records, which also takes this
  process's own appends as soon as they are acknowledged (kafka_tail.py);
  a read the window cannot answer goes to a cursor;
* for each `join_group`, one consumer in that group (see `_KafkaMembership`);
* for each partition it was asked to `fence`, one transactional producer
  (engine/log/kafka_txn.py): `append_atomic`, what `sl.emit` rides on.

Every consumer reads with isolation_level=read_committed, so a record of
an open or aborted transaction is never folded, and `end_offset` is the
last stable offset (where the first open transaction starts). Commit and
abort markers take offsets that no read returns (see `_fetch_soon`).

Appends: every call to one partition waits in a per-partition queue; one
flusher per partition packs everything queued into ONE closed record batch
(`create_batch` / `send_batch`), so a call's records are contiguous and
its offsets are the batch's base offset + 0, 1, 2, ... While one batch is
in flight the next calls pile up and go out together: concurrent callers
share produce requests (group commit), as in the sqlite backend.

Names: with `namespace=NS`, topic T is `NS.T` on the broker and group G is
`NS.G`, so several apps (or test runs) share a cluster; records still
report the logical topic name.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    KafkaError,
    OffsetOutOfRangeError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest

from ..errors import InvalidLogUrl, LogError, LogUnavailable, LogWriteFailed, UnknownTopic
from .base import (
    AssignCallback,
    Assignment,
    Log,
    Membership,
    Outgoing,
    Record,
    RevokeCallback,
    TopicSpec,
)
from .kafka_tail import Tails, make_record
from .kafka_txn import TransactionalWriters
from .redact import redact_url

__all__ = ["KafkaLog", "URL_OPTIONS", "from_url_options"]

log = structlog.get_logger("stepline.log.kafka")

T = TypeVar("T")

# Kafka protocol error codes we handle by number.
_UNKNOWN_TOPIC_OR_PARTITION = 3
_TOPIC_ALREADY_EXISTS = 36

# Batching: our own flusher already merges concurrent appends, so linger is
# only a small extra window; batches may be much larger than aiokafka's
# 16 KiB default (the broker's message.max.bytes default is ~1 MiB).
DEFAULT_LINGER_MS = 2
DEFAULT_MAX_BATCH_SIZE = 512 * 1024
DEFAULT_MAX_REQUEST_SIZE = 1024 * 1024
# Upper bound on what one record adds to a v2 batch beyond key and value
# (length, attributes, timestamp and offset deltas, key/value lengths,
# header count, as varints), and the batch header.
_RECORD_OVERHEAD = 40
_BATCH_OVERHEAD = 61


# --- URL options --------------------------------------------------------------

# name -> help; anything else in a kafka:// URL is an InvalidLogUrl.
URL_OPTIONS: dict[str, str] = {
    # Stepline's own
    "namespace": "prefix for topic and group names on the broker (NS.topic)",
    "partitions": "partition count of topics this log creates (default: the engine's)",
    "replication_factor": "replicas per partition of created topics (default: broker's)",
    "retention_ms": "retention.ms of created topics (default -1: keep forever)",
    "min_insync_replicas": "min.insync.replicas of created topics (default: broker's)",
    "connect_timeout_ms": "give up reaching the brokers after this long, default 10000",
    "cursors_per_partition": "readers kept open per partition, default 4",
    "transactions": "true (default) or false: a transactional producer per owned runs "
                    "partition, for stepline.emit and zombie fencing",
    "transaction_timeout_ms": "the broker aborts a transaction open this long, default 60000",
    # passed to every aiokafka client
    "client_id": "client id shown in broker logs and quotas, default 'stepline'",
    "request_timeout_ms": "aiokafka request timeout, default 30000",
    "retry_backoff_ms": "aiokafka retry backoff, default 100",
    "metadata_max_age_ms": "aiokafka metadata refresh interval",
    "connections_max_idle_ms": "aiokafka idle connection timeout",
    "security_protocol": "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
    "sasl_mechanism": "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or GSSAPI",
    "sasl_plain_username": "SASL user (PLAIN and SCRAM)",
    "sasl_plain_password": "SASL password (PLAIN and SCRAM)",
    "sasl_kerberos_service_name": "GSSAPI service name",
    "sasl_kerberos_domain_name": "GSSAPI domain name",
    "ssl_cafile": "CA bundle that signs the brokers' certificates",
    "ssl_capath": "directory of CA certificates",
    "ssl_certfile": "client certificate (PEM) for mutual TLS",
    "ssl_keyfile": "client private key (PEM) for mutual TLS",
    "ssl_password": "password of ssl_keyfile",
    "ssl_check_hostname": "true (default) or false",
    # producer
    "compression_type": "gzip, snappy, lz4 or zstd",
    "linger_ms": f"extra wait to fill a batch, default {DEFAULT_LINGER_MS}",
    "max_batch_size": f"bytes per record batch, default {DEFAULT_MAX_BATCH_SIZE}",
    "max_request_size": f"bytes per produce request, default {DEFAULT_MAX_REQUEST_SIZE}",
    # consumers
    "fetch_max_wait_ms": "how long a fetch waits on the broker for data, default 500 "
                         "(50 for the shared tail, engine/log/kafka_tail.py)",
    "fetch_min_bytes": "bytes a fetch waits for, default 1",
    "fetch_max_bytes": "bytes per fetch response",
    "max_partition_fetch_bytes": "bytes per partition per fetch",
    "session_timeout_ms": "group session timeout, default 10000",
    "heartbeat_interval_ms": "group heartbeat interval, default 1000",
    "max_poll_interval_ms": "group max poll interval, default 300000",
    "rebalance_timeout_ms": "how long a rebalance waits for members' callbacks",
    "partition_assignment_strategy": "roundrobin (default), range or sticky",
    "client_rack": "rack id for follower fetching",
}

_COMMON_INT = ("request_timeout_ms", "retry_backoff_ms", "metadata_max_age_ms",
               "connections_max_idle_ms")
_COMMON_STR = ("client_id", "security_protocol", "sasl_mechanism", "sasl_plain_username",
               "sasl_plain_password", "sasl_kerberos_service_name", "sasl_kerberos_domain_name")
_PRODUCER_INT = ("linger_ms", "max_batch_size", "max_request_size")
_CONSUMER_INT = ("fetch_max_wait_ms", "fetch_min_bytes", "fetch_max_bytes",
                 "max_partition_fetch_bytes", "session_timeout_ms", "heartbeat_interval_ms",
                 "max_poll_interval_ms", "rebalance_timeout_ms")
_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI")
_COMPRESSION = ("gzip", "snappy", "lz4", "zstd")


def _int_option(url: str, name: str, text: str, *, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise InvalidLogUrl(
            f"option {name}={text!r} in log URL {redact_url(url)!r} must be an integer >= {minimum}"
        )
    return value


def from_url_options(url: str, servers: list[str], options: dict[str, str]) -> KafkaLog:
    """Build a KafkaLog from a URL's checked options (see `URL_OPTIONS`)."""
    common: dict[str, Any] = {}
    producer: dict[str, Any] = {}
    consumer: dict[str, Any] = {}
    for name in _COMMON_INT:
        if name in options:
            common[name] = _int_option(url, name, options[name], minimum=1)
    for name in _COMMON_STR:
        if name in options:
            common[name] = options[name]
    for name in _PRODUCER_INT:
        if name in options:
            producer[name] = _int_option(url, name, options[name], minimum=0)
    for name in _CONSUMER_INT:
        if name in options:
            consumer[name] = _int_option(url, name, options[name], minimum=0)

    if "security_protocol" in common:
        common["security_protocol"] = common["security_protocol"].upper()
        if common["security_protocol"] not in _SECURITY_PROTOCOLS:
            raise InvalidLogUrl(
                f"option security_protocol={options['security_protocol']!r} in log URL "
                f"{redact_url(url)!r} must be one of {', '.join(_SECURITY_PROTOCOLS)}"
            )
    if "sasl_mechanism" in common:
        common["sasl_mechanism"] = common["sasl_mechanism"].upper()
        if common["sasl_mechanism"] not in _SASL_MECHANISMS:
            raise InvalidLogUrl(
                f"option sasl_mechanism={options['sasl_mechanism']!r} in log URL "
                f"{redact_url(url)!r} must be one of {', '.join(_SASL_MECHANISMS)} "
                "(OAUTHBEARER needs a token provider: build KafkaLog in code)"
            )
    if "compression_type" in options:
        kind = options["compression_type"].lower()
        if kind not in _COMPRESSION:
            raise InvalidLogUrl(
                f"option compression_type={options['compression_type']!r} in log URL "
                f"{redact_url(url)!r} must be one of {', '.join(_COMPRESSION)}"
            )
        producer["compression_type"] = kind
    if "partition_assignment_strategy" in options:
        from aiokafka.coordinator.assignors.range import RangePartitionAssignor
        from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
        from aiokafka.coordinator.assignors.sticky.sticky_assignor import (
            StickyPartitionAssignor,
        )

        strategies = {
            "roundrobin": RoundRobinPartitionAssignor,
            "range": RangePartitionAssignor,
            "sticky": StickyPartitionAssignor,
        }
        name = options["partition_assignment_strategy"].lower()
        if name not in strategies:
            raise InvalidLogUrl(
                f"option partition_assignment_strategy={name!r} in log URL {redact_url(url)!r} "
                f"must be one of {', '.join(strategies)}"
            )
        consumer["partition_assignment_strategy"] = (strategies[name],)
    if "client_rack" in options:
        consumer["client_rack"] = options["client_rack"]

    ssl_options = {k: v for k, v in options.items() if k.startswith("ssl_")}
    check_hostname = True
    if "ssl_check_hostname" in ssl_options:
        flag = ssl_options.pop("ssl_check_hostname").lower()
        if flag not in ("true", "false", "1", "0", "yes", "no"):
            raise InvalidLogUrl(
                f"option ssl_check_hostname={flag!r} in log URL {redact_url(url)!r} "
                "must be true or false"
            )
        check_hostname = flag in ("true", "1", "yes")

    namespace = options.get("namespace", "")
    if namespace and not _valid_name(namespace):
        raise InvalidLogUrl(
            f"option namespace={namespace!r} in log URL {redact_url(url)!r} may only use "
            "letters, digits, '.', '_' and '-'"
        )
    transactions = options.get("transactions", "true").lower()
    if transactions not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidLogUrl(
            f"option transactions={transactions!r} in log URL {redact_url(url)!r} must be true or false"
        )
    rf = options.get("replication_factor")
    mir = options.get("min_insync_replicas")
    retention = options.get("retention_ms")
    parts = options.get("partitions")
    try:
        return KafkaLog(
            servers,
            namespace=namespace,
            partitions=None if parts is None else _int_option(url, "partitions", parts, minimum=1),
            replication_factor=(
                -1 if rf is None else _int_option(url, "replication_factor", rf, minimum=1)
            ),
            retention_ms=(
                None if retention is None
                else _int_option(url, "retention_ms", retention, minimum=-1)
            ),
            min_insync_replicas=(
                None if mir is None else _int_option(url, "min_insync_replicas", mir, minimum=1)
            ),
            connect_timeout=_int_option(
                url, "connect_timeout_ms", options.get("connect_timeout_ms", "10000"), minimum=1
            ) / 1000,
            cursors_per_partition=_int_option(
                url, "cursors_per_partition", options.get("cursors_per_partition", "4"),
                minimum=1,
            ),
            transactions=transactions in ("true", "1", "yes"),
            transaction_timeout_ms=_int_option(
                url, "transaction_timeout_ms", options.get("transaction_timeout_ms", "60000"),
                minimum=1000,
            ),
            client_options=common,
            producer_options=producer,
            consumer_options=consumer,
            ssl_files={k.removeprefix("ssl_"): v for k, v in ssl_options.items()},
            ssl_check_hostname=check_hostname,
            url=redact_url(url),
        )
    except ValueError as exc:  # bad option combinations, unreadable TLS files
        if isinstance(exc, InvalidLogUrl):
            raise
        raise InvalidLogUrl(f"log URL {redact_url(url)!r}: {exc}") from exc


def _ready(meta: dict[str, Any] | None) -> bool:
    """A topic's metadata shows it, with a leader for every partition."""
    return bool(
        meta is not None
        and meta["error_code"] == 0
        and meta["partitions"]
        and all(p["error_code"] == 0 and p["leader"] >= 0 for p in meta["partitions"])
    )


def _valid_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "._-" for c in name)


# --- private aiokafka access, each in one place ----------------------------------


def _group_generation(consumer: AIOKafkaConsumer) -> int:
    """The generation of the group the member has just joined.

    aiokafka has no public API for it. Its group coordinator keeps the
    generation from the JoinGroup response in `consumer._coordinator.generation`,
    and it is current by the time `on_partitions_assigned` runs (aiokafka 0.11
    to 0.14). This function is the only place that reaches for it.
    """
    generation = getattr(getattr(consumer, "_coordinator", None), "generation", None)
    if not isinstance(generation, int) or generation < 0:
        raise LogError(
            "cannot read the consumer group generation from aiokafka "
            f"(got {generation!r}); this aiokafka version is not supported"
        )
    return generation


async def _topic_metadata(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, Any]:
    """Metadata of `topics` without creating them.

    `AIOKafkaAdminClient.describe_topics` sends a MetadataRequest that lets a
    broker with auto.create.topics.enable=true create every topic it is asked
    about, so we send our own with allow_auto_topic_creation=False through
    the admin's `_send_request` (aiokafka 0.14).
    """
    response = await admin._send_request(MetadataRequest(topics, allow_auto_topic_creation=False))
    return {t["topic"]: t for t in response.to_object()["topics"]}


# --- appends --------------------------------------------------------------------


@dataclass(slots=True)
class _Call:
    records: Sequence[tuple[bytes, bytes]]
    size: int
    future: asyncio.Future[list[int]]


@dataclass(slots=True)
class _Partial:
    """A call whose records span several batches (only when it is bigger than one)."""

    call: _Call
    offsets: list[int] = field(default_factory=list)
    parts_left: int = 0


def _size(records: Sequence[tuple[bytes, bytes]]) -> int:
    if len(records) == 1:
        k, v = records[0]
        return len(k) + len(v) + _RECORD_OVERHEAD
    return sum(len(k) + len(v) + _RECORD_OVERHEAD for k, v in records)


# --- reads ----------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Cursor:
    consumer: AIOKafkaConsumer
    tp: TopicPartition
    position: int
    busy: bool = False
    used: float = 0.0


@dataclass(slots=True)
class _Pool:
    cursors: list[_Cursor] = field(default_factory=list)
    opening: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


_CURSOR_IDLE_S = 60.0
_REAP_EVERY_S = 10.0


class KafkaLog(Log):
    """A `Log` on Apache Kafka; see the module docstring."""

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        namespace: str = "",
        partitions: int | None = None,
        replication_factor: int = -1,
        retention_ms: int | None = None,
        min_insync_replicas: int | None = None,
        connect_timeout: float = 10.0,
        cursors_per_partition: int = 4,
        transactions: bool = True,
        transaction_timeout_ms: int = 60_000,
        client_options: dict[str, Any] | None = None,
        producer_options: dict[str, Any] | None = None,
        consumer_options: dict[str, Any] | None = None,
        ssl_files: dict[str, str] | None = None,
        ssl_check_hostname: bool = True,
        url: str | None = None,
    ) -> None:
        if isinstance(bootstrap_servers, str):
            bootstrap_servers = [s for s in bootstrap_servers.split(",") if s.strip()]
        self.bootstrap_servers = [s.strip() for s in bootstrap_servers]
        if not self.bootstrap_servers:
            raise ValueError("no Kafka bootstrap servers given")
        self.url = url or f"kafka://{','.join(self.bootstrap_servers)}"
        self.namespace = namespace
        self.default_partitions = partitions
        self.replication_factor = replication_factor
        self.retention_ms = retention_ms
        self.min_insync_replicas = min_insync_replicas
        self.connect_timeout = connect_timeout
        self.cursors_per_partition = cursors_per_partition
        self.transactional = transactions
        self.transaction_timeout_ms = transaction_timeout_ms

        client: dict[str, Any] = {"client_id": "stepline", "request_timeout_ms": 30000}
        client.update(client_options or {})
        self._client_options = client
        self._producer_options = dict(producer_options or {})
        self._consumer_options = dict(consumer_options or {})
        self._ssl_context = self._make_ssl_context(dict(ssl_files or {}), ssl_check_hostname)

        self._admin: AIOKafkaAdminClient | None = None
        self._producer: AIOKafkaProducer | None = None
        self._meta: AIOKafkaConsumer | None = None
        self._counts: dict[str, int] = {}
        self._pending: dict[tuple[str, int], list[_Call]] = {}
        self._flushers: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._inflight: set[asyncio.Future[Any]] = set()
        self._pools: dict[tuple[str, int], _Pool] = {}
        self._last_reap = 0.0
        self._closing_cursors: set[asyncio.Task[None]] = set()
        self._committers: dict[str, AIOKafkaConsumer] = {}
        self._committer_locks: dict[str, asyncio.Lock] = {}
        self._members: list[_KafkaMembership] = []
        self._writers = TransactionalWriters(self)
        self._tails = Tails(self)

    def __repr__(self) -> str:
        # The URL as given to open_log, with secret options shown as ***.
        return f"KafkaLog({self.url!r})"

    # --- configuration ---

    def _make_ssl_context(self, files: dict[str, str], check_hostname: bool) -> ssl.SSLContext | None:
        protocol = self._client_options.get("security_protocol", "PLAINTEXT")
        uses_tls = protocol in ("SSL", "SASL_SSL")
        if files and not uses_tls:
            raise ValueError(
                f"TLS options ({', '.join('ssl_' + k for k in files)}) need "
                "security_protocol=SSL or SASL_SSL"
            )
        if protocol.startswith("SASL_"):
            mechanism = self._client_options.get("sasl_mechanism", "PLAIN")
            if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and not (
                self._client_options.get("sasl_plain_username")
                and self._client_options.get("sasl_plain_password") is not None
            ):
                raise ValueError(
                    f"sasl_mechanism={mechanism} needs sasl_plain_username and sasl_plain_password"
                )
        if not uses_tls:
            return None
        for name in ("cafile", "certfile", "keyfile"):
            path = files.get(name)
            # ssl's own errors ("[Errno 2] No such file or directory") name no option.
            if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                why = ("does not exist" if not os.path.exists(path) else
                       "is not a file" if not os.path.isfile(path) else "cannot be read by this process")
                raise ValueError(f"ssl_{name}={path!r} {why}")
        try:
            context = create_ssl_context(
                cafile=files.get("cafile"),
                capath=files.get("capath"),
                certfile=files.get("certfile"),
                keyfile=files.get("keyfile"),
                password=files.get("password"),
            )
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the TLS files: {exc}") from exc
        context.check_hostname = check_hostname
        return context

    def _common_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"bootstrap_servers": list(self.bootstrap_servers)}
        kwargs.update(self._client_options)
        if self._ssl_context is not None:
            kwargs["ssl_context"] = self._ssl_context
        return kwargs

    def admin_kwargs(self) -> dict[str, Any]:
        """What the AIOKafkaAdminClient is built with."""
        return self._common_kwargs()

    def producer_kwargs(self) -> dict[str, Any]:
        """What the AIOKafkaProducer is built with."""
        kwargs = self._common_kwargs()
        kwargs.update(
            acks="all",
            enable_idempotence=True,
            linger_ms=DEFAULT_LINGER_MS,
            max_batch_size=DEFAULT_MAX_BATCH_SIZE,
            max_request_size=DEFAULT_MAX_REQUEST_SIZE,
        )
        kwargs.update(self._producer_options)
        return kwargs

    def consumer_kwargs(self, group_id: str | None = None) -> dict[str, Any]:
        """What a consumer is built with: a reader (no group) or a group member."""
        kwargs = self._common_kwargs()
        # read_committed: records of open or aborted transactions (sl.emit's
        # checkpoints) are never read, and end offsets are last stable offsets.
        kwargs.update(enable_auto_commit=False, heartbeat_interval_ms=1000,
                      session_timeout_ms=10000, isolation_level="read_committed")
        if group_id is None:
            # Readers always seek before they fetch; an offset outside the
            # log is reported to us (OffsetOutOfRangeError), never "fixed".
            kwargs["auto_offset_reset"] = "none"
        else:
            kwargs["group_id"] = group_id
            kwargs["auto_offset_reset"] = "earliest"
        kwargs.update(self._consumer_options)
        client_id = kwargs.get("client_id", "stepline")
        kwargs["client_id"] = f"{client_id}-member" if group_id else f"{client_id}-reader"
        return kwargs

    def topic_name(self, topic: str) -> str:
        """The topic's name on the broker."""
        return f"{self.namespace}.{topic}" if self.namespace else topic

    def group_name(self, group: str) -> str:
        """The consumer group's name on the broker."""
        return f"{self.namespace}.{group}" if self.namespace else group

    # --- lifecycle ---

    def _unavailable(self, exc: BaseException) -> LogUnavailable:
        why = "no answer" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        err = LogUnavailable(
            f"cannot reach Kafka at {','.join(self.bootstrap_servers)} "
            f"within {self.connect_timeout:g} s ({why}); log URL {self.url}"
        )
        err.__cause__ = exc
        return err

    async def _bounded(self, start: Any) -> None:
        """Await a client's start(), giving up after connect_timeout."""
        try:
            await asyncio.wait_for(start, self.connect_timeout)
        except (TimeoutError, KafkaError, OSError) as exc:
            raise self._unavailable(exc) from exc

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

    async def close(self) -> None:
        if self._producer is None:
            return
        for member in list(self._members):
            await member._shutdown()
        await self._writers.close()
        await self._tails.close()
        # Appends already queued still go out and get their answer.
        flushers = list(self._flushers.values())
        if flushers:
            await asyncio.gather(*flushers, return_exceptions=True)
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        cursors = [c for pool in self._pools.values() for c in pool.cursors]
        self._pools.clear()
        await _quietly(
            *(c.consumer.stop() for c in cursors),
            *(c.stop() for c in self._committers.values()),
            *self._closing_cursors,
        )
        self._committers.clear()
        admin, producer, meta = self._admin, self._producer, self._meta
        self._admin = self._producer = self._meta = None
        await _quietly(producer.stop(), meta.stop() if meta else _noop(),
                       admin.close() if admin else _noop())

    def _started(self) -> tuple[AIOKafkaAdminClient, AIOKafkaProducer, AIOKafkaConsumer]:
        if self._admin is None or self._producer is None or self._meta is None:
            raise RuntimeError(f"{self.url} is not started; use `async with` or start()")
        return self._admin, self._producer, self._meta

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run an admin request again while the broker says "not yet".

        The admin client does not retry by itself; a fresh cluster, for one,
        answers COORDINATOR_NOT_AVAILABLE until it has made the offsets topic.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._client_options["request_timeout_ms"] / 1000
        backoff = self._client_options.get("retry_backoff_ms", 100) / 1000
        while True:
            try:
                return await op()
            except KafkaError as exc:
                if not exc.retriable or loop.time() + backoff > deadline:
                    raise
            await asyncio.sleep(backoff)

    # --- topics ---

    async def _describe(self, names: list[str]) -> dict[str, int | None]:
        """Partition counts of broker topics; None for those that do not exist."""
        admin, _, _ = self._started()
        try:
            found = await self._retrying(lambda: _topic_metadata(admin, names))
        except KafkaError as exc:
            raise LogError(f"cannot read topic metadata from Kafka: {exc}") from exc
        counts: dict[str, int | None] = {}
        for name in names:
            meta = found.get(name)
            if meta is None or meta["error_code"] == _UNKNOWN_TOPIC_OR_PARTITION:
                counts[name] = None
            elif meta["partitions"]:
                counts[name] = len(meta["partitions"])
                self._counts[name] = len(meta["partitions"])
            else:  # being created: exists, partitions not reported yet
                counts[name] = None
        return counts

    async def _count(self, topic: str) -> int:
        name = self.topic_name(topic)
        count = self._counts.get(name)
        if count is None:
            count = (await self._describe([name]))[name]
        if count is None:
            raise UnknownTopic(f"topic {topic!r} ({name!r} on Kafka at "
                               f"{','.join(self.bootstrap_servers)}) does not exist; "
                               "create it with ensure_topics()")
        return count

    async def _where(self, topic: str, partition: int) -> TopicPartition:
        name = self.topic_name(topic)
        count = self._counts.get(name)
        if count is None or not 0 <= partition < count:
            count = await self._count(topic)
        if not 0 <= partition < count:
            raise UnknownTopic(
                f"topic {topic!r} has {count} partitions; partition {partition} does not exist"
            )
        return TopicPartition(name, partition)

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        for spec in specs:
            if spec.partitions < 1:
                raise ValueError(f"topic {spec.name!r} needs at least one partition")
        admin, _, _ = self._started()
        names = {self.topic_name(s.name): s for s in specs}
        existing = await self._describe(list(names))
        missing = [(name, spec) for name, spec in names.items() if existing[name] is None]
        if not missing:
            return
        new = []
        for name, spec in missing:
            retention = spec.retention_ms if spec.retention_ms is not None else -1
            if self.retention_ms is not None:
                retention = self.retention_ms
            configs = {"retention.ms": str(retention), "cleanup.policy": "compact" if spec.compact else "delete"}
            if self.min_insync_replicas is not None:
                configs["min.insync.replicas"] = str(self.min_insync_replicas)
            new.append(NewTopic(
                name,
                num_partitions=self.default_partitions or spec.partitions,
                replication_factor=self.replication_factor,
                # NewTopic insists on replica assignments when the factor is
                # -1; an empty map means "broker's default.replication.factor".
                replica_assignments={} if self.replication_factor == -1 else None,
                topic_configs=configs,
            ))
        try:
            response = await self._retrying(lambda: admin.create_topics(new))
        except KafkaError as exc:
            raise LogError(f"cannot create topics on Kafka: {exc}") from exc
        for err in response.to_object()["topic_errors"]:
            if err["error_code"] not in (0, _TOPIC_ALREADY_EXISTS):
                raise LogError(
                    f"Kafka refused to create topic {err['topic']!r}: error "
                    f"{err['error_code']} {err['error_message'] or ''}".rstrip()
                )
        # Wait until the metadata shows every new topic with a leader for each
        # partition, so the next call through any handle finds it writable.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self.connect_timeout, 10.0)
        waiting = [name for name, _ in missing]
        while waiting:
            try:
                found = await _topic_metadata(admin, waiting)
            except KafkaError as exc:
                raise LogError(f"cannot read topic metadata from Kafka: {exc}") from exc
            waiting = [n for n in waiting if not _ready(found.get(n))]
            if waiting:
                if loop.time() > deadline:
                    raise LogError(f"topics {waiting} were created but do not show up in metadata")
                await asyncio.sleep(0.05)

    async def partitions(self, topic: str) -> int:
        self._started()
        return await self._count(topic)

    # --- appends ---

    async def append(
        self, topic: str, partition: int, records: Sequence[tuple[bytes, bytes]]
    ) -> list[int]:
        if self._producer is None:
            self._started()
        # The hot path: dict lookups only, for a known topic.
        name = f"{self.namespace}.{topic}" if self.namespace else topic
        count = self._counts.get(name)
        if count is None or not 0 <= partition < count:
            await self._where(topic, partition)
        if not records:
            return []
        key = (name, partition)
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        queue = self._pending.get(key)
        if queue is None:
            queue = self._pending[key] = []
        queue.append(_Call(records, _size(records), future))
        if key not in self._flushers:
            self._flushers[key] = asyncio.create_task(
                self._flush(key), name=f"stepline-kafka-flush:{name}:{partition}"
            )
        return await future

    async def _flush(self, key: tuple[str, int]) -> None:
        """Send everything queued for one partition, one batch per round."""
        _, producer, _ = self._started()
        topic, partition = key
        limit = self._batch_limit()
        taken: list[_Call] = []
        try:
            while True:
                queue = self._pending.get(key)
                if not queue:
                    self._pending.pop(key, None)
                    return
                # Take whole calls while they fit; a call bigger than a batch
                # goes alone, split over as many batches as it needs.
                n, size = 0, _BATCH_OVERHEAD
                while n < len(queue) and (n == 0 or size + queue[n].size <= limit):
                    size += queue[n].size
                    n += 1
                    if size > limit:
                        break
                taken = queue[:n]
                del queue[:n]
                if len(taken) == 1 and taken[0].size + _BATCH_OVERHEAD > limit:
                    await self._send_split(producer, topic, partition, taken[0], limit)
                    taken = []
                    continue
                batch = producer.create_batch()
                stamps: list[int] = []
                overflow = False
                for call in taken:
                    for k, v in call.records:
                        meta = batch.append(key=k, value=v or None, timestamp=None)
                        if meta is None:
                            overflow = True
                            break
                        stamps.append(meta.timestamp)
                if overflow:  # cannot happen while _RECORD_OVERHEAD is an upper bound
                    for call in taken:
                        _fail(call.future, LogWriteFailed(
                            f"append to {topic}[{partition}]: records overflowed a batch"))
                    continue
                batch.close()
                await self._send(producer, topic, partition, batch, taken, stamps)
                taken = []
        except BaseException as exc:
            # Nothing may wait forever: fail what this flusher still held.
            for call in [*taken, *self._pending.pop(key, [])]:
                _fail(call.future, exc)
            raise
        finally:
            self._flushers.pop(key, None)

    def _batch_limit(self) -> int:
        return int(self.producer_kwargs().get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))

    async def _send(self, producer: AIOKafkaProducer, topic: str, partition: int,
                    batch: Any, calls: list[_Call], stamps: list[int] | None = None) -> None:
        """Send one closed batch; `stamps` (its records' create times) let
        the tails serve the records to this process's readers at once."""
        try:
            # Returns once the batch is queued (after the previous batch of
            # this partition was taken by the sender); the future resolves
            # with the base offset once every in-sync replica has it.
            delivered = await producer.send_batch(batch, topic, partition=partition)
        except KafkaError as exc:
            for call in calls:
                _fail(call.future, self._write_failed(topic, partition, exc))
            return

        def done(fut: asyncio.Future[Any]) -> None:
            self._inflight.discard(fut)
            if fut.cancelled():
                exc: BaseException = self._write_failed(topic, partition, asyncio.CancelledError())
            elif fut.exception() is not None:
                exc = self._write_failed(topic, partition, fut.exception())  # type: ignore[arg-type]
            else:
                meta = fut.result()
                base = meta.offset
                for call in calls:
                    n = len(call.records)
                    if not call.future.done():
                        call.future.set_result(list(range(base, base + n)))
                    base += n
                if stamps is not None:
                    # After the writers' futures, so that (callbacks run in
                    # order) a writer learns its offsets before this
                    # process's readers see the records: the engine skips
                    # decoding its own events by offset.
                    # -1: the records keep their create times; else the topic
                    # stamps them all with the broker's append time.
                    times = stamps if meta.timestamp == -1 else [meta.timestamp] * len(stamps)
                    self._tails.appended(meta.topic_partition, meta.offset,
                                         [r for call in calls for r in call.records], times)
                return
            for call in calls:
                _fail(call.future, exc)

        self._inflight.add(delivered)
        delivered.add_done_callback(done)

    async def _send_split(self, producer: AIOKafkaProducer, topic: str, partition: int,
                          call: _Call, limit: int) -> None:
        """A call too big for one batch: consecutive batches, in order.

        Within this process nothing else writes the partition in between;
        another producer could, so such a call is contiguous only per batch.
        """
        chunks: list[list[tuple[bytes, bytes]]] = [[]]
        size = _BATCH_OVERHEAD
        for k, v in call.records:
            rec = len(k) + len(v) + _RECORD_OVERHEAD
            if chunks[-1] and size + rec > limit:
                chunks.append([])
                size = _BATCH_OVERHEAD
            chunks[-1].append((k, v))
            size += rec
        partial = _Partial(call, parts_left=len(chunks))
        results: list[list[int] | None] = [None] * len(chunks)
        loop = asyncio.get_running_loop()
        for i, chunk in enumerate(chunks):
            sub: asyncio.Future[list[int]] = loop.create_future()

            def collect(fut: asyncio.Future[list[int]], i: int = i) -> None:
                if call.future.done():
                    return
                if fut.exception() is not None:
                    call.future.set_exception(fut.exception())  # type: ignore[arg-type]
                    return
                results[i] = fut.result()
                partial.parts_left -= 1
                if partial.parts_left == 0:
                    call.future.set_result([o for r in results for o in (r or [])])

            sub.add_done_callback(collect)
            batch = producer.create_batch()
            for k, v in chunk:
                batch.append(key=k, value=v or None, timestamp=None)
            batch.close()
            await self._send(producer, topic, partition, batch, [_Call(chunk, 0, sub)])

    def _write_failed(self, topic: str, partition: int, exc: BaseException) -> LogWriteFailed:
        err = LogWriteFailed(
            f"append to {topic}[{partition}] on Kafka at {','.join(self.bootstrap_servers)} "
            f"failed: {type(exc).__name__}: {exc}"
        )
        err.__cause__ = exc
        return err

    # --- transactions (sl.emit) ---

    async def fence(self, topic: str, partition: int) -> None:
        if not self.transactional:
            return
        self._started()
        tp = await self._where(topic, partition)
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
        if self._counts.get(topic) is None and (await self._describe([topic]))[topic] is None:
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
    ) -> list[int]:
        if not self.transactional:
            return await super().append_atomic(topic, partition, records, outgoing)
        self._started()
        tp = await self._where(topic, partition)
        return await self._writers.append(tp, records, outgoing)

    # --- reads ---

    async def end_offset(self, topic: str, partition: int) -> int:
        _, _, meta = self._started()
        tp = await self._where(topic, partition)
        try:
            return int((await meta.end_offsets([tp]))[tp])
        except KafkaError as exc:
            raise LogError(f"cannot read the end offset of {tp.topic}[{partition}]: {exc}") from exc

    async def offset_for_time(self, topic: str, partition: int, time_ms: int) -> int:
        _, _, meta = self._started()
        tp = await self._where(topic, partition)
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
        tp = await self._where(topic, partition)
        if max_records <= 0:
            return []
        # A tailing reader, or one inside the recent window, reads from the
        # shared tail (engine/log/kafka_tail.py); the rest through a cursor.
        served = await self._tails.read(topic, tp, max(offset, 0), max_records, timeout)
        if served is not None:
            return served
        cursor = await self._acquire(tp, max(offset, 0))
        try:
            found = await self._read_at(cursor, max_records, timeout)
        except asyncio.CancelledError:
            # Nothing is consumed until getmany returns, so the cursor still
            # stands where it did (tails are cancelled on every revoke).
            raise
        except BaseException:
            # A failed read may leave the consumer anywhere: drop the cursor.
            cursor.position = -1
            raise
        finally:
            self._release(cursor)
        return [
            make_record(topic, partition, r.offset, r.key or b"", r.value or b"", r.timestamp)
            for r in found
        ]

    async def _read_at(self, cursor: _Cursor, max_records: int, timeout: float) -> list[Any]:
        consumer, tp = cursor.consumer, cursor.tp
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        start = cursor.position
        while True:
            try:
                got = (await consumer.getmany(tp, timeout_ms=0, max_records=max_records)).get(tp)
                if not got:
                    remaining = deadline - loop.time()
                    if remaining > 0:
                        got = (await consumer.getmany(
                            tp, timeout_ms=int(remaining * 1000) + 1, max_records=max_records
                        )).get(tp)
                    else:
                        # timeout=0 promises what is there now, but this
                        # cursor may not have fetched it yet: ask the broker.
                        end = int((await consumer.end_offsets([tp]))[tp])
                        if end <= start:
                            return []
                        got = await self._fetch_soon(consumer, tp, max_records, end)
            except OffsetOutOfRangeError:
                got = await self._out_of_range(cursor, deadline)
                if got is None:
                    return []
                continue
            except KafkaError as exc:
                raise LogError(f"cannot read {tp.topic}[{tp.partition}]: {exc}") from exc
            got = [r for r in got or () if r.offset >= start]
            if got:
                cursor.position = got[-1].offset + 1
                return got
            if loop.time() >= deadline:
                return []

    async def _fetch_soon(self, consumer: AIOKafkaConsumer, tp: TopicPartition,
                          max_records: int, end: int) -> list[Any]:
        """Offsets below `end` exist: wait for the fetch that brings their records.

        They may hold none: transaction markers and aborted records take
        offsets that a read_committed consumer skips, moving its position
        on without returning anything. Once the position passes `end`
        with nothing returned, there was nothing to read.
        """
        loop = asyncio.get_running_loop()
        limit = self._client_options.get("request_timeout_ms", 30000) / 1000
        deadline = loop.time() + limit
        while True:
            if await consumer.position(tp) >= end:
                return []
            got = (await consumer.getmany(tp, timeout_ms=50, max_records=max_records)).get(tp)
            if got:
                return got
            if loop.time() > deadline:
                raise LogError(
                    f"records of {tp.topic}[{tp.partition}] did not arrive within {limit:g} s"
                )

    async def _out_of_range(self, cursor: _Cursor, deadline: float) -> list[Any] | None:
        """The cursor's offset is not in the log: past its end, or retention
        removed it. Returns None for "nothing yet"; repositions otherwise."""
        consumer, tp = cursor.consumer, cursor.tp
        first = int((await consumer.beginning_offsets([tp]))[tp])
        if cursor.position < first:
            # Deleted by retention: the oldest record left is the next one.
            consumer.seek(tp, first)
            cursor.position = first
            return []
        # Past the end: wait until the log grows that far or time runs out.
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
            if int((await consumer.end_offsets([tp]))[tp]) > cursor.position:
                consumer.seek(tp, cursor.position)
                return []
        consumer.seek(tp, cursor.position)
        return None

    async def _acquire(self, tp: TopicPartition, offset: int) -> _Cursor:
        """A cursor on `tp` standing at `offset`, reserved for one read."""
        self._maybe_reap()
        pool = self._pools.setdefault((tp.topic, tp.partition), _Pool())
        loop = asyncio.get_running_loop()
        while True:
            free = [c for c in pool.cursors if not c.busy]
            for c in free:
                if c.position == offset:
                    c.busy = True
                    return c
            if len(pool.cursors) + pool.opening < self.cursors_per_partition:
                pool.opening += 1
                try:
                    cursor = await self._open_cursor(tp, offset)
                finally:
                    pool.opening -= 1
                cursor.busy = True
                pool.cursors.append(cursor)
                return cursor
            if free:
                cursor = min(free, key=lambda c: c.used)
                cursor.consumer.seek(tp, offset)
                cursor.position = offset
                cursor.busy = True
                return cursor
            waiter: asyncio.Future[None] = loop.create_future()
            pool.waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in pool.waiters:
                    pool.waiters.remove(waiter)

    def _release(self, cursor: _Cursor) -> None:
        cursor.busy = False
        cursor.used = time.monotonic()
        pool = self._pools.get((cursor.tp.topic, cursor.tp.partition))
        if pool is None:  # the log closed meanwhile
            self._stop_later(cursor.consumer)
            return
        if cursor.position < 0:
            pool.cursors.remove(cursor)
            self._stop_later(cursor.consumer)
        for waiter in pool.waiters:
            if not waiter.done():
                waiter.set_result(None)
                break

    async def _open_cursor(self, tp: TopicPartition, offset: int) -> _Cursor:
        consumer = AIOKafkaConsumer(**self.consumer_kwargs())
        try:
            await self._bounded(consumer.start())
            consumer.assign([tp])
            consumer.seek(tp, offset)
        except BaseException:
            await _quietly(consumer.stop())
            raise
        return _Cursor(consumer, tp, offset, used=time.monotonic())

    def _maybe_reap(self) -> None:
        """Close cursors nobody has used for a while (they keep fetching)."""
        now = time.monotonic()
        if now - self._last_reap < _REAP_EVERY_S:
            return
        self._last_reap = now
        for pool in self._pools.values():
            idle = [c for c in pool.cursors if not c.busy and now - c.used > _CURSOR_IDLE_S]
            for c in idle:
                pool.cursors.remove(c)
                self._stop_later(c.consumer)

    def _stop_later(self, consumer: AIOKafkaConsumer) -> None:
        task = asyncio.get_running_loop().create_task(_quietly(consumer.stop()))
        self._closing_cursors.add(task)
        task.add_done_callback(self._closing_cursors.discard)

    # --- groups ---

    async def join_group(
        self,
        group: str,
        topic: str,
        on_assign: AssignCallback,
        on_revoke: RevokeCallback,
    ) -> Membership:
        self._started()
        await self._count(topic)
        member = _KafkaMembership(self, group, self.topic_name(topic), on_assign, on_revoke)
        self._members.append(member)
        try:
            await member._join()
        except BaseException:
            await asyncio.shield(member._shutdown())
            raise
        return member

    async def commit(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        self._started()
        tps = {await self._where(topic, p): int(o) for p, o in offsets.items()}
        if not tps:
            return
        name = self.group_name(group)
        # The group's own member commits with its generation; anyone else
        # commits as a "simple" consumer, which the broker allows only while
        # the group has no live members.
        for member in self._members:
            consumer = member._consumer
            if member._group == name and consumer is not None and not member._closing:
                if set(tps) <= consumer.assignment():
                    try:
                        await consumer.commit(tps)
                        return
                    except KafkaError as exc:
                        raise self._commit_failed(group, exc) from exc
        lock = self._committer_locks.setdefault(name, asyncio.Lock())
        async with lock:
            committer = self._committers.get(name)
            if committer is None:
                committer = AIOKafkaConsumer(**self.consumer_kwargs(group_id=name))
                try:
                    await self._bounded(committer.start())
                except BaseException:
                    await _quietly(committer.stop())
                    raise
                self._committers[name] = committer
            committer.assign(list(tps))
            committer.pause(*tps)  # it never fetches; it only commits
            try:
                await committer.commit(tps)
            except KafkaError as exc:
                raise self._commit_failed(group, exc) from exc

    def _commit_failed(self, group: str, exc: KafkaError) -> LogError:
        if isinstance(exc, CommitFailedError):
            return LogError(
                f"cannot commit offsets for group {group!r}: the group has live members "
                f"elsewhere (only a partition's owner can commit while it runs); {exc}"
            )
        return LogWriteFailed(f"cannot commit offsets for group {group!r}: {exc}")

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        admin, _, _ = self._started()
        await self._count(topic)
        name = self.topic_name(topic)
        try:
            found = await self._retrying(
                lambda: admin.list_consumer_group_offsets(self.group_name(group))
            )
        except KafkaError as exc:
            raise LogError(f"cannot read committed offsets of group {group!r}: {exc}") from exc
        return {
            tp.partition: int(meta.offset)
            for tp, meta in found.items()
            if tp.topic == name and meta.offset >= 0
        }


class _Listener(ConsumerRebalanceListener):
    def __init__(self, member: _KafkaMembership) -> None:
        self._member = member

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._member._revoked()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._member._assigned(assigned)


class _KafkaMembership(Membership):
    """One member of a Kafka consumer group, subscribed to one topic.

    The engine's callbacks run one at a time, in order (`_serially`):

    * revoke: awaited inside aiokafka's rebalance, before this member
      rejoins, so a partition is given up before anyone else gets it (all
      members' revokes precede all assigns). Heartbeats continue meanwhile,
      up to the rebalance timeout (max_poll_interval_ms by default).
    * assign: aiokafka calls the listener after SyncGroup but before it
      restarts heartbeats, so a long on_assign there (the engine rebuilds
      partitions) would let the session expire. It runs in a task instead,
      right after; a following revoke waits for it.

    The member never consumes through this consumer (the engine reads with
    `Log.read`): its partitions are paused, and a background task keeps
    calling getmany so aiokafka does not leave the group for not polling
    within max_poll_interval_ms.
    """

    def __init__(self, log_: KafkaLog, group: str, topic: str,
                 on_assign: AssignCallback, on_revoke: RevokeCallback) -> None:
        self._log = log_
        self._group = log_.group_name(group)
        self._topic = topic
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._consumer: AIOKafkaConsumer | None = None
        self._assignment = Assignment(frozenset(), 0)
        self._held = False  # the engine was told about self._assignment
        self._left = False
        self._closing = False
        self._joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_op: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None

    @property
    def assignment(self) -> Assignment:
        return self._assignment

    async def _join(self) -> None:
        consumer = AIOKafkaConsumer(**self._log.consumer_kwargs(group_id=self._group))
        self._consumer = consumer
        await self._log._bounded(consumer.start())
        consumer.subscribe([self._topic], listener=_Listener(self))
        self._poller = asyncio.create_task(self._keep_polling(),
                                           name=f"stepline-kafka-member:{self._group}")
        await self._joined

    async def _keep_polling(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self._closing:
            try:
                # Everything assigned is paused: this returns nothing, but it
                # is the poll that keeps the member in the group.
                await consumer.getmany(timeout_ms=1000)
            except asyncio.CancelledError:
                raise
            except ConsumerStoppedError:
                return
            except Exception as exc:  # noqa: BLE001 - report and keep the seat
                if not self._joined.done():
                    self._joined.set_exception(
                        LogError(f"joining group {self._group!r} failed: {exc}")
                    )
                    return
                log.warning("kafka group member poll failed", group=self._group,
                            error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)

    def _serially(self, op: Callable[[], Any]) -> asyncio.Task[None]:
        prev = self._last_op

        async def run() -> None:
            if prev is not None:
                await asyncio.gather(prev, return_exceptions=True)
            await op()

        self._last_op = task = asyncio.get_running_loop().create_task(run())
        return task

    def _assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is None or self._closing:
            return
        consumer.pause(*assigned)
        try:
            generation = _group_generation(consumer)
        except LogError as exc:
            if not self._joined.done():
                self._joined.set_exception(exc)
            raise
        assignment = Assignment(
            frozenset(tp.partition for tp in assigned if tp.topic == self._topic), generation
        )

        async def deliver() -> None:
            if self._left or self._closing:
                return
            self._assignment = assignment
            self._held = True
            try:
                await self._on_assign(assignment)
            except Exception as exc:  # noqa: BLE001
                if not self._joined.done():
                    self._joined.set_exception(exc)
                    return
                log.error("on_assign failed", group=self._group, topic=self._topic,
                          partitions=sorted(assignment.partitions),
                          generation=assignment.generation,
                          error=f"{type(exc).__name__}: {exc}")
            if not self._joined.done():
                self._joined.set_result(None)

        self._serially(deliver)

    async def _revoked(self) -> None:
        async def revoke() -> None:
            if self._left or self._closing or not self._held:
                return
            self._held = False
            try:
                await self._on_revoke(self._assignment.partitions)
            except Exception as exc:  # noqa: BLE001 - a rebalance must go on
                log.error("on_revoke failed", group=self._group, topic=self._topic,
                          error=f"{type(exc).__name__}: {exc}")

        await self._serially(revoke)

    async def leave(self) -> None:
        if self._left:
            return

        async def leave() -> None:
            if self._left:
                return
            self._left = True
            if self._held:
                self._held = False
                await self._on_revoke(self._assignment.partitions)

        try:
            await self._serially(leave)
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        """Leave the group without telling the engine (close, failed join)."""
        if self._closing:
            return
        self._closing = True
        if not self._joined.done():
            self._joined.cancel()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._consumer is not None:
            await _quietly(self._consumer.stop())  # sends LeaveGroup
        if self in self._log._members:
            self._log._members.remove(self)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if future.done():
        return
    if isinstance(exc, Exception):
        future.set_exception(exc)
    else:
        future.cancel()


async def _noop() -> None:
    return None


async def _quietly(*aws: Any) -> None:
    """Await clean-up steps; their failures must not mask the real error."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, (Exception, asyncio.CancelledError)):
            raise r
