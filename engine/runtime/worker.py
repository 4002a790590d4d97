"""The worker: owns partitions, folds their events, runs what is runnable.

Lifecycle of an owned partition:

1. Rebuild: read the partition from the start and fold it into
   `PartitionRuns` (snapshots come later; the fold is the same).
2. Claim: append PartitionClaimed with an epoch above every epoch seen and
   the group's generation, then read up to the claim, so nothing a previous
   owner wrote before it is missed. From here on events of older epochs are
   dropped by the projection.
3. Resume: every live run is put back where it belongs: ready to start,
   on a timer (delays, retries, sleeps), or restarted if it was running
   when the previous owner died.
4. Tail: new events are folded in log order, and each touched run is
   re-examined (`_react`).

The worker writes its own events through the Appender and folds them when
it reads them back, in log order like everyone else's; to save decoding,
the events it appended are kept by offset until read back.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import socket
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from stepline.client import Client
from stepline.client.backfill import backfill_new_subscriptions
from stepline.consumers.lookback import find_past_event
from stepline.consumers.router import Router
from stepline.consumers.waits import WaitEntry, register, unregister
from stepline.core import codec
from stepline.core.events import (
    PAUSE_TASK,
    Body,
    ErrorInfo,
    Event,
    PartitionClaimed,
    PauseChanged,
    RetryScheduled,
    RunCompleted,
    RunDeadLettered,
    RunExpired,
    RunFailed,
    RunResumed,
    RunSuspended,
    RunTriggered,
    SlotReleased,
    SlotRequested,
    WaitCompleted,
)
from stepline.core.ids import new_event_id
from stepline.errors import LogError, SchemaError, UnknownTask
from stepline.log.appender import Appender
from stepline.log.base import Assignment, Log, Membership, Outgoing, partition_for
from stepline.log.quarantine import quarantine
from stepline.log.topics import Topics
from stepline.observability import tracing
from stepline.projections.runs import (
    CANCELLED,
    EXPIRED,
    PENDING,
    RETRYING,
    RUNNING,
    SUSPENDED,
    TERMINAL,
    PartitionRuns,
    RunState,
)
from stepline.projections.snapshot import SnapshotError
from stepline.runtime.admission import Admission
from stepline.runtime.dispatch import ReadyQueue
from stepline.runtime.runner import execute_attempt
from stepline.runtime.snapshots import SnapshotStore
from stepline.runtime.timers import TimerWheel
from stepline.sdk.context import SLEEP, RunContext, error_info, now_ms
from stepline.sdk.port import bind_client
from stepline.sdk.schedule import Scheduler
from stepline.sdk.task import Queue, Registry, Task
from stepline.sdk.waits import EVENT
from stepline.security.keystore import KeyStore, default_keystore

log = structlog.get_logger("stepline.worker")

START = "start"
RESUME = "resume"
EXPIRE = "expire"

# Events that end an attempt; a slot held for the attempt is released first.
_ENDS_ATTEMPT = (RunCompleted, RunSuspended, RetryScheduled, RunFailed)


def _copy_result(src: asyncio.Future[int], dst: asyncio.Future[int]) -> None:
    if dst.done():
        return
    if src.cancelled():
        dst.cancel()
    elif src.exception() is not None:
        dst.set_exception(src.exception())  # type: ignore[arg-type]
    else:
        dst.set_result(src.result())


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


class Worker:
    """Runs the tasks of a registry from a log. Use as an async context manager."""

    def __init__(
        self,
        registry: Registry,
        log_: Log,
        *,
        topics: Topics | None = None,
        concurrency: int = 256,
        worker_id: str | None = None,
        clock: Callable[[], int] = now_ms,
        read_batch: int = 2000,
        client: Client | None = None,
        snapshot_every: int = 50_000,
        route_events: bool = True,
        keys: KeyStore | None = None,
    ) -> None:
        self.registry = registry
        self.log = log_
        self.topics = topics or Topics()
        self.concurrency = concurrency
        self.worker_id = worker_id or default_worker_id()
        self.clock = clock
        self._read_batch = read_batch
        # Events folded between snapshots of a partition; a revoke also
        # snapshots when at least a tenth of that has accumulated.
        self.snapshot_every = snapshot_every
        # Route domain events to subscribed tasks and waiting runs (needs a
        # client to append with).
        self._router: Router[Task[Any, Any]] | None = (
            Router(registry, client, retroactive=functools.partial(backfill_new_subscriptions, client))
            if route_events and client is not None else None
        )
        self._scheduler: Scheduler | None = (
            Scheduler(registry, client) if client is not None
            and any(t.schedule is not None for t in registry) else None
        )
        self._folded_since: dict[int, int] = {}
        # Where each claimed partition's rebuild started (0 without a snapshot).
        self.rebuilt_from: dict[int, int] = {}
        # Tasks that trigger other tasks use this client.
        self.client = client
        # Subject keys to open sensitive payload fields with: the client's, unless given.
        self.keys = keys if keys is not None else (
            client.keys if client is not None else default_keystore(log_.url))
        self._rng = random.Random()
        self._parts: dict[int, PartitionRuns] = {}
        self._epoch: dict[int, int] = {}
        self._readers: dict[int, asyncio.Task[None]] = {}
        self._active: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: set[str] = set()
        self._recover: set[str] = set()
        # Runs whose attempt ended but whose outcome is not folded yet, with
        # the outcome's offset: until then their state lags behind the truth.
        self._settling: dict[str, int] = {}
        # Runs whose last attempt could not record its outcome (the log
        # refused the append: disk full, broker down), by failures in a row.
        self._stalled: dict[str, int] = {}
        self._seq: dict[str, int] = {}
        self._own: dict[tuple[int, int], Event] = {}
        self._ready = ReadyQueue()
        self._timers = TimerWheel(self._on_timer, clock)
        self._membership: Membership | None = None
        self._appender: Appender | None = None
        self._nparts = 0
        self._stopping = False
        self._background: set[asyncio.Task[None]] = set()
        # Admission to limited queues: runs that asked for a slot and have
        # not seen it granted; runs whose attempt holds one; and, per run, the
        # release that must be durable before the attempt's outcome is.
        self._asked: dict[str, SlotRequested] = {}
        self._holding: dict[str, tuple[str, str | None, str]] = {}
        self._gates: dict[str, asyncio.Future[int]] = {}
        self._expiring: set[str] = set()
        # W3C context of each live run's RunTriggered: its attempts' spans
        # are children of the trigger's, so a run is one trace wherever it
        # was triggered. (Runs whose trigger is older than the snapshot a
        # partition was rebuilt from have none: their attempts start traces.)
        self._trace_parents: dict[str, tracing.TraceParent] = {}
        self.started = asyncio.Event()

    # --- lifecycle -------------------------------------------------------

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        await self.log.ensure_topics(self.topics.specs())
        self._nparts = await self.log.partitions(self.topics.runs)
        self._appender = Appender(self.log, self.topics.runs, self._on_appended)
        self._admission = Admission(self.log, self.topics, self._request, self.clock, self.worker_id)
        await self._admission.prepare()
        self._snapshots = SnapshotStore(self.log, self.topics.snapshots)
        self._timers.start()
        # Ticks first: on the single-seat backends joining the group waits
        # while another worker holds it, and a standby firing ticks is
        # harmless (one run per tick) and keeps schedules going if the
        # active worker is wedged.
        if self._scheduler is not None:
            self._scheduler.start()
        self._membership = await self.log.join_group(
            self.topics.worker_group, self.topics.runs, self._on_assign, self._on_revoke
        )
        if self._router is not None:
            await self._router.start()
        await self._admission.start()
        tracing.watch_worker(self)
        self.started.set()

    async def close(self) -> None:
        self._stopping = True
        tracing.unwatch_worker(self)
        await self._admission.close()
        if self._scheduler is not None:
            await self._scheduler.close()
        if self._router is not None:
            await self._router.close()
        if self._membership is not None:
            await self._on_revoke(frozenset(self._parts))
            await self._membership.leave()
            self._membership = None
        await self._timers.stop()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._appender is not None:
            await self._appender.drain()

    # --- ownership -------------------------------------------------------

    async def _on_assign(self, assignment: Assignment) -> None:
        for p in sorted(assignment.partitions):
            await self._claim(p, assignment.generation)
        # Start only once every partition is rebuilt, so the first runs
        # admitted are the best by priority across all of them.
        self._pump()

    async def _on_revoke(self, partitions: frozenset[int]) -> None:
        """Stop everything for these partitions before anyone else may own them.

        The partitions are forgotten first, so that no run of theirs starts
        while the running ones wind down (a run ending frees a slot, and the
        pump would otherwise pick a queued run of a partition being revoked).
        """
        readers = [self._readers.pop(p) for p in partitions if p in self._readers]
        leaving = [part for p in partitions if (part := self._parts.pop(p, None)) is not None]
        for p in partitions:
            self._epoch.pop(p, None)
        for rid in [r for r in self._asked if partition_for(r.encode(), self._nparts) in partitions]:
            del self._asked[rid]  # the next owner asks again; the queue keeps one request
        for rid in [r for r in self._trace_parents if partition_for(r.encode(), self._nparts) in partitions]:
            del self._trace_parents[rid]
        for reader in readers:
            reader.cancel()
        doomed = [t for rid, t in self._active.items()
                  if partition_for(rid.encode(), self._nparts) in partitions]
        for t in doomed:
            t.cancel()
        await asyncio.gather(*readers, *doomed, return_exceptions=True)
        for p in partitions:
            await self.log.unfence(self.topics.runs, p)
        # Leave a recent snapshot for the next owner. Its state is a fold of
        # a log prefix, valid whoever writes it, even after losing ownership.
        for part in leaving:
            if self._folded_since.get(part.partition, 0) >= max(1, self.snapshot_every // 10):
                await self._snapshot(part)

    async def _claim(self, p: int, generation: int) -> None:
        assert self._appender is not None
        # Fence before the claim is written: a previous owner's transaction
        # (a checkpoint with emitted records) either committed before our
        # claim, and is accepted, or is aborted now and can never commit.
        await self.log.fence(self.topics.runs, p)
        part = await self._load_snapshot(p)
        self.rebuilt_from[p] = part.next_offset
        await self._catch_up(part, await self.log.end_offset(self.topics.runs, p))
        # What the rebuild folded counts towards the next snapshot: a worker
        # restarted more often than `snapshot_every` events arrive would
        # otherwise never write one, and every restart would rebuild from 0.
        self._folded_since[p] = part.next_offset - self.rebuilt_from[p]
        epoch = max(generation, part.epoch + 1)
        claim = Event(
            new_event_id(), PartitionClaimed.TYPE, "", "", 0, self.clock(), epoch,
            PartitionClaimed(p, self.worker_id),
        )
        await self._appender.submit(claim, b"", p)
        await self._catch_up(part, await self.log.end_offset(self.topics.runs, p))
        if part.epoch != epoch:  # someone claimed after us: we are already fenced
            log.warning("partition claimed by a newer owner", partition=p, epoch=epoch)
            await self.log.unfence(self.topics.runs, p)
            return
        self._epoch[p] = epoch
        self._parts[p] = part
        live = list(part.live_runs())
        for state in live:
            if state.status == RUNNING:
                self._recover.add(state.run_id)
            self._react(state)
        log.info("partition claimed", partition=p, epoch=epoch, live_runs=len(live),
                 worker=self.worker_id)
        self._readers[p] = asyncio.create_task(self._tail(p), name=f"stepline-tail-{p}")
        if self._folded_since[p] >= self.snapshot_every:
            # A long rebuild: leave a snapshot now so the next owner starts there.
            t = asyncio.create_task(self._snapshot(part), name=f"stepline-snapshot-{p}")
            self._background.add(t)
            t.add_done_callback(self._background.discard)

    async def _load_snapshot(self, p: int) -> PartitionRuns:
        try:
            part = await self._snapshots.load(p)
        except (SnapshotError, LogError) as exc:
            log.warning("snapshot unusable, rebuilding from offset 0", partition=p, error=str(exc))
            part = None
        return part if part is not None else PartitionRuns(p)

    async def _snapshot(self, part: PartitionRuns) -> None:
        try:
            await self._snapshots.save(part)
            self._folded_since[part.partition] = 0
        except LogError as exc:  # a shortcut lost, nothing else
            log.warning("could not write a snapshot", partition=part.partition, error=str(exc))

    async def _catch_up(self, part: PartitionRuns, end: int) -> None:
        while part.next_offset < end:
            recs = await self.log.read(self.topics.runs, part.partition, part.next_offset, self._read_batch)
            if not recs:
                return  # the rest below `end` holds no record (Kafka transaction markers)
            for r in recs:
                ev = self._decode(r.value, part.partition, r.offset)
                if ev is not None:
                    self._fold(part, ev, r.offset)
                else:
                    part.next_offset = r.offset + 1

    # --- reading ---------------------------------------------------------

    def _fold(self, part: PartitionRuns, ev: Event, offset: int) -> RunState | None:
        """Fold one event, keeping the trace context of each live run's trigger."""
        st = part.apply(ev, offset)
        if st is not None:
            if ev.traceparent is not None and type(ev.body) is RunTriggered:
                parent = tracing.trigger_context(ev)
                if parent is not None and st.status not in TERMINAL:
                    self._trace_parents.setdefault(st.run_id, parent)
            elif self._trace_parents and st.status in TERMINAL:
                self._trace_parents.pop(st.run_id, None)
        return st

    def _decode(self, value: bytes, p: int, offset: int) -> Event | None:
        own = self._own.pop((p, offset), None)
        if own is not None:
            return own
        try:
            return codec.decode(value)
        except SchemaError as exc:
            # Never block the partition on one bad record; keep it aside
            # with the reason (a rebuild meets it again: one entry per place).
            log.error("undecodable event quarantined", partition=p, offset=offset, error=str(exc))
            t = asyncio.create_task(quarantine(self.log, self.topics.quarantine, self.topics.runs, p,
                                               offset, value, str(exc), f"worker {self.worker_id}"))
            self._background.add(t)
            t.add_done_callback(self._background.discard)
            return None

    def _on_appended(self, p: int, offsets: list[int], events: list[Event]) -> None:
        part = self._parts.get(p)
        if part is None:
            return
        for off, ev in zip(offsets, events):
            if off >= part.next_offset:
                self._own[(p, off)] = ev

    async def _tail(self, p: int) -> None:
        part = self._parts[p]
        topic = self.topics.runs
        while True:
            recs = await self.log.read(topic, p, part.next_offset, self._read_batch, timeout=1.0)
            touched: dict[str, RunState] = {}
            for r in recs:
                ev = self._decode(r.value, p, r.offset)
                if ev is None:
                    part.next_offset = r.offset + 1
                    continue
                st = self._fold(part, ev, r.offset)
                if st is not None:
                    touched[st.run_id] = st
                elif isinstance(ev.body, PauseChanged):
                    touched.update(self._paused_runs(part, ev.body))
            for st in touched.values():
                self._react(st)
            if touched:
                self._pump()
            folded = self._folded_since[p] = self._folded_since.get(p, 0) + len(recs)
            if folded >= self.snapshot_every:
                await self._snapshot(part)

    # --- deciding --------------------------------------------------------

    def _react(self, state: RunState) -> None:
        rid = state.run_id
        status = state.status
        if status == CANCELLED and state.parent_step is not None and state.parent_run_id is not None:
            # A cancelled child still answers its parent's trigger_and_wait.
            self._request(state.parent_run_id, "", WaitCompleted(
                state.parent_step, "child", rid,
                error=ErrorInfo("Cancelled", "the child run was cancelled", "", False),
            ))
        if rid in self._active:
            if status == CANCELLED:
                self._cancel_requested.add(rid)
                self._active[rid].cancel()
            return
        settling = self._settling.get(rid)
        if settling is not None:
            part = self._parts.get(partition_for(rid.encode(), self._nparts))
            if part is not None and part.next_offset <= settling:
                return  # this state predates the attempt's outcome
            del self._settling[rid]
        if rid in self._asked and status in TERMINAL | {SUSPENDED}:
            self._withdraw(state, status)
        if status == PENDING:
            now = self.clock()
            if state.expires_at is not None and state.started_at is None:
                if state.expires_at <= now:
                    self._expire(state)
                    return
                self._timers.schedule(state.expires_at, rid, EXPIRE)
            if state.not_before is not None and state.not_before > now:
                self._timers.schedule(state.not_before, rid, START)
            else:
                self._enqueue(state)
        elif status == RETRYING and state.retry_at is not None:
            self._timers.schedule(state.retry_at, rid, START)
        elif status == SUSPENDED and state.wake_at is not None:
            self._timers.schedule(state.wake_at, rid, RESUME)
        elif status == RUNNING and rid in self._recover:
            self._enqueue(state)
        else:
            self._ready.discard(rid)
            if status not in (RUNNING,):
                self._seq.pop(rid, None)

    def _enqueue(self, state: RunState) -> None:
        task = self.registry.find(state.task_id)
        if self._held(state):
            self._ready.discard(state.run_id)  # it starts when resumed, in its usual order
            return
        if task is not None and task.queue.limited:
            if state.slot is None:
                self._ask_slot(state, task.queue)
                return
            # Admitted by the queue's owner, for all workers: no local limit.
            self._asked.pop(state.run_id, None)
            self._ready.push(state.run_id, task.queue.name, None, state.priority, state.created_at)
            return
        queue, limit = (task.queue.name, task.queue.concurrency_limit) if task else ("", None)
        self._ready.push(state.run_id, queue, limit, state.priority, state.created_at)

    # --- pauses (engine/client/pause.py) ----------------------------------------

    def _held(self, state: RunState) -> bool:
        """Whether a pause holds this run back from a new attempt.

        Runs of limited queues are held by the queue's owner instead (it
        grants no slot while paused, so they keep their place in the queue),
        and an attempt already under way (RUNNING, recovered after its
        worker died) finishes: a pause stops starts, not work.
        """
        part = self._parts.get(partition_for(state.run_id.encode(), self._nparts))
        if part is None or not part.paused or state.status == RUNNING:
            return False
        task = self.registry.find(state.task_id)
        if task is not None and task.queue.limited:
            return False
        return part.is_paused(state.task_id, task.queue.name if task is not None else state.queue)

    def _paused_runs(self, part: PartitionRuns, body: PauseChanged) -> dict[str, RunState]:
        """The live runs of a partition that a PauseChanged is about."""
        out: dict[str, RunState] = {}
        for st in part.live_runs():
            if body.scope == PAUSE_TASK:
                hit = st.task_id == body.name
            else:
                task = self.registry.find(st.task_id)
                hit = (task.queue.name if task is not None else st.queue) == body.name
            if hit:
                out[st.run_id] = st
        return out

    # --- admission to limited queues -------------------------------------

    def _ask_slot(self, state: RunState, queue: Queue) -> None:
        rid = state.run_id
        if rid in self._asked:
            return
        rate = queue.rate_limit
        body = SlotRequested(
            queue.name, state.concurrency_key, state.priority, state.created_at,
            queue.concurrency_limit, queue.key_limit,
            rate.limit if rate else None, rate.period_ms if rate else None,
        )
        self._asked[rid] = body
        fut = self._admission.request(rid, state.task_id, body)

        def failed(f: asyncio.Future[int]) -> None:
            if not f.cancelled() and f.exception() is not None and self._asked.get(rid) is body:
                # Ask again on the next reaction to this run.
                del self._asked[rid]
                log.warning("slot request failed", run_id=rid, error=str(f.exception()))

        fut.add_done_callback(failed)

    def _withdraw(self, state: RunState, reason: str) -> None:
        """Give back a slot asked for (or granted too late) by a run that no longer wants it."""
        asked = self._asked.pop(state.run_id)
        self._background_future(self._admission.release(
            state.run_id, state.task_id, SlotReleased(asked.queue, asked.concurrency_key, reason)))

    def _background_future(self, fut: asyncio.Future[int]) -> None:
        def done(f: asyncio.Future[int]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.warning("could not append to the queues topic", error=str(f.exception()))

        fut.add_done_callback(done)

    def _expire(self, state: RunState) -> None:
        rid = state.run_id
        if rid in self._expiring or state.expires_at is None:
            return
        self._expiring.add(rid)
        self._ready.discard(rid)
        if rid in self._asked:
            self._withdraw(state, EXPIRED)
        self._emit(state, RunExpired(state.expires_at)).add_done_callback(
            lambda _: self._expiring.discard(rid))

    def _state(self, run_id: str) -> RunState | None:
        part = self._parts.get(partition_for(run_id.encode(), self._nparts))
        return None if part is None else part.runs.get(run_id)

    def _on_timer(self, run_id: str, kind: str) -> None:
        state = self._state(run_id)
        if state is None or run_id in self._active:
            return
        now = self.clock()
        if kind == RESUME and state.status == SUSPENDED and state.wake_at is not None and state.wake_at <= now:
            due = [s for s in state.steps.values()
                   if s.status == "waiting" and s.wake_at is not None and s.wake_at <= now]
            for s in due:
                self._emit(state, RunResumed(s.step, "timer" if s.name == SLEEP else "timeout"))
                if s.name == EVENT:
                    self._forget_wait(run_id, s.step)
        elif kind == START and self._runnable(state, now):
            self._enqueue(state)
            self._pump()
        elif kind == EXPIRE and state.status == PENDING and state.started_at is None:
            self._expire(state)

    def _forget_wait(self, run_id: str, step: int) -> None:
        """Drop a timed-out event wait from the router's table. Best effort:
        a leftover entry only costs a WaitCompleted the fold ignores."""
        t = asyncio.create_task(unregister(self.log, self.topics.waits, run_id, step))
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    def _runnable(self, state: RunState, now: int) -> bool:
        if state.status == PENDING:
            return state.not_before is None or state.not_before <= now
        if state.status == RETRYING:
            return state.retry_at is None or state.retry_at <= now
        return state.status == RUNNING and state.run_id in self._recover

    def _pump(self) -> None:
        now = self.clock()
        while len(self._active) < self.concurrency:
            nxt = self._ready.pop()
            if nxt is None:
                return
            rid, queue = nxt
            state = self._state(rid)
            if state is None or rid in self._active or not self._runnable(state, now) or self._held(state):
                self._ready.release(queue)
                continue
            if state.expires_at is not None and state.started_at is None and state.expires_at <= now:
                self._ready.release(queue)
                self._expire(state)
                continue
            if state.slot is not None:
                self._holding[rid] = (state.slot, state.concurrency_key, state.task_id)
            self._recover.discard(rid)
            self._active[rid] = asyncio.create_task(self._run(state, queue), name=f"run-{rid}")

    # --- executing -------------------------------------------------------

    def _emit(self, state: RunState, body: Body, traceparent: str | None = None,
              outgoing: Sequence[Outgoing] = ()) -> asyncio.Future[int]:
        assert self._appender is not None
        rid = state.run_id
        p = partition_for(rid.encode(), self._nparts)
        epoch = self._epoch.get(p)
        if epoch is None:
            # The partition was revoked while this attempt went on (its code
            # swallowed the cancellation). Whatever it says now, the next
            # owner decides: write nothing, and end the attempt as a revoke
            # does. (Written, it would carry epoch 0, which every fold drops,
            # but a reader that started after the last claim, such as a
            # client awaiting a result, could not tell it was stale.)
            revoked: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            revoked.cancel()
            return revoked
        seq = max(self._seq.get(rid, 0), state.seq) + 1
        self._seq[rid] = seq
        ev = Event(new_event_id(), body.TYPE, rid, state.task_id, seq, self.clock(),
                   epoch, body, traceparent)
        if rid in self._holding and isinstance(body, _ENDS_ATTEMPT):
            # The user's code is done: free the slot, durably, before the
            # outcome is recorded. In the other order a crash between the two
            # would leave the slot held by a run that has ended.
            queue, key, task_id = self._holding.pop(rid)
            self._gates[rid] = self._admission.release(
                rid, task_id, SlotReleased(queue, key, body.TYPE))
        gate = self._gates.get(rid)
        if gate is None:
            return self._appender.submit(ev, rid.encode(), p, outgoing)
        if gate.done():
            del self._gates[rid]
            if not gate.cancelled() and gate.exception() is not None:
                log.warning("slot release failed; the slot may stay held", run_id=rid,
                            error=str(gate.exception()))
            return self._appender.submit(ev, rid.encode(), p, outgoing)
        # Later events of the run queue up behind the release, in order
        # (done-callbacks run in the order they were added).
        out: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def submit(_: asyncio.Future[int]) -> None:
            assert self._appender is not None
            inner = self._appender.submit(ev, rid.encode(), p, outgoing)
            inner.add_done_callback(lambda f: _copy_result(f, out))

        gate.add_done_callback(submit)
        return out

    def _request(self, run_id: str, task_id: str, body: Body) -> asyncio.Future[int]:
        """Append a request (epoch 0, unfenced) to any run, owned here or not."""
        assert self._appender is not None
        ev = Event(new_event_id(), body.TYPE, run_id, task_id, 0, self.clock(), 0, body)
        return self._appender.submit(ev, run_id.encode(), partition_for(run_id.encode(), self._nparts))

    async def _unregister_wait(self, run_id: str, step: int) -> None:
        await unregister(self.log, self.topics.waits, run_id, step)

    async def _register_wait(self, entry: WaitEntry) -> None:
        await register(self.log, self.topics.waits, entry)
        if entry.lookback:
            # Registered first, then searched: an event the search does not
            # reach was appended after the wait, and the router offers it.
            seen = await find_past_event(self.log, self.topics.events, entry)
            if seen is not None:
                await self._request(entry.run_id, entry.task_id,
                                    WaitCompleted(entry.step, EVENT, seen.event_id, seen.raw))
                self._forget_wait(entry.run_id, entry.step)

    async def _run(self, state: RunState, queue: str) -> None:
        rid = state.run_id
        outcome_offset: int | None = None
        if self.client is not None:
            bind_client(self.client)  # this attempt's own context copy
        # The attempt's span, current while it runs; its events carry its context.
        span = tracing.start_attempt(rid, state.task_id, state.attempt, self._trace_parents.get(rid))
        tp = span.traceparent
        try:
            try:
                task = self.registry.get(state.task_id)
            except UnknownTask as exc:
                info = error_info(exc, retriable=False)
                span.record_failure(exc)
                self._emit(state, RunFailed(info, state.attempt), tp)
                outcome_offset = await self._emit(
                    state, RunDeadLettered(f"task {state.task_id!r} is not registered on this worker"), tp
                )
                span.ended("failed", "UnknownTask")
                return
            ctx: RunContext  # its emitter (below) refers to it
            ctx = RunContext(rid, state.task_id, state.attempt, state.steps,
                             lambda body: self._emit(state, body, tp, ctx.take_attached()),
                             self.clock, emit_log=self.log,
                             register_wait=self._register_wait, request=self._request,
                             unregister_wait=self._unregister_wait, keys=self.keys,
                             patches=state.patch_answers())
            outcome = await execute_attempt(task, state, ctx, self.worker_id, self._rng)
            span.ended(outcome.kind, outcome.detail)
            outcome_offset = outcome.offset
            self._stalled.pop(rid, None)
        except asyncio.CancelledError:
            if rid not in self._cancel_requested:
                raise  # shutdown or revocation: the next owner resumes the run
            span.ended("cancelled")
        except Exception as exc:
            # Recording the outcome failed (the log is down). The run stays
            # live on the log; nothing on it will wake this worker again, so
            # it tries the attempt again itself, backing off, for as long
            # as it owns the run (a new owner resumes it anyway).
            log.exception("could not record attempt outcome", run_id=rid)
            span.record_failure(exc)
            span.ended("error", "could not record the outcome")
            self._retry_unrecorded(rid)
        finally:
            span.close()  # first: runs started from here must not inherit its context
            holding = self._holding.pop(rid, None)
            if holding is not None and rid in self._cancel_requested:
                queue_name, key, task_id = holding
                self._background_future(self._admission.release(
                    rid, task_id, SlotReleased(queue_name, key, CANCELLED)))
            # Otherwise (revoked, shutting down) the run keeps its slot: its
            # next owner resumes it as a holder.
            self._cancel_requested.discard(rid)
            self._active.pop(rid, None)
            self._ready.release(queue)
            if not self._stopping:
                # If the outcome was already read back while this attempt was
                # winding down, its reaction was skipped (the run was still
                # active): react now. Otherwise the tail reacts when it folds it.
                part = self._parts.get(partition_for(rid.encode(), self._nparts))
                if outcome_offset is not None and part is not None:
                    if part.next_offset > outcome_offset:
                        latest = part.runs.get(rid)
                        if latest is not None:
                            self._react(latest)
                    else:
                        self._settling[rid] = outcome_offset
                self._pump()

    def _retry_unrecorded(self, rid: str) -> None:
        """Try an attempt again whose outcome the log refused, after a pause.

        Treated like a run whose owner died mid-attempt (its state on the
        log is whatever got written: running, or still pending): completed
        steps replay, the step whose checkpoint was lost runs again. The
        pause doubles up to a minute, so a log that stays down for hours
        does not re-run that step every second.
        """
        if self._stopping or partition_for(rid.encode(), self._nparts) not in self._epoch:
            return  # not ours any more: its next owner resumes it
        failures = self._stalled[rid] = self._stalled.get(rid, 0) + 1
        self._recover.add(rid)
        self._timers.schedule(self.clock() + min(60_000, 500 * 2 ** failures), rid, START)

    # --- introspection (tests, CLI) -------------------------------------

    def runs(self) -> dict[str, RunState]:
        out: dict[str, RunState] = {}
        for part in self._parts.values():
            out.update(part.runs)
        return out

    def queue_depths(self) -> dict[str, int]:
        """Runs ready to start here, by queue (the `stepline.queue.depth` gauge).

        Read from the ready queue's entries, copied first: the metrics
        exporter may call this from its own thread.
        """
        ready = self._ready
        queued = set(ready._queued)
        entries = list(ready._heap) + [e for held in list(ready._held.values()) for e in list(held)]
        by_queue: dict[str, set[str]] = {}
        for *_, run_id, queue in entries:
            if run_id in queued:
                by_queue.setdefault(queue, set()).add(run_id)
        return {q: len(ids) for q, ids in by_queue.items()}

    def run_counts(self) -> dict[str, int]:
        """Runs of the owned partitions by state (the `stepline.partition.runs` gauge)."""
        counts: dict[str, int] = {}
        for part in list(self._parts.values()):
            for st in list(part.runs.values()):
                counts[st.status] = counts.get(st.status, 0) + 1
        return counts

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def owned(self) -> frozenset[int]:
        return frozenset(self._parts)
