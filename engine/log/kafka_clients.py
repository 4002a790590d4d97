"""How a `KafkaLog` configures and connects its aiokafka clients.

`KafkaClients` holds a log's settings (brokers, namespace, topic defaults,
client options, TLS) and builds the keyword arguments of every client the
log makes: the admin client, the producers, the readers and the group
members (engine/log/kafka.py), the shared tail (kafka_tail.py) and the
transactional writers (kafka_txn.py). Those parts depend on this module,
never on `KafkaLog`.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Sequence
from typing import Any

from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from ..errors import LogUnavailable

__all__ = ["KafkaClients", "DEFAULT_LINGER_MS", "DEFAULT_MAX_BATCH_SIZE", "DEFAULT_MAX_REQUEST_SIZE"]

# Batching: our own flusher already merges concurrent appends, so linger is
# only a small extra window; batches may be much larger than aiokafka's
# 16 KiB default (the broker's message.max.bytes default is ~1 MiB).
DEFAULT_LINGER_MS = 2
DEFAULT_MAX_BATCH_SIZE = 512 * 1024
DEFAULT_MAX_REQUEST_SIZE = 1024 * 1024


class KafkaClients:
    """A Kafka log's settings, and the clients' keyword arguments built from them."""

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
        self._build()

    def _build(self) -> None:
        """What a subclass builds on the settings (KafkaLog: its clients' parts)."""

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

    # --- connecting ---

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


def _valid_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "._-" for c in name)


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
