"""The log port and its backends, opened by URL.

    memory://NAME                      in-process, shared by NAME (tests)
    sqlite:///relative/path.db         embedded, one file (the default)
    sqlite:////absolute/path.db?synchronous=normal&poll_interval_ms=10
    kafka://host:9092[,host2:9092]?namespace=app&partitions=12&replication_factor=3
        &security_protocol=SASL_SSL&sasl_mechanism=SCRAM-SHA-512
        &sasl_plain_username=u&sasl_plain_password=p&ssl_cafile=/path/ca.pem
                                       Apache Kafka; options in kafka.URL_OPTIONS

A new backend is one `_open_<scheme>` function and one entry in `_OPENERS`.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable

from ..errors import InvalidLogUrl
from .base import Assignment, Log, Membership, Record, TopicSpec, partition_for
from .redact import redact_url

__all__ = [
    # opening a log
    "open_log",
    "DEFAULT_LOG_URL",
    "absent_file",
    # the port
    "Log",
    "Record",
    "TopicSpec",
    "Assignment",
    "Membership",
    "partition_for",
    # showing a URL
    "redact_url",
]

DEFAULT_LOG_URL = "sqlite:///.stepline/stepline.db"


def _options(url: str, query: str, allowed: dict[str, str]) -> dict[str, str]:
    """The URL's query options, each checked against `allowed` (name -> help)."""
    options: dict[str, str] = {}
    for name, values in urllib.parse.parse_qs(query, keep_blank_values=True).items():
        if name not in allowed:
            known = ", ".join(f"{k} ({v})" for k, v in allowed.items()) or "none"
            raise InvalidLogUrl(f"unknown option {name!r} in log URL {url!r}; options: {known}")
        options[name] = values[-1]
    return options


def _number(url: str, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise InvalidLogUrl(f"option {name}={text!r} in log URL {url!r} must be a positive number")
    return value


def _open_memory(url: str, parts: urllib.parse.SplitResult) -> Log:
    from .memory import MemoryLog  # lazy: start-up loads only the backend a URL names

    _options(url, parts.query, {})
    name = parts.netloc + parts.path
    return MemoryLog(name or "default")


def _open_sqlite(url: str, parts: urllib.parse.SplitResult) -> Log:
    from .sqlite import SqliteLog  # lazy: start-up loads only the backend a URL names

    if parts.netloc:
        raise InvalidLogUrl(
            f"log URL {url!r} has a host {parts.netloc!r}; sqlite URLs have none: use "
            "sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    # Like SQLAlchemy: "sqlite:///" then the path, so a 4th slash means absolute.
    path = urllib.parse.unquote(parts.path[1:])
    if not path or path == ":memory:":
        raise InvalidLogUrl(
            f"log URL {url!r} names no database file; use sqlite:///path/to/file.db "
            "(or memory://NAME for an in-process log)"
        )
    options = _options(
        url,
        parts.query,
        {
            "synchronous": "full (default) or normal",
            "poll_interval_ms": "how often to look for other processes' appends, default 10",
            "busy_timeout_ms": "how long to wait for another process's write lock, default 10000",
        },
    )
    synchronous = options.get("synchronous", "full").lower()
    if synchronous not in ("full", "normal"):
        raise InvalidLogUrl(
            f"option synchronous={synchronous!r} in log URL {url!r} must be 'full' or 'normal'"
        )
    poll_ms = _number(url, "poll_interval_ms", options.get("poll_interval_ms", "10"))
    busy_ms = _number(url, "busy_timeout_ms", options.get("busy_timeout_ms", "10000"))
    return SqliteLog(
        path,
        synchronous="full" if synchronous == "full" else "normal",
        poll_interval=poll_ms / 1000,
        busy_timeout_ms=int(busy_ms),
    )


def _open_kafka(url: str, parts: urllib.parse.SplitResult) -> Log:
    # lazy: aiokafka loads (slowly) only for a kafka:// URL
    from .kafka import URL_OPTIONS, from_url_options

    shown = redact_url(url)
    if "@" in parts.netloc:
        raise InvalidLogUrl(
            f"log URL {shown!r} has credentials before the host; pass them as "
            "sasl_plain_username=...&sasl_plain_password=... options instead"
        )
    if parts.path not in ("", "/"):
        raise InvalidLogUrl(
            f"log URL {shown!r} has a path {parts.path!r}; kafka URLs name brokers only: "
            "kafka://host:9092[,host2:9092]?options"
        )
    servers = [s.strip() for s in parts.netloc.split(",") if s.strip()]
    if not servers:
        raise InvalidLogUrl(
            f"log URL {shown!r} names no broker; use kafka://host:9092[,host2:9092]"
        )
    for server in servers:
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidLogUrl(
                f"broker {server!r} in log URL {shown!r} must be host:port, e.g. localhost:9092"
            )
    try:
        options = _options(url, parts.query, URL_OPTIONS)
    except InvalidLogUrl as exc:
        # The message quotes the URL: never echo a password.
        raise InvalidLogUrl(str(exc).replace(repr(url), repr(shown))) from None
    return from_url_options(url, servers, options)


_OPENERS: dict[str, Callable[[str, urllib.parse.SplitResult], Log]] = {
    "memory": _open_memory,
    "sqlite": _open_sqlite,
    "kafka": _open_kafka,
}
# Schemes we know but cannot open yet; a backend moves from here to _OPENERS.
_PLANNED: dict[str, str] = {}


def open_log(url: str) -> Log:
    """Build the `Log` a URL names; it connects on `start()` / `async with`."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower() if "://" in url else ""
    opener = _OPENERS.get(scheme)
    if opener is not None:
        return opener(url, parts)
    schemes = ", ".join(f"{s}://" for s in _OPENERS)
    why = _PLANNED.get(scheme, "unsupported log URL")
    raise InvalidLogUrl(f"{why}: {url!r}; supported schemes: {schemes} (default {DEFAULT_LOG_URL})")


def absent_file(url: str) -> str | None:
    """The file an embedded log URL names, when it does not exist; else None.

    Opening a sqlite log creates its file (and folders), which a command
    that writes wants; a read of a mistyped URL would instead report an
    empty log and leave files behind. Readers ask here first. Other
    backends have no such file: a Kafka cluster is there or not.
    InvalidLogUrl for a malformed URL, as from `open_log`.
    """
    log = open_log(url)
    if urllib.parse.urlsplit(url).scheme.lower() != "sqlite":
        return None
    from .sqlite import SqliteLog  # loaded already: open_log built one

    assert isinstance(log, SqliteLog)
    return None if os.path.exists(log.path) else log.path
