"""Interceptors: hooks around a run's lifecycle for concerns that cut across the core.

Tracing (spans and metrics), Prometheus metrics and the sealing of sensitive fields are not called
from the worker, the runner, the run context or the client: each is an
`Interceptor` in a list those call at fixed points, as Temporal's interceptors
and dramatiq's middleware are. An interceptor overrides the hooks it needs;
the others do nothing. `Interceptors` is the list as the core holds it: it
calls each interceptor in order and skips the work when none has anything to do.

The points, in the order a run meets them:

1. `trigger` (client): around the append of a RunTriggered; may replace the
   event (tracing writes its span's context into the envelope). `publish`
   (client): the same around the append of a DomainEvent. Both are told
   where the record goes (`Destination`: the log's system, topic, partition).
2. `started` / `stopped` (worker): the worker's lifetime (tracing reports its
   queues and runs in the metrics' gauges meanwhile).
   `folded` / `released` (worker): each event of a run the worker owns, after
   the fold, with its partition and offset; then the partitions it gives up (tracing keeps each live run's
   trigger context, to parent its attempts).
   `appended` (worker): each batch of the worker's run events the log took,
   with the time the append took (the log-append latency histogram).
3. `attempt` (worker): a scope around one attempt, opened before its context
   exists; its `traceparent` goes on every event the attempt writes.
4. `open_attempt` (runner, before the isolation split): the run as the
   attempt sees it (sealing decrypts the payload and scrubs what it records).
5. `enter_body` (in the process that runs the body, a child's too): just
   before the task function (sealing scrubs an isolated child's log lines).
6. `step` (run context): around each step that executes.
7. `failed` (runner): the exception that failed the attempt.

`default_interceptors()` is what a worker and a client use unless given a list.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

from stepline.core.events import Event, RunTriggered
from stepline.log.base import Log
from stepline.log.topics import Topics
from stepline.observability import metrics, sending, tracing
from stepline.observability.messaging import Destination, messaging_system
from stepline.observability.metrics import Watched
from stepline.projections.runs import TERMINAL, RunState
from stepline.sdk.context import RunContext
from stepline.sdk.sealing import open_run, watch_values
from stepline.sdk.task import Task

Append = Callable[[Event], Awaitable[int]]


class AttemptScope(Protocol):
    """What an interceptor keeps open around one attempt."""

    @property
    def traceparent(self) -> str | None: ...

    def failed(self, exc: BaseException) -> None:
        """The attempt failed with `exc` before it had a context (an unknown task)."""

    def ended(self, outcome: str, detail: str = "") -> None:
        """The attempt's outcome is on the log (or recording it failed: "error")."""

    def close(self) -> None:
        """The attempt is over; leave whatever it made current."""


class WorkerView(Watched, Protocol):
    """What a worker shows its interceptors of itself (read on its event loop):
    what the metrics watch, its runs counted by state, and its log and topics."""

    log: Log
    topics: Topics

    def run_counts(self) -> dict[str, int]: ...


class Interceptor:
    """Hooks around a run's lifecycle; each one does nothing unless overridden."""

    async def trigger(self, event: Event, append: Append, where: Destination) -> int:
        return await append(event)

    async def publish(self, event: Event, append: Append, where: Destination) -> int:
        return await append(event)

    def started(self, worker: WorkerView) -> None:
        return None

    def stopped(self, worker: WorkerView) -> None:
        return None

    def folded(self, event: Event, state: RunState, partition: int, offset: int) -> None:
        return None

    def released(self, partitions: frozenset[int], partition_of: Callable[[str], int]) -> None:
        return None

    def appended(self, seconds: float, records: int) -> None:
        return None

    def attempt(self, state: RunState) -> AttemptScope | None:
        return None

    async def open_attempt(self, task: Task[Any, Any], state: RunState, ctx: RunContext) -> RunState:
        return state

    def enter_body(self, task: Task[Any, Any], state: RunState, ctx: RunContext) -> None:
        return None

    def step(self, name: str, position: int) -> AbstractContextManager[object] | None:
        return None

    def failed(self, exc: BaseException) -> None:
        return None


