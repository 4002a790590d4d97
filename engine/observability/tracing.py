"""OpenTelemetry: one trace per run, across processes, and the engine's metrics.

Spans of a run:

    stepline.trigger            PRODUCER  where the run was triggered
    └─ stepline.run <task>      CONSUMER  one per attempt, on the worker
       └─ stepline.step <name>  INTERNAL  one per step executed (replayed steps have none)

The trigger span's W3C context travels in the RunTriggered envelope
(`traceparent`, and `tracestate` in `extra`), so an attempt on another
process, hours later, joins the trace of the request that triggered it.
Every event an attempt writes carries the attempt span's `traceparent`.

Metrics: `stepline.runs` (attempts by outcome and task),
`stepline.step.duration` (ms, by task and step), and two gauges read from
the workers of this process: `stepline.queue.depth` (runs ready to start, by
queue) and `stepline.partition.runs` (runs of owned partitions, by state).

Stepline only uses the OpenTelemetry API: it never installs a provider on
import. Without one (the API's default no-op) every hook here returns at
once. `stepline worker`/`serve`/`dev` install exporters from the standard
OTEL_* variables (`configure_from_env`); tests and embedding applications
point Stepline at a provider of their own with `use_tracer_provider` and
`use_meter_provider`, which leaves the process-global providers alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import replace
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
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from stepline.core.events import Event

try:  # where the API keeps the proxy it hands out before a provider is set
    from opentelemetry.metrics._internal import _ProxyMeterProvider
except ImportError:  # pragma: no cover - the API moved it; then only NoOp counts as off
    _ProxyMeterProvider = NoOpMeterProvider  # type: ignore[misc,assignment]  # same role

SCOPE = "stepline"

# The envelope carries W3C trace context whatever propagators the
# application installed globally: the field is named for it.
_W3C = TraceContextTextMapPropagator()

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

# Outcomes that make an attempt span an error.
_ERROR_OUTCOMES = frozenset({"failed", "retrying", "error"})


# --- which providers -------------------------------------------------------------

_tracer_provider: TracerProvider | None = None
_meter_provider: MeterProvider | None = None
_settled = False
_MISSING = object()


def use_tracer_provider(provider: TracerProvider | None) -> None:
    """Trace Stepline through `provider` rather than the global one (None: the global again).

    For tests and applications that keep several providers; the global one
    can be set only once per process.
    """
    global _tracer_provider
    _tracer_provider = provider


def use_meter_provider(provider: MeterProvider | None) -> None:
    """Record Stepline's metrics through `provider` rather than the global one (None: the global)."""
    global _meter_provider
    _meter_provider = provider


def _settle() -> None:
    """Let the API load providers named by OTEL_PYTHON_*_PROVIDER, once."""
    global _settled
    _settled = True
    trace.get_tracer_provider()
    metrics.get_meter_provider()


def _global_tracer_provider() -> Any:
    # trace.get_tracer_provider() consults os.environ on every call while no
    # provider is set (about 4 µs, an exception inside the mapping): too slow
    # for every attempt. Once settled, read the value it reads.
    if not _settled:
        _settle()
    provider = getattr(trace, "_TRACER_PROVIDER", _MISSING)
    return trace.get_tracer_provider() if provider is _MISSING else provider


def _global_meter_provider() -> Any:
    if not _settled:
        _settle()
    internal = getattr(metrics, "_internal", None)
    provider = getattr(internal, "_METER_PROVIDER", _MISSING)
    return metrics.get_meter_provider() if provider is _MISSING else provider


_tracer_cache: tuple[object, Tracer] | None = None


def _tracer() -> Tracer | None:
    """Stepline's tracer, or None when nothing would record a span."""
    global _tracer_cache
    provider = _tracer_provider if _tracer_provider is not None else _global_tracer_provider()
    if provider is None or isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider)):
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
        self.step_duration = meter.create_histogram(
            "stepline.step.duration", unit="ms", description="Time a step took, checkpoint included",
        )
        meter.create_observable_gauge(
            "stepline.queue.depth", [_observe_queues], unit="{run}",
            description="Runs ready to start in this process's workers, by queue",
        )
        meter.create_observable_gauge(
            "stepline.partition.runs", [_observe_states], unit="{run}",
            description="Runs of the partitions this process's workers own, by state",
        )


_instruments_cache: tuple[object, _Instruments] | None = None


def _instruments() -> _Instruments | None:
    global _instruments_cache
    provider = _meter_provider if _meter_provider is not None else _global_meter_provider()
    if provider is None or isinstance(provider, (_ProxyMeterProvider, NoOpMeterProvider)):
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


# --- trigger -----------------------------------------------------------------------


async def traced_trigger(ev: Event, append: Callable[[Event], Awaitable[int]]) -> int:
    """Append a RunTriggered inside a `stepline.trigger` span, carrying its context.

    The span is a child of the caller's current context: a web request's
    span, or the step of a parent run.
    """
    tracer = _tracer()
    if tracer is None:
        return await append(ev)
    with tracer.start_as_current_span(
        "stepline.trigger", kind=SpanKind.PRODUCER, attributes={RUN_ID: ev.run_id, TASK_ID: ev.task_id},
    ):
        carrier: dict[str, str] = {}
        _W3C.inject(carrier)
        extra = ev.extra
        if "tracestate" in carrier:
            extra = {**extra, "tracestate": carrier["tracestate"]}
        return await append(replace(ev, traceparent=carrier.get("traceparent"), extra=extra))


TraceParent = tuple[str, str | None]


