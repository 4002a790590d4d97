"""OpenTelemetry: one trace per run, across processes, and the engine's metrics.

Spans of a run:

    stepline.trigger            PRODUCER  where the run was triggered
    └─ stepline.run <task>      CONSUMER  one per attempt, on the worker
       └─ stepline.step <name>  INTERNAL  one per step executed (replayed steps have none)

and, where a run has a cause outside it, `stepline.publish <event>`
(PRODUCER, where a domain event was published) or `stepline.schedule <task>`
(PRODUCER, a schedule's tick): a run the router or a schedule starts is a
trace of its own whose trigger and attempt spans link to that span
(engine/core/causes.py). Spans that cross the log carry the messaging
attributes of engine/observability/messaging.py.

The trigger span's W3C context travels in the RunTriggered envelope
(`traceparent`, and `tracestate` in `extra`), so an attempt on another
process, hours later, joins the trace of the request that triggered it.
Every event an attempt writes carries the attempt span's `traceparent`.

Metrics: `stepline.runs` (attempts by outcome and task),
`stepline.step.duration` (seconds, by task and step), and two gauges read from
the workers of this process: `stepline.queue.depth` (runs ready to start, by
queue) and `stepline.partition.runs` (runs of owned partitions, by state).

Stepline only uses the OpenTelemetry API: it never installs a provider on
import. Without one (the API's default no-op) every hook here returns at
once, and so does everything under OTEL_SDK_DISABLED=true. `stepline
worker`/`serve`/`dev` install exporters from the standard OTEL_* variables
(engine/observability/otel_env.py); tests and embedding applications
point Stepline at a provider of their own with `use_tracer_provider` and
`use_meter_provider`, which leaves the process-global providers alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol
from weakref import WeakSet

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, MeterProvider, NoOpMeterProvider, Observation
from opentelemetry.trace import (
    NoOpTracerProvider,
    ProxyTracerProvider,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    TracerProvider,
)

from stepline.observability import messaging
from stepline.observability.messaging import Destination, Propagated

try:  # where the API keeps the proxy it hands out before a provider is set
    from opentelemetry.metrics._internal import _ProxyMeterProvider
except ImportError:  # pragma: no cover - the API moved it; then only NoOp counts as off
    _ProxyMeterProvider = NoOpMeterProvider  # type: ignore[misc,assignment]  # same role

SCOPE = "stepline"

_log = logging.getLogger(__name__)

# Attribute names, on spans and metrics alike.
RUN_ID = "stepline.run_id"
TASK_ID = "stepline.task_id"
ATTEMPT = "stepline.attempt"
OUTCOME = "stepline.outcome"
STEP = "stepline.step"
STEP_NAME = "stepline.step_name"
QUEUE = "stepline.queue"
STATE = "stepline.state"
SCHEDULE = "stepline.schedule"
SCHEDULED_AT = "stepline.scheduled_at"

# Outcomes that make an attempt span an error.
_ERROR_OUTCOMES = frozenset({"failed", "retrying", "error"})


# --- which providers -------------------------------------------------------------

_tracer_provider: TracerProvider | None = None
_meter_provider: MeterProvider | None = None
_settled = False
_disabled = False
_MISSING = object()


def sdk_disabled() -> bool:
    """OTEL_SDK_DISABLED=true, as the SDK reads it (case-insensitive "true")."""
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def use_tracer_provider(provider: TracerProvider | None) -> None:
    """Trace Stepline through `provider` rather than the global one (None: the global again).

    For tests and applications that keep several providers; the global one
    can be set only once per process.
    """
    global _tracer_provider, _disabled
    _tracer_provider = provider
    _disabled = sdk_disabled()


def use_meter_provider(provider: MeterProvider | None) -> None:
    """Record Stepline's metrics through `provider` rather than the global one (None: the global)."""
    global _meter_provider, _disabled
    _meter_provider = provider
    _disabled = sdk_disabled()


