"""Deciding what each run of the owned partitions needs next.

Each time a run's state changes (folded from the log, or its attempt
ended), `react` looks at it once: ready to start (into the ready queue,
engine/runtime/dispatch.py, or first a slot of its limited queue,
engine/runtime/slots.py), on a timer (a delay, an expiry, a retry, a
sleep or timeout to wake from), recovered (it was running when its previous
owner died), or done. Timers (engine/runtime/timers.py) bring runs back
here when due. `pump` starts ready runs while fewer than `concurrency`
attempts run, and hands each to the executor (engine/runtime/executor.py).

`drain` is the first half of a graceful stop: no attempt starts any more,
and the running ones end at their next step boundary (or by finishing)
within a grace; the worker then gives its partitions up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from stepline.core.events import (
    PAUSE_TASK,
    ErrorInfo,
    PauseChanged,
    RunExpired,
    RunResumed,
    WaitCompleted,
)
from stepline.log.topics import DEFAULT_POOL
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
from stepline.runtime.dispatch import ReadyQueue
from stepline.runtime.executor import Ended, Executor
from stepline.runtime.fence import Fence
from stepline.runtime.owned import Owned
from stepline.runtime.slots import Slots
from stepline.runtime.timers import TimerWheel
from stepline.sdk.context import SLEEP
from stepline.sdk.task import Registry
from stepline.sdk.waits import EVENT

START = "start"
RESUME = "resume"
EXPIRE = "expire"


class Decider:
    def __init__(
        self,
        registry: Registry,
        owned: Owned,
        fence: Fence,
        slots: Slots,
        executor: Executor,
        *,
        clock: Callable[[], int],
        concurrency: int,
    ) -> None:
        self.registry = registry
        self._owned = owned
        self._fence = fence
        self._slots = slots
        self._executor = executor
        self.clock = clock
        self.concurrency = concurrency
        self.ready = ReadyQueue()
        self.timers = TimerWheel(self._on_timer, clock)
        self.stopping = False
        # Draining (a graceful stop): no attempt starts; running ones hand over at a step boundary.
        self.draining = False
        self._active: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: set[str] = set()
        # Runs found RUNNING on claim, or whose attempt could not record its
        # outcome: their attempt runs again.
        self._recover: set[str] = set()
        # Runs whose attempt ended but whose outcome is not folded yet, with
        # the outcome's offset: until then their state lags behind the truth.
        self._settling: dict[str, int] = {}
        # Runs whose last attempt could not record its outcome (the log
        # refused the append: disk full, broker down), by failures in a row.
        self._stalled: dict[str, int] = {}
        self._expiring: set[str] = set()
        # Runs woken from a sleep by their timer, not started yet, with the
        # state their RunResumed gives them: they start from it at once,
        # rather than after the event's round trip through the log and the
        # fold (see _on_timer). Dropped when started, or when the fold
        # catches up with them.
        self._woken: dict[str, RunState] = {}

    @property
    def active(self) -> int:
        return len(self._active)

    def claimed(self, live: list[RunState]) -> None:
        """A partition was claimed: put each of its live runs back where it belongs."""
        for state in live:
            if state.status == RUNNING:
                self._recover.add(state.run_id)
            self.react(state)

    def react(self, state: RunState) -> None:
        rid = state.run_id
        status = state.status
        if status == CANCELLED and state.parent_step is not None and state.parent_run_id is not None:
            # A cancelled child still answers its parent's trigger_and_wait.
            self._fence.request(state.parent_run_id, "", WaitCompleted(
                state.parent_step, "child", rid,
                error=ErrorInfo("Cancelled", "the child run was cancelled", "", False),
            ), state.parent_pool or DEFAULT_POOL)
        if rid in self._active:
            if status == CANCELLED:
                self._cancel_requested.add(rid)
                self._active[rid].cancel()
            return
        if rid in self._woken:
            if status == SUSPENDED:
                return  # the fold has not reached its RunResumed yet: it is on its way
            del self._woken[rid]  # the fold caught up (or a cancel came first): it decides
        settling = self._settling.get(rid)
        if settling is not None:
            part = self._owned.part_of(rid)
            if part is not None and part.next_offset <= settling:
                return  # this state predates the attempt's outcome
            del self._settling[rid]
        if self._slots.asked(rid) and status in TERMINAL | {SUSPENDED}:
            self._slots.withdraw(state, status)
        if status == PENDING:
            now = self.clock()
            if state.expires_at is not None and state.started_at is None:
                if state.expires_at <= now:
                    self._expire(state)
                    return
                self.timers.schedule(state.expires_at, rid, EXPIRE)
            if state.not_before is not None and state.not_before > now:
                self.timers.schedule(state.not_before, rid, START)
            else:
                self._enqueue(state)
        elif status == RETRYING and state.retry_at is not None:
            self.timers.schedule(state.retry_at, rid, START)
        elif status == SUSPENDED and state.wake_at is not None:
            self.timers.schedule(state.wake_at, rid, RESUME)
        elif status == RUNNING and rid in self._recover:
            self._enqueue(state)
        else:
            self.ready.discard(rid)
            if status not in (RUNNING,):
                self._fence.forget(rid)

    def _enqueue(self, state: RunState) -> None:
        task = self.registry.find(state.task_id)
        if self._held(state):
            self.ready.discard(state.run_id)  # it starts when resumed, in its usual order
            return
        if task is not None and task.queue.limited:
            if state.slot is None:
                self._slots.ask(state, task.queue)
                return
            # Admitted by the queue's owner, for all workers: no local limit.
            self._slots.granted(state.run_id)
            self.ready.push(state.run_id, task.queue.name, None, state.priority, state.created_at)
            return
        queue, limit = (task.queue.name, task.queue.concurrency_limit) if task else ("", None)
        self.ready.push(state.run_id, queue, limit, state.priority, state.created_at)

    # --- pauses (engine/client/pause.py) ----------------------------------------

    def _held(self, state: RunState) -> bool:
        """Whether a pause holds this run back from a new attempt.

        Runs of limited queues are held by the queue's owner instead (it
        grants no slot while paused, so they keep their place in the queue),
        and an attempt already under way (RUNNING, recovered after its
        worker died) finishes: a pause stops starts, not work.
        """
        part = self._owned.part_of(state.run_id)
        if part is None or not part.paused or state.status == RUNNING:
            return False
        task = self.registry.find(state.task_id)
        if task is not None and task.queue.limited:
            return False
        return part.is_paused(state.task_id, task.queue.name if task is not None else state.queue)

    def paused_runs(self, part: PartitionRuns, body: PauseChanged) -> dict[str, RunState]:
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

    # --- timers ------------------------------------------------------------

    def _expire(self, state: RunState) -> None:
        rid = state.run_id
        if rid in self._expiring or state.expires_at is None:
            return
        self._expiring.add(rid)
        self.ready.discard(rid)
        if self._slots.asked(rid):
            self._slots.withdraw(state, EXPIRED)
        self._fence.emit(state, RunExpired(state.expires_at)).add_done_callback(
            lambda _: self._expiring.discard(rid))

    def _on_timer(self, run_id: str, kind: str) -> None:
        state = self._owned.state(run_id)
        if state is None or run_id in self._active:
            return
        now = self.clock()
        if kind == RESUME and state.status == SUSPENDED and state.wake_at is not None and state.wake_at <= now:
            if run_id in self._woken:
                return  # woken already (a second timer entry of the same sleep)
            due = [s for s in state.steps.values()
                   if s.status == "waiting" and s.wake_at is not None and s.wake_at <= now]
            # Only plain sleeps: a timer branch of wait_for_any (a group) can
            # lose to a sibling whose resolution is on the log, unread yet.
            if due and all(s.name == SLEEP and s.group is None for s in due):
                self._wake(state, [s.step for s in due])
                return
            for s in due:
                self._fence.emit(state, RunResumed(s.step, "timer" if s.name == SLEEP else "timeout"))
                if s.name == EVENT:
                    self._executor.forget_wait(run_id, s.step)
        elif kind == START and self._runnable(state, now):
            self._enqueue(state)
            self.pump()
        elif kind == EXPIRE and state.status == PENDING and state.started_at is None:
            self._expire(state)

    def _wake(self, state: RunState, steps: list[int]) -> None:
        """Resume a run whose sleeps are over, and start it without waiting
        to read its RunResumed back.

        A plain sleep ends only by its timer (a timeout of an event wait, or
        a timer branch of wait_for_any, can lose to an event or a sibling
        already on the log, so those go the long way round): the
        run's next state is known here, and its attempt's events queue up
        behind the RunResumed on the same partition, in order. The claim's
        epoch guards it as it guards every attempt: revoked, nothing is
        written and nothing starts; superseded, the fold drops the
        RunResumed and everything after it. It cannot start twice: a run
        in `_woken` or running ignores its own RunResumed when the fold
        gets there (react), and pump takes it out of `_woken` as it starts it.
        """
        rid = state.run_id
        woken: RunState | None = state
        appended: list[asyncio.Future[int]] = []
        for step in steps:
            assert woken is not None
            out = self._fence.emit_folded(woken, RunResumed(step, "timer"))
            if out is None:
                return  # the partition is no longer ours
            woken, fut = out
            appended.append(fut)
        assert woken is not None
        for fut in appended:
            fut.add_done_callback(lambda f: self._resume_failed(rid, f))
        if woken.status != PENDING:
            return  # still asleep in another wait: the fold reacts as usual
        self._woken[rid] = woken
        self._enqueue(woken)
        self.pump()

    def _resume_failed(self, rid: str, appended: asyncio.Future[int]) -> None:
        """The log refused a RunResumed the run was started on: stop that
        attempt (its next owner, or this worker's timer, resumes the run
        from what the log says) and try the wake again in a while."""
        if appended.cancelled() or appended.exception() is None:
            return
        self._woken.pop(rid, None)
        self.ready.discard(rid)
        task = self._active.get(rid)
        if task is not None:
            task.cancel()
        if not self.stopping:
            self.timers.schedule(self.clock() + 1_000, rid, RESUME)

    # --- starting attempts -------------------------------------------------

    def _runnable(self, state: RunState, now: int) -> bool:
        if state.status == PENDING:
            return state.not_before is None or state.not_before <= now
        if state.status == RETRYING:
            return state.retry_at is None or state.retry_at <= now
        return state.status == RUNNING and state.run_id in self._recover

    def pump(self) -> None:
        if self.draining:
            return  # the runs wait for their partitions' next owner
        now = self.clock()
        while len(self._active) < self.concurrency:
            nxt = self.ready.pop()
            if nxt is None:
                return
            rid, queue = nxt
            state = self._owned.state(rid)
            woken = self._woken.pop(rid, None)
            if woken is not None and state is not None and state.status == SUSPENDED:
                state = woken  # its RunResumed is on its way to the fold
            if state is None or rid in self._active or not self._runnable(state, now) or self._held(state):
                self.ready.release(queue)
                continue
            if state.expires_at is not None and state.started_at is None and state.expires_at <= now:
                self.ready.release(queue)
                self._expire(state)
                continue
            self._slots.hold(state)
            self._recover.discard(rid)
            self._active[rid] = asyncio.create_task(self._attempt(state, queue), name=f"run-{rid}")

    async def _attempt(self, state: RunState, queue: str) -> None:
        rid = state.run_id
        ended: Ended | None = None
        try:
            ended = await self._executor.run(state, self._cancel_requested.__contains__)
            if ended.unrecorded:
                self._retry_unrecorded(rid)
            elif ended.executed:
                self._stalled.pop(rid, None)
        finally:
            self._cancel_requested.discard(rid)
            self._active.pop(rid, None)
            self.ready.release(queue)
            if not self.stopping:
                # If the outcome was already read back while this attempt was
                # winding down, its reaction was skipped (the run was still
                # active): react now. Otherwise the tail reacts when it folds it.
                outcome_offset = None if ended is None else ended.offset
                part = self._owned.part_of(rid)
                if outcome_offset is not None and part is not None:
                    if part.next_offset > outcome_offset:
                        latest = part.runs.get(rid)
                        if latest is not None:
                            self.react(latest)
                    else:
                        self._settling[rid] = outcome_offset
                self.pump()

    def _retry_unrecorded(self, rid: str) -> None:
        """Try an attempt again whose outcome the log refused, after a pause.

        Treated like a run whose owner died mid-attempt (its state on the
        log is whatever got written: running, or still pending): completed
        steps replay, the step whose checkpoint was lost runs again. The
        pause doubles up to a minute, so a log that stays down for hours
        does not re-run that step every second.
        """
        if self.stopping or self._owned.partition_of(rid) not in self._owned.epochs:
            return  # not ours any more: its next owner resumes it
        failures = self._stalled[rid] = self._stalled.get(rid, 0) + 1
        self._recover.add(rid)
        self.timers.schedule(self.clock() + min(60_000, 500 * 2 ** failures), rid, START)

    async def drain(self, grace: float) -> int:
        """Start no attempt any more, and give the running ones up to `grace`
        seconds to end: each stops before its next step (engine/sdk/context.py,
        `Handover`) or ends by itself. How many still run after that (the
        caller cancels them). Cancelling the drain only stops the waiting."""
        self.draining = True
        self._executor.handover.set()
        running = list(self._active.values())
        if running and grace > 0:
            await asyncio.wait(running, timeout=grace)
        return sum(not t.done() for t in running)

    def stop_attempts(self, partitions: frozenset[int]) -> list[asyncio.Task[None]]:
        """Cancel the attempts of runs in these partitions (being revoked)."""
        for rid in [r for r in self._woken if self._owned.partition_of(r) in partitions]:
            del self._woken[rid]
        doomed = [t for rid, t in self._active.items() if self._owned.partition_of(rid) in partitions]
        for t in doomed:
            t.cancel()
        return doomed
