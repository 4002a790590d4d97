"""The record headers of engine events on Kafka (docs/events.md).

Generic consumers, Kafka's own tools and tracing agents read headers without
decoding Avro, so every engine event appended to a log that keeps headers
(`Log.record_headers`) says what it is there: its type, its run, the schema
that wrote it and, when traced, its W3C trace context and what the
application's propagators wrote besides (OTEL_PROPAGATORS: `baggage`, B3's
`b3`...; kept in the envelope's `extra` as `propagation.<header>`). The
record's key and value are the same with or without them.
"""

from __future__ import annotations

import functools

from stepline.core import codec
from stepline.core.events import Event

from .base import Headers, Log

__all__ = ["PROPAGATION", "RUN_ID", "SCHEMA", "TRACEPARENT", "TRACESTATE", "TYPE", "append_event", "event_headers"]

# Never rename these: consumers outside Stepline filter by them.
TYPE = "stepline.type"  # the body's record name, e.g. RunTriggered
RUN_ID = "stepline.run_id"  # absent for events of no run (DomainEvent, PauseChanged)
SCHEMA = "stepline.schema"  # the writer schema's fingerprint: bytes 2-9 of the value, as hex
TRACEPARENT = "traceparent"  # W3C Trace Context, as OpenTelemetry's Kafka instrumentations name it
TRACESTATE = "tracestate"
# Envelope `extra` keys under this prefix are propagation fields, sent as the
# header named by the rest (engine/observability/messaging.py writes them).
PROPAGATION = "propagation."


@functools.cache
def _leading(type_: str) -> tuple[tuple[str, bytes], tuple[str, bytes]]:
    return (TYPE, type_.encode()), (SCHEMA, codec.fingerprint().hex().encode())


def event_headers(event: Event) -> Headers:
    """The headers of `event` as the current schema encodes it."""
    kind, schema = _leading(event.type)
    if event.run_id:
        out: Headers = (kind, (RUN_ID, event.run_id.encode()), schema)
    else:
        out = (kind, schema)
    if event.traceparent:
        out += ((TRACEPARENT, event.traceparent.encode()),)
        state = event.extra.get("tracestate")
        if state:
            out += ((TRACESTATE, state.encode()),)
        out += tuple((k[len(PROPAGATION):], v.encode()) for k, v in event.extra.items()
                     if k.startswith(PROPAGATION))
    return out


async def append_event(log_: Log, topic: str, partition: int, key: bytes, event: Event) -> int:
    """Append one engine event outside an `Appender` (with its headers where
    the log keeps them); returns its offset once durable."""
    value = codec.encode(event)
    if log_.record_headers:
        offsets = await log_.append(topic, partition, [(key, value)], [event_headers(event)])
    else:
        offsets = await log_.append(topic, partition, [(key, value)])
    return offsets[0]
