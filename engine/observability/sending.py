"""Spans where records are sent to the log: a publish, a trigger, a schedule's tick.

    stepline.publish <event>    PRODUCER  a DomainEvent appended (Client.publish)
    stepline.trigger            PRODUCER  a RunTriggered appended (Client.trigger, the router, a schedule)
    stepline.schedule <task>    PRODUCER  a schedule's tick, the cause of its run

Each writes its context into the envelope it appends
(engine/observability/messaging.py) and says where the record went in
messaging attributes. A trigger made under a cause (engine/core/causes.py:
the router for a published event, the scheduler for a tick) starts a trace
of its own that links to the cause, rather than joining the caller's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from stepline.core.causes import Cause, current_cause
from stepline.core.events import Event
from stepline.observability import messaging, tracing
from stepline.observability.messaging import Destination, Propagated
from stepline.observability.tracing import RUN_ID, SCHEDULE, SCHEDULED_AT, TASK_ID

__all__ = ["Append", "tick_cause", "traced_publish", "traced_trigger", "trigger_context"]

Append = Callable[[Event], Awaitable[int]]


async def traced_publish(ev: Event, append: Append, where: Destination) -> int:
    """Append a DomainEvent inside a `stepline.publish <name>` span, carrying its
    context: the runs it starts link to this span. A child of the caller's context."""
    tracer = tracing.tracer()
    if tracer is None:
        return await append(ev)
    name = getattr(ev.body, "name", ev.type)
    attributes = where.attributes("send", "publish", ev.event_id)
    with tracer.start_as_current_span(f"stepline.publish {name}", kind=SpanKind.PRODUCER,
                                      attributes=attributes) as span:
        traceparent, extra = messaging.inject(ev.extra)
        offset = await append(replace(ev, traceparent=traceparent, extra=extra))
        if where.system == "kafka":
            span.set_attribute(messaging.KAFKA_OFFSET, offset)
        return offset


async def traced_trigger(ev: Event, append: Append, where: Destination) -> int:
    """Append a RunTriggered inside a `stepline.trigger` span, carrying its context.

    The span is a child of the caller's current context (a web request's
    span, or the step of a parent run), except under a cause (the router,
    a schedule): then it starts a trace of its own that links to the cause.
    """
    tracer = tracing.tracer()
    if tracer is None:
        return await append(ev)
    attributes: dict[str, Any] = {RUN_ID: ev.run_id, TASK_ID: ev.task_id,
                                  **where.attributes("send", "trigger", ev.event_id)}
    cause = current_cause()
    link = None if cause is None else messaging.link_to(cause.traceparent, cause.tracestate,
                                                         _cause_attributes(cause, where.system))
    context = None if link is None else otel_context.Context()
    with tracer.start_as_current_span("stepline.trigger", context=context, kind=SpanKind.PRODUCER,
                                      attributes=attributes, links=() if link is None else (link,)) as span:
        traceparent, extra = messaging.inject(ev.extra)
        if link is not None and cause is not None:
            extra[messaging.LINK_TRACEPARENT] = cause.traceparent
            if cause.tracestate:
                extra[messaging.LINK_TRACESTATE] = cause.tracestate
        offset = await append(replace(ev, traceparent=traceparent, extra=extra))
        if where.system == "kafka":
            span.set_attribute(messaging.KAFKA_OFFSET, offset)
        return offset


def _cause_attributes(cause: Cause, system: str) -> dict[str, Any]:
    out: dict[str, Any] = dict(cause.attributes)
    if cause.topic is not None and cause.partition is not None and cause.message_id is not None:
        out.update(Destination(system, cause.topic, cause.partition).attributes(
            "process", "route", cause.message_id, cause.offset))
    return out


def tick_cause(task_id: str, schedule: str, tick_ms: int) -> Cause | None:
    """A schedule's tick as a cause: a `stepline.schedule <task>` span (a root:
    nothing published a tick) for the tick's run to link to. None untraced."""
    tracer = tracing.tracer()
    if tracer is None:
        return None
    span = tracer.start_span(f"stepline.schedule {task_id}", context=otel_context.Context(),
                             kind=SpanKind.PRODUCER,
                             attributes={TASK_ID: task_id, SCHEDULE: schedule, SCHEDULED_AT: tick_ms})
    try:
        traceparent, extra = messaging.inject({}, trace.set_span_in_context(span))
    finally:
        span.end()
    if traceparent is None:
        return None
    return Cause(traceparent, extra.get(messaging.TRACESTATE), attributes={SCHEDULE: schedule, SCHEDULED_AT: tick_ms})


def trigger_context(ev: Event) -> Propagated | None:
    """What a worker keeps of a RunTriggered to parent (and link) the run's attempts."""
    return messaging.propagated(ev.traceparent, ev.extra)