def _settle() -> None:
    """Let the API load providers named by OTEL_PYTHON_*_PROVIDER, once."""
    global _settled, _disabled
    _settled = True
    _disabled = sdk_disabled()
    trace.get_tracer_provider()
    metrics.get_meter_provider()


def global_tracer_provider() -> Any:
    """The process-global tracer provider, None while none is set."""
    # trace.get_tracer_provider() consults os.environ on every call while no
    # provider is set (about 4 µs, an exception inside the mapping): too slow
    # for every attempt. Once settled, read the value it reads.
    if not _settled:
        _settle()
    provider = getattr(trace, "_TRACER_PROVIDER", _MISSING)
    return trace.get_tracer_provider() if provider is _MISSING else provider


def global_meter_provider() -> Any:
    """The process-global meter provider, None while none is set."""
    if not _settled:
        _settle()
    internal = getattr(metrics, "_internal", None)
    provider = getattr(internal, "_METER_PROVIDER", _MISSING)
    return metrics.get_meter_provider() if provider is _MISSING else provider


def current_tracer_provider() -> Any:
    """The provider Stepline traces through: the one given to
    `use_tracer_provider`, else the global one (None while none is set)."""
    return _tracer_provider if _tracer_provider is not None else global_tracer_provider()


_tracer_cache: tuple[object, Tracer] | None = None


def tracer() -> Tracer | None:
    """Stepline's tracer, or None when nothing would record a span."""
    global _tracer_cache
    provider = _tracer_provider if _tracer_provider is not None else global_tracer_provider()
    if _disabled or provider is None or isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider)):
        return None
    cached = _tracer_cache
    if cached is not None and cached[0] is provider:
        return cached[1]
    from stepline.version import __version__

    tracer = provider.get_tracer(SCOPE, __version__)
    _tracer_cache = (provider, tracer)
    return tracer


class _Instruments:
    """Stepline's instruments on one meter provider."""

    def __init__(self, provider: MeterProvider) -> None:
        from stepline.version import __version__

        meter = provider.get_meter(SCOPE, __version__)
        self.runs = meter.create_counter(
            "stepline.runs", unit="{attempt}",
            description="Attempts ended, by outcome (completed, failed, suspended, retrying, cancelled, handed_over)",
        )
        self.step_duration = _histogram(meter, "stepline.step.duration", "Time a step took, checkpoint included")
        meter.create_observable_gauge(
            "stepline.queue.depth", [_observe_queues], unit="{run}",
            description="Runs ready to start in this process's workers, by queue",
        )
        meter.create_observable_gauge(
            "stepline.partition.runs", [_observe_states], unit="{run}",
            description="Runs of the partitions this process's workers own, by state",
        )


# Seconds, as the conventions want durations; the SDK's default buckets
# (0..10,000) are made for milliseconds and would put every step in the first few.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 900.0, 3600.0)


