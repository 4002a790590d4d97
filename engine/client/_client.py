"""The client: trigger runs, await their results, inspect and steer them.

Used from application code (`async with stepline.Client(url)`), from inside
tasks (the worker's own client), and by the CLI. It writes only requests
that any process may make (trigger, cancel, retrigger); everything else is
the partition owner's to write.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

from stepline.client.fork import copied_bytes, fork_trigger
from stepline.client.pause import pauses, scope_of, set_paused
from stepline.core import codec
from stepline.core.events import (
    JSON,
    REQUEST_TYPES,
    DomainEvent,
    ErrorInfo,
    Event,
    Payload,
    RunCancelled,
    RunRetriggered,
    RunTriggered,
    WaitCompleted,
)
from stepline.core.ids import TOKEN, idempotent_run_id, new_event_id, new_run_id, parse_token
from stepline.core.payloads import ANY
from stepline.errors import (
    InvalidEventName,
    InvalidRunState,
    InvalidToken,
    KeyStoreError,
    NoClient,
    PayloadTooLarge,
    PayloadValidationError,
    UnknownRun,
)
from stepline.log import open_log
from stepline.log.appender import Appender
from stepline.log.base import Log, partition_for
from stepline.log.topics import Topics
from stepline.projections.runs import (
    CANCELLED,
    FAILED,
    LIVE,
    PENDING,
    TERMINAL,
    PartitionRuns,
    RunState,
    fold_run,
)
from stepline.sdk import port
from stepline.sdk.context import now_ms
from stepline.sdk.debounce import Debounce
from stepline.sdk.interceptors import Interceptor, Interceptors, default_interceptors
from stepline.sdk.port import ClientPort, RunHandle, TaskRef, bind_client, unbind_client
from stepline.sdk.task import Registry, Task
from stepline.security.keystore import KeyStore, default_keystore
from stepline.security.sensitive import refuse_envelopes, seal
from stepline.settings import load_settings

R = TypeVar("R")

Progress = Callable[[int, int], None]

_TERMINAL_TYPES = frozenset({b"RunCompleted", b"RunFailed", b"RunCancelled", b"RunExpired"})


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


class _Watcher:
    """Tails one partition for terminal events of awaited runs."""

    RECENT = 50_000

    def __init__(self, client: Client, partition: int, start: int) -> None:
        self.client = client
        self.partition = partition
        self.start = start
        self.waiters: dict[str, list[asyncio.Future[Event]]] = {}
        self.recent: OrderedDict[str, Event] = OrderedDict()
        # The newest owner epoch seen since `start` (claims before it are not
        # read, so fencing here covers what this watcher saw).
        self.epoch = 0
        self.task = asyncio.create_task(self._loop(), name=f"stepline-watch-{partition}")

    async def _loop(self) -> None:
        try:
            await self._tail()
        except Exception as exc:
            # The log failed under us: waiters get the error now rather than
            # a timeout later, and the next wait starts a new watcher.
            self.client._watchers.pop(self.partition, None)
            for futures in self.waiters.values():
                for f in futures:
                    if not f.done():
                        f.set_exception(exc)
            self.waiters.clear()

    async def _tail(self) -> None:
        offset = self.start
        log_, topic = self.client.log, self.client.topics.runs
        while True:
            recs = await log_.read(topic, self.partition, offset, 5000, timeout=1.0)
            for r in recs:
                offset = r.offset + 1
                kind = codec.peek_type(r.value)
                if kind == b"PartitionClaimed":
                    self.epoch = max(self.epoch, codec.decode(r.value).epoch)
                    continue
                if kind not in _TERMINAL_TYPES:
                    continue
                ev = codec.decode(r.value)
                if ev.type not in REQUEST_TYPES and ev.epoch < self.epoch:
                    continue  # a replaced owner's late outcome: the fold drops it too
                self.recent[ev.run_id] = ev
                if len(self.recent) > self.RECENT:
                    self.recent.popitem(last=False)
                for f in self.waiters.pop(ev.run_id, ()):
                    if not f.done():
                        f.set_result(ev)


class Client:
    """Talks to a Stepline log. An async context manager."""

    def __init__(
        self,
        url: str | None = None,
        *,
        log: Log | None = None,
        registry: Registry | None = None,
        topics: Topics | None = None,
        max_payload_bytes: int | None = None,
        keys: KeyStore | None = None,
        interceptors: Sequence[Interceptor] | None = None,
    ) -> None:
        if (url is None) == (log is None):
            raise ValueError("Client needs exactly one of url= or log=")
        self._owns_log = log is None
        self._keys = keys
        self.log: Log = log if log is not None else open_log(url or "")
        self.registry = registry
        self.topics = topics or Topics()
        self._appender: Appender | None = None
        self._nparts = 0
        self._event_partitions = 0
        self._watchers: dict[int, _Watcher] = {}
        self._token: contextvars.Token[ClientPort | None] | None = None
        self.clock = now_ms
        # Hooks around each trigger (tracing: the run's trace starts here).
        self.interceptors = Interceptors(default_interceptors() if interceptors is None else interceptors)
        # Payloads and event data larger than this are refused before anything
        # is appended (a log record is not a blob store; Kafka's default
        # message limit is 1 MiB for the whole batch).
        self.max_payload_bytes = (max_payload_bytes if max_payload_bytes is not None
                                  else load_settings().max_payload_bytes)

    @property
    def keys(self) -> KeyStore | None:
        """Subject keys of sensitive payload fields: as given, else STEPLINE_KEYS,
        else beside an embedded log (engine/security/keystore.py); None when unconfigured."""
        if self._keys is None:
            self._keys = default_keystore(self.log.url)
        return self._keys

    async def forget(self, subject: str) -> list[str]:
        """Erase a subject: delete its keys, so its sensitive fields are unreadable
        everywhere (they show as "[erased]"; its runs still fold and replay, and
        an attempt that needs them fails with SubjectErased). Returns the key ids
        deleted, empty when the subject had none. See docs/sensitive-data.md."""
        keys = self.keys
        if keys is None:
            raise KeyStoreError("no key store is configured (STEPLINE_KEYS or Client(keys=...)): "
                                "there are no subject keys to delete")
        return await keys.forget(subject)

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

    async def start(self) -> None:
        if self._owns_log:
            await self.log.start()
        await self.log.ensure_topics(self.topics.specs())
        self._nparts = await self.log.partitions(self.topics.runs)
        self._event_partitions = await self.log.partitions(self.topics.events)
        self._appender = Appender(self.log, self.topics.runs)

    async def close(self) -> None:
        for w in self._watchers.values():
            w.task.cancel()
        await asyncio.gather(*(w.task for w in self._watchers.values()), return_exceptions=True)
        self._watchers.clear()
        if self._appender is not None:
            await self._appender.drain()
        if self._owns_log:
            await self.log.close()

    def _check_size(self, payload: Payload, where: str) -> None:
        if len(payload.data) > self.max_payload_bytes:
            raise PayloadTooLarge(
                f"{where} is {len(payload.data):,} bytes, over the {self.max_payload_bytes:,}-byte limit "
                f"(STEPLINE_MAX_PAYLOAD_BYTES): store large data elsewhere and pass a reference"
            )

    async def _seal(self, t: Task[Any, Any] | None, data: Payload, where: str, strict: bool = True) -> Payload:
        """Encrypt the task's sensitive fields (engine/security/sensitive.py) before anything is appended.

        Not strict (the event router): a payload that cannot be sealed, e.g.
        without its subject, is recorded as given, and its run fails on its own."""
        spec = t.sensitive if t is not None else None
        if spec is None:
            if strict:
                refuse_envelopes(data, where)
            return data
        try:
            return await seal(spec, data, self.keys, where)
        except PayloadValidationError:
            if strict:
                raise
            return data

    def partition_of(self, run_id: str) -> int:
        return partition_for(run_id.encode(), self._nparts)

    def _task(self, task: TaskRef[Any] | str) -> tuple[str, Task[Any, Any] | None]:
        if isinstance(task, Task):
            return task.id, task
        task_id = task if isinstance(task, str) else task.id
        if self.registry is not None:
            return task_id, self.registry.get(task_id)  # raises UnknownTask
        return task_id, None

    async def _append(self, ev: Event) -> int:
        assert self._appender is not None, "client not started"
        return await self._appender.submit(ev, ev.run_id.encode(), self.partition_of(ev.run_id))

    async def _append_trigger(self, ev: Event) -> int:
        """Append a RunTriggered in a `stepline.trigger` span whose W3C context it carries."""
        return await self.interceptors.trigger(ev, self._append)

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
        offset = await self._append_trigger(Event(new_event_id(), body.TYPE, run_id, task_id, 1, now, 0, body))
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
            offset = await self._append_trigger(Event(new_event_id(), body.TYPE, run_id, t.id, 1, now, 0, body))
            if await self._took(run_id, offset):
                return RunHandle(run_id, t.id, self, t.output_codec, None)
            generation += 1

    async def _took(self, run_id: str, offset: int) -> bool:
        """Whether the trigger at `offset` found the run pending and unstarted (or new)."""
        part = PartitionRuns(self.partition_of(run_id))
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
        await self.log.append(
            self.topics.events,
            partition_for(partition_key, self._event_partitions),
            [(partition_key, codec.encode(ev))],
        )
        return event_id

    async def cancel(self, run_id: str, reason: str = "cancelled by request") -> RunState:
        state = await self.get_run(run_id)
        if state.status not in LIVE:
            raise InvalidRunState(f"run {run_id} is already {state.status}; nothing to cancel")
        body = RunCancelled(reason, "client")
        await self._append(Event(new_event_id(), body.TYPE, run_id, state.task_id, 0, self.clock(), 0, body))
        return state

    async def retry(self, run_id: str, payload: Any = None, *, new_payload: bool = False) -> RunState:
        """Re-trigger a failed (dead-lettered) or cancelled run.

        It resumes from its last completed step; with `new_payload=True` the
        given payload replaces the original (validated against the task when
        the client knows it).
        """
        state = await self.get_run(run_id)
        if state.status not in (FAILED, CANCELLED):
            raise InvalidRunState(
                f"run {run_id} is {state.status}; only failed or cancelled runs can be retried"
            )
        replacement: Payload | None = None
        if new_payload:
            t: Task[Any, Any] | None = None
            if self.registry is not None and state.task_id in self.registry:
                t = self.registry.get(state.task_id)
            pcodec = t.payload_codec if t else ANY
            replacement = pcodec.check_and_dump(payload, f"payload for task {state.task_id!r}")
            replacement = await self._seal(t, replacement, f"payload for task {state.task_id!r}")
        body = RunRetriggered(replacement, "client")
        await self._append(Event(new_event_id(), body.TYPE, run_id, state.task_id, 0, self.clock(), 0, body))
        return state

    async def pause(self, *, task: str | None = None, queue: str | None = None, reason: str = "",
                    requested_by: str = "api") -> None:
        """Pause a task or a queue (name one): its runs stay queued, new
        triggers are still recorded, attempts under way finish. Holds across
        every worker and restart until `resume`; see engine/client/pause.py."""
        scope, name = scope_of(task, queue)
        await set_paused(self, scope, name, True, reason=reason, requested_by=requested_by)

    async def resume(self, *, task: str | None = None, queue: str | None = None,
                     requested_by: str = "api") -> None:
        """Resume a paused task or queue: its held runs start in their usual order."""
        scope, name = scope_of(task, queue)
        await set_paused(self, scope, name, False, requested_by=requested_by)

    async def paused(self) -> dict[tuple[str, str], str]:
        """What is paused: (scope, name) -> the reason given."""
        return {key: body.reason for key, body in (await pauses(self)).items()}

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
        offset = await self._append_trigger(ev)
        return RunHandle(new_id, state.task_id, self, t.output_codec if t else ANY,
                         None if idempotency_key else offset)

    async def resolve_wait(
        self, run_id: str, task_id: str, step: int, reason: str, source: str,
        output: Payload | None = None, error: ErrorInfo | None = None,
    ) -> int:
        """Append WaitCompleted: the first resolution of a wait wins, repeats are no-ops."""
        body = WaitCompleted(step, reason, source, output, error)
        return await self._append(Event(new_event_id(), body.TYPE, run_id, task_id, 0, self.clock(), 0, body))

    async def complete_token(self, token: str, data: Any = None) -> RunState:
        """Resume the run waiting on `token` (`wait_for_token`) with `data`.

        Raises InvalidToken for a malformed token or one that was already
        completed or timed out, and InvalidRunState when its run has ended.
        """
        run_id, step = parse_token(token)
        state = await self.get_run(run_id)
        if state.status in TERMINAL:
            raise InvalidRunState(f"run {run_id} is already {state.status}; token {token} cannot complete it")
        rec = state.steps.get(step)
        if rec is not None and rec.status != "waiting":
            raise InvalidToken(f"token {token} was already {'completed' if rec.output else 'resolved or timed out'}")
        if rec is not None and rec.name != TOKEN:
            raise InvalidToken(f"token {token} does not name a token wait (step {step} is {rec.name!r})")
        output = ANY.dump(data, f"data for token {token}")
        await self.resolve_wait(run_id, state.task_id, step, TOKEN, token, output=output)
        return state

    # --- reading -------------------------------------------------------------

    async def history(
        self, run_id: str, progress: Progress | None = None, *, claims: bool = False
    ) -> list[tuple[int, Event]]:
        """Every event of a run, in log order, with its offset.

        With `claims=True` the partition's PartitionClaimed events come too,
        so that a fold of the result fences a replaced owner's late events
        exactly as the worker's own fold does.
        """
        p = self.partition_of(run_id)
        key = run_id.encode()
        out: list[tuple[int, Event]] = []
        end = await self.log.end_offset(self.topics.runs, p)
        offset = 0
        while offset < end:
            recs = await self.log.read(self.topics.runs, p, offset, 5000)
            for r in recs:
                if r.key == key or (claims and r.key == b"" and codec.peek_type(r.value) == b"PartitionClaimed"):
                    out.append((r.offset, codec.decode(r.value)))
            offset = recs[-1].offset + 1 if recs else end
            if progress:
                progress(offset, end)
        return out

    async def get_run(self, run_id: str) -> RunState:
        part = PartitionRuns(self.partition_of(run_id))
        for off, ev in await self.history(run_id, claims=True):
            part.apply(ev, off)
        state = part.runs.get(run_id)
        if state is None:
            raise UnknownRun(run_id)
        return state

    async def events(
        self, progress: Progress | None = None
    ) -> AsyncIterator[tuple[int, int, Event]]:
        """Every event on the runs topic as (partition, offset, event), in log
        order within each partition, up to the ends as of the call."""
        ends = {p: await self.log.end_offset(self.topics.runs, p) for p in range(self._nparts)}
        total, done = sum(ends.values()), 0
        for p, end in ends.items():
            offset = 0
            while offset < end:
                recs = await self.log.read(self.topics.runs, p, offset, 5000)
                for r in recs:
                    if r.offset >= end:
                        break
                    yield p, r.offset, codec.decode(r.value)
                step = (recs[-1].offset + 1 - offset) if recs else end - offset
                offset += step
                done += step
                if progress:
                    progress(min(done, total), total)

    async def list_runs(self, progress: Progress | None = None) -> list[RunState]:
        """All runs, folded from the log (newest first)."""
        parts: dict[int, PartitionRuns] = {}
        async for p, offset, ev in self.events(progress):
            part = parts.get(p)
            if part is None:
                part = parts[p] = PartitionRuns(p)
            part.apply(ev, offset)
        runs = [r for part in parts.values() for r in part.runs.values()]
        runs.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        return runs

    async def wait(self, run_id: str, timeout: float | None = None, from_offset: int | None = None) -> RunState:
        """Wait until the run is completed, failed or cancelled; its state then."""
        p = self.partition_of(run_id)
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        w = self._watchers.get(p)
        covered = w is not None and from_offset is not None and from_offset >= w.start
        if w is None:
            start = from_offset if from_offset is not None else await self.log.end_offset(self.topics.runs, p)
            w = self._watchers[p] = _Watcher(self, p, start)
            covered = from_offset is not None
        w.waiters.setdefault(run_id, []).append(fut)
        if run_id in w.recent:
            fut.set_result(w.recent[run_id])
        if not covered:
            # The watcher may have passed this run's end already: look it up.
            state = await self.get_run(run_id)
            if state.status in TERMINAL:
                return state
        try:
            async with asyncio.timeout(timeout):
                ev = await fut
        except TimeoutError:
            raise TimeoutError(f"run {run_id} did not finish within {timeout} s") from None
        finally:
            waiting = w.waiters.get(run_id)
            if waiting and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del w.waiters[run_id]
        return self._terminal_state(run_id, ev)

    def _terminal_state(self, run_id: str, ev: Event) -> RunState:
        """A state good enough for result(): built from the terminal event alone.

        The watcher sees only terminal events; folding the whole run to
        answer a result() would read its partition again.
        """
        start = RunState(run_id, ev.task_id, "pending", Payload(JSON, b"null"), ev.time, ev.time)
        return fold_run(start, ev) or start


__all__ = ["Client", "RunHandle", "check_event_name", "current_client", "publish"]
