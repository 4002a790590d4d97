"""Where spans cross the log: messaging attributes and trace context in the envelope.

OpenTelemetry's messaging semantic conventions describe a record crossing a
broker: `messaging.system`, `messaging.operation.type` ("send" where a
record is appended, "process" where a worker acts on it),
`messaging.destination.name` (the topic), `messaging.destination.partition.id`,
`messaging.message.id` and, on Kafka, `messaging.kafka.offset`. Stepline's
embedded logs are not brokers the conventions name, so they say
`stepline.sqlite` and `stepline.memory` (a system outside the list is
spelled as its own name, namespaced).

Trace context travels in the envelope: `traceparent` (W3C, the field is
named for it) and `extra["tracestate"]`, whatever propagators are set, so
every worker can parent its spans. What the application's propagators
(OTEL_PROPAGATORS, read by `opentelemetry.propagate`) write besides, such as
`baggage` or B3's `b3`, goes in `extra["propagation.<field>"]`, is extracted
with those same propagators on the worker and copied into the Kafka
record headers (engine/log/headers.py). A run started by an event or a
schedule links to its cause's context: `extra["link.traceparent"]` and
`extra["link.tracestate"]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.trace import Link, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from stepline.log import headers

__all__ = [
    "Destination",
    "PROPAGATION",
    "Propagated",
    "context_of",
    "inject",
    "link_to",
    "messaging_system",
    "propagated",
    "traceparent_of",
]

# Attribute names of the messaging conventions (semantic conventions 1.27+).
SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
PARTITION = "messaging.destination.partition.id"
MESSAGE_ID = "messaging.message.id"
KAFKA_OFFSET = "messaging.kafka.offset"
KAFKA_KEY = "messaging.kafka.message.key"

# Envelope `extra` keys. Never rename: events on the log keep them.
TRACESTATE = "tracestate"
PROPAGATION = headers.PROPAGATION  # + the field's name, also its Kafka header
LINK_TRACEPARENT = "link.traceparent"
LINK_TRACESTATE = "link.tracestate"

_W3C = TraceContextTextMapPropagator()
_W3C_FIELDS = frozenset({"traceparent", "tracestate"})


def messaging_system(log_url: str) -> str:
    """`messaging.system` of a log, by its URL's scheme."""
    scheme = log_url.partition(":")[0].lower()
    return "kafka" if scheme == "kafka" else f"stepline.{scheme or 'log'}"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a record goes or came from: the log's system, topic and partition."""

    system: str
    topic: str
    partition: int

    def attributes(self, operation: str, name: str, message_id: str, offset: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            SYSTEM: self.system, OPERATION_TYPE: operation, OPERATION_NAME: name,
            DESTINATION: self.topic, PARTITION: str(self.partition), MESSAGE_ID: message_id,
        }
        if offset is not None and self.system == "kafka":
            out[KAFKA_OFFSET] = offset
        return out


def traceparent_of(ctx: otel_context.Context) -> str | None:
    """The W3C traceparent of `ctx`'s span alone (what the events of an attempt carry)."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, ctx)
    return carrier.get("traceparent")


def inject(extra: Mapping[str, str], ctx: otel_context.Context | None = None) -> tuple[str | None, dict[str, str]]:
    """(traceparent, extra) of an envelope written in `ctx` (the current one by default)."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, ctx)
    fields: dict[str, str] = {}
    propagate.inject(fields, ctx)  # the application's propagators (OTEL_PROPAGATORS)
    out = dict(extra)
    if "tracestate" in carrier:
        out[TRACESTATE] = carrier["tracestate"]
    for k, v in fields.items():
        if k not in _W3C_FIELDS:
            out[PROPAGATION + k] = v
    return carrier.get("traceparent"), out


@dataclass(frozen=True, slots=True)
class Propagated:
    """The trace context an envelope carries: its own, and the cause it links to."""

    traceparent: str
    tracestate: str | None = None
    fields: tuple[tuple[str, str], ...] = ()
    link: tuple[str, str | None] | None = None


def propagated(traceparent: str | None, extra: Mapping[str, str]) -> Propagated | None:
    if traceparent is None:
        return None
    fields = tuple((k[len(PROPAGATION):], v) for k, v in extra.items() if k.startswith(PROPAGATION))
    link_tp = extra.get(LINK_TRACEPARENT)
    return Propagated(traceparent, extra.get(TRACESTATE), fields,
                      (link_tp, extra.get(LINK_TRACESTATE)) if link_tp else None)


def context_of(p: Propagated | None) -> otel_context.Context:
    """A fresh context (never the caller's) whose parent is `p`'s span, with
    what the application's propagators carried (baggage, say)."""
    base = otel_context.Context()
    if p is None:
        return base
    carrier = {"traceparent": p.traceparent}
    if p.tracestate:
        carrier["tracestate"] = p.tracestate
    base = _W3C.extract(carrier, base)
    if p.fields:
        base = propagate.extract(dict(p.fields), base)
    return base


def link_to(traceparent: str, tracestate: str | None, attributes: Mapping[str, Any] | None = None) -> Link | None:
    """A span link to a W3C context; None when it does not parse."""
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    ctx = get_current_span(_W3C.extract(carrier, otel_context.Context())).get_span_context()
    if not ctx.is_valid:
        return None
    return Link(ctx, dict(attributes) if attributes else None)
