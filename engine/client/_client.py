"""The client: trigger runs, await their results, inspect and steer them.

Used from application code (`async with stepline.Client(url)`), from inside
tasks (the worker's own client), and by the CLI. It writes only requests
that any process may make (trigger, cancel, retrigger); everything else is
the partition owner's to write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

from stepline.client._steering import Steering
from stepline.client.fork import copied_bytes, fork_trigger
from stepline.client.why import reasons
from stepline.core.events import (
    DomainEvent,
    Event,
    Payload,
    RunTriggered,
)
from stepline.core.ids import idempotent_run_id, new_event_id, new_run_id
from stepline.core.payloads import ANY
from stepline.errors import (
    InvalidEventName,
    NoClient,
    PayloadTooLarge,
    UnknownRun,
)
from stepline.log.base import kafka_partition_for
from stepline.log.headers import append_event
from stepline.log.topics import DEFAULT_POOL
from stepline.projections.runs import (
    PARENT_POOL,
    PENDING,
    PartitionRuns,
    RunState,
)
from stepline.projections.why import Reason
from stepline.sdk import port
from stepline.sdk.debounce import Debounce
from stepline.sdk.interceptors import Destination
from stepline.sdk.port import RunHandle, TaskRef, bind_client, unbind_client
from stepline.sdk.task import Task

R = TypeVar("R")


async def publish(name: str, data: Any = None, *, key: str | None = None, source: str = "api") -> str:
    """Publish a domain event through the current client (see Client.publish)."""
    return await port.current_client().publish(name, data, key=key, source=source)


def check_event_name(name: str) -> None:
    """Raise InvalidEventName unless `name` can be published (e.g. `user.created`)."""
    if not name or any(c.isspace() for c in name) or name.startswith(".") or name.endswith("."):
        raise InvalidEventName(f"event name must be a non-empty dotted name without spaces, got {name!r}")


def current_client() -> Client:
    """The `Client` open in this context (a worker's own inside a task), or NoClient.

    Code that needs the whole client (backfill) asks here; a task handle asks
    `stepline.sdk.port.current_client`, which an isolated child also answers.
    """
    c = port.current_client()
    if not isinstance(c, Client):
        raise NoClient("this needs a stepline.Client opened in this process (`async with stepline.Client(url):`)")
    return c


def _ms(duration: timedelta | float) -> int:
    secs = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    return int(secs * 1000)


class Client(Steering):
    """Talks to a Stepline log. An async context manager."""

    async def __aenter__(self) -> Client:
        await self.start()
        self._token = bind_client(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            unbind_client(self._token, self)
            self._token = None
        await self.close()

    # --- requests ----------------------------------------------------------

    async def trigger(
        self,
        task: TaskRef[R] | str,
        payload: Any = None,
        *,
        idempotency_key: str | None = None,
        delay: timedelta | float | None = None,
        priority: int = 0,
        tags: Sequence[str] = (),
        concurrency_key: str | None = None,
        parent_run_id: str | None = None,
        parent_step: int | None = None,
        ttl: timedelta | float | None = None,
        idempotency_key_ttl: timedelta | float | None = None,
        validate: bool = True,
    ) -> RunHandle[R]:
        """Append RunTriggered; validation errors raise before anything is written.

        `ttl`: the run expires (RunExpired) unless it starts within it.
        `idempotency_key_ttl`: the key maps to the same run only while that
        run is younger than this; later the key starts a new run (without
        it, a key means one run forever).
        `validate=False` (the event router) records the payload as given; a
        payload that does not fit then fails its run, not the caller.
        """
        task_id, t = self._task(task)
        where = f"payload for task {task_id!r}"
        data = (t.payload_codec if t and validate else ANY).check_and_dump(payload, where)
        data = await self._seal(t, data, where, strict=validate)
        self._check_size(data, where)
        now = self.clock()
        debounce = getattr(t, "debounce", None) if t is not None else None
        if t is not None and debounce is not None and idempotency_key is None:
            return await self._debounced(t, debounce, payload, data, now, priority=priority, tags=tags,
                                         concurrency_key=concurrency_key, ttl=ttl)
        if idempotency_key and idempotency_key_ttl is not None:
            run_id, existing = await self._keyed_run(task_id, idempotency_key, _ms(idempotency_key_ttl), now)
            if existing:
                return RunHandle(run_id, task_id, self, t.output_codec if t else ANY, None)
        elif idempotency_key:
            run_id = idempotent_run_id(task_id, idempotency_key)
        else:
            run_id = new_run_id(now)
        not_before = now + _ms(delay) if delay is not None else None
        expires_at = now + _ms(ttl) if ttl is not None else None
        body = RunTriggered(
            data, idempotency_key, not_before, priority, tuple(tags),
            t.queue.name if t else None, concurrency_key, parent_run_id, parent_step, expires_at,
        )
        ev = Event(new_event_id(), body.TYPE, run_id, task_id, 1, now, 0, body)
        if parent_run_id is not None:
            # A child answers its parent on the parent's pool's runs topic: a
            # parent triggers through its worker's client, of the parent's pool.
            parent_pool = self._homes.get(parent_run_id, self.topics.pool)
            if parent_pool != DEFAULT_POOL:
                ev = replace(ev, extra={PARENT_POOL: parent_pool})
        offset = await self._append_trigger(ev, self.task_pool(task_id, t))
        # With an idempotency key the run may predate this trigger: watch from 0.
        return RunHandle(run_id, task_id, self, t.output_codec if t else ANY,
                         None if idempotency_key else offset)

    async def _debounced(
        self, t: Task[Any, R], debounce: Debounce, payload: Any, data: Payload, now: int, *,
        priority: int, tags: Sequence[str], concurrency_key: str | None, ttl: timedelta | float | None,
    ) -> RunHandle[R]:
        """Trigger through the key's pending run (see engine/sdk/debounce.py).

        The current generation is the first whose run is missing or still
        pending and unstarted. If that run starts between our look and our
        append, the fold ignores the append: we then move on a generation.
        """
        generation = 0
        while True:
            key = debounce.key_of(payload, generation)
            run_id = idempotent_run_id(t.id, key)
            try:
                state: RunState | None = await self.get_run(run_id)
            except UnknownRun:
                state = None
            if state is not None and not (state.status == PENDING and state.started_at is None):
                generation += 1
                continue
            start = now + debounce.period_ms
            body = RunTriggered(data, key, start, priority, tuple(tags), t.queue.name, concurrency_key,
                                expires_at=None if ttl is None else start + _ms(ttl))
            offset = await self._append_trigger(Event(new_event_id(), body.TYPE, run_id, t.id, 1, now, 0, body),
                                                t.pool)
            if await self._took(run_id, offset):
                return RunHandle(run_id, t.id, self, t.output_codec, None)
            generation += 1

    async def _took(self, run_id: str, offset: int) -> bool:
        """Whether the trigger at `offset` found the run pending and unstarted (or new)."""
        part = PartitionRuns(0)  # the number is not read: one run is folded
        for off, ev in await self.history(run_id):
            if off >= offset:
                break
            part.apply(ev, off)
        before = part.runs.get(run_id)
        return before is None or (before.status == PENDING and before.started_at is None)

    async def _keyed_run(self, task_id: str, key: str, ttl_ms: int, now: int) -> tuple[str, bool]:
        """The run an idempotency key maps to under a TTL: (run id, exists).

        Generation n of a key is the run id of `key` (n = 0) or `key#n`; a
        key whose run outlived the TTL moves on to the next generation. Each
        look-up reads the run's partition, so keys with a TTL cost a read
        per trigger where plain keys cost none.
        """
        generation = 0
        while True:
            run_id = idempotent_run_id(task_id, key if generation == 0 else f"{key}#{generation}")
            try:
                state = await self.get_run(run_id)
            except UnknownRun:
                return run_id, False
            if now - state.created_at < ttl_ms:
                return run_id, True
            generation += 1

    async def publish(
        self, name: str, data: Any = None, *, key: str | None = None, source: str = "api"
    ) -> str:
        """Append a DomainEvent to the events topic; returns its event id.

        Events with the same key land in one partition and keep their order;
        without a key the event id spreads them out.
        """
        check_event_name(name)
        payload = ANY.dump(data, f"data of event {name!r}")
        self._check_size(payload, f"data of event {name!r}")
        event_id = new_event_id()
        body = DomainEvent(name, payload, key, source)
        ev = Event(event_id, body.TYPE, "", "", 0, self.clock(), 0, body)
        partition_key = (key or event_id).encode()
        # Kafka's partitioner, not the runs topic's CRC-32: other services
        # publish to this topic with their own clients (docs/operations.md).
        partition = kafka_partition_for(partition_key, self._event_partitions)

        async def append(event: Event) -> int:
            return await append_event(self.log, self.topics.events, partition, partition_key, event)

        # Through the interceptors: tracing writes its publish span's context
        # into the envelope, for the runs this event starts to link to.
        await self.interceptors.publish(ev, append, Destination(self._system, self.topics.events, partition))
        return event_id

    async def why(self, run_id: str) -> list[Reason]:
        """Why `run_id` is not executing now: each reason a kind, a sentence
        and its facts (engine/client/why.py). UnknownRun for no such run."""
        return await reasons(self, run_id)

    async def fork(
        self,
        run_id: str,
        at_step: int,
        *,
        payload: Any = None,
        new_payload: bool = False,
        step_outputs: Mapping[int, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> RunHandle[Any]:
        """Start a new run of the same task whose journal before `at_step` is
        a copy of `run_id`'s, then runs live from `at_step` (engine/client/fork.py).

        `new_payload=True` replaces the payload with `payload` (validated
        against the task when the client knows it); `step_outputs` replaces
        the outputs of copied steps, by position. The new run records
        `forked_from` and `forked_at_step`. Raises InvalidFork when the
        original's history cannot give that prefix.
        """
        state = await self.get_run(run_id)
        t = self.registry.find(state.task_id) if self.registry is not None else None
        where = f"payload for task {state.task_id!r}"
        replacement: Payload | None = None
        if new_payload:
            replacement = (t.payload_codec if t else ANY).check_and_dump(payload, where)
            replacement = await self._seal(t, replacement, where)
        outputs = {int(pos): ANY.dump(value, f"output for step {pos} of the fork")
                   for pos, value in (step_outputs or {}).items()}
        body = fork_trigger(state, at_step, payload=replacement, step_outputs=outputs,
                            idempotency_key=idempotency_key)
        size = copied_bytes(body)
        if size > self.max_payload_bytes:
            raise PayloadTooLarge(
                f"a fork of run {run_id} at step {at_step} copies {size:,} bytes of payload and step data, "
                f"over the {self.max_payload_bytes:,}-byte limit (STEPLINE_MAX_PAYLOAD_BYTES): fork at "
                f"an earlier step"
            )
        now = self.clock()
        new_id = idempotent_run_id(state.task_id, idempotency_key) if idempotency_key else new_run_id(now)
        ev = Event(new_event_id(), body.TYPE, new_id, state.task_id, 1, now, 0, body)
        offset = await self._append_trigger(ev, t.pool if t else await self.home(run_id))
        return RunHandle(new_id, state.task_id, self, t.output_codec if t else ANY,
                         None if idempotency_key else offset)


__all__ = ["Client", "RunHandle", "check_event_name", "current_client", "publish"]