def trigger_context(ev: Event) -> TraceParent | None:
    """What a worker keeps of a RunTriggered to parent the run's attempts."""
    if ev.traceparent is None:
        return None
    return ev.traceparent, ev.extra.get("tracestate")


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

    def _open(self, name: str, parent: TraceParent | None, attributes: dict[str, Any]) -> None:
        otel_token: object = None
        if self.tracer is not None:
            # Never the worker's own context: without a trigger context the
            # attempt is the root of a trace of its own.
            base = otel_context.Context()
            if parent is not None:
                carrier = {"traceparent": parent[0]}
                if parent[1]:
                    carrier["tracestate"] = parent[1]
                base = _W3C.extract(carrier, base)
            self._span = self.tracer.start_span(name, context=base, kind=SpanKind.CONSUMER,
                                                attributes=attributes)
            current = trace.set_span_in_context(self._span, base)
            out: dict[str, str] = {}
            _W3C.inject(out, current)
            self.traceparent = out.get("traceparent")
            otel_token = otel_context.attach(current)
        self._tokens = (otel_token, _attempt.set(self))

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


def start_attempt(run_id: str, task_id: str, attempt: int, parent: TraceParent | None) -> Attempt:
    """Open the attempt's span, a child of the run's trigger; make it current."""
    tracer = _tracer()
    instruments = _instruments()
    if tracer is None and instruments is None:
        return NO_ATTEMPT
    a = Attempt(tracer, instruments, task_id)
    a._open(f"stepline.run {task_id}", parent, {RUN_ID: run_id, TASK_ID: task_id, ATTEMPT: attempt})
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
        elapsed_ms = (time.perf_counter() - self._start) * 1000.0
        span = self._span
        if span is not None:
            if isinstance(exc, Exception):
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__qualname__}: {exc}"))
            span.end()
            otel_context.detach(self._token)  # type: ignore[arg-type]  # the token attach() gave
        instruments = self._attempt.instruments
        if instruments is not None:
            instruments.step_duration.record(elapsed_ms, {TASK_ID: self._attempt.task_id, STEP_NAME: self._name})


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


# --- exporters for the CLI ------------------------------------------------------------


def configure_from_env(service_name: str = "stepline") -> None:
    """Install exporters from the standard OTEL_* variables, for `stepline` commands.

    Nothing happens unless OTEL_EXPORTER_OTLP_ENDPOINT (or the per-signal
    `..._TRACES_ENDPOINT` / `..._METRICS_ENDPOINT`), OTEL_TRACES_EXPORTER or
    OTEL_METRICS_EXPORTER is set, nor for a signal whose global provider the
    process already has. Exporters: `otlp` (needs the package
    opentelemetry-exporter-otlp-proto-http, or -grpc with
    OTEL_EXPORTER_OTLP_PROTOCOL=grpc), `console`, `none`.
    """
    env = os.environ
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    traces = _exporter_choice("TRACES", endpoint)
    meters = _exporter_choice("METRICS", endpoint)
    if traces is None and meters is None:
        return
    from opentelemetry.sdk.resources import Resource

    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create({} if named else {"service.name": service_name})
    if traces is not None and _global_tracer_provider() is None:
        _install_tracing(traces, resource)
    if meters is not None and _global_meter_provider() is None:
        _install_metrics(meters, resource)


def _exporter_choice(signal: str, endpoint: str | None) -> str | None:
    chosen = os.environ.get(f"OTEL_{signal}_EXPORTER", "").strip().lower()
    if not chosen:
        chosen = "otlp" if endpoint or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") else ""
    if chosen in ("", "none"):
        return None
    if chosen not in ("otlp", "console"):
        _log.warning("OTEL_%s_EXPORTER=%s is not supported by stepline (otlp, console, none)", signal, chosen)
        return None
    return chosen


def _otlp(kind: str) -> Any:
    """The OTLP exporter class for `kind` ("trace" or "metric"), or None if not installed."""
    grpc = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip().lower() == "grpc"
    module_name = f"opentelemetry.exporter.otlp.proto.{'grpc' if grpc else 'http'}.{kind}_exporter"
    cls_name = "OTLPSpanExporter" if kind == "trace" else "OTLPMetricExporter"
    try:
        import importlib

        return getattr(importlib.import_module(module_name), cls_name)
    except ImportError:
        package = f"opentelemetry-exporter-otlp-proto-{'grpc' if grpc else 'http'}"
        _log.warning("OTLP export is configured but %s is not installed: no %ss are exported "
                     "(pip install %s)", package, kind, package)
        return None


def _install_tracing(choice: str, resource: Any) -> None:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if choice == "console":
        exporter: Any = ConsoleSpanExporter()
    else:
        cls = _otlp("trace")
        if cls is None:
            return
        exporter = cls()  # endpoint, headers, timeout from the OTEL_EXPORTER_OTLP_* variables
    provider = SdkTracerProvider(resource=resource)  # shut down (flushed) at exit
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def _install_metrics(choice: str, resource: Any) -> None:
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    if choice == "console":
        exporter: Any = ConsoleMetricExporter()
    else:
        cls = _otlp("metric")
        if cls is None:
            return
        exporter = cls()
    # OTEL_METRIC_EXPORT_INTERVAL (default 60 s) sets the reader's period.
    metrics.set_meter_provider(SdkMeterProvider(resource=resource,
                                                metric_readers=[PeriodicExportingMetricReader(exporter)]))


__all__ = [
    "Attempt",
    "NO_ATTEMPT",
    "attempt_failed",
    "configure_from_env",
    "current_ids",
    "start_attempt",
    "step_scope",
    "traced_trigger",
    "trigger_context",
    "unwatch_worker",
    "use_meter_provider",
    "use_tracer_provider",
    "watch_worker",
]
