"""Prometheus metrics: what `/metrics` serves on a worker's `--http-port` and on the API.

Built on prometheus-client (the Prometheus project's own client) rather than
OpenTelemetry's Prometheus exporter: that exporter is still a beta release,
renames instruments on the way out (dots to underscores, units appended), and
needs an SDK meter provider installed globally, which `stepline worker`
leaves to `OTEL_*` (engine/observability/tracing.py). Here the names are
exactly the documented ones, histograms are in seconds, and the OTLP export
goes on beside it unchanged.

Three kinds of figures, all in one process-wide registry (`REGISTRY`):

* counters and histograms, updated as things happen: the interceptor
  (`MetricsInterceptor`, engine/sdk/interceptors.py) calls `triggered`,
  `attempt`, `step`, `folded`, `appended`;
* gauges read when scraped from the workers of this process (`watch`):
  queue depth, slots in use, runs of owned partitions by state, partitions
  owned, attempts running;
* gauges read when scraped from other sources (`add_source`): the API's
  backlog from its read model (engine/server/backlog.py), which is how
  pending work is visible with no worker running.

docs/operations.md ("Metrics") lists every name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar, Token
from typing import Any, Protocol
from weakref import WeakSet

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from stepline.core.events import Event
from stepline.projections.runs import SUSPENDED, RunState

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Not prometheus_client's global REGISTRY: an application embedding Stepline
# keeps its own metrics apart, and serves ours with `exposition()` if it likes.
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Steps and attempts: from a millisecond to an LLM call's minutes.
_STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Runs may sleep for days between their steps.
_RUN_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400)
_APPEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

TRIGGERED = Counter("stepline_runs_triggered", "Runs triggered (RunTriggered appended) by this process",
                    ["task"], registry=REGISTRY)
STARTED = Counter("stepline_runs_started", "Runs whose first attempt started on this process",
                  ["task"], registry=REGISTRY)
COMPLETED = Counter("stepline_runs_completed", "Runs completed by attempts on this process",
                    ["task"], registry=REGISTRY)
FAILED = Counter("stepline_runs_failed", "Runs failed for good (no retry left) by attempts on this process",
                 ["task"], registry=REGISTRY)
DEAD_LETTERED = Counter("stepline_runs_dead_lettered",
                        "Runs put in the dead-letter list by attempts on this process",
                        ["task"], registry=REGISTRY)
ATTEMPTS = Counter("stepline_attempts", "Attempts ended on this process, by outcome (completed, suspended, "
                   "retrying, failed, cancelled, error, interrupted)", ["task", "outcome"], registry=REGISTRY)
RETRIES = Counter("stepline_retries", "Retries scheduled (RetryScheduled) by attempts on this process",
                  ["task"], registry=REGISTRY)
STEP_SECONDS = Histogram("stepline_step_duration_seconds", "Time a step took, checkpoint included",
                         ["task"], buckets=_STEP_BUCKETS, registry=REGISTRY)
ATTEMPT_SECONDS = Histogram("stepline_attempt_duration_seconds", "Time an attempt took, outcome recorded",
                            ["task"], buckets=_STEP_BUCKETS, registry=REGISTRY)
RUN_SECONDS = Histogram("stepline_run_duration_seconds",
                        "Time from a run's first start to its end (sleeps and waits included)",
                        ["task", "outcome"], buckets=_RUN_BUCKETS, registry=REGISTRY)
FOLDED = Counter("stepline_events_folded", "Run events folded by the workers of this process "
                 "(rebuilds included), by event type", ["event"], registry=REGISTRY)
APPEND_SECONDS = Histogram("stepline_log_append_duration_seconds",
                           "Time one batched append of a worker's run events to the log took",
                           buckets=_APPEND_BUCKETS, registry=REGISTRY)


# --- counters: what the interceptor reports ----------------------------------------


# Every run calls `labels()` on several metrics; each call takes the metric's
# lock and builds a key. The children, looked up once per label values,
# are kept here (prometheus_client keeps every child anyway).
_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def _child(metric: Any, *values: str) -> Any:
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def triggered(task_id: str) -> None:
    _child(TRIGGERED, task_id).inc()


_folded: dict[type[Any], Any] = {}


def folded(event: Event) -> None:
    # The hot path of every worker: one child per event type, looked up once.
    kind = type(event.body)
    child = _folded.get(kind)
    if child is None:
        child = _folded[kind] = FOLDED.labels(kind.__name__)
    child.inc()


def appended(seconds: float) -> None:
    APPEND_SECONDS.observe(seconds)


_task: ContextVar[str | None] = ContextVar("stepline_metrics_task", default=None)


class AttemptTimer:
    """One attempt's counts and durations; the task it runs is current for `step`."""

    __slots__ = ("task_id", "_first_start_ms", "_start", "_ended", "_token")

    def __init__(self, task_id: str, first_start_ms: int | None) -> None:
        self.task_id = task_id
        self._first_start_ms = first_start_ms
        self._start = time.perf_counter()
        self._ended = False
        self._token: Token[str | None] | None = _task.set(task_id)

    traceparent = None

    def failed(self, exc: BaseException) -> None:
        return None

    def ended(self, outcome: str, detail: str = "") -> None:
        if self._ended:
            return
        self._ended = True
        task = self.task_id
        _child(ATTEMPTS, task, outcome).inc()
        _child(ATTEMPT_SECONDS, task).observe(time.perf_counter() - self._start)
        if outcome == "retrying":
            _child(RETRIES, task).inc()
        elif outcome in ("completed", "failed", "cancelled"):
            if outcome == "completed":
                _child(COMPLETED, task).inc()
            elif outcome == "failed":
                # A run that fails for good is dead-lettered in the same
                # attempt (RunFailed + RunDeadLettered, engine/runtime/runner.py).
                _child(FAILED, task).inc()
                _child(DEAD_LETTERED, task).inc()
            first = self._first_start_ms
            elapsed = time.time() - first / 1000 if first is not None else time.perf_counter() - self._start
            _child(RUN_SECONDS, task, outcome).observe(max(elapsed, 0.0))

    def close(self) -> None:
        if not self._ended:
            self.ended("interrupted")  # shutdown or a revoked partition: the next owner resumes it
        token, self._token = self._token, None
        if token is not None:
            _task.reset(token)


