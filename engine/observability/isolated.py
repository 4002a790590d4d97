"""Spans of isolated attempts: made in the child process, ended in the worker's provider.

An attempt of a task with `isolation="process"` runs its body in a fresh
interpreter (engine/runtime/isolation.py), while its `stepline.run` span is
the worker's. The worker hands the child that span's context
(`parent_carrier`, in its `Init`); the child records its step spans (and any
span the task's own code makes through the global API) with an SDK provider
of its own whose only processor sends each finished span back over the
socket (`ChildSpans`); the worker hands them, ids unchanged, to the span
processors of its own provider (`replay`). So an isolated attempt's spans
go wherever the worker's go, sampled and exported by the worker's
configuration, with nothing to configure in the child, and a span id the
child propagated on (an HTTP call from a step) is the one exported.

Only an SDK provider (opentelemetry-sdk's `TracerProvider`) takes spans
made elsewhere; with another provider the child's spans are dropped, with
one warning. Step durations measured in the child are not in the
`stepline.step.duration` histogram.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from stepline.observability import messaging, tracing

__all__ = ["ChildSpans", "PortableSpan", "parent_carrier", "replay"]

_log = logging.getLogger(__name__)

# A finished span as plain data: both ends run the same build, so the
# shape needs no version (the pickled wire of engine/runtime/isolation_wire.py).
PortableSpan = dict[str, Any]


def parent_carrier() -> dict[str, str] | None:
    """The current span's context (the attempt's) for the child; None when untraced."""
    if not tracing.tracing_on():
        return None
    traceparent, extra = messaging.inject({})
    if traceparent is None:
        return None
    return {"traceparent": traceparent, **extra}


def _context(c: SpanContext) -> tuple[int, int, int, tuple[tuple[str, str], ...], bool]:
    return c.trace_id, c.span_id, int(c.trace_flags), tuple(c.trace_state.items()), c.is_remote


def _span_context(t: Sequence[Any]) -> SpanContext:
    return SpanContext(t[0], t[1], is_remote=t[4], trace_flags=TraceFlags(t[2]), trace_state=TraceState(list(t[3])))


def portable(span: ReadableSpan) -> PortableSpan:
    ctx = span.get_span_context()
    assert ctx is not None  # an SDK span always has one
    scope = span.instrumentation_scope
    return {
        "name": span.name,
        "context": _context(ctx),
        "parent": None if span.parent is None else _context(span.parent),
        "kind": span.kind.value,
        "start": span.start_time,
        "end": span.end_time,
        "attributes": dict(span.attributes or {}),
        "events": [(e.name, e.timestamp, dict(e.attributes or {})) for e in span.events],
        "links": [(_context(link.context), dict(link.attributes or {})) for link in span.links],
        "status": (span.status.status_code.value, span.status.description),
        "scope": None if scope is None else (scope.name, scope.version),
    }


class _Forward(SpanProcessor):
    def __init__(self, send: Callable[[list[PortableSpan]], None]) -> None:
        self._send = send

    def on_end(self, span: ReadableSpan) -> None:
        self._send([portable(span)])


class ChildSpans:
    """The child's tracing: an SDK provider whose spans go back to the worker,
    and the worker's attempt span as the parent of the steps here."""

    def __init__(self, carrier: Mapping[str, str], task_id: str, send: Callable[[list[PortableSpan]], None]) -> None:
        self.provider = SdkTracerProvider(shutdown_on_exit=False)
        self.provider.add_span_processor(_Forward(send))
        tracing.use_tracer_provider(self.provider)
        # The task's own spans (trace.get_tracer(...)) too, unless the app
        # installed a provider of its own at import.
        if tracing.global_tracer_provider() is None:
            trace.set_tracer_provider(self.provider)
        self.attempt = tracing.adopt_attempt(carrier, task_id)

    def close(self) -> None:
        self.attempt.close()


def _status(code: int, description: str | None) -> Status:
    status_code = StatusCode(code)
    return Status(status_code, description if status_code is StatusCode.ERROR else None)


_warned = False


def replay(batch: Sequence[PortableSpan]) -> None:
    """Hand spans a child finished to this process's span processors, as they were."""
    global _warned
    provider = tracing.current_tracer_provider()
    processor = getattr(provider, "_active_span_processor", None)  # the SDK's; no public way in
    if processor is None:
        if not _warned and provider is not None:
            _warned = True
            _log.warning("spans of isolated attempts need opentelemetry-sdk's TracerProvider; %s "
                         "takes no spans made elsewhere, so they are dropped", type(provider).__name__)
        return
    resource = getattr(provider, "resource", None)
    for s in batch:
        scope = s["scope"]
        span = ReadableSpan(
            s["name"], context=_span_context(s["context"]),
            parent=None if s["parent"] is None else _span_context(s["parent"]),
            resource=resource, attributes=s["attributes"],
            events=[SpanEvent(name, attributes, timestamp) for name, timestamp, attributes in s["events"]],
            links=[Link(_span_context(c), attributes) for c, attributes in s["links"]],
            kind=SpanKind(s["kind"]), status=_status(*s["status"]),
            start_time=s["start"], end_time=s["end"],
            instrumentation_scope=None if scope is None else InstrumentationScope(scope[0], scope[1]),
        )
        processor.on_end(span)
