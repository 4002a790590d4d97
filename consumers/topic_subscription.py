"""`stepline.KafkaTopic`: a subscription to a Kafka topic Stepline does not own.

    @sl.task(on=sl.KafkaTopic("orders", where={"status": "paid"}))
    async def ship(order: dict) -> None: ...

It reads like `sl.Subscription("user.created", where=...)`, its neighbour for
Stepline's own domain events, and takes the same `where=` patterns
(consumers/patterns.py). What is here is the declaration: checked once, when
the task is defined, and the decoding of one record's value. Reading the
topic is consumers/external.py.

A value is JSON unless `avro=` gives its Avro writer schema (a path to an
`.avsc` file or the schema as a dict), decoded with fastavro;
`confluent=True` first strips the 5-byte frame of Confluent's serializers
(a 0 byte and a 4-byte schema id; the id is not looked up: the given schema
is the writer schema of every record). The task's payload is the value as
JSON would carry it: Avro `bytes` and `fixed` as base64 text, timestamps and
dates as ISO-8601 text, decimals and UUIDs as text; `where=` sees that same
payload.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import fastavro
from pydantic_core import to_json

from stepline.consumers.patterns import Matcher, compile_where
from stepline.errors import TaskDefinitionError

__all__ = ["KafkaTopic", "MalformedRecord", "check_topic_subscriptions"]

AvroSchema = str | os.PathLike[str] | Mapping[str, Any]

# Kafka's own rule for topic names (kafka.common.internals.Topic).
_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_TOPIC_MAX = 249
_CONFLUENT_FRAME = 5


class MalformedRecord(ValueError):
    """A record's value is not what its subscription says it is; `reason` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class KafkaTopic:
    """Start a task for every record of the Kafka topic `topic` whose value matches `where`.

    For topics other services write (Stepline's own domain events are
    `Subscription`'s). Values are JSON, or Avro when `avro=` gives the writer
    schema (an `.avsc` path or a dict; `confluent=True` for values framed by
    Confluent's serializers). `where` is a pattern or a callable, as for
    `Subscription`. Runs are once per record. The first start begins at the
    end of the topic, as a Kafka consumer does; `since=timedelta(days=7)`
    begins a week back. Only the Kafka backend has such topics (see
    docs/external-topics.md).
    """

    topic: str
    where: Any = None
    avro: AvroSchema | None = None
    confluent: bool = False
    since: timedelta | None = None
    _where: Matcher = field(init=False, repr=False, compare=False)
    _schema: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        t = self.topic
        if not isinstance(t, str) or not t or len(t) > _TOPIC_MAX or t in (".", "..") \
                or not set(t) <= _TOPIC_CHARS:
            raise TaskDefinitionError(
                f"KafkaTopic({t!r}): not a Kafka topic name (1 to {_TOPIC_MAX} letters, digits, "
                "'.', '_' and '-')")
        if self.since is not None and (not isinstance(self.since, timedelta) or self.since <= timedelta(0)):
            raise TaskDefinitionError(f"KafkaTopic({t!r}, since={self.since!r}): since must be a positive timedelta")
        if self.confluent and self.avro is None:
            raise TaskDefinitionError(
                f"KafkaTopic({t!r}, confluent=True): Confluent framing wraps Avro; give the writer schema with avro=")
        object.__setattr__(self, "_where", compile_where(self.where))
        object.__setattr__(self, "_schema", None if self.avro is None else _load_avro(t, self.avro))

    @property
    def decoding(self) -> str:
        """How values are read, as text: equal for subscriptions that read alike."""
        if self._schema is None:
            return "json"
        return f"avro{'+confluent' if self.confluent else ''}:{json.dumps(self._schema, sort_keys=True)}"

    def decode(self, value: bytes) -> Any:
        """The payload a record's value gives; MalformedRecord when it does not decode."""
        if self._schema is None:
            try:
                return json.loads(value)
            except ValueError as exc:  # UnicodeDecodeError is one too
                raise MalformedRecord(f"not JSON: {exc}") from None
        body = value
        if self.confluent:
            if len(value) < _CONFLUENT_FRAME or value[0] != 0:
                raise MalformedRecord("not in Confluent's wire format (a 0 byte, a 4-byte schema id, then Avro)")
            body = value[_CONFLUENT_FRAME:]
        buf = io.BytesIO(body)
        try:
            decoded = fastavro.schemaless_reader(buf, self._schema, None)
        except Exception as exc:  # fastavro raises what the bytes lead it to
            raise MalformedRecord(f"not Avro of the given writer schema: {type(exc).__name__}: {exc}") from None
        if buf.tell() != len(body):
            raise MalformedRecord(
                f"not Avro of the given writer schema: {len(body) - buf.tell()} bytes left after the record")
        # As JSON carries it, so `where=` sees what the run will.
        return json.loads(to_json(_base64_bytes(decoded)))

    def matches(self, data: Any) -> bool:
        return bool(self._where(data if isinstance(data, dict) else {}))


def _base64_bytes(value: Any) -> Any:
    """Avro `bytes` and `fixed` as standard base64 text (pydantic's own is URL-safe)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: _base64_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_base64_bytes(v) for v in value]
    return value


def _load_avro(topic: str, spec: AvroSchema) -> Any:
    where = f"KafkaTopic({topic!r}, avro=...)"
    source = "the schema"
    if isinstance(spec, Mapping):
        schema: Any = dict(spec)
    elif isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        source = str(path)
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise TaskDefinitionError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise TaskDefinitionError(f"{where}: {path} is not JSON: {exc}") from None
    else:
        raise TaskDefinitionError(
            f"{where}: avro= takes the writer schema, as a path to an .avsc file or a dict; got {spec!r}")
    try:
        return fastavro.parse_schema(schema)
    except Exception as exc:  # fastavro's several schema errors
        raise TaskDefinitionError(f"{where}: {source} is not an Avro schema: {type(exc).__name__}: {exc}") from None


def check_topic_subscriptions(task_id: str, subs: Sequence[KafkaTopic]) -> None:
    """One consumer group reads a topic for a task, so its subscriptions to one
    topic must decode alike and start alike; `where` may differ (any match runs)."""
    first: dict[str, KafkaTopic] = {}
    for s in subs:
        other = first.setdefault(s.topic, s)
        for what, get in _MUST_AGREE:
            if get(s) != get(other):
                raise TaskDefinitionError(
                    f"task {task_id!r}: its KafkaTopic({s.topic!r}) subscriptions differ in {what}; "
                    "one consumer group reads the topic for the task, so they must agree")


_MUST_AGREE: tuple[tuple[str, Callable[[KafkaTopic], Any]], ...] = (
    ("avro=/confluent=", lambda s: s.decoding),
    ("since=", lambda s: s.since),
)