def _histogram(meter: metrics.Meter, name: str, description: str) -> metrics.Histogram:
    try:
        return meter.create_histogram(name, unit="s", description=description,
                                      explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
    except TypeError:  # an API from before the advisory (< 1.30): the SDK's default buckets
        return meter.create_histogram(name, unit="s", description=description)


_instruments_cache: tuple[object, _Instruments] | None = None


def _instruments() -> _Instruments | None:
    global _instruments_cache
    provider = _meter_provider if _meter_provider is not None else global_meter_provider()
    if _disabled or provider is None or isinstance(provider, (_ProxyMeterProvider, NoOpMeterProvider)):
        return None
    cached = _instruments_cache
    if cached is not None and cached[0] is provider:
        return cached[1]
    made = _Instruments(provider)
    _instruments_cache = (provider, made)
    return made


# --- the gauges: what the workers of this process hold ---------------------------


class Observed(Protocol):
    def queue_depths(self) -> dict[str, int]: ...

    def run_counts(self) -> dict[str, int]: ...


_workers: WeakSet[Observed] = WeakSet()


def watch_worker(worker: Observed) -> None:
    """Report this worker in the gauges until `unwatch_worker` (or until it is gone)."""
    _workers.add(worker)
    _instruments()  # so the gauges exist even before the first attempt ends


def unwatch_worker(worker: Observed) -> None:
    _workers.discard(worker)


def _sum(counts: Iterable[dict[str, int]]) -> Tally[str]:
    total: Tally[str] = Tally()
    for c in counts:
        total.update(c)
    return total


def _observe_queues(options: CallbackOptions) -> Iterable[Observation]:
    # May run on the exporter's thread: the workers copy what they read.
    total = _sum(w.queue_depths() for w in list(_workers))
    return [Observation(n, {QUEUE: q}) for q, n in sorted(total.items())]


def _observe_states(options: CallbackOptions) -> Iterable[Observation]:
    total = _sum(w.run_counts() for w in list(_workers))
    return [Observation(n, {STATE: s}) for s, n in sorted(total.items())]


# --- attempts and steps --------------------------------------------------------------


class Attempt:
    """One attempt's span (current while the attempt runs) and its count.

    `start_attempt` returns the shared `NO_ATTEMPT` when nothing records:
    then every method returns at once.
    """

    __slots__ = ("traceparent", "tracer", "instruments", "task_id", "_span", "_tokens", "_ended")

    def __init__(self, tracer: Tracer | None, instruments: _Instruments | None, task_id: str) -> None:
        self.tracer = tracer
        self.instruments = instruments
        self.task_id = task_id
        self.traceparent: str | None = None
        self._span: trace.Span | None = None
        self._tokens: tuple[object, object] | None = None
        self._ended = False

    def _open(self, name: str, parent: Propagated | None, attributes: dict[str, Any]) -> None:
        otel_token: object = None
        if self.tracer is not None:
            # Never the worker's own context: without a trigger context the
            # attempt is the root of a trace of its own.
            base = messaging.context_of(parent)
            link = None if parent is None or parent.link is None else messaging.link_to(*parent.link)
            self._span = self.tracer.start_span(name, context=base, kind=SpanKind.CONSUMER,
                                                attributes=attributes, links=() if link is None else (link,))
            current = trace.set_span_in_context(self._span, base)
            self.traceparent = messaging.traceparent_of(current)
            otel_token = otel_context.attach(current)
        self._tokens = (otel_token, _attempt.set(self))

    def adopt(self, carrier: Mapping[str, str]) -> None:
        """Continue, in an isolated attempt's child process, the attempt whose
        span the parent opened: steps here are children of that span."""
        base = messaging.context_of(messaging.propagated(carrier.get("traceparent"), carrier))
        self.traceparent = carrier.get("traceparent")
        self._tokens = (otel_context.attach(base), _attempt.set(self))
        self._ended = True  # the parent's span has the outcome

    def record_failure(self, exc: BaseException) -> None:
        if self._span is not None:
            self._span.record_exception(exc)

    def ended(self, outcome: str, detail: str = "") -> None:
        """The attempt's outcome is on the log (or recording it failed: "error")."""
        if self._ended or self is NO_ATTEMPT:
            return
        self._ended = True
        if self.instruments is not None and outcome != "error":
            self.instruments.runs.add(1, {TASK_ID: self.task_id, OUTCOME: outcome})
        if self._span is not None:
            self._span.set_attribute(OUTCOME, outcome)
            if outcome in _ERROR_OUTCOMES:
                self._span.set_status(Status(StatusCode.ERROR, detail or outcome))

    def close(self) -> None:
        """End the span and leave its context; an attempt cut short is "interrupted"."""
        if self._tokens is None:
            return
        if self._span is not None:
            if not self._ended:
                self._span.set_attribute(OUTCOME, "interrupted")
            self._span.end()
        otel_token, attempt_token = self._tokens
        self._tokens = None
        _attempt.reset(attempt_token)  # type: ignore[arg-type]  # the token set() gave
        if otel_token is not None:
            otel_context.detach(otel_token)  # type: ignore[arg-type]  # the token attach() gave


NO_ATTEMPT = Attempt(None, None, "")

_attempt: ContextVar[Attempt | None] = ContextVar("stepline_attempt", default=None)


@dataclass(frozen=True, slots=True)
class Trigger:
    """What a worker keeps of a live run's RunTriggered for its attempts' spans."""

    context: Propagated | None
    event_id: str
    where: Destination
    offset: int


def start_attempt(run_id: str, task_id: str, attempt: int, trigger: Trigger | None) -> Attempt:
    """Open the attempt's span, a child of the run's trigger (linked to its
    cause, if any), processing the trigger's record; make it current."""
    spans = tracer()
    instruments = _instruments()
    if spans is None and instruments is None:
        return NO_ATTEMPT
    a = Attempt(spans, instruments, task_id)
    attributes: dict[str, Any] = {RUN_ID: run_id, TASK_ID: task_id, ATTEMPT: attempt}
    if trigger is not None:
        attributes.update(trigger.where.attributes("process", "run", trigger.event_id, trigger.offset))
    a._open(f"stepline.run {task_id}", None if trigger is None else trigger.context, attributes)
    return a


def tracing_on() -> bool:
    """Whether spans are recorded (a worker keeps trigger contexts only then)."""
    return tracer() is not None


def adopt_attempt(carrier: Mapping[str, str], task_id: str) -> Attempt:
    """The attempt of an isolated child: its parent's span is current, its
    steps are spans of this process's tracer (engine/observability/isolated.py)."""
    a = Attempt(tracer(), _instruments(), task_id)
    a.adopt(carrier)
    return a


def attempt_failed(exc: BaseException) -> None:
    """Record the exception that failed the current attempt on its span."""
    a = _attempt.get()
    if a is not None:
        a.record_failure(exc)


class _Step:
    """A step's span and duration. Cancellation and durable waits are not errors."""

    __slots__ = ("_attempt", "_name", "_position", "_start", "_span", "_token")

    def __init__(self, attempt: Attempt, name: str, position: int) -> None:
        self._attempt = attempt
        self._name = name
        self._position = position
        self._span: trace.Span | None = None
        self._token: object = None

    def __enter__(self) -> None:
        tracer = self._attempt.tracer
        if tracer is not None:
            self._span = tracer.start_span(
                f"stepline.step {self._name}",
                attributes={STEP: self._position, STEP_NAME: self._name, TASK_ID: self._attempt.task_id},
            )
            self._token = otel_context.attach(trace.set_span_in_context(self._span))
        self._start = time.perf_counter()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        elapsed = time.perf_counter() - self._start
        span = self._span
        if span is not None:
            if isinstance(exc, Exception):
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__qualname__}: {exc}"))
            span.end()
            otel_context.detach(self._token)  # type: ignore[arg-type]  # the token attach() gave
        instruments = self._attempt.instruments
        if instruments is not None:
            instruments.step_duration.record(elapsed, {TASK_ID: self._attempt.task_id, STEP_NAME: self._name})


def step_scope(name: str, position: int) -> _Step | None:
    """Span and timing of one executed step; None outside a traced attempt
    (so that the interceptors skip it: another scope may still time the step)."""
    a = _attempt.get()
    if a is None:
        return None
    return _Step(a, name, position)


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, for log lines; None when untraced."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)


__all__ = [
    "Attempt",
    "DURATION_BUCKETS",
    "NO_ATTEMPT",
    "Trigger",
    "adopt_attempt",
    "attempt_failed",
    "current_ids",
    "current_tracer_provider",
    "global_meter_provider",
    "global_tracer_provider",
    "sdk_disabled",
    "start_attempt",
    "step_scope",
    "tracer",
    "tracing_on",
    "unwatch_worker",
    "use_meter_provider",
    "use_tracer_provider",
    "watch_worker",
]