class TracingInterceptor(Interceptor):
    """OpenTelemetry spans and metrics (engine/observability/tracing.py): one trace
    per run, from the trigger through each attempt to each step.

    It keeps the trigger context of each live run of one worker: give every
    worker an instance of its own (`default_interceptors()` makes one each time).
    """

    def __init__(self) -> None:
        # Each live run's RunTriggered (its trace context, record and place):
        # its attempts' spans are children of the trigger's, so a run is one
        # trace wherever it executes. (Runs whose trigger precedes the
        # snapshot their partition was rebuilt from have none: their
        # attempts start traces.)
        self._parents: dict[str, tracing.Trigger] = {}
        self._system = "stepline"
        self._topic = "runs"

    async def trigger(self, event: Event, append: Append, where: Destination) -> int:
        return await sending.traced_trigger(event, append, where)

    async def publish(self, event: Event, append: Append, where: Destination) -> int:
        return await sending.traced_publish(event, append, where)

    def started(self, worker: WorkerView) -> None:
        self._system = messaging_system(worker.log.url)
        self._topic = worker.topics.runs
        tracing.watch_worker(worker)

    def stopped(self, worker: WorkerView) -> None:
        tracing.unwatch_worker(worker)

    def folded(self, event: Event, state: RunState, partition: int, offset: int) -> None:
        if type(event.body) is RunTriggered:
            # Untraced triggers are kept only while spans are recorded: then
            # the attempt still says which record it processes.
            if state.status not in TERMINAL and state.run_id not in self._parents and (
                    event.traceparent is not None or tracing.tracing_on()):
                self._parents[state.run_id] = tracing.Trigger(
                    sending.trigger_context(event), event.event_id,
                    Destination(self._system, self._topic, partition), offset)
        elif self._parents and state.status in TERMINAL:
            self._parents.pop(state.run_id, None)

    def released(self, partitions: frozenset[int], partition_of: Callable[[str], int]) -> None:
        for run_id in [r for r in self._parents if partition_of(r) in partitions]:
            del self._parents[run_id]

    def attempt(self, state: RunState) -> AttemptScope | None:
        span = tracing.start_attempt(state.run_id, state.task_id, state.attempt, self._parents.get(state.run_id))
        # Nothing records (no tracer, no meter): no scope, so that the
        # metrics' scope is the attempt's alone, not one of two to call.
        return None if span is tracing.NO_ATTEMPT else _SpanScope(span)

    def step(self, name: str, position: int) -> AbstractContextManager[object] | None:
        return tracing.step_scope(name, position)

    def failed(self, exc: BaseException) -> None:
        tracing.attempt_failed(exc)


class _SpanScope:
    """An attempt's span as an AttemptScope."""

    __slots__ = ("_span",)

    def __init__(self, span: tracing.Attempt) -> None:
        self._span = span

    @property
    def traceparent(self) -> str | None:
        return self._span.traceparent

    def failed(self, exc: BaseException) -> None:
        self._span.record_failure(exc)

    def ended(self, outcome: str, detail: str = "") -> None:
        self._span.ended(outcome, detail)

    def close(self) -> None:
        self._span.close()


class SealingInterceptor(Interceptor):
    """Sensitive payload fields (docs/sensitive-data.md): the attempt sees them
    decrypted, and what it records and logs is scrubbed of them."""

    async def open_attempt(self, task: Task[Any, Any], state: RunState, ctx: RunContext) -> RunState:
        return await open_run(task, state, ctx)

    def enter_body(self, task: Task[Any, Any], state: RunState, ctx: RunContext) -> None:
        watch_values(task, state, ctx)


class MetricsInterceptor(Interceptor):
    """Prometheus counters, histograms and gauges (engine/observability/metrics.py):
    triggers, attempts by outcome, step, attempt and run durations, events
    folded, log appends, and the watched worker's gauges while it runs.

    It keeps nothing per run: one instance may serve any number of workers.
    """

    async def trigger(self, event: Event, append: Append, where: Destination) -> int:
        offset = await append(event)
        metrics.triggered(event.task_id)  # counted once the log has it
        return offset

    def started(self, worker: WorkerView) -> None:
        metrics.watch(worker)

    def stopped(self, worker: WorkerView) -> None:
        metrics.unwatch(worker)

    def folded(self, event: Event, state: RunState, partition: int, offset: int) -> None:
        metrics.folded(event)

    def appended(self, seconds: float, records: int) -> None:
        metrics.appended(seconds)

    def attempt(self, state: RunState) -> AttemptScope:
        return metrics.attempt(state.task_id, state.started_at)

    def step(self, name: str, position: int) -> AbstractContextManager[object] | None:
        return metrics.step()


def default_interceptors() -> list[Interceptor]:
    """Sealing, tracing, then metrics: what workers and clients use unless told otherwise."""
    return [SealingInterceptor(), TracingInterceptor(), MetricsInterceptor()]


class _NoScope:
    __slots__ = ()
    traceparent = None

    def failed(self, exc: BaseException) -> None:
        return None

    def ended(self, outcome: str, detail: str = "") -> None:
        return None

    def close(self) -> None:
        return None


NO_SCOPE: AttemptScope = _NoScope()


class _Scopes:
    """Several interceptors' scopes as one; the first traceparent is the attempt's."""

    __slots__ = ("_scopes",)

    def __init__(self, scopes: list[AttemptScope]) -> None:
        self._scopes = scopes

    @property
    def traceparent(self) -> str | None:
        return next((s.traceparent for s in self._scopes if s.traceparent is not None), None)

    def failed(self, exc: BaseException) -> None:
        for s in self._scopes:
            s.failed(exc)

    def ended(self, outcome: str, detail: str = "") -> None:
        for s in self._scopes:
            s.ended(outcome, detail)

    def close(self) -> None:
        for s in reversed(self._scopes):  # the last opened is the innermost
            s.close()