def attempt(task_id: str, first_start_ms: int | None) -> AttemptTimer:
    """An attempt begins: `first_start_ms` is when the run first started, None if never."""
    if first_start_ms is None:
        _child(STARTED, task_id).inc()
    return AttemptTimer(task_id, first_start_ms)


class _StepTimer:
    __slots__ = ("_histogram", "_start")

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._histogram.observe(time.perf_counter() - self._start)


# Every step: the task's histogram child is looked up once, not under the
# registry's lock each time.
_step_children: dict[str, Any] = {}


def step() -> _StepTimer | None:
    """A step's timer inside an attempt; None outside one (a replay, a test)."""
    task = _task.get()
    if task is None:
        return None
    child = _step_children.get(task)
    if child is None:
        child = _step_children[task] = STEP_SECONDS.labels(task)
    return _StepTimer(child)


# --- gauges: read when scraped ----------------------------------------------------

Samples = dict[tuple[tuple[str, str], ...], float]
Reading = dict[str, Samples]


class Gauge:
    """One gauge family of `exposition()`: its name, help and label names."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels


GAUGES: dict[str, Gauge] = {g.name: g for g in (
    Gauge("stepline_queue_depth", "Runs ready to start on this process's workers, by queue", ("queue",)),
    Gauge("stepline_queue_slots_in_use", "Slots of limited queues held by runs of this process's "
          "partitions, by queue", ("queue",)),
    Gauge("stepline_owned_runs", "Runs of the partitions this process's workers own, by state "
          "(pending, running, retrying, sleeping, waiting, completed, failed, cancelled, expired)", ("state",)),
    Gauge("stepline_partitions_owned", "Partitions of the runs topic this process's workers own", ()),
    Gauge("stepline_attempts_running", "Attempts executing now on this process's workers", ()),
    Gauge("stepline_worker_concurrency", "Attempts this process's workers may run at once", ()),
    Gauge("stepline_runs_ready", "Runs ready to start or resume now and not started, by task, queue and pool "
          "(the API's read model: all workers, or none)", ("task", "queue", "pool")),
    Gauge("stepline_runs_running", "Runs in an attempt now, by task, queue and pool (the API's read model)",
          ("task", "queue", "pool")),
    Gauge("stepline_runs_delayed", "Runs due later: delayed, backing off or sleeping, by task, queue and pool "
          "(the API's read model)", ("task", "queue", "pool")),
    Gauge("stepline_runs_waiting", "Runs waiting without a deadline for an event, token or child, "
          "by task, queue and pool (the API's read model)", ("task", "queue", "pool")),
    Gauge("stepline_runs_paused", "Runs ready but held by a paused task or queue, by task, queue and pool "
          "(the API's read model)", ("task", "queue", "pool")),
)}

Source = Callable[[], Awaitable[Reading]]


class Watched(Protocol):
    """What `watch` reads of a worker (engine/runtime/worker.py), on its loop."""

    def queue_depths(self) -> dict[str, int]: ...

    def runs(self) -> dict[str, RunState]: ...

    @property
    def owned(self) -> frozenset[int]: ...

    @property
    def active(self) -> int: ...

    @property
    def concurrency(self) -> int: ...


# The reason a `stepline.sleep` records (engine/sdk/context.py, SLEEP): a run
# suspended on nothing else is sleeping, not waiting.
_SLEEP = "sleep"


def _state(run: RunState) -> str:
    if run.status != SUSPENDED:
        return run.status
    waits = [s.name for s in run.steps.values() if s.status == "waiting"]
    return "sleeping" if waits and all(w == _SLEEP for w in waits) else "waiting"


def worker_reading(worker: Watched) -> Reading:
    """A worker's gauges now."""
    states: Samples = {}
    slots: Samples = {}
    for run in worker.runs().values():
        key = labels(state=_state(run))
        states[key] = states.get(key, 0.0) + 1
        if run.slot is not None:
            q = labels(queue=run.slot)
            slots[q] = slots.get(q, 0.0) + 1
    return {
        "stepline_queue_depth": {labels(queue=q): float(n) for q, n in worker.queue_depths().items()},
        "stepline_queue_slots_in_use": slots,
        "stepline_owned_runs": states,
        "stepline_partitions_owned": {(): float(len(worker.owned))},
        "stepline_attempts_running": {(): float(worker.active)},
        "stepline_worker_concurrency": {(): float(worker.concurrency)},
    }


