"""The options of a kafka:// log URL: what each means, and checking them
into the keyword arguments of `KafkaLog` (engine/log/kafka.py)."""

from __future__ import annotations

from typing import Any

from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

from ..errors import InvalidLogUrl
from .kafka_clients import DEFAULT_LINGER_MS, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_REQUEST_SIZE, _valid_name
from .redact import redact_url

__all__ = ["URL_OPTIONS", "url_settings"]

# name -> help; anything else in a kafka:// URL is an InvalidLogUrl.
URL_OPTIONS: dict[str, str] = {
    # Stepline's own
    "namespace": "prefix for topic and group names on the broker (NS.topic)",
    "partitions": "partition count of topics this log creates (default: the engine's)",
    "replication_factor": "replicas per partition of created topics (default: broker's)",
    "retention_ms": "retention.ms of created topics (default -1: keep forever)",
    "min_insync_replicas": "min.insync.replicas of created topics (default: broker's)",
    "durability": "production: created topics get replication_factor=3 and "
                  "min_insync_replicas=2 unless those are set; broker (default): the broker's",
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


def url_settings(url: str, options: dict[str, str]) -> dict[str, Any]:
    """KafkaLog's keyword arguments from a URL's options (see `URL_OPTIONS`),
    each checked in turn; the first bad one is an InvalidLogUrl."""
    common, producer, consumer = _numbers_and_names(url, options)
    _check_security(url, options, common)
    _check_producer(url, options, producer)
    _check_consumer(url, options, consumer)
    ssl_files, check_hostname = _tls(url, options)
    return {
        **_log_settings(url, options),
        "client_options": common,
        "producer_options": producer,
        "consumer_options": consumer,
        "ssl_files": ssl_files,
        "ssl_check_hostname": check_hostname,
        "url": redact_url(url),
    }


def _numbers_and_names(
    url: str, options: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The options passed through to every client, the producer and the consumers."""
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
    return common, producer, consumer


def _check_security(url: str, options: dict[str, str], common: dict[str, Any]) -> None:
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


def _check_producer(url: str, options: dict[str, str], producer: dict[str, Any]) -> None:
    if "compression_type" in options:
        kind = options["compression_type"].lower()
        if kind not in _COMPRESSION:
            raise InvalidLogUrl(
                f"option compression_type={options['compression_type']!r} in log URL "
                f"{redact_url(url)!r} must be one of {', '.join(_COMPRESSION)}"
            )
        producer["compression_type"] = kind


def _check_consumer(url: str, options: dict[str, str], consumer: dict[str, Any]) -> None:
    if "partition_assignment_strategy" in options:
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


def _tls(url: str, options: dict[str, str]) -> tuple[dict[str, str], bool]:
    """The TLS files (cafile, certfile, ...) and whether to check host names."""
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
    return {k.removeprefix("ssl_"): v for k, v in ssl_options.items()}, check_hostname


def _log_settings(url: str, options: dict[str, str]) -> dict[str, Any]:
    """Stepline's own options: names, created topics, timeouts, transactions."""
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
    rf, mir = _replication(url, options)
    retention = options.get("retention_ms")
    parts = options.get("partitions")
    return {
        "namespace": namespace,
        "partitions": None if parts is None else _int_option(url, "partitions", parts, minimum=1),
        "replication_factor": rf,
        "retention_ms": (
            None if retention is None
            else _int_option(url, "retention_ms", retention, minimum=-1)
        ),
        "min_insync_replicas": mir,
        "connect_timeout": _int_option(
            url, "connect_timeout_ms", options.get("connect_timeout_ms", "10000"), minimum=1
        ) / 1000,
        "cursors_per_partition": _int_option(
            url, "cursors_per_partition", options.get("cursors_per_partition", "4"),
            minimum=1,
        ),
        "transactions": transactions in ("true", "1", "yes"),
        "transaction_timeout_ms": _int_option(
            url, "transaction_timeout_ms", options.get("transaction_timeout_ms", "60000"),
            minimum=1000,
        ),
    }


# durability=NAME: replication_factor and min_insync_replicas of created topics.
# production: three copies, and a write is acknowledged once two have it, so
# one broker can be lost (or restarted for an upgrade) without losing an
# acknowledged event or stopping writes.
DURABILITY_PRESETS: dict[str, tuple[int, int] | None] = {
    "broker": None,  # the broker's default.replication.factor and min.insync.replicas
    "production": (3, 2),
}


def _replication(url: str, options: dict[str, str]) -> tuple[int, int | None]:
    """(replication_factor, min_insync_replicas) of created topics: -1 and
    None leave them to the broker. Explicit options beat the preset."""
    name = options.get("durability", "broker").lower()
    if name not in DURABILITY_PRESETS:
        raise InvalidLogUrl(
            f"option durability={options['durability']!r} in log URL {redact_url(url)!r} "
            f"must be one of {', '.join(DURABILITY_PRESETS)}"
        )
    rf, mir = DURABILITY_PRESETS[name] or (-1, None)
    if "replication_factor" in options:
        rf = _int_option(url, "replication_factor", options["replication_factor"], minimum=1)
    if "min_insync_replicas" in options:
        mir = _int_option(url, "min_insync_replicas", options["min_insync_replicas"], minimum=1)
    if rf != -1 and mir is not None and mir > rf:
        raise InvalidLogUrl(
            f"min_insync_replicas={mir} in log URL {redact_url(url)!r} is more than "
            f"replication_factor={rf}: every acks=all write would fail (NotEnoughReplicas); "
            "keep it below the replication factor (production: 3 and 2)"
        )
    return rf, mir