class Interceptors:
    """A list of interceptors as the core calls them: each in order, the last innermost.

    Per hook, only the interceptors that override it are called: the base
    class's no-ops would cost a call (a coroutine frame for `trigger`) per
    run, step or folded event for nothing.
    """

    __slots__ = ("items", "_trigger", "_publish", "_folded", "_attempt", "_step", "_open_attempt",
                 "_enter_body")

    def __init__(self, items: Sequence[Interceptor] = ()) -> None:
        self.items = tuple(items)
        self._trigger = _overriding(self.items, "trigger")
        self._publish = _overriding(self.items, "publish")
        self._folded = _overriding(self.items, "folded")
        self._attempt = _overriding(self.items, "attempt")
        self._step = _overriding(self.items, "step")
        self._open_attempt = _overriding(self.items, "open_attempt")
        self._enter_body = _overriding(self.items, "enter_body")

    async def trigger(self, event: Event, append: Append, where: Destination) -> int:
        call = append
        for hook in reversed(self._trigger):
            call = _Next(hook, call, where)
        return await call(event)

    async def publish(self, event: Event, append: Append, where: Destination) -> int:
        call = append
        for hook in reversed(self._publish):
            call = _Next(hook, call, where)
        return await call(event)

    def started(self, worker: WorkerView) -> None:
        for i in self.items:
            i.started(worker)

    def stopped(self, worker: WorkerView) -> None:
        for i in self.items:
            i.stopped(worker)

    def folded(self, event: Event, state: RunState, partition: int, offset: int) -> None:
        for hook in self._folded:
            hook(event, state, partition, offset)

    def released(self, partitions: frozenset[int], partition_of: Callable[[str], int]) -> None:
        for i in self.items:
            i.released(partitions, partition_of)

    def appended(self, seconds: float, records: int) -> None:
        for i in self.items:
            i.appended(seconds, records)

    def attempt(self, state: RunState) -> AttemptScope:
        scopes: list[AttemptScope] = []
        for hook in self._attempt:  # a loop, not a generator: once per attempt
            scope = hook(state)
            if scope is not None:
                scopes.append(scope)
        if not scopes:
            return NO_SCOPE
        return scopes[0] if len(scopes) == 1 else _Scopes(scopes)

    async def open_attempt(self, task: Task[Any, Any], state: RunState, ctx: RunContext) -> RunState:
        for hook in self._open_attempt:
            state = await hook(task, state, ctx)
        return state

    def enter_body(self, task: Task[Any, Any], state: RunState, ctx: RunContext) -> None:
        for hook in self._enter_body:
            hook(task, state, ctx)

    def step(self, name: str, position: int) -> AbstractContextManager[object]:
        # A hot path: one scope (tracing's or metrics') is returned as it is.
        scopes: list[AbstractContextManager[object]] = []
        for hook in self._step:  # a loop, not a generator: once per step
            scope = hook(name, position)
            if scope is not None:
                scopes.append(scope)
        if len(scopes) == 1:
            return scopes[0]
        return _Steps(scopes) if scopes else _NO_STEP

    def failed(self, exc: BaseException) -> None:
        for i in self.items:
            i.failed(exc)


class _Steps:
    """Several step scopes, entered in order and left in reverse (none of
    them swallows an exception). Not an ExitStack: this is on every step."""

    __slots__ = ("_scopes", "_entered")

    def __init__(self, scopes: list[AbstractContextManager[object]]) -> None:
        self._scopes = scopes
        self._entered = 0

    def __enter__(self) -> None:
        try:
            for s in self._scopes:
                s.__enter__()
                self._entered += 1
        except BaseException as exc:
            self._leave(type(exc), exc, exc.__traceback__)
            raise

    def __exit__(self, *exc: Any) -> None:
        self._leave(*exc)

    def _leave(self, *exc: Any) -> None:
        error: BaseException | None = None
        for s in reversed(self._scopes[:self._entered]):
            try:
                s.__exit__(*exc)
            except BaseException as raised:  # the rest still leave; the first error wins
                error = error or raised
        self._entered = 0
        if error is not None:
            raise error


_NO_STEP = nullcontext()


def _overriding(items: tuple[Interceptor, ...], name: str) -> tuple[Any, ...]:
    """The bound `name` hooks of `items` that are not the base class's no-op."""
    base = getattr(Interceptor, name)
    return tuple(hook for hook in (getattr(i, name) for i in items)
                 if getattr(hook, "__func__", None) is not base)


class _Next:
    """`hook` bound to what comes after it: called with an event, it gives
    the hook's awaitable itself (no coroutine of its own around it: every
    trigger goes through each level)."""

    __slots__ = ("_hook", "_append", "_where")

    def __init__(self, hook: Callable[[Event, Append, Destination], Awaitable[int]], append: Append,
                 where: Destination) -> None:
        self._hook = hook
        self._append = append
        self._where = where

    def __call__(self, event: Event) -> Awaitable[int]:
        return self._hook(event, self._append, self._where)


__all__ = [
    "AttemptScope",
    "Destination",
    "Interceptor",
    "Interceptors",
    "MetricsInterceptor",
    "NO_SCOPE",
    "SealingInterceptor",
    "TracingInterceptor",
    "WorkerView",
    "default_interceptors",
    "messaging_system",
]