_workers: WeakSet[Any] = WeakSet()
_sources: list[Source] = []


def watch(worker: Watched) -> None:
    """Report `worker` on every scrape until `unwatch` (or until it is gone)."""
    _workers.add(worker)


def unwatch(worker: Watched) -> None:
    _workers.discard(worker)


def add_source(source: Source) -> None:
    """Read `source()` on every scrape, until `remove_source`."""
    _sources.append(source)


def remove_source(source: Source) -> None:
    if source in _sources:
        _sources.remove(source)


def merge(readings: Iterable[Reading]) -> Reading:
    """Readings of several workers or sources as one: the same series add up."""
    out: Reading = {}
    for reading in readings:
        for name, samples in reading.items():
            into = out.setdefault(name, {})
            for labels, value in samples.items():
                into[labels] = into.get(labels, 0.0) + value
    return out


async def read_gauges() -> Reading:
    """Every gauge now: the watched workers' and the sources'. Runs on the loop that owns them."""
    readings = [worker_reading(w) for w in list(_workers)]
    readings += await asyncio.gather(*(s() for s in list(_sources)))
    return merge(readings)


class _Fixed(Collector):
    def __init__(self, reading: Mapping[str, Samples]) -> None:
        self._reading = reading

    def collect(self) -> Iterator[Metric]:
        for gauge in GAUGES.values():
            samples = self._reading.get(gauge.name)
            if samples is None:
                continue
            family = GaugeMetricFamily(gauge.name, gauge.documentation, labels=list(gauge.labels))
            for labels, value in sorted(samples.items()):
                family.add_metric([v for _, v in labels], value)
            yield family


def render(reading: Mapping[str, Samples]) -> bytes:
    """The Prometheus text of the registry's counters and histograms, then `reading`'s gauges."""
    gauges = CollectorRegistry(auto_describe=False)
    gauges.register(_Fixed(reading))
    return generate_latest(REGISTRY) + generate_latest(gauges)


async def exposition() -> bytes:
    """What `/metrics` answers, read now."""
    return render(await read_gauges())


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    """A series' labels as a `Samples` key."""
    return tuple(values.items())


__all__ = [
    "CONTENT_TYPE",
    "GAUGES",
    "REGISTRY",
    "AttemptTimer",
    "Reading",
    "Samples",
    "Source",
    "Watched",
    "add_source",
    "appended",
    "attempt",
    "exposition",
    "folded",
    "labels",
    "merge",
    "read_gauges",
    "remove_source",
    "render",
    "step",
    "triggered",
    "unwatch",
    "watch",
    "worker_reading",
]
